"""The LASS shim: what one case run adds to Unicorn, hook by hook.

Unicorn (QEMU TCG) knows nothing of LASS. The shim supplies it at three points:

- the TLB-fill hook, which is the machine's page walk: canonical check, then LASS (the policy),
  then 4-level paging, recording why a fill was refused so the fault can be rebuilt;
- code hooks on the few instructions QEMU gets wrong for this machine (MOV CR*, CLFLUSH*, HLT,
  POPF, CMPXCHG8B/16B, and everything outside the machine's scope), found by a pre-scan of the
  case's code;
- a CPUID hook that advertises LASS when the case says so.

One :class:`CaseRun` exists per run; the machine creates it, routes hooks to it and turns its
record into an :class:`~lassfuzz.outcome.Outcome`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Final

import iced_x86 as iced
from iced_x86 import Code, FlowControl, Mnemonic, OpKind, Register, RegisterExt, RflagsBits
from unicorn import UC_PROT_EXEC, UC_PROT_READ, UC_PROT_WRITE, x86_const
from unicorn.unicorn_const import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH, UC_MEM_READ, UC_MEM_WRITE
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
    CR4_LA57,
    CR4_LASS,
    CR4_OSFXSR,
    CR4_OSXMMEXCPT,
    CR4_PAE,
    CR4_PGE,
    CR4_PSE,
    CR4_SMAP,
    CR4_SMEP,
    EFER_LMA,
    EFER_NXE,
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
from lassfuzz.emulator.port import UnicornPort
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
#: A paging-structure entry (the walk reads ~7 per TLB fill).
_ENTRY: Final = struct.Struct("<Q")
#: QEMU's TCG_MAX_INSNS: no translated block holds more instructions.
_MAX_BLOCK_INSTRUCTIONS: Final = 512
_PUSHF: Final = frozenset({Mnemonic.PUSHF, Mnemonic.PUSHFD, Mnemonic.PUSHFQ})
_STATUS_FLAGS: Final = (
    RflagsBits.OF | RflagsBits.SF | RflagsBits.ZF | RflagsBits.AF | RflagsBits.PF | RflagsBits.CF
)
#: String operands addressed with ESI/EDI (an 0x67 prefix in 64-bit mode): REP counts ECX.
_ADDRESS32_STRING_OPERANDS: Final = frozenset(
    {OpKind.MEMORY_SEG_ESI, OpKind.MEMORY_SEG_EDI, OpKind.MEMORY_ESEDI}
)
_GENU, _INEI, _NTEL = (int.from_bytes(text, "little") for text in (b"Genu", b"ineI", b"ntel"))


def is_canonical(address: int, bits: int = 48) -> bool:
    """Canonical form for ``bits``-bit linear addresses (48, or 57 with LA57): bits 63:bits-1
    all equal."""
    return (address >> (bits - 1)) in (0, MASK64 >> (bits - 1))


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
        #: Linear-address width (57 with LA57: CR4.LA57 cannot change during a case) and the
        #: code size (CS.L; compatibility mode has 32-bit code), both for the policy's view.
        self.bits = 57 if state.la57 else 48
        self.cs_l = state.mode == "64"
        #: Code outside the pre-scan has a code hook on every instruction (system cases,
        #: lassfuzz.emulator.sysrun): check_block need not refuse it.
        self.hooks_foreign_code = False
        #: The paging structures live here, not in Unicorn's memory: in virtual-TLB mode nothing
        #: but the fill hook reads them, and no linear page maps a table frame, so the walk and
        #: its A/D updates stay in Python and the outcome takes the final tables from here.
        self.tables = {frame: bytearray(image.frames[frame]) for frame in image.table_frames}
        self.walks: dict[tuple[int, ...], Walk] = {}  # first walks, see walk()
        self.end_page = case.code_end & ~(PAGE_SIZE - 1)
        self.code_pages = _pages_spanned(case.code_address, len(case.code) + MAX_INSTRUCTION_BYTES)
        self.refusal: Refusal | None = None
        self.foreign: dict[int, iced.Instruction] = {}  # decoded outside the pre-scan
        self.shapes: dict[int, AccessShape] = {}  # by RIP, computed on the first data fill
        #: (RIP, RFLAGS) read in the last code hook: the flags before that instruction (see
        #: :meth:`rflags_at_fault`).
        self.flags_at_hook: tuple[int, int] | None = None
        #: Instructions of the blocks entered so far (REP iterations one each) and the
        #: addresses of the last block's instructions: the budget and ``Outcome.instructions``.
        self.entered = 0
        self.last_block: tuple[int, ...] = ()
        #: How often each instruction ended a block that ran to its end (before the last).
        self.completed_ends: dict[int, int] = {}
        self.blocks: dict[tuple[int, int], tuple[int, ...]] = {}
        #: (rip, entry address, old entry) of A/D changes made since the current block started.
        self.bit_log: list[tuple[int, int, int]] = []
        self.stop: Stop | None = None
        self.frame_pages: dict[int, int] = {}
        self.exec_frames: set[int] = set()
        #: Frames the run may have written (given WRITE permission, or written by the shim
        #: itself): a re-run restores them, the outcome reads only them back.
        self.written_frames: set[int] = set()
        self.trace: list[Access] | None = [] if trace else None
        #: Per trace entry: the RIP of its instruction and the block it ran in (REP
        #: iterations are blocks of their own), to find the faulting instruction's entries.
        self.trace_origins: list[tuple[int, int]] = []
        self.blocks_entered = 0

    # ----------------------------------------------------------------------------- TLB fill

    def fill(self, page: int, access: int, entry: Any) -> bool:
        """The page walk for one TLB miss; False refuses the access (recorded for the fault)."""
        kind = FILL_KINDS[access]
        # Unicorn keeps RIP exact in the fill hook (measured); fetch fills need no attribution.
        rip = None if kind == "fetch" else self.uc.reg_read(UC_X86_REG_RIP)
        if rip is not None:
            self._repair_restored_flags(rip)
        elif page == self.end_page and self.uc.reg_read(UC_X86_REG_RIP) == self.case.code_end:
            return self._fill_end(entry)
        try:
            return self._fill(page, kind, rip, entry)
        except PolicyFailure as failure:
            self.stop = Stop(Status.ERROR, detail=str(failure))
        except WalkUnsupported as error:
            self.stop = Stop(Status.UNSUPPORTED, detail=str(error))
        return False

    def _fill_end(self, entry: Any) -> bool:
        """QEMU fetches the page of ``code_end`` before it notices that it is the end (the exit
        check runs when the block is translated), though the case ends there with no fetch
        (docs/machine.md): answer without a walk, so no A bit is set and no fault raised
        (measured: a case whose last instruction enabled SMEP reported #PF at its end)."""
        frame = self.image.page_frames.get(self.end_page, 0)
        entry.paddr = frame
        entry.perms = UC_PROT_EXEC
        self.exec_frames.add(frame)  # the translated end block must not outlive the case
        return True

    def _fill(self, page: int, kind: str, rip: int | None, entry: Any) -> bool:
        mmu = self.mmu()
        multi = rip is not None and self._multi_access(rip)
        if multi:
            assert rip is not None
            earlier = self._architectural_prefix(rip, kind, page, mmu)
            if earlier is not None:
                return self._refuse(earlier, rip)
        if not is_canonical(page, self.bits):
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
        result = self.walk(page, mmu)
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
                if not is_canonical(piece_page, self.bits):
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
        result = self.walk(page, mmu)
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
                if not is_canonical(piece_page, self.bits):
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
        set, for fault rebuilding); one that needs an intercept cannot be hooked any more
        (unless ``hooks_foreign_code``)."""
        if self.hooks_foreign_code:
            return None
        if address in self.scan.instructions or address in self.foreign:
            return None
        data = self._peek_code(address, MAX_BLOCK_BYTES)
        if data is None:
            return None  # the fetch itself will fault
        for instruction in iced.Decoder(64 if self.cs_l else 32, data, ip=address):
            if instruction.code == Code.INVALID:
                break  # QEMU raises #UD there; later bytes are not this block
            if intercept_for(instruction) is not None:
                detail = f"{instruction} at {instruction.ip:#x}, outside the pre-scanned code"
                return Stop(Status.UNSUPPORTED, detail=detail)
            self.foreign[instruction.ip] = instruction
            if instruction.flow_control != FlowControl.NEXT:
                break
        return None

    def new_block(self, address: int, size: int) -> int:
        """A translated block of ``size`` bytes starts (REP iterations included): count its
        instructions (returned) and make A/D changes logged before it final (their
        instructions completed)."""
        self.bit_log.clear()
        self.blocks_entered += 1
        if self.last_block:  # it ran to its end (or to an intercept that cut it, _skip)
            last = self.last_block[-1]
            self.completed_ends[last] = self.completed_ends.get(last, 0) + 1
        block = self._block(address, size)
        if self.last_block and self.last_block[-1] == address and self._rep_exhausted(address):
            # QEMU runs a REP string instruction as one block per iteration and, after the
            # iteration that zeroes the counter, once more to find the counter zero. That
            # last round is not an instruction (docs/machine.md counts iterations).
            block = ()
        self.entered += len(block)
        self.last_block = block
        return len(block)

    def _block(self, address: int, size: int) -> tuple[int, ...]:
        """The instruction addresses of the block at ``address`` (blocks are straight-line)."""
        key = (address, size)
        block = self.blocks.get(key)
        if block is not None:
            return block
        addresses: list[int] = []
        current = address
        while (current - address) & MASK64 < size and len(addresses) < _MAX_BLOCK_INSTRUCTIONS:
            instruction = self.instruction_at(current) or self._decode_foreign(current)
            if instruction is None:
                break
            addresses.append(current)
            current = instruction.next_ip & MASK64
        block = self.blocks[key] = tuple(addresses)
        return block

    def _peek_code(self, address: int, size: int) -> bytes | None:
        """Up to ``size`` fetchable bytes at ``address``: all of them, or those up to the end
        of its page (a supervisor-only or SMAP-protected page may be executable but not
        readable, and the next page need not be executable)."""
        in_page = PAGE_SIZE - address % PAGE_SIZE
        data = self.peek(address, size, "fetch")
        return data if data is not None or in_page >= size else self.peek(address, in_page, "fetch")

    def _decode_foreign(self, address: int) -> iced.Instruction | None:
        data = self._peek_code(address, MAX_INSTRUCTION_BYTES)
        if data is None:
            return None
        instruction = iced.Decoder(64 if self.cs_l else 32, data, ip=address).decode()
        if instruction.code == Code.INVALID:
            return None
        self.foreign[address] = instruction
        return instruction

    def _rep_exhausted(self, address: int) -> bool:
        instruction = self.instruction_at(address)
        if instruction is None:
            return False
        mask = _rep_counter_mask(instruction)
        return mask is not None and not self.uc.reg_read(UC_X86_REG_RCX) & mask

    def flags_clobbered(self, rip: int) -> bool:
        """Whether QEMU's RFLAGS at a fault the shim raised (a refused fill) at ``rip`` may be
        wrong, with no code hook there to supply them (:meth:`rflags_at_fault`).

        QEMU translates an instruction that reads flags (SETcc m, ADC/SBB m, RCL m, ...) by
        first materialising the lazy flags into CC_SRC; when its memory access then faults,
        QEMU restores the CC_OP recorded at the instruction's start over the new CC_SRC
        (``restore_state_to_opc``): measured ``add rax, rax; seto [unmapped]`` reports 0x57
        for 0x847. The shim raised the fault, so it owes the exact value.
        """
        if self.refusal is None or self.refusal.kind == "fetch" or self.stop is not None:
            return False
        if self.flags_at_hook is not None and self.flags_at_hook[0] == rip:
            return False
        instruction = self.instruction_at(rip)
        # Only a memory destination is accessed after the flags are materialised (a memory
        # source is read first). PUSHF and REP string instructions keep the lazy state
        # intact, and a code hook on them would itself corrupt it (rflags_at_fault).
        return (
            instruction is not None
            and bool(instruction.rflags_read & _STATUS_FLAGS)
            and instruction.op_count > 0
            and instruction.op0_kind == OpKind.MEMORY
        )

    def last_branch(self) -> tuple[int, int] | None:
        """The control transfer that ended the last block, which ran to its end, and how
        many times it has run: where a fetch fault at its target came from."""
        if not self.last_block:
            return None
        address = self.last_block[-1]
        instruction = self.instruction_at(address)
        if instruction is None or instruction.flow_control == FlowControl.NEXT:
            return None
        return address, self.completed_ends.get(address, 0) + 1

    def executed(self, rip: int | None) -> int:
        """Instructions executed when the run stopped at ``rip``: the last block ran up to
        the instruction at ``rip`` (or entirely, when ``rip`` is outside it)."""
        block = self.last_block
        if rip in block:
            return self.entered - (len(block) - block.index(rip))
        return self.entered

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

    def ask_policy(
        self, address: int, size: int, kind: str, mmu: MmuState, *, implicit: bool = False
    ) -> bool:
        access = PolicyAccess(
            address=address,
            size=size,
            kind=kind,
            implicit=implicit,
            cpl=mmu.cpl,
            cr4=mmu.cr4,
            rflags=mmu.rflags,
            efer=mmu.efer,
            # The real CS.L, for implicit accesses too: PolicyAccess.touches knows that their
            # addresses are 64-bit, and a policy may tell compatibility mode apart (bochs).
            cs_l=self.cs_l,
        )
        try:
            return bool(self.policy(access))
        except Exception as error:  # a user policy may fail in any way: report, never pass
            raise PolicyFailure(f"policy {self.policy_name} raised {error!r}") from error

    def walk(self, page: int, mmu: MmuState) -> Walk:
        """The page walk for ``page`` under ``mmu``: the first one per (page, paging-relevant
        state) is done, later ones refresh it (:meth:`Walk.refreshed`), which gives the same
        result at a fraction of the cost (a system case walks the GDT's page for every
        descriptor)."""
        key = (
            page,
            self.cr3,
            mmu.cpl == 3,
            mmu.cr0 & CR0_WP,
            mmu.cr4 & (CR4_SMEP | CR4_SMAP | CR4_LA57),
            mmu.rflags & RFLAGS_AC,
            mmu.efer & EFER_NXE,
        )
        first = self.walks.get(key)
        if first is None:
            first = self.walks[key] = walk(self._read_entry, self._frame_known, self.cr3, page, mmu)
            return first
        return first.refreshed(self._read_entry)

    def _read_entry(self, address: int) -> int:
        frame = address & ~(PAGE_SIZE - 1)
        return int(_ENTRY.unpack_from(self.tables[frame], address - frame)[0])

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
        _ENTRY.pack_into(self.tables[frame], address - frame, entry)

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
        # A fault QEMU raises inside a hooked instruction leaves stale RFLAGS (rflags_at_fault).
        self.flags_at_hook = (address, self.uc.reg_read(UC_X86_REG_EFLAGS))
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
        elif kind is Intercept.CMPXCHG8B:
            self._start_block_at(address)

    def _end(self, stop: Stop) -> None:
        self.stop = stop
        self.uc.emu_stop()

    def _gp(self, address: int, detail: str) -> None:
        self._end(Stop(Status.FAULT, Fault(VEC_GP, 0, address), detail=detail))

    def _mov_cr(self, address: int, size: int) -> None:
        instruction = self.scan.instructions[address]
        target = instruction.op0_register
        value = self.uc.reg_read(GPR_IDS[RegisterExt.full_register(instruction.op1_register)])
        if not self.cs_l:
            value &= 0xFFFF_FFFF  # MOV CRn, r32 (compatibility mode) zero-extends
        if target == Register.CR4:
            supported = SUPPORTED_CR4 | (CR4_LASS if self.case.state.lass_supported else 0)
            if (value ^ self.cr4) & CR4_LA57:
                self._gp(address, f"MOV CR4, {value:#x} changes LA57")
                return
            if value & ~(supported | CR4_LA57) or not value & CR4_PAE:
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
        self._skip(address, size)

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
            self._skip(address, size)

    def _start_block_at(self, address: int) -> None:
        """Make the instruction at ``address`` the first of its translated block.

        QEMU 5 translates CMPXCHG8B/16B as a helper that computes RFLAGS from the CC_OP in
        ``env`` without the translator writing its pending lazy-flags state there first
        (QEMU later inlined the instruction). Mid-block, ``env`` then holds the state of the
        block's start: measured ``test [mem], 0; cmpxchg8b [rax]`` reports the case's initial
        flags with ZF changed. At a block's start ``env`` is exact, so the shim restarts
        translation at the instruction (writing RIP in a hook does, see :meth:`_skip`).
        """
        # The flags read in this hook, written back: Unicorn's code hook leaves CC_SRC holding
        # the materialised flags while env's CC_OP may still name the lazy operation (measured:
        # ``adc r10, 0x54; jmp $+2; cmpxchg8b [0]`` lost AF); RFLAGS written sets both.
        assert self.flags_at_hook is not None and self.flags_at_hook[0] == address
        self.uc.reg_write(UC_X86_REG_EFLAGS, self.flags_at_hook[1])
        block = self.last_block
        if not block or block[0] == address or address not in block:
            return
        done = block.index(address)
        self.entered -= len(block) - done
        self.last_block = block[:done]
        self.uc.reg_write(UC_X86_REG_RIP, address)

    def _skip(self, address: int, size: int) -> None:
        """Resume after the intercepted instruction at ``address`` (done by the shim). Writing
        RIP in a hook makes Unicorn restart in a new block, so the rest of the current block,
        counted when it was entered, does not run."""
        block = self.last_block
        if address in block:
            done = block.index(address) + 1
            self.entered -= len(block) - done
            self.last_block = block[:done]
        self.uc.reg_write(UC_X86_REG_RIP, (address + size) & MASK64)

    def _check_data(self, operand: OperandAccess, page: int, rip: int) -> Stop | None:
        """Canonical, LASS, paging for one data access done by the shim itself."""
        if not is_canonical(page, self.bits):
            return self.fault_for(Refusal(page, operand.kind, "canonical"), operand, rip)
        mmu = self.mmu()
        if self.lass_active and self.ask_policy(operand.address, operand.size, operand.kind, mmu):
            return self.fault_for(Refusal(page, operand.kind, "lass"), operand, rip)
        result = self.walk(page, mmu)
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

    def peek(self, address: int, size: int, kind: str = "read") -> bytes | None:
        """Read linear memory without side effects (no A/D bits); None unless paging allows
        ``kind`` ("read", or "fetch" for code) on every byte."""
        data = b""
        while len(data) < size:
            linear = (address + len(data)) & MASK64
            page = linear & ~(PAGE_SIZE - 1)
            if not is_canonical(page, self.bits):
                return None
            mmu = MmuState(
                self.cpl, self.cr0, self.cr4, self.uc.reg_read(UC_X86_REG_EFLAGS), self.efer
            )
            try:
                result = self.walk(page, mmu)
            except WalkUnsupported:
                return None
            if not result.allows(kind):
                return None
            chunk = min(size - len(data), page + PAGE_SIZE - linear)
            data += self.uc.mem_read(result.frame + linear - page, chunk)
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
            if target is not None and not is_canonical(target, self.bits):
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

    def on_memory(self, access: int, physical: int, size: int, value: int) -> None:
        """Trace mode: a data access by physical address, mapped back to its linear page."""
        assert self.trace is not None
        frame = physical & ~(PAGE_SIZE - 1)
        page = self.frame_pages.get(frame)
        if page is None:
            return
        kind = "write" if access == UC_MEM_WRITE else "read"
        linear = page + physical - frame
        if kind == "read" and physical - frame + size > PAGE_SIZE:
            # Unicorn hooks a page-crossing read once, at the physical address of its first
            # byte; the rest lies in another frame (measured with a read wrapping past 2**64).
            data = self.peek(linear, size)
            value = 0 if data is None else int.from_bytes(data, "little")
        elif kind == "read":
            value = int.from_bytes(self.uc.mem_read(physical, size), "little")
        self.trace.append(Access(kind, linear, size, value & ((1 << (8 * size)) - 1)))
        # Unicorn restores RIP (and CC_OP) before calling memory hooks (measured exact).
        rip = self.uc.reg_read(UC_X86_REG_RIP)
        self._repair_restored_flags(rip)
        self.trace_origins.append((rip, self.blocks_entered))

    def _repair_restored_flags(self, rip: int) -> None:
        """Undo what Unicorn's state restore before a TLB fill or memory hook does to the lazy
        flags of a hooked PUSHF or REP string instruction at ``rip``.

        The restore puts back the CC_OP recorded at the instruction's start. After a code
        hook QEMU holds the flags materialised (CC_OP = EFLAGS, CC_SRC = flags), and these two
        instructions store that CC_OP before their memory access: the restore replaces it
        with the older CC_OP, which nothing stores again, so the flags stay wrong for the
        rest of the run (measured: ``cmp rax, -0x4f; pushfq`` under code hooks ends with CF
        lost). The flags read in the hook are what the translated code expects.
        """
        hooked = self.flags_at_hook
        if hooked is None or hooked[0] != rip:
            return
        instruction = self.instruction_at(rip)
        if instruction is not None and (
            instruction.mnemonic in _PUSHF or _rep_counter_mask(instruction) is not None
        ):
            self.uc.reg_write(UC_X86_REG_EFLAGS, hooked[1])

    def rflags_at_fault(self, rip: int, rflags: int) -> int:
        """RFLAGS to report for a fault at ``rip``, given Unicorn's final ``rflags``.

        QEMU computes the status flags lazily (CC_OP says how to derive them from CC_SRC and
        CC_DST) and records, per instruction, the CC_OP to restore when a fault aborts it
        mid-block (``restore_state_to_opc``); Unicorn also restores that state before every
        TLB fill and memory hook. A Unicorn code hook breaks the record for the hooked
        instruction: after the hook it materialises the flags (CC_SRC = flags, CC_OP =
        EFLAGS) but the recorded CC_OP stays the one from before, so a fault inside the
        instruction restores an old CC_OP over the new CC_SRC (measured: ``add rax, rax``
        then a faulting load under a code hook reports 0x57 for 0x847). The machine
        therefore hooks as few instructions as it can (no ``count``, no per-instruction
        trace hook); for a hooked one, the flags read in its hook are the ones to report.
        """
        if self.flags_at_hook is not None and self.flags_at_hook[0] == rip:
            return self.flags_at_hook[1]
        return rflags

    def final_trace(self, fault_rip: int | None) -> tuple[Access, ...] | None:
        """The access trace of the run; a fault at ``fault_rip`` drops the accesses of the
        faulting instruction: the trailing entries made at ``fault_rip`` in the last block
        (for REP, the faulting iteration). A fetch fault at a branch target made no access
        there, so the branch's accesses stay (docs/machine.md).

        Instruction boundaries come from RIP in the memory hooks, not from a code hook on
        every instruction: code hooks corrupt QEMU's lazy flags (:meth:`rflags_at_fault`).
        """
        if self.trace is None:
            return None
        end = len(self.trace)
        while end and self.trace_origins[end - 1] == (fault_rip, self.blocks_entered):
            end -= 1
        return tuple(self.trace[:end])

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


def _rep_counter_mask(instruction: iced.Instruction) -> int | None:
    """The counter mask of a REP/REPE/REPNE string instruction (RCX or, with an 0x67
    prefix, ECX), or None for any other instruction."""
    if not instruction.is_string_instruction or not (
        instruction.has_rep_prefix or instruction.has_repne_prefix
    ):
        return None
    kinds = {instruction.op_kind(index) for index in range(instruction.op_count)}
    return 0xFFFF_FFFF if kinds & _ADDRESS32_STRING_OPERANDS else MASK64


def _pages_spanned(address: int, size: int) -> frozenset[int]:
    first = address & ~(PAGE_SIZE - 1)
    last = (address + size - 1) & MASK64 & ~(PAGE_SIZE - 1)
    pages = {first}
    page = first
    while page != last:
        page = (page + PAGE_SIZE) & MASK64
        pages.add(page)
    return frozenset(pages)
