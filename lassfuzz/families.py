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
    "flags": ("PUSHF", "PUSHFQ", "POPF", "POPFQ", "STAC", "CLAC", "CLD", "STD"),
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
}
_FAMILY_OF_MNEMONIC: Final = {
    int(getattr(Mnemonic, name)): family for family, names in _BY_NAME.items() for name in names
}
_CONTROL_REGISTERS: Final = frozenset(int(getattr(Register, f"CR{n}")) for n in range(16))


def family_of(instruction: Instruction) -> str:
    """The family of a decoded instruction (``"invalid"`` if it did not decode)."""
    if instruction.code == 0:  # Code.INVALID
        return "invalid"
    family = _FAMILY_OF_MNEMONIC.get(instruction.mnemonic, "other")
    if family == "mov" and _touches_control_register(instruction):
        return "cr"
    return family


def _touches_control_register(instruction: Instruction) -> bool:
    return any(
        instruction.op_kind(operand) == OpKind.REGISTER
        and instruction.op_register(operand) in _CONTROL_REGISTERS
        for operand in range(instruction.op_count)
    )


def family_at(code: bytes, address: int) -> str:
    """The family of the first instruction of ``code`` decoded in 64-bit mode at ``address``."""
    if not code:
        raise ValueError("family_at: no code bytes")
    if not 0 <= address < 1 << 64:
        raise ValueError(f"family_at: address {address:#x} is not a u64")
    return family_of(Decoder(64, code, DecoderOptions.NONE, address).decode())
