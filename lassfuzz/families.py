"""Instruction families: one short name per instruction, for crash signatures and coverage.

The names match the generator's instruction groups (:mod:`lassfuzz.generator.config`), plus
``"other"`` for valid instructions outside them and ``"invalid"`` for bytes that do not decode.
"""

from __future__ import annotations

from typing import Final

from iced_x86 import Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register

FAMILIES: Final = (
    "mov",
    "movx",
    "lea",
    "cmov",
    "setcc",
    "alu",
    "unary",
    "xchg",
    "cmpxchg",
    "bt",
    "push-pop",
    "flags",
    "enter-leave",
    "call-ret",
    "jmp",
    "jcc",
    "string",
    "prefetch",
    "clflush",
    "invlpg",
    "cr",
    "cpuid",
    "nop",
    "hlt",
    "ud2",
    "sreg",
    "lar",
    "sdt",
    "ldt",
    "int",
    "iret",
    "syscall",
    "far",
    "other",
    "invalid",
)

_CONDITIONS: Final = (
    "O",
    "NO",
    "B",
    "AE",
    "E",
    "NE",
    "BE",
    "A",
    "S",
    "NS",
    "P",
    "NP",
    "L",
    "GE",
    "LE",
    "G",
)
_BY_NAME: Final = {
    "mov": ("MOV",),
    "movx": ("MOVZX", "MOVSX", "MOVSXD"),
    "lea": ("LEA",),
    "alu": ("ADD", "ADC", "SUB", "SBB", "AND", "OR", "XOR", "CMP", "TEST"),
    "unary": ("INC", "DEC", "NEG", "NOT"),
    "xchg": ("XCHG", "XADD"),
    "cmpxchg": ("CMPXCHG", "CMPXCHG8B", "CMPXCHG16B"),
    "bt": ("BT", "BTS", "BTR", "BTC"),
    "push-pop": ("PUSH", "POP"),
    "flags": ("PUSHF", "PUSHFD", "PUSHFQ", "POPF", "POPFD", "POPFQ", "STAC", "CLAC", "CLD", "STD"),
    "enter-leave": ("ENTER", "LEAVE"),
    "call-ret": ("CALL", "RET"),
    "jmp": ("JMP",),
    "jcc": tuple(f"J{cc}" for cc in _CONDITIONS),
    "cmov": tuple(f"CMOV{cc}" for cc in _CONDITIONS),
    "setcc": tuple(f"SET{cc}" for cc in _CONDITIONS),
    "string": tuple(f"{op}{w}" for op in ("MOVS", "STOS", "LODS", "CMPS", "SCAS") for w in "BWDQ"),
    "prefetch": ("PREFETCHT0", "PREFETCHT1", "PREFETCHT2", "PREFETCHNTA", "PREFETCHW"),
    "clflush": ("CLFLUSH", "CLFLUSHOPT"),
    "invlpg": ("INVLPG",),
    "cpuid": ("CPUID",),
    "nop": ("NOP", "PAUSE"),
    "hlt": ("HLT",),
    "ud2": ("UD2",),
    "lar": ("LAR", "LSL", "VERR", "VERW"),
    "sdt": ("SGDT", "SIDT", "SLDT", "STR"),
    "ldt": ("LGDT", "LIDT", "LTR", "LLDT"),
    "int": ("INT", "INT3"),
    "iret": ("IRET", "IRETD", "IRETQ"),
    "syscall": ("SYSCALL", "SYSRET", "SYSRETQ"),
    "far": ("RETF",),
}
_FAMILY_OF_MNEMONIC: Final = {
    int(getattr(Mnemonic, name)): family for family, names in _BY_NAME.items() for name in names
}
_CONTROL_REGISTERS: Final = frozenset(int(getattr(Register, f"CR{n}")) for n in range(16))
_SEGMENT_REGISTERS: Final = frozenset(
    int(getattr(Register, name)) for name in ("ES", "CS", "SS", "DS", "FS", "GS")
)


def family_of(instruction: Instruction) -> str:
    """The family of a decoded instruction (``"invalid"`` if it did not decode).

    MOV to or from a control register is ``cr``; MOV, PUSH or POP of a segment register is
    ``sreg``; JMP and CALL through a far pointer are ``far``, like RET far.
    """
    if instruction.code == 0:  # Code.INVALID
        return "invalid"
    family = _FAMILY_OF_MNEMONIC.get(instruction.mnemonic, "other")
    if family == "mov" and _touches(instruction, _CONTROL_REGISTERS):
        return "cr"
    if family in ("mov", "push-pop") and _touches(instruction, _SEGMENT_REGISTERS):
        return "sreg"
    if instruction.is_jmp_far_indirect or instruction.is_call_far_indirect:
        return "far"
    return family


def _touches(instruction: Instruction, registers: frozenset[int]) -> bool:
    return any(
        instruction.op_kind(operand) == OpKind.REGISTER
        and instruction.op_register(operand) in registers
        for operand in range(instruction.op_count)
    )


def family_at(code: bytes, address: int, bits: int = 64) -> str:
    """The family of the first instruction of ``code`` decoded at ``address`` in ``bits``-bit
    code (32 for compatibility-mode cases)."""
    if not code:
        raise ValueError("family_at: no code bytes")
    if not 0 <= address < 1 << 64:
        raise ValueError(f"family_at: address {address:#x} is not a u64")
    if bits not in (32, 64):
        raise ValueError(f"family_at: bits {bits} is not 32 or 64")
    return family_of(Decoder(bits, code, DecoderOptions.NONE, address).decode())
