"""The LASS shim: what one case run adds to Unicorn, hook by hook.

Unicorn (QEMU TCG) knows nothing of LASS. The shim supplies it at three points:

- the TLB-fill hook, which is the machine's page walk: canonical check, then LASS (the policy),
  then 4-level paging, recording why a fill was refused so the fault can be rebuilt;
- code hooks on the few instructions QEMU gets wrong for this machine (MOV CR*, CLFLUSH*, HLT,
  POPF, and everything outside the machine's scope), found by a pre-scan of the case's code;
- a CPUID hook that advertises LASS when the case says so.

One :class:`CaseRun` exists per run; the machine creates it, routes hooks to it and turns its
record into an :class:`~lassfuzz.outcome.Outcome`.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any, Final, Protocol

import iced_x86 as iced
from iced_x86 import Code, FlowControl, OpKind, Register, RegisterExt
from unicorn import UC_PROT_EXEC, UC_PROT_READ, UC_PROT_WRITE, x86_const
from unicorn.unicorn_const import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH, UC_MEM_READ, UC_MEM_WRITE
from unicorn.unicorn_py3.unicorn import uclib
from unicorn.x86_const import (
    UC_X86_REG_CR0,
    UC_X86_REG_CR3,
    UC_X86_REG_CR4,
    UC_X86_REG_EAX,
    UC_X86_REG_ECX,
    UC_X86_REG_EFLAGS,
    UC_X86_REG_FS_BASE,
    UC_X86_REG_GS_BASE,
    UC_X86_REG_RAX,
    UC_X86_REG_RBX,
    UC_X86_REG_RCX,
    UC_X86_REG_RDX,
    UC_X86_REG_RIP,
    UC_X86_REG_RSP,
)

from lassfuzz.arch import (
    CR0_AM,
    CR0_CD,
    CR0_EM,
    CR0_ET,
    CR0_MP,
    CR0_NE,
    CR0_NW,
    CR0_PE,
    CR0_PG,
    CR0_TS,
    CR0_WP,
    CR4_LASS,
    CR4_OSFXSR,
    CR4_OSXMMEXCPT,
    CR4_PAE,
    CR4_PGE,
    CR4_PSE,
    CR4_SMAP,
    CR4_SMEP,
    EFER_LMA,
    GPR_NAMES,
    MASK64,
    PAGE_SIZE,
    PTE_A,
    PTE_D,
    RFLAGS_AC,
    RFLAGS_TF,
    VEC_GP,
    VEC_PF,
    VEC_SS,
)
from lassfuzz.case import MemoryImage, TestCase
from lassfuzz.emulator.decode import (
    MAX_INSTRUCTION_BYTES,
    AccessShape,
    Intercept,
    OperandAccess,
    Prescan,
    access_shape,
    intercept_for,
    memory_accesses,
)
from lassfuzz.emulator.paging import KINDS, MmuState, Walk, WalkUnsupported, updated_leaf, walk
from lassfuzz.outcome import Access, Fault, Status
from lassfuzz.policies import Policy, PolicyAccess

CR0_DEFINED: Final = (
    CR0_PE | CR0_MP | CR0_EM | CR0_TS | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_NW | CR0_CD | CR0_PG
)
SUPPORTED_CR4: Final = (
    CR4_PSE | CR4_PAE | CR4_PGE | CR4_OSFXSR | CR4_OSXMMEXCPT | CR4_SMEP | CR4_SMAP
)
#: Unicorn's access types in the TLB-fill hook, by the shim's names.
FILL_KINDS: Final = {UC_MEM_READ: "read", UC_MEM_WRITE: "write", 18: "fetch"}
#: The top page of the supervisor half: an access leaving it wraps to page 0.
TOP_PAGE: Final = 0xFFFF_FFFF_FFFF_F000
#: How far a foreign block is decoded (QEMU's blocks are shorter; a branch ends it earlier).
MAX_BLOCK_BYTES: Final = 256
_PERMS: Final = {"read": UC_PROT_READ, "write": UC_PROT_WRITE, "fetch": UC_PROT_EXEC}
#: iced-x86 64-bit GPR ids to Unicorn register ids.
GPR_IDS: Final = {
    getattr(Register, name.upper()): getattr(x86_const, f"UC_X86_REG_{name.upper()}")
    for name in GPR_NAMES
}
_CR_IDS: Final = {
    Register.CR0: UC_X86_REG_CR0,
    Register.CR3: UC_X86_REG_CR3,
    Register.CR4: UC_X86_REG_CR4,
}
_GENU, _INEI, _NTEL = (int.from_bytes(text, "little") for text in (b"Genu", b"ineI", b"ntel"))


def is_canonical(address: int) -> bool:
    """48-bit canonical form (LA57 off): bits 63:47 all equal."""
    return (address >> 47) in (0, 0x1FFFF)


def _cr0_unsupported(value: int) -> str | None:
    """Why a CR0 value the architecture accepts is outside the machine (docs/machine.md)."""
    if value & CR0_AM:
        return "CR0.AM = 1 (alignment checking is not modelled)"
    if not value & CR0_ET:
        return f"MOV CR0, {value:#x} clears ET"
    if value & ~CR0_DEFINED:
        return f"MOV CR0, {value:#x} sets reserved bits"
    return None


def cpuid_leaf(eax: int, ecx: int, *, lass_supported: bool) -> tuple[int, int, int, int]:
    """CPUID (EAX, EBX, ECX, EDX) of the lassfuzz virtual CPU (docs/machine.md)."""
    if eax == 0:
        return 7, _GENU, _NTEL, _INEI
    if eax == 7 and ecx == 0:
        return 1, (1 << 7) | (1 << 20) | (1 << 23), 0, 0  # SMEP, SMAP, CLFLUSHOPT
    if eax == 7 and ecx == 1:
        return (1 << 6) if lass_supported else 0, 0, 0, 0
    return 0, 0, 0, 0


@dataclass(frozen=True)
class Refusal:
    """A TLB fill the shim refused: the page, the access kind, why, and the #PF error code."""

    page: int
    kind: str
    reason: str  # "canonical" | "lass" | "paging"
    error_code: int = 0
    write_error_code: int = 0  # what a write would report: a refused RMW read reports it


@dataclass(frozen=True)
class Stop:
    """A run ended by the shim itself (a hook decided the outcome)."""

    status: Status
    fault: Fault | None = None
    detail: str = ""
    rip: int | None = None  # the RIP to report, when it differs from Unicorn's


class UnicornPort(Protocol):
    """The part of a Unicorn ``Uc`` the shim uses (typed; Unicorn's x86 class is not)."""

    def reg_read(self, reg_id: int) -> int: ...
    def reg_write(self, reg_id: int, value: int) -> None: ...
    def mem_read(self, address: int, size: int) -> bytearray: ...
    def mem_write(self, address: int, data: bytes) -> None: ...
    def ctl(self, ctl: int, op: int, *args: int) -> Any: ...
    def emu_stop(self) -> None: ...


class FastPort:
    """A :class:`UnicornPort` over a ``Uc`` whose ``reg_read`` calls the C API directly.

    The binding's ``reg_read`` spends ~1.3 us choosing a register class per call; the hooks read
    RIP, RFLAGS and address registers on every fill, so this path (~0.4 us, measured) matters.
    It uses the 2.1.4 binding's ``uclib``/``_uch``, which the self-test pins.
    """

    def __init__(self, uc: Any) -> None:
        self._uc = uc
        self._read = uclib.uc_reg_read
        self._handle = uc._uch
        self._value = ctypes.c_uint64()
        self._pointer = ctypes.byref(self._value)

    def reg_read(self, reg_id: int) -> int:
        """A scalar register of up to 64 bits (GPR, RIP, EFLAGS, CRn, segment base)."""
        self._value.value = 0  # EFLAGS is written as 32 bits: clear the upper half first
        if self._read(self._handle, reg_id, self._pointer):
            return int(self._uc.reg_read(reg_id))  # the binding raises a proper UcError
        return self._value.value

    def reg_write(self, reg_id: int, value: int) -> None:
        self._uc.reg_write(reg_id, value)

    def mem_read(self, address: int, size: int) -> bytearray:
        return bytearray(self._uc.mem_read(address, size))

    def mem_write(self, address: int, data: bytes) -> None:
        self._uc.mem_write(address, data)

    def ctl(self, ctl: int, op: int, *args: int) -> Any:
        return self._uc.ctl(ctl, op, *args)

    def emu_stop(self) -> None:
        self._uc.emu_stop()


class CaseRun:
    """Per-run shim state: the case, the shadow control registers and the hooks' records.

    ``shim=False`` keeps the machine (walk, intercepts needed for the machine's semantics) and
    drops LASS: the policy is never asked and CR4.LASS is accepted as QEMU does.
    """

    def __init__(
        self,
        uc: UnicornPort,
        case: TestCase,
        image: MemoryImage,
        scan: Prescan,
        policy: Policy,
        policy_name: str,
        *,
        shim: bool,
        trace: bool,
        replay: CaseRun | None = None,
    ) -> None:
        self.uc = uc
        self.case = case
        self.image = image
        self.scan = scan
        self.policy = policy
        self.policy_name = policy_name
        self.shim = shim
        state = case.state
        self.cpl = state.cpl
        self.cr0 = state.cr0
        self.cr3 = image.cr3
        self.cr4 = state.cr4
        self.efer = state.efer
        #: The paging structures live here, not in Unicorn's memory: in virtual-TLB mode nothing
        #: but the fill hook reads them, and no linear page maps a table frame, so the walk and
        #: its A/D updates stay in Python and the outcome takes the final tables from here.
        self.tables = {frame: bytearray(image.frames[frame]) for frame in image.table_frames}
        self.code_pages = _pages_spanned(case.code_address, len(case.code) + MAX_INSTRUCTION_BYTES)
        self.refusal: Refusal | None = None
        #: Fills granted, by _fill_key: a re-run of the same case (``replay``) answers from it.
        self.granted: dict[tuple[int, ...], tuple[int, int]] = {}
        self.replay = replay
        self.foreign: dict[int, iced.Instruction] = {}  # decoded outside the pre-scan
        self.shapes: dict[int, AccessShape] = {}  # by RIP, computed on the first data fill
        self.block_start: int | None = None
        self.flags_before: tuple[int, int] | None = None  # (RIP, RFLAGS) taken by a re-run
        #: (rip, entry address, old entry) of A/D changes made since the current block started.
        self.bit_log: list[tuple[int, int, int]] = []
        self.stop: Stop | None = None
        self.frame_pages: dict[int, int] = {}
        self.exec_frames: set[int] = set()
        self.written_frames: set[int] = (
            set()
        )  # frames given WRITE permission (a re-run resets them)
        self.trace: list[Access] | None = [] if trace else None
        self.instruction_trace_start = 0
        if replay is not None:  # the first run's walks are final: share their results
            self.tables = replay.tables
            self.frame_pages = replay.frame_pages
            self.exec_frames = replay.exec_frames
            self.written_frames = replay.written_frames

    # ----------------------------------------------------------------------------- TLB fill

    def fill(self, page: int, access: int, entry: Any) -> bool:
        """The page walk for one TLB miss; False refuses the access (recorded for the fault)."""
        kind = FILL_KINDS[access]
        # Unicorn keeps RIP exact in the fill hook (measured); fetch fills need no attribution.
        if self.replay is not None:
            return self._replay_fill(page, kind, entry, self.replay)
        rip = None if kind == "fetch" else self.uc.reg_read(UC_X86_REG_RIP)
        try:
            return self._fill(page, kind, rip, entry)
        except PolicyFailure as failure:
            self.stop = Stop(Status.ERROR, detail=str(failure))
        except WalkUnsupported as error:
            self.stop = Stop(Status.UNSUPPORTED, detail=str(error))
        return False

    def _fill(self, page: int, kind: str, rip: int | None, entry: Any) -> bool:
        mmu = self.mmu()
        multi = rip is not None and self._multi_access(rip)
        if multi:
            assert rip is not None
            earlier = self._architectural_prefix(rip, kind, page, mmu)
            if earlier is not None:
                return self._refuse(earlier, rip)
        if not is_canonical(page):
            return self._refuse(Refusal(page, kind, "canonical"), rip)
        if self.lass_active and self.ask_policy(page, PAGE_SIZE, kind, mmu):
            return self._refuse(Refusal(page, kind, "lass"), rip)
        if page == TOP_PAGE and rip is not None and not multi:
            wrapped = self._walk_wrapped_piece(rip, kind, mmu)
            if wrapped is not None:
                return self._refuse(wrapped, rip)
        # QEMU reads a read-modify-write operand before writing it; paging treats the whole
        # access as a write (W = 1 in #PF, D set, no A bit when the write is refused).
        paging_kind = "write" if kind == "read" and rip and self._shape(rip).rmw else kind
        result = walk(self._read_entry, self._frame_known, self.cr3, page, mmu)
        for address in result.accessed:
            self._set_entry_bits(address, PTE_A, rip)
        if not result.allows(paging_kind):
            write_error = result.error.get("write", 0)
            refusal = Refusal(page, kind, "paging", result.error[paging_kind], write_error)
            if rip is not None and not multi:
                refusal = (
                    self._pre_paging_violation(rip, mmu)
                    or self._lower_pieces(rip, kind, paging_kind, page, mmu)
                    or refusal
                )
            return self._refuse(refusal, rip)
        if kind == "write" and page in self.code_pages:
            detail = f"self-modifying code (write to code page {page:#x})"
            self.stop = Stop(Status.UNSUPPORTED, detail=detail)
            return False
        entry.paddr = result.frame
        entry.perms = self._grant(result, paging_kind, mmu, page, rip)
        self.frame_pages[result.frame] = page
        self.granted[self._fill_key(page, kind, mmu)] = (result.frame, entry.perms)
        return True

    def _fill_key(self, page: int, kind: str, mmu: MmuState) -> tuple[int, ...]:
        """What a fill's answer depends on (QEMU's MMU index is CPL, SMAP and AC)."""
        return (page, KINDS.index(kind), mmu.rflags & RFLAGS_AC, self.cr0, self.cr3, self.cr4)

    def _replay_fill(self, page: int, kind: str, entry: Any, first: CaseRun) -> bool:
        """A re-run of the same case repeats its fills: answer them from the first run (the
        walks and their A/D updates already happened there) and refuse where it refused."""
        answer = first.granted.get(self._fill_key(page, kind, self.mmu()))
        if answer is None:
            self.refusal, self.stop = first.refusal, first.stop
            return False
        entry.paddr, entry.perms = answer
        return True

    def _refuse(self, refusal: Refusal, rip: int | None) -> bool:
        """Record a refused fill. For an instruction with one memory access, a canonical or
        LASS fault precedes the paging of *every* piece (docs/machine.md), so A/D bits its
        earlier fills set are taken back; with several accesses, those done before stay."""
        if rip is not None and refusal.reason != "paging" and not self._multi_access(rip):
            self._undo_bits(rip)
        self.refusal = refusal
        return False

    def _shape(self, rip: int) -> AccessShape:
        shape = self.shapes.get(rip)
        if shape is None:
            instruction = self.instruction_at(rip)
            shape = AccessShape(0, False) if instruction is None else access_shape(instruction)
            self.shapes[rip] = shape
        return shape

    def _multi_access(self, rip: int) -> bool:
        """Whether the instruction at ``rip`` makes several memory accesses (MOVS, CMPS,
        PUSH/POP m, CALL m): their order is architectural, QEMU's may differ."""
        return self._shape(rip).count > 1

    def _architectural_prefix(
        self, rip: int, kind: str, page: int, mmu: MmuState
    ) -> Refusal | None:
        """Perform, in architectural order (reads first, pieces by ascending page), the
        accesses of the instruction at ``rip`` that precede the piece QEMU now fills.

        Each access gets its canonical and LASS checks for every byte, then its page walks;
        the first fault wins. QEMU will repeat the walks later (A/D updates are idempotent).
        """
        instruction = self.instruction_at(rip)
        assert instruction is not None
        operands = memory_accesses(instruction, self.register, self.segment_base)
        for operand in sorted(operands, key=lambda op: op.kind != "read"):
            pieces = sorted(operand.pieces(PAGE_SIZE))
            for address, size in pieces:
                piece_page = address & ~(PAGE_SIZE - 1)
                if not is_canonical(piece_page):
                    return Refusal(piece_page, operand.kind, "canonical")
                if self.lass_active and self.ask_policy(address, size, operand.kind, mmu):
                    return Refusal(piece_page, operand.kind, "lass")
            target = operand.kind == kind and operand.covers(page, PAGE_SIZE)
            for address, _ in pieces:
                piece_page = address & ~(PAGE_SIZE - 1)
                if target and piece_page == page:
                    return None
                refusal = self._walk_piece(piece_page, operand.kind, mmu, rip)
                if refusal is not None:
                    return refusal
        return None

    def _walk_piece(self, page: int, kind: str, mmu: MmuState, rip: int) -> Refusal | None:
        """A page walk done by the shim for an access QEMU has not reached: A/D as for a real
        access, and the #PF refusal if paging forbids it."""
        result = walk(self._read_entry, self._frame_known, self.cr3, page, mmu)
        for address in result.accessed:
            self._set_entry_bits(address, PTE_A, rip)
        if not result.allows(kind):
            write_error = result.error.get("write", 0)
            return Refusal(page, kind, "paging", result.error[kind], write_error)
        assert result.leaf_address is not None and result.leaf is not None
        self._set_entry_bits(result.leaf_address, updated_leaf(result.leaf, kind), rip)
        return None

    def _lower_pieces(
        self, rip: int, kind: str, paging_kind: str, page: int, mmu: MmuState
    ) -> Refusal | None:
        """Before a refused piece, the access's lower pieces are paged as ``paging_kind``: the
        first that faults decides, the others get A (and D for a write) even though the
        access faults. QEMU may have read them from the TLB, or only read an RMW operand."""
        instruction = self.instruction_at(rip)
        if instruction is None:
            return None
        for operand in memory_accesses(instruction, self.register, self.segment_base):
            if operand.kind != kind or not operand.covers(page, PAGE_SIZE):
                continue
            for address, _ in sorted(operand.pieces(PAGE_SIZE)):
                piece_page = address & ~(PAGE_SIZE - 1)
                if piece_page >= page:
                    break
                refusal = self._walk_piece(piece_page, paging_kind, mmu, rip)
                if refusal is not None:
                    return refusal
            return None
        return None

    def _walk_wrapped_piece(self, rip: int, kind: str, mmu: MmuState) -> Refusal | None:
        """An access wrapping past 2**64 is paged from page 0 first (docs/machine.md), but QEMU
        fills the top page first: walk the page-0 piece here, before the top page's walk."""
        instruction = self.instruction_at(rip)
        if instruction is None:
            return None
        for operand in memory_accesses(instruction, self.register, self.segment_base):
            pieces = operand.pieces(PAGE_SIZE)
            if operand.kind != kind or len(pieces) < 2 or pieces[1][0] >> 12 != 0:
                continue
            if self.lass_active and self.ask_policy(pieces[1][0], pieces[1][1], kind, mmu):
                return Refusal(0, kind, "lass")
            refusal = self._walk_piece(0, "write" if operand.rmw else kind, mmu, rip)
            if refusal is not None:
                return self._pre_paging_violation(rip, mmu) or refusal
        return None

    def _pre_paging_violation(self, rip: int, mmu: MmuState) -> Refusal | None:
        """The canonical or LASS violation of some access of the instruction at ``rip``, if any.

        QEMU fills an instruction's accesses (and their page pieces) one at a time, so a #PF on
        an early one could hide a violation on a later one that architecturally comes first.
        """
        instruction = self.instruction_at(rip)
        if instruction is None:
            return None
        for operand in memory_accesses(instruction, self.register, self.segment_base):
            for address, size in operand.pieces(PAGE_SIZE):
                piece_page = address & ~(PAGE_SIZE - 1)
                if not is_canonical(piece_page):
                    return Refusal(piece_page, operand.kind, "canonical")
                if self.lass_active and self.ask_policy(address, size, operand.kind, mmu):
                    return Refusal(piece_page, operand.kind, "lass")
        return None

    def instruction_at(self, address: int) -> iced.Instruction | None:
        """The decoded instruction at ``address``: pre-scanned, or foreign code seen running."""
        return self.scan.instructions.get(address) or self.foreign.get(address)

    def check_block(self, address: int) -> Stop | None:
        """A block starts outside the pre-scanned code (a branch into a data page, or into the
        middle of an instruction). Decode it: plain instructions run (and join the decoded
        set, for fault rebuilding); one that needs an intercept cannot be hooked any more."""
        if address in self.scan.instructions or address in self.foreign:
            return None
        data = self.peek(address, MAX_BLOCK_BYTES)
        if data is None:
            return None  # the fetch itself will fault
        for instruction in iced.Decoder(64, data, ip=address):
            if instruction.code == Code.INVALID:
                break  # QEMU raises #UD there; later bytes are not this block
            if intercept_for(instruction) is not None:
                detail = f"{instruction} at {instruction.ip:#x}, outside the pre-scanned code"
                return Stop(Status.UNSUPPORTED, detail=detail)
            self.foreign[instruction.ip] = instruction
            if instruction.flow_control != FlowControl.NEXT:
                break
        return None

    def new_block(self, address: int) -> None:
        """A translated block starts (REP iterations included): A/D changes logged before it
        belong to instructions that completed and are no longer undoable."""
        self.bit_log.clear()
        self.block_start = address

    def flags_may_be_stale(self, rip: int) -> bool:
        """Whether a shim-refused fault at ``rip`` may report stale lazy flags: an instruction
        of the same block before it modified flags (QEMU syncs them at block starts, and before
        the helpers that raise its own exceptions; intercepts run in code hooks, where the
        flags are exact)."""
        if self.refusal is None or self.stop is not None or self.block_start is None:
            return False
        address = self.block_start
        while address != rip:
            instruction = self.instruction_at(address)
            if instruction is None:
                return True  # left the straight line: be safe
            if instruction.rflags_modified:
                return True
            address = instruction.next_ip
        return False

    def _grant(self, result: Walk, kind: str, mmu: MmuState, page: int, rip: int | None) -> int:
        """Set A/D for the allowed access and return the permissions safe to cache: every kind
        paging and LASS allow now, but WRITE only once D is set and never on a code page."""
        assert result.leaf is not None and result.leaf_address is not None
        leaf = updated_leaf(result.leaf, kind)
        if leaf != result.leaf:
            self._set_entry_bits(result.leaf_address, leaf & (PTE_A | PTE_D), rip)
        perms = 0
        for other in KINDS:
            if not result.allows(other):
                continue
            if other == "write" and (not leaf & PTE_D or page in self.code_pages):
                continue
            if other != kind and self.lass_active and self.ask_policy(page, PAGE_SIZE, other, mmu):
                continue
            perms |= _PERMS[other]
        if perms & UC_PROT_EXEC:
            self.exec_frames.add(result.frame)
        if perms & UC_PROT_WRITE:
            self.written_frames.add(result.frame)
        return perms

    def mmu(self) -> MmuState:
        """The paging/LASS-relevant register state now (RFLAGS.AC changes without a hook)."""
        rflags = self.uc.reg_read(UC_X86_REG_EFLAGS)
        return MmuState(self.cpl, self.cr0, self.cr4, rflags, self.efer)

    @property
    def lass_active(self) -> bool:
        return self.shim and bool(self.efer & EFER_LMA) and bool(self.cr4 & CR4_LASS)

    def ask_policy(self, address: int, size: int, kind: str, mmu: MmuState) -> bool:
        access = PolicyAccess(
            address=address,
            size=size,
            kind=kind,
            implicit=False,
            cpl=mmu.cpl,
            cr4=mmu.cr4,
            rflags=mmu.rflags,
            efer=mmu.efer,
            cs_l=True,
        )
        try:
            return bool(self.policy(access))
        except Exception as error:  # a user policy may fail in any way: report, never pass
            raise PolicyFailure(f"policy {self.policy_name} raised {error!r}") from error

    def _read_entry(self, address: int) -> int:
        frame = address & ~(PAGE_SIZE - 1)
        offset = address - frame
        return int.from_bytes(self.tables[frame][offset : offset + 8], "little")

    def _frame_known(self, frame: int) -> bool:
        return frame in self.image.frames

    def _set_entry_bits(self, address: int, bits: int, rip: int | None = None) -> None:
        """Set A/D bits in a paging entry; changes made for a data access at ``rip`` are logged
        so that a later canonical or LASS fault of the same instruction can take them back."""
        old = self._read_entry(address)
        if old | bits == old:
            return
        if rip is not None:
            self.bit_log.append((rip, address, old))
        self._write_entry(address, old | bits)

    def _write_entry(self, address: int, entry: int) -> None:
        frame = address & ~(PAGE_SIZE - 1)
        self.tables[frame][address - frame : address - frame + 8] = entry.to_bytes(8, "little")

    def _undo_bits(self, rip: int) -> None:
        """Restore the entries the current execution of the instruction at ``rip`` changed."""
        for logged_rip, address, old in reversed(self.bit_log):
            if logged_rip == rip:
                self._write_entry(address, old)
        self.bit_log = [item for item in self.bit_log if item[0] != rip]

    # ----------------------------------------------------------------------------- intercepts

    def intercept(self, address: int) -> None:
        """Code hook on a pre-scanned instruction: act before QEMU runs it.

        The length comes from the pre-scan: the size Unicorn passes to code hooks is sometimes
        its unpatched placeholder (0xF1F2F3F1 and the like) in the TB after a RIP write.
        """
        kind = self.scan.intercepts[address]
        size = self.scan.instructions[address].len
        if kind is Intercept.UNSUPPORTED or (
            kind is Intercept.PRIVILEGED_UNSUPPORTED and self.cpl == 0
        ):
            detail = f"{self.scan.unsupported_reason(address)} at {address:#x}"
            self._end(Stop(Status.UNSUPPORTED, detail=detail))
        elif kind is Intercept.HLT:
            if self.cpl == 0:  # at CPL3 QEMU raises the #GP itself
                self._end(Stop(Status.HALTED, rip=(address + size) & MASK64))
        elif kind is Intercept.MOV_CR:
            if self.cpl == 0:
                self._mov_cr(address, size)
        elif kind is Intercept.CACHE_FLUSH:
            self._cache_flush(address, size)
        elif kind is Intercept.POPF:
            self._popf(address)

    def _end(self, stop: Stop) -> None:
        self.stop = stop
        self.uc.emu_stop()

    def _gp(self, address: int, detail: str) -> None:
        self._end(Stop(Status.FAULT, Fault(VEC_GP, 0, address), detail=detail))

    def _mov_cr(self, address: int, size: int) -> None:
        instruction = self.scan.instructions[address]
        target = instruction.op0_register
        value = self.uc.reg_read(GPR_IDS[instruction.op1_register])
        if target == Register.CR4:
            supported = SUPPORTED_CR4 | (CR4_LASS if self.case.state.lass_supported else 0)
            if value & ~supported or not value & CR4_PAE:
                self._gp(address, f"MOV CR4, {value:#x}: reserved or unsupported bit, or PAE clear")
                return
            self.cr4 = value
        elif target == Register.CR0:
            if (
                value >> 32
                or not value & CR0_PG
                or not value & CR0_PE
                or (value & CR0_NW and not value & CR0_CD)
            ):
                self._gp(address, f"MOV CR0, {value:#x}: invalid combination")
                return
            unsupported = _cr0_unsupported(value)
            if unsupported is not None:
                self._end(Stop(Status.UNSUPPORTED, detail=unsupported))
                return
            self.cr0 = value
        else:
            if value >> 52:
                self._gp(address, f"MOV CR3, {value:#x}: bits 63:52 set")
                return
            self.cr3 = value
        self.uc.reg_write(_CR_IDS[target], value)
        self.flush_tlb()
        self.uc.reg_write(UC_X86_REG_RIP, (address + size) & MASK64)

    def flush_tlb(self) -> None:
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)

    def _cache_flush(self, address: int, size: int) -> None:
        """CLFLUSH/CLFLUSHOPT/CLWB: checked like a 1-byte read, then skipped (QEMU makes no
        access for them, and the Broadwell model raises #UD for CLFLUSHOPT and CLWB)."""
        (operand,) = (
            access
            for access in memory_accesses(
                self.scan.instructions[address], self.register, self.segment_base
            )
            if access.kind == "read"
        )
        page = operand.address & ~(PAGE_SIZE - 1)
        try:
            fault = self._check_data(operand, page, address)
        except PolicyFailure as failure:
            self._end(Stop(Status.ERROR, detail=str(failure)))
            return
        except WalkUnsupported as error:
            self._end(Stop(Status.UNSUPPORTED, detail=str(error)))
            return
        if fault is not None:
            self._end(fault)
        else:
            self.uc.reg_write(UC_X86_REG_RIP, (address + size) & MASK64)

    def _check_data(self, operand: OperandAccess, page: int, rip: int) -> Stop | None:
        """Canonical, LASS, paging for one data access done by the shim itself."""
        if not is_canonical(page):
            return self.fault_for(Refusal(page, operand.kind, "canonical"), operand, rip)
        mmu = self.mmu()
        if self.lass_active and self.ask_policy(operand.address, operand.size, operand.kind, mmu):
            return self.fault_for(Refusal(page, operand.kind, "lass"), operand, rip)
        result = walk(self._read_entry, self._frame_known, self.cr3, page, mmu)
        for entry_address in result.accessed:
            self._set_entry_bits(entry_address, PTE_A)
        if not result.allows(operand.kind):
            refusal = Refusal(page, operand.kind, "paging", result.error[operand.kind])
            return self.fault_for(refusal, operand, rip)
        assert result.leaf is not None and result.leaf_address is not None
        self._set_entry_bits(result.leaf_address, updated_leaf(result.leaf, operand.kind) & PTE_A)
        return None

    def _popf(self, address: int) -> None:
        """A POPF that would set TF single-steps, which the machine does not model."""
        rsp = self.uc.reg_read(UC_X86_REG_RSP)
        value = self.peek(rsp, 8)
        if value is not None and int.from_bytes(value, "little") & RFLAGS_TF:
            self._end(Stop(Status.UNSUPPORTED, detail=f"POPF setting TF at {address:#x}"))

    def peek(self, address: int, size: int) -> bytes | None:
        """Read linear memory without side effects (no A/D bits); None if not readable."""
        data = b""
        while len(data) < size:
            linear = (address + len(data)) & MASK64
            page = linear & ~(PAGE_SIZE - 1)
            if not is_canonical(page):
                return None
            mmu = MmuState(
                self.cpl, self.cr0, self.cr4, self.uc.reg_read(UC_X86_REG_EFLAGS), self.efer
            )
            try:
                result = walk(self._read_entry, self._frame_known, self.cr3, page, mmu)
            except WalkUnsupported:
                return None
            if not result.allows("read"):
                return None
            chunk = min(size - len(data), page + PAGE_SIZE - linear)
            data += bytes(self.uc.mem_read(result.frame + linear - page, chunk))
        return data

    # ----------------------------------------------------------------------------- faults

    def register(self, register_id: int) -> int:
        return int(self.uc.reg_read(GPR_IDS[register_id]))

    def segment_base(self, segment: int) -> int:
        if segment == Register.FS:
            return int(self.uc.reg_read(UC_X86_REG_FS_BASE))
        if segment == Register.GS:
            return int(self.uc.reg_read(UC_X86_REG_GS_BASE))
        return 0

    def fault_from_refusal(self, rip: int) -> Stop:
        """Rebuild the architectural fault of the refused fill at ``rip``."""
        refusal = self.refusal
        assert refusal is not None
        if refusal.kind == "fetch":
            address = rip if rip & ~(PAGE_SIZE - 1) == refusal.page else refusal.page
            return self._fault(refusal, rip, address, stack=False)
        instruction = self.instruction_at(rip)
        if instruction is None:
            return Stop(
                Status.UNSUPPORTED, detail=f"data fault at {rip:#x}, outside the pre-scanned code"
            )
        operands = memory_accesses(instruction, self.register, self.segment_base)
        if refusal.kind == "write" and (
            instruction.is_call_near or instruction.is_call_near_indirect
        ):
            target = self._call_target(instruction, operands)
            if target is not None and not is_canonical(target):
                # The target is checked before the push (SDM CALL); QEMU pushes first.
                self._undo_bits(rip)
                fault = Fault(VEC_GP, 0, rip, access="fetch", address=target)
                return Stop(Status.FAULT, fault, detail=f"call to non-canonical {target:#x}")
        matches = [
            op for op in operands if op.kind == refusal.kind and op.covers(refusal.page, PAGE_SIZE)
        ]
        if not matches:
            return Stop(
                Status.UNSUPPORTED,
                detail=f"cannot attribute the {refusal.kind} of {refusal.page:#x} to {instruction}",
            )
        return self.fault_for(refusal, matches[0], rip)

    def _call_target(
        self, instruction: iced.Instruction, operands: tuple[OperandAccess, ...]
    ) -> int | None:
        """A near CALL's target from the registers or its (already read) memory operand."""
        if instruction.is_call_near:
            return int(instruction.near_branch_target)
        if instruction.op0_kind == OpKind.REGISTER:
            return self.register(RegisterExt.full_register(instruction.op0_register))
        source = next((op for op in operands if op.kind == "read" and not op.stack), None)
        data = None if source is None else self.peek(source.address, 8)
        return None if data is None else int.from_bytes(data, "little")

    def fault_for(self, refusal: Refusal, operand: OperandAccess, rip: int) -> Stop:
        address = operand.first_byte_in(refusal.page, PAGE_SIZE)
        rmw = operand.rmw and refusal.kind == "read"
        return self._fault(refusal, rip, address, stack=operand.stack, rmw=rmw)

    def _fault(
        self, refusal: Refusal, rip: int, address: int, *, stack: bool, rmw: bool = False
    ) -> Stop:
        if refusal.reason == "paging":
            # A read-modify-write operand is a write access for paging (W = 1 in the error
            # code) although QEMU performs, and gets refused on, the read first.
            kind, code = (
                ("write", refusal.write_error_code) if rmw else (refusal.kind, refusal.error_code)
            )
            fault = Fault(VEC_PF, code, rip, cr2=address, access=kind, address=address)
            return Stop(Status.FAULT, fault, detail=f"#PF on {kind} of {address:#x}")
        vector = VEC_SS if stack else VEC_GP
        fault = Fault(vector, 0, rip, access=refusal.kind, address=address)
        why = "non-canonical" if refusal.reason == "canonical" else f"LASS ({self.policy_name})"
        return Stop(Status.FAULT, fault, detail=f"{why} {refusal.kind} of {address:#x}")

    # ----------------------------------------------------------------------------- trace

    def on_instruction(self) -> None:
        """Trace mode: an instruction (or REP iteration) starts; earlier entries are final."""
        assert self.trace is not None
        self.instruction_trace_start = len(self.trace)

    def on_memory(self, access: int, physical: int, size: int, value: int) -> None:
        """Trace mode: a data access by physical address, mapped back to its linear page."""
        assert self.trace is not None
        frame = physical & ~(PAGE_SIZE - 1)
        page = self.frame_pages.get(frame)
        if page is None:
            return
        kind = "write" if access == UC_MEM_WRITE else "read"
        if kind == "read":
            value = int.from_bytes(self.uc.mem_read(physical, size), "little")
        self.trace.append(
            Access(kind, page + physical - frame, size, value & ((1 << (8 * size)) - 1))
        )

    def rflags_at_fault(self, rip: int, rflags: int) -> int:
        """RFLAGS to report for a fault at ``rip``: the intercepted value if one was taken."""
        if self.flags_before is not None and self.flags_before[0] == rip:
            return self.flags_before[1]
        return rflags

    def final_trace(self, *, faulted: bool) -> tuple[Access, ...] | None:
        if self.trace is None:
            return None
        return tuple(self.trace[: self.instruction_trace_start] if faulted else self.trace)

    # ----------------------------------------------------------------------------- CPUID

    def cpuid(self) -> int:
        eax = self.uc.reg_read(UC_X86_REG_EAX) & 0xFFFF_FFFF
        ecx = self.uc.reg_read(UC_X86_REG_ECX) & 0xFFFF_FFFF
        values = cpuid_leaf(eax, ecx, lass_supported=self.case.state.lass_supported)
        for register_id, value in zip(
            (UC_X86_REG_RAX, UC_X86_REG_RBX, UC_X86_REG_RCX, UC_X86_REG_RDX), values, strict=True
        ):
            self.uc.reg_write(register_id, value)
        return 1


class PolicyFailure(Exception):
    """The policy raised: the run ends with Status.ERROR naming the policy and the exception."""


def _pages_spanned(address: int, size: int) -> frozenset[int]:
    first = address & ~(PAGE_SIZE - 1)
    last = (address + size - 1) & MASK64 & ~(PAGE_SIZE - 1)
    pages = {first}
    page = first
    while page != last:
        page = (page + PAGE_SIZE) & MASK64
        pages.add(page)
    return frozenset(pages)
