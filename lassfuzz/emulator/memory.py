"""Linear-memory accesses the shim makes itself, with the machine's checks.

When the shim emulates an instruction (descriptor loads, event delivery, IRETQ, SGDT...) it
reads and writes guest memory directly, so it must apply what the TLB-fill hook applies to
QEMU's accesses — canonical check, LASS (the policy, told whether the access is implicit),
paging with A/D updates — and record the access in the trace. Implicit supervisor accesses
(descriptor tables, IDT, TSS) are paged as supervisor accesses with RFLAGS.AC ignored
(docs/machine.md, "Descriptor tables").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from unicorn.x86_const import UC_X86_REG_EFLAGS

from lassfuzz.arch import (
    CR4_SMAP,
    MASK64,
    PAGE_SIZE,
    PTE_A,
    PTE_D,
    RFLAGS_AC,
    VEC_GP,
    VEC_PF,
    VEC_SS,
)
from lassfuzz.emulator.paging import MmuState, Walk, WalkUnsupported, updated_leaf
from lassfuzz.emulator.shim import is_canonical
from lassfuzz.outcome import Access, Fault

if TYPE_CHECKING:
    from lassfuzz.emulator.shim import CaseRun


class SystemFault(Exception):
    """An exception raised by an access or a check the shim performs itself."""

    def __init__(self, fault: Fault, detail: str) -> None:
        super().__init__(detail)
        self.fault = fault
        self.detail = detail


class SystemUnsupported(Exception):
    """Something the machine does not model met during emulation: the message names it."""


def gp(code: int, rip: int, detail: str) -> SystemFault:
    return SystemFault(Fault(VEC_GP, code, rip), detail)


@dataclass(frozen=True)
class _Piece:
    address: int
    size: int
    page: int


class Memory:
    """The shim's own linear accesses for one run, at the run's current CPL and flags."""

    def __init__(self, run: CaseRun) -> None:
        self.run = run
        #: Frames of single-page accesses already allowed, by page and everything the checks
        #: and the walk read (see _translate): the TLB of the shim's own accesses.
        self._allowed: dict[tuple[object, ...], int] = {}
        #: Frames of mapped pages for :meth:`physical`, which sets no A/D bit.
        self._mapped: dict[tuple[int, ...], int] = {}

    def read(
        self, address: int, size: int, rip: int, *, implicit: bool, stack: bool = False
    ) -> int:
        """Read ``size`` bytes at linear ``address`` (little-endian value); raises
        :class:`SystemFault` for the access's fault, attributed to the instruction at ``rip``."""
        data = b"".join(
            self.run.uc.mem_read(frame, piece.size)
            for piece, frame in self._translate(address, size, "read", rip, implicit, stack)
        )
        value = int.from_bytes(data, "little")
        self.trace_access("read", address, size, value, implicit, rip)
        return value

    def write(
        self,
        address: int,
        value: int,
        size: int,
        rip: int,
        *,
        implicit: bool,
        stack: bool = False,
    ) -> None:
        """Write ``size`` bytes of ``value`` at linear ``address``, all checks first."""
        pieces = self.prepare_write(address, size, rip, implicit=implicit, stack=stack)
        self.commit_write(pieces, address, value, size, rip, implicit=implicit)

    def prepare_write(
        self, address: int, size: int, rip: int, *, implicit: bool, stack: bool = False
    ) -> list[tuple[int, int]]:
        """Every check and page walk of a write (A/D set), without writing: the (physical
        address, size) pieces for :meth:`commit_write`."""
        translated = self._translate(address, size, "write", rip, implicit, stack)
        return [(frame, piece.size) for piece, frame in translated]

    def commit_write(
        self,
        pieces: list[tuple[int, int]],
        address: int,
        value: int,
        size: int,
        rip: int,
        *,
        implicit: bool,
    ) -> None:
        """Store a write prepared by :meth:`prepare_write` and trace it."""
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        offset = 0
        for physical, length in pieces:
            self.run.uc.mem_write(physical, data[offset : offset + length])
            self.run.written_frames.add(physical & ~(PAGE_SIZE - 1))
            offset += length
        self.trace_access("write", address, size, int.from_bytes(data, "little"), implicit, rip)

    def would_fault(self, address: int, size: int, kind: str) -> bool:
        """Whether an explicit access at the current CPL would fault (canonical, LASS,
        paging), without any side effect."""
        run = self.run
        mmu = run.mmu()
        for piece in self._pieces(address, size):
            last = (piece.address + piece.size - 1) & MASK64
            if not (is_canonical(piece.address, run.bits) and is_canonical(last, run.bits)):
                return True
            if run.lass_active and run.ask_policy(piece.address, piece.size, kind, mmu):
                return True
            result = self._walk(piece.page, mmu)
            if not result.allows(kind):
                return True
        return False

    def trusted_read(self, address: int, size: int) -> int | None:
        """Boot-time read: no check, no A/D bit, no trace; None if some byte is not mapped."""
        pieces = self.physical(address, size)
        if pieces is None:
            return None
        data = b"".join(self.run.uc.mem_read(frame, size) for frame, size in pieces)
        return int.from_bytes(data, "little")

    def physical(self, address: int, size: int) -> list[tuple[int, int]] | None:
        """The (physical address, size) pieces of a linear range, without any check or A/D
        bit (None if some byte is not mapped)."""
        run = self.run
        mmu = MmuState(0, run.cr0, run.cr4 & ~CR4_SMAP, 0, run.efer)
        pieces = []
        for piece in self._pieces(address, size):
            # A page's mapping is fixed for a given CR3 (the tables change only in A/D bits).
            key = (piece.page, run.cr3, run.cr0, run.cr4, run.efer)
            frame = self._mapped.get(key)
            if frame is None:
                result = self._walk(piece.page, mmu)
                if not result.allows("read"):
                    return None
                frame = self._mapped[key] = result.frame
            pieces.append((frame + piece.address - piece.page, piece.size))
        return pieces

    # ------------------------------------------------------------------------------------

    def _walk(self, page: int, mmu: MmuState) -> Walk:
        run = self.run
        try:
            return run.walk(page, mmu)
        except WalkUnsupported as error:  # tables outside the case format
            raise SystemUnsupported(str(error)) from None

    def _pieces(self, address: int, size: int) -> list[_Piece]:
        """Page pieces in byte order (for an access wrapping past 2**64, the top page's bytes
        first: they are the low-order bytes of the value)."""
        pieces = []
        offset = 0
        while offset < size:
            linear = (address + offset) & MASK64
            page = linear & ~(PAGE_SIZE - 1)
            chunk = min(size - offset, page + PAGE_SIZE - linear)
            pieces.append(_Piece(linear, chunk, page))
            offset += chunk
        return pieces

    def _check_piece(self, piece: _Piece, kind: str, rip: int, implicit: bool, stack: bool) -> None:
        run = self.run
        vector = VEC_SS if stack else VEC_GP
        last = (piece.address + piece.size - 1) & MASK64
        if not (is_canonical(piece.address, run.bits) and is_canonical(last, run.bits)):
            raise SystemFault(
                Fault(vector, 0, rip, access=kind, address=piece.address),
                f"non-canonical {kind} of {piece.address:#x}",
            )
        if run.lass_active and run.ask_policy(
            piece.address, piece.size, kind, run.mmu(), implicit=implicit
        ):
            what = "implicit " if implicit else ""
            raise SystemFault(
                Fault(vector, 0, rip, access=kind, address=piece.address),
                f"LASS ({run.policy_name}) {what}{kind} of {piece.address:#x}",
            )

    def _translate(
        self, address: int, size: int, kind: str, rip: int, implicit: bool, stack: bool
    ) -> list[tuple[_Piece, int]]:
        """Check every byte, then page each piece (A/D set for allowed pieces only); the
        physical address of each piece, in byte order."""
        run = self.run
        pieces = self._pieces(address, size)
        # An access within one page that was allowed before in the same state is allowed again
        # with no new side effect: canonicality and the policy are per page (README, "Shim
        # policies"), the tables change only in A/D bits, which that access already set.
        # An event delivery pushes five words and reads three tables through here.
        key: tuple[object, ...] | None = None
        if len(pieces) == 1:
            rflags_ac = run.uc.reg_read(UC_X86_REG_EFLAGS) & RFLAGS_AC
            key = (pieces[0].page, kind, implicit, stack, run.cpl, run.cs_l, run.cr0, run.cr3,
                   run.cr4, run.efer, rflags_ac)  # fmt: skip
            frame = self._allowed.get(key)
            if frame is not None:
                return [(pieces[0], frame + address - pieces[0].page)]
        # Checks and walks go lowest page first (docs/machine.md: a wrapping access is paged
        # from page 0 first), but the pieces keep byte order for assembling the value.
        checked = sorted(pieces, key=lambda piece: piece.page)
        for piece in checked:
            self._check_piece(piece, kind, rip, implicit, stack)
        mmu = run.mmu()
        if implicit:  # supervisor access; SMAP applies whatever AC says
            mmu = MmuState(0, mmu.cr0, mmu.cr4, mmu.rflags & ~RFLAGS_AC, mmu.efer)
        frames: dict[int, int] = {}
        for piece in checked:
            result = self._walk(piece.page, mmu)
            for entry in result.accessed:
                run._set_entry_bits(entry, PTE_A)
            if not result.allows(kind):
                fault = Fault(
                    VEC_PF,
                    result.error[kind],
                    rip,
                    cr2=piece.address,
                    access=kind,
                    address=piece.address,
                )
                raise SystemFault(fault, f"#PF on {kind} of {piece.address:#x}")
            assert result.leaf is not None and result.leaf_address is not None
            run._set_entry_bits(
                result.leaf_address, updated_leaf(result.leaf, kind) & (PTE_A | PTE_D)
            )
            frames[piece.page] = result.frame + piece.address - piece.page
        if key is not None:
            self._allowed[key] = result.frame
        return [(piece, frames[piece.page]) for piece in pieces]

    def trace_access(
        self, kind: str, address: int, size: int, value: int, implicit: bool, rip: int
    ) -> None:
        """Trace mode: record an access the shim made for the instruction at ``rip``."""
        run = self.run
        if run.trace is not None:
            run.trace.append(Access(kind, address, size, value, implicit))
            run.trace_origins.append((rip, run.blocks_entered))
