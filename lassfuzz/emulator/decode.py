"""Instruction decoding for the shim (iced-x86): the case pre-scan and operand addresses.

Unicorn tells the shim *that* an access faulted (a page and a kind); the architecture also needs
*which* byte and through which segment. Both come from decoding the instruction at RIP with the
live register values. The pre-scan finds, once per case, the instructions the shim must intercept.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

import iced_x86 as iced
from iced_x86 import (
    Code,
    CodeSize,
    EncodingKind,
    FlowControl,
    Mnemonic,
    OpAccess,
    OpKind,
    Register,
    RegisterExt,
)
from iced_x86._iced_x86_py import Code as CodeId
from iced_x86._iced_x86_py import Register as RegisterId

from lassfuzz.arch import MASK64

MAX_INSTRUCTION_BYTES: Final = 15


class Intercept(enum.Enum):
    """Why the shim hooks an instruction address."""

    MOV_CR = "mov to a control register"  # CR0/CR3/CR4 writes: validated by the shim
    CACHE_FLUSH = "cache-line flush"  # CLFLUSH/CLFLUSHOPT/CLWB: QEMU makes no access
    HLT = "hlt"  # the end of a case at CPL0
    POPF = "popf"  # single-step (TF) is not modelled
    CMPXCHG8B = "cmpxchg8b/16b"  # QEMU computes its RFLAGS from a stale lazy-flags state
    UNSUPPORTED = "unsupported"  # the machine cannot run it faithfully (reason in the Prescan)
    PRIVILEGED_UNSUPPORTED = "unsupported at CPL0"  # at CPL3 QEMU's #GP comes first


_CACHE_FLUSH: Final = frozenset({Code.CLFLUSH_M8, Code.CLFLUSHOPT_M8, Code.CLWB_M8})
_CONTROL_REGISTERS: Final = frozenset({Register.CR0, Register.CR3, Register.CR4})
_UNMODELLED_CONTROL_REGISTERS: Final = frozenset({Register.CR2, Register.CR8})
#: MOV to/from CRn: the R32 forms are the compatibility-mode encodings.
_MOV_TO_CR: Final = frozenset({Code.MOV_CR_R64, Code.MOV_CR_R32})
_MOV_FROM_CR: Final = frozenset({Code.MOV_R64_CR, Code.MOV_R32_CR})
#: Instructions whose effects are outside the machine's scope (descriptor-table and IDT
#: accesses, privilege changes, machine-specific values, nondeterminism). In cases with
#: descriptor tables, lassfuzz.emulator.sysrun emulates the descriptor, INT n, IRETQ and
#: SYSCALL/SYSRET ones itself before this table is consulted.
_UNSUPPORTED: Final[Mapping[int, str]] = MappingProxyType(
    {
        Mnemonic.IRET: "IRET (privilege change)",
        Mnemonic.IRETD: "IRETD (privilege change)",
        Mnemonic.IRETQ: "IRETQ (privilege change)",
        Mnemonic.INT: "INT n (event delivery)",
        Mnemonic.INT1: "INT1 (event delivery)",
        Mnemonic.INT3: "INT3 (event delivery)",
        Mnemonic.INTO: "INTO (event delivery)",
        Mnemonic.SYSCALL: "SYSCALL (privilege change)",
        Mnemonic.SYSRET: "SYSRET (privilege change)",
        Mnemonic.SYSRETQ: "SYSRETQ (privilege change)",
        Mnemonic.SYSENTER: "SYSENTER (privilege change)",
        Mnemonic.SYSEXIT: "SYSEXIT (privilege change)",
        Mnemonic.SYSEXITQ: "SYSEXITQ (privilege change)",
        Mnemonic.LGDT: "LGDT (descriptor tables)",
        Mnemonic.LIDT: "LIDT (descriptor tables)",
        Mnemonic.LLDT: "LLDT (descriptor tables)",
        Mnemonic.LTR: "LTR (descriptor tables)",
        Mnemonic.SGDT: "SGDT (machine-specific GDTR)",
        Mnemonic.SIDT: "SIDT (machine-specific IDTR)",
        Mnemonic.SLDT: "SLDT (machine-specific LDTR)",
        Mnemonic.STR: "STR (machine-specific TR)",
        Mnemonic.LAR: "LAR (descriptor tables)",
        Mnemonic.LSL: "LSL (descriptor tables)",
        Mnemonic.VERR: "VERR (descriptor tables)",
        Mnemonic.VERW: "VERW (descriptor tables)",
        Mnemonic.LSS: "LSS (segment load)",
        Mnemonic.LFS: "LFS (segment load)",
        Mnemonic.LGS: "LGS (segment load)",
        Mnemonic.LDS: "LDS (segment load)",
        Mnemonic.LES: "LES (segment load)",
        Mnemonic.WRMSR: "WRMSR (MSR writes are not modelled)",
        Mnemonic.RDMSR: "RDMSR (machine-specific MSRs)",
        Mnemonic.SWAPGS: "SWAPGS (IA32_KERNEL_GS_BASE is not modelled)",
        Mnemonic.RDTSC: "RDTSC (nondeterministic)",
        Mnemonic.RDTSCP: "RDTSCP (nondeterministic)",
        Mnemonic.RDRAND: "RDRAND (nondeterministic)",
        Mnemonic.RDSEED: "RDSEED (nondeterministic)",
        Mnemonic.RDPID: "RDPID (machine-specific)",
        Mnemonic.XSAVE: "XSAVE (not modelled)",
        Mnemonic.XRSTOR: "XRSTOR (not modelled)",
    }
)
_FOREIGN_ENCODINGS: Final = frozenset(
    {EncodingKind.VEX, EncodingKind.EVEX, EncodingKind.XOP, EncodingKind.MVEX, EncodingKind.D3NOW}
)
_SEGMENT_LOADS: Final = frozenset({Code.MOV_SREG_RM16, Code.MOV_SREG_R32M16, Code.MOV_SREG_R64M16})
_SEGMENT_POPS: Final = frozenset(
    getattr(Code, f"POP{size}_{segment}")
    for size, segments in (("W", "CS DS ES SS FS GS"), ("D", "DS ES SS FS GS"), ("Q", "FS GS"))
    for segment in segments.split()
)
_FAR_TRANSFERS: Final = frozenset(
    {
        Code.CALL_PTR1616,
        Code.CALL_PTR1632,
        Code.CALL_M1616,
        Code.CALL_M1632,
        Code.CALL_M1664,
        Code.JMP_PTR1616,
        Code.JMP_PTR1632,
        Code.JMP_M1616,
        Code.JMP_M1632,
        Code.JMP_M1664,
    }
)


def _unsupported_reason(instruction: iced.Instruction) -> str | None:
    """Why the machine cannot run ``instruction`` faithfully, or None."""
    if _unmodelled_control_register(instruction):
        return f"{instruction} (CR2 and CR8 are not modelled)"
    reason = _unsupported_by_code(instruction.code)
    return None if reason is None else reason.format(instruction=instruction)


@functools.cache
def _unsupported_by_code(code: CodeId) -> str | None:
    """The reason template for an instruction form (a pure function of its Code, memoized)."""
    info = iced.OpCodeInfo(code)
    if info.encoding in _FOREIGN_ENCODINGS:
        return "{instruction} (VEX/EVEX/XOP encoding: Unicorn runs these wrongly or not at all)"
    reason = _UNSUPPORTED.get(info.mnemonic)
    if reason is not None:
        return reason
    if code in _SEGMENT_LOADS or code in _SEGMENT_POPS:
        return "{instruction} (segment load from the GDT)"
    if code in _FAR_TRANSFERS or info.mnemonic == Mnemonic.RETF:
        return "{instruction} (far transfer)"
    return None


@functools.cache
def _intercept_by_code(code: CodeId) -> Intercept | None:
    """The intercept for an instruction form, MOV CR aside (it depends on the register)."""
    if _unsupported_by_code(code) is not None:
        return Intercept.UNSUPPORTED
    if code in _CACHE_FLUSH:
        return Intercept.CACHE_FLUSH
    mnemonic = iced.OpCodeInfo(code).mnemonic
    if mnemonic == Mnemonic.HLT:
        return Intercept.HLT
    if mnemonic in (Mnemonic.POPF, Mnemonic.POPFD, Mnemonic.POPFQ):
        return Intercept.POPF
    if mnemonic in (Mnemonic.CMPXCHG8B, Mnemonic.CMPXCHG16B):
        return Intercept.CMPXCHG8B
    return None


def intercept_for(instruction: iced.Instruction) -> Intercept | None:
    """Why the shim must hook ``instruction``, or None."""
    if _unmodelled_control_register(instruction):
        return Intercept.PRIVILEGED_UNSUPPORTED
    code = instruction.code
    if code in _MOV_TO_CR:
        return Intercept.MOV_CR if instruction.op0_register in _CONTROL_REGISTERS else None
    return _intercept_by_code(code)


def _unmodelled_control_register(instruction: iced.Instruction) -> bool:
    code = instruction.code
    if code in _MOV_TO_CR:
        return instruction.op0_register in _UNMODELLED_CONTROL_REGISTERS
    return code in _MOV_FROM_CR and instruction.op1_register in _UNMODELLED_CONTROL_REGISTERS


@dataclass(frozen=True)
class Prescan:
    """The case's code decoded once, linearly from ``code_address`` to ``code_end``.

    ``instructions`` maps each instruction start to its decoded form; ``intercepts`` the
    addresses the shim hooks; ``branches`` the addresses of control transfers.
    """

    instructions: Mapping[int, iced.Instruction]
    intercepts: Mapping[int, Intercept]
    branches: frozenset[int]

    def unsupported_reason(self, address: int) -> str:
        reason = _unsupported_reason(self.instructions[address])
        assert reason is not None
        return reason


def prescan(
    code: bytes, code_address: int, following: bytes = b"", *, bitness: int = 64
) -> Prescan:
    """Decode ``code`` at ``code_address``; ``following`` are the bytes after the code (so an
    instruction that runs past the end decodes as Unicorn will execute it). ``bitness`` is 32
    for compatibility-mode code."""
    decoder = iced.Decoder(bitness, code + following[:MAX_INSTRUCTION_BYTES], ip=code_address)
    instructions: dict[int, iced.Instruction] = {}
    intercepts: dict[int, Intercept] = {}
    branches: set[int] = set()
    for instruction in decoder:
        offset = (instruction.ip - code_address) & MASK64
        if offset >= len(code):
            break
        instructions[instruction.ip] = instruction
        kind = intercept_for(instruction)
        if kind is not None:
            intercepts[instruction.ip] = kind
        if instruction.flow_control != FlowControl.NEXT:
            branches.add(instruction.ip)
    return Prescan(
        MappingProxyType(instructions), MappingProxyType(intercepts), frozenset(branches)
    )


@dataclass(frozen=True)
class OperandAccess:
    """One memory access an instruction makes: linear address, size, kind, and whether it goes
    through SS (stack operations and SS-segment operands: LASS and canonical faults are #SS)."""

    address: int
    size: int
    kind: str  # "read" | "write"
    stack: bool
    rmw: bool = False  # one half of a read-modify-write operand (its #PF reports W = 1)

    def covers(self, page: int, page_size: int) -> bool:
        """Whether some byte of the access lies in ``[page, page + page_size)`` (mod 2**64).

        Accesses are shorter than a page, so only the first and the last byte's pages count.
        """
        last = (self.address + self.size - 1) & MASK64
        return page in (self.address & ~(page_size - 1), last & ~(page_size - 1))

    def pieces(self, page_size: int) -> tuple[tuple[int, int], ...]:
        """The (address, size) page pieces of the access, in access order (wrapping at 2**64)."""
        first = min(self.size, page_size - self.address % page_size)
        if first == self.size:
            return ((self.address, self.size),)
        return ((self.address, first), ((self.address + first) & MASK64, self.size - first))

    def first_byte_in(self, page: int, page_size: int) -> int:
        """The lowest-offset byte of the access that lies in ``page`` (the fault's CR2)."""
        start_page = self.address & ~(page_size - 1)
        return self.address if start_page == page else page


_READS: Final = frozenset(
    {OpAccess.READ, OpAccess.COND_READ, OpAccess.READ_WRITE, OpAccess.READ_COND_WRITE}
)
_WRITES: Final = frozenset(
    {OpAccess.WRITE, OpAccess.COND_WRITE, OpAccess.READ_WRITE, OpAccess.READ_COND_WRITE}
)
_INFO: Final = iced.InstructionInfoFactory()


@dataclass(frozen=True)
class AccessShape:
    """The register-independent shape of an instruction's memory accesses."""

    count: int  # memory operands (a read-modify-write operand counts once)
    rmw: bool  # some operand is read-modify-write (a write for paging)


def access_shape(instruction: iced.Instruction) -> AccessShape:
    used = _INFO.info(instruction).used_memory()
    rmw = any(memory.access in _READS and memory.access in _WRITES for memory in used)
    return AccessShape(len(used), rmw)


def memory_accesses(
    instruction: iced.Instruction,
    register: Callable[[int], int],
    segment_base: Callable[[int], int],
) -> tuple[OperandAccess, ...]:
    """The data accesses ``instruction`` makes with the current registers.

    ``register(iced_register)`` returns a full 64-bit GPR value; ``segment_base(iced_segment)``
    the base of FS/GS (0 for the others). A read-modify-write operand yields two entries.
    """
    accesses: list[OperandAccess] = []
    bit_offset = _bit_string_offset(instruction, register)
    for used in _INFO.info(instruction).used_memory():
        address = used.displacement + bit_offset
        if used.base != Register.NONE:
            address += _address_register(used.base, register)
        if used.index != Register.NONE:
            address += _address_register(used.index, register) * used.scale
        if RegisterExt.is_gpr32(used.base) or RegisterExt.is_gpr32(used.index):
            address &= 0xFFFF_FFFF
        address = (address + segment_base(used.segment)) & MASK64
        if instruction.code_size != CodeSize.CODE64:
            address &= 0xFFFF_FFFF  # compatibility mode: 32-bit linear addresses
        size = iced.MemorySizeExt.size(used.memory_size) or iced.MemorySizeExt.size(
            instruction.memory_size
        )
        stack = used.segment == Register.SS
        rmw = used.access in _READS and used.access in _WRITES
        for kind, kinds in (("read", _READS), ("write", _WRITES)):
            if used.access in kinds:
                accesses.append(OperandAccess(address, max(size, 1), kind, stack, rmw))
    return tuple(accesses)


def _address_register(register_id: RegisterId, register: Callable[[int], int]) -> int:
    return register(RegisterExt.full_register(register_id))


_BIT_TESTS: Final = frozenset({Mnemonic.BT, Mnemonic.BTS, Mnemonic.BTR, Mnemonic.BTC})


def _bit_string_offset(instruction: iced.Instruction, register: Callable[[int], int]) -> int:
    """BT/BTS/BTR/BTC m, r address a bit string: the access lands at EA plus the operand-sized
    chunk the signed register offset selects (iced reports the plain EA)."""
    if (
        instruction.mnemonic not in _BIT_TESTS
        or instruction.op0_kind != OpKind.MEMORY
        or instruction.op1_kind != OpKind.REGISTER
    ):
        return 0
    bits = RegisterExt.size(instruction.op1_register) * 8
    offset = register(RegisterExt.full_register(instruction.op1_register)) & ((1 << bits) - 1)
    if offset >> (bits - 1):
        offset -= 1 << bits
    return (offset >> (bits.bit_length() - 1)) * (bits // 8)
