"""Linear memory: every access goes canonical -> LASS -> paging (docs/machine.md "Checks").

Bytes wrap modulo 2^64 and every byte is checked; a page-crossing access is checked page by
page from the lowest address, and the first faulting piece decides. Stores are held back until the
instruction completes, so a faulting instruction leaves no memory or trace effect (faults are
precise); Accessed/Dirty bits set by the walks of allowed pieces do stay, as on hardware.
"""

from __future__ import annotations

from typing import Final

from lassfuzz.arch import MASK64, PAGE_MASK, PAGE_SIZE, VEC_GP, VEC_SS
from lassfuzz.model.faults import CpuFault
from lassfuzz.model.lass import Kind, Verdict, check_access
from lassfuzz.model.observe import Observer
from lassfuzz.model.paging import Tlb, translate
from lassfuzz.model.physical import PhysicalMemory
from lassfuzz.model.state import Cpu
from lassfuzz.outcome import Access

#: The longest x86 instruction (SDM Vol. 2 2.3.11).
MAX_INSTRUCTION_LENGTH: Final = 15


def is_canonical(address: int, la57: bool = False) -> bool:
    """Canonical form (SDM Vol. 1 3.3.7.1): bits 63:47 all equal with 4-level paging, bits
    63:56 with 5-level paging (CR4.LA57 = 1, SDM Vol. 3A 4.1.1)."""
    if la57:
        return (address >> 56) in (0, 0xFF)
    return (address >> 47) in (0, 0x1FFFF)


def first_noncanonical(address: int, la57: bool) -> int:
    """The first non-canonical byte of an access starting at ``address`` whose last byte is
    not canonical: the start itself, or the first address past the lower canonical half."""
    if not is_canonical(address, la57):
        return address
    return 1 << 56 if la57 else 1 << 47


class Location:
    """A checked data access: linear address, size and its physical pieces (frame, offset, n);
    ``implicit`` is what the trace records for it (docs/machine.md "Descriptor tables")."""

    __slots__ = ("address", "implicit", "pieces", "size")

    def __init__(
        self,
        address: int,
        size: int,
        pieces: list[tuple[bytearray, int, int]],
        implicit: bool = False,
    ) -> None:
        self.address = address
        self.size = size
        self.pieces = pieces
        self.implicit = implicit


class LinearMemory:
    """The access path of one run, with the per-instruction pending stores and trace."""

    __slots__ = (
        "_checked",
        "_fetch_pages",
        "_pending",
        "_pending_trace",
        "cpu",
        "observer",
        "phys",
        "tlb",
        "trace",
    )

    def __init__(
        self, cpu: Cpu, phys: PhysicalMemory, *, trace: bool, observer: Observer | None = None
    ) -> None:
        self.cpu = cpu
        self.observer = observer
        self.phys = phys
        self.tlb = Tlb()
        self._fetch_pages: dict[int, bytearray] = {}
        self._checked: dict[int, bytearray] = {}
        self._pending: list[tuple[bytearray, int, bytes]] = []
        self.trace: list[Access] | None = [] if trace else None
        self._pending_trace: list[Access] = []

    # ---- checks ------------------------------------------------------------------------------

    def locate(
        self, address: int, size: int, kind: Kind, *, stack: bool, implicit: bool = False
    ) -> Location:
        """Check a data access of ``size`` bytes at linear ``address`` and find its frames.

        ``kind`` is READ or WRITE (read-modify-write instructions check as WRITE); ``stack``
        selects #SS over #GP (LASS.md §4; SDM Vol. 3A 6.15 for the canonical check).
        """
        cpu = self.cpu
        offset = address & ~PAGE_MASK
        key = -1
        if offset + size <= PAGE_SIZE:
            # An access within one page that was allowed before, with the same inputs, is
            # allowed again with no side effect: the page decides canonicality and the LASS
            # half, the walk is cached (self.tlb) and its leaf already has its A (and for a
            # write D) bit. The inputs are the page, kind, stack, implicit, RFLAGS.AC, CPL and
            # CS.L (in the key) and CR0/CR3/CR4/EFER (changed only with flush_tlb).
            key = (
                (address & PAGE_MASK) | (kind is Kind.WRITE) | stack << 1 | implicit << 2
                | (cpu.rflags >> 15 & 8) | cpu.cpl << 4 | cpu.cs_l << 6
            )  # fmt: skip
            frame = self._checked.get(key)
            if frame is not None:
                if self.observer is not None:
                    self.observer.access(cpu, address, size, kind, implicit=implicit, stack=stack)
                return Location(address, size, [(frame, offset, size)], implicit)
        # 1. Canonical: with sizes <= 16 the first and last byte decide (SDM Vol. 1 3.3.7.1).
        last = (address + size - 1) & MASK64
        la57 = cpu.la57
        if not (is_canonical(address, la57) and is_canonical(last, la57)):
            bad = first_noncanonical(address, la57)
            raise CpuFault(
                VEC_SS if stack else VEC_GP, 0,
                f"non-canonical {'stack' if stack else 'data'} access at {bad:#x}",
                access=kind.value, address=bad,
            )  # fmt: skip
        # 2. LASS, before paging: a violation walks nothing and sets no A/D bit (LASS.md §4).
        if self.observer is not None:
            self.observer.access(cpu, address, size, kind, implicit=implicit, stack=stack)
        # Implicit accesses (GDT/LDT/IDT/TSS) use 64-bit linear addresses in IA-32e mode even
        # from compatibility mode, where only segment-relative addresses are 32-bit (bit 63 =
        # 0): docs/machine.md "Modes".
        decision = check_access(
            address, size, kind, implicit=implicit, stack=stack, cpl=cpu.cpl,
            cr4=cpu.cr4, rflags=cpu.rflags, efer=cpu.efer, cs_l=cpu.cs_l or implicit,
        )  # fmt: skip
        if decision.verdict is Verdict.VIOLATION:
            assert decision.vector is not None
            raise CpuFault(
                decision.vector, 0, decision.rule, access=kind.value, address=decision.address
            )
        # 3. Paging, page by page from the lowest address (docs/machine.md "Checks"): for an
        # access that wraps past 2^64 that is page 0, before the top page it starts in.
        write = kind is Kind.WRITE
        user = cpu.cpl == 3 and not implicit
        if key >= 0:  # one page
            frame = self.phys.frame(
                translate(
                    self.phys, self.tlb, address, write=write, fetch=False, user=user,
                    implicit=implicit, cr0=cpu.cr0, cr3=cpu.cr3, cr4=cpu.cr4, efer=cpu.efer,
                    rflags=cpu.rflags,
                )
            )  # fmt: skip
            self._checked[key] = frame
            return Location(address, size, [(frame, offset, size)], implicit)
        spans = []
        linear = address
        remaining = size
        while remaining:
            length = min(remaining, PAGE_SIZE - (linear & ~PAGE_MASK))
            spans.append((linear, length))
            linear = (linear + length) & MASK64
            remaining -= length
        physical = {}
        for linear, _ in sorted(spans) if len(spans) > 1 else spans:
            physical[linear] = translate(
                self.phys, self.tlb, linear, write=write, fetch=False, user=user,
                implicit=implicit, cr0=cpu.cr0, cr3=cpu.cr3, cr4=cpu.cr4, efer=cpu.efer,
                rflags=cpu.rflags,
            )  # fmt: skip
        pieces = [
            (self.phys.frame(physical[linear]), physical[linear] & ~PAGE_MASK, length)
            for linear, length in spans
        ]
        return Location(address, size, pieces, implicit)

    def fetch_page(self, address: int) -> bytearray:
        """Check an instruction fetch from ``address``'s page and return that page's frame.

        Within one page every byte has the same half and the same translation, so the check of
        the page stands for the check of every instruction byte on it. The result is cached
        until a TLB flush (the inputs, CPL, CR0/CR3/CR4 and EFER, change only with one).
        """
        key = (address & PAGE_MASK) | (self.cpu.rflags >> 18 & 1)  # AC, an input of the check
        frame = self._fetch_pages.get(key)
        if frame is not None:
            return frame
        cpu = self.cpu
        if not is_canonical(address, cpu.la57):
            raise CpuFault(VEC_GP, 0, f"fetch from non-canonical {address:#x}", access="fetch",
                           address=address)  # fmt: skip
        length = PAGE_SIZE - (address & ~PAGE_MASK)
        if self.observer is not None:
            self.observer.access(cpu, address, length, Kind.FETCH, implicit=False, stack=False)
        decision = check_access(
            address, length, Kind.FETCH, implicit=False, stack=False, cpl=cpu.cpl,
            cr4=cpu.cr4, rflags=cpu.rflags, efer=cpu.efer, cs_l=cpu.cs_l,
        )  # fmt: skip
        if decision.verdict is Verdict.VIOLATION:
            raise CpuFault(VEC_GP, 0, decision.rule, access="fetch", address=decision.address)
        physical = translate(
            self.phys, self.tlb, address, write=False, fetch=True, user=cpu.cpl == 3,
            implicit=False, cr0=cpu.cr0, cr3=cpu.cr3, cr4=cpu.cr4, efer=cpu.efer,
            rflags=cpu.rflags,
        )  # fmt: skip
        frame = self.phys.frame(physical)
        self._fetch_pages[key] = frame
        return frame

    def privilege_changed(self) -> None:
        """CPL or CS.L changed (event delivery, IRETQ, SYSCALL/SYSRET): the cached fetch checks
        depend on both, the cached translations on neither (the data checks key on both)."""
        self._fetch_pages.clear()

    def flush_tlb(self) -> None:
        """MOV CR0/CR3/CR4 and INVLPG invalidate cached translations (docs/machine.md)."""
        self.tlb.clear()
        self._fetch_pages.clear()
        self._checked.clear()

    # ---- data --------------------------------------------------------------------------------

    def load(self, location: Location) -> int:
        """The little-endian value at a checked location; traced as a read."""
        pieces = location.pieces
        if len(pieces) == 1 and not self._pending:
            frame, offset, length = pieces[0]
            value = int.from_bytes(frame[offset : offset + length], "little")
        else:
            value = int.from_bytes(b"".join(self._forwarded(piece) for piece in pieces), "little")
        if self.trace is not None:
            self._pending_trace.append(
                Access("read", location.address, location.size, value, location.implicit)
            )
        return value

    def _forwarded(self, piece: tuple[bytearray, int, int]) -> bytes:
        """A piece's bytes as this instruction sees them: memory overlaid with its own earlier
        pending stores, in program order (ENTER reads what it has just pushed)."""
        frame, offset, length = piece
        chunk = bytearray(frame[offset : offset + length])
        for pending_frame, pending_offset, data in self._pending:
            if pending_frame is frame:
                low = max(offset, pending_offset)
                high = min(offset + length, pending_offset + len(data))
                if low < high:
                    chunk[low - offset : high - offset] = data[
                        low - pending_offset : high - pending_offset
                    ]
        return bytes(chunk)

    def store(self, location: Location, value: int) -> None:
        """Queue a store to a checked location until the instruction completes."""
        data = value.to_bytes(location.size, "little")
        start = 0
        for frame, offset, length in location.pieces:
            self._pending.append((frame, offset, data[start : start + length]))
            start += length
        if self.trace is not None:
            self._pending_trace.append(
                Access("write", location.address, location.size, value, location.implicit)
            )

    def read(self, address: int, size: int, *, stack: bool) -> int:
        return self.load(self.locate(address, size, Kind.READ, stack=stack))

    def write(self, address: int, size: int, value: int, *, stack: bool) -> None:
        self.store(self.locate(address, size, Kind.WRITE, stack=stack), value)

    # ---- instruction boundaries ------------------------------------------------------------

    def commit(self) -> None:
        """The instruction (or REP iteration) completed: apply its stores and trace."""
        for frame, offset, data in self._pending:
            frame[offset : offset + len(data)] = data
        self._pending.clear()
        if self.trace is not None and self._pending_trace:
            self.trace.extend(self._pending_trace)
            self._pending_trace.clear()

    def discard(self) -> None:
        """The instruction faulted: drop its stores and trace entries."""
        self._pending.clear()
        self._pending_trace.clear()
