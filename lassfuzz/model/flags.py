"""Arithmetic status flags and condition codes, computed from their SDM definitions.

Each helper returns ``(result, status)`` where ``status`` holds only the six status bits
(CF PF AF ZF SF OF) the instruction defines; callers merge it into RFLAGS and record which of
them the SDM leaves undefined (SDM Vol. 1 Appendix A, "EFLAGS Cross-Reference").
"""

from __future__ import annotations

from typing import Final

from lassfuzz.arch import (
    RFLAGS_AF,
    RFLAGS_CF,
    RFLAGS_OF,
    RFLAGS_PF,
    RFLAGS_SF,
    RFLAGS_ZF,
)

#: PF is set when the low byte of the result has an even number of 1 bits (SDM Vol. 1 3.4.3.1).
_PARITY: Final = tuple(0 if bin(byte).count("1") % 2 else RFLAGS_PF for byte in range(256))

FLAG_NAMES: Final = {
    RFLAGS_CF: "CF",
    RFLAGS_PF: "PF",
    RFLAGS_AF: "AF",
    RFLAGS_ZF: "ZF",
    RFLAGS_SF: "SF",
    RFLAGS_OF: "OF",
}

#: Flags the SDM leaves undefined after AND/OR/XOR/TEST (AF) and BT/BTS/BTR/BTC (OF SF AF PF).
UNDEFINED_AFTER_LOGIC: Final = RFLAGS_AF
UNDEFINED_AFTER_BT: Final = RFLAGS_OF | RFLAGS_SF | RFLAGS_AF | RFLAGS_PF


def flag_names(mask: int) -> str:
    """``"CF PF"``-style names of the status bits in ``mask``, for messages."""
    return " ".join(name for bit, name in FLAG_NAMES.items() if mask & bit)


def result_flags(result: int, bits: int) -> int:
    """SF, ZF and PF of a ``bits``-wide result (already masked)."""
    flags = _PARITY[result & 0xFF]
    if result == 0:
        flags |= RFLAGS_ZF
    if result >> (bits - 1):
        flags |= RFLAGS_SF
    return flags


def add(a: int, b: int, carry: int, bits: int) -> tuple[int, int]:
    """ADD/ADC (carry = CF in): CF = unsigned carry out, OF = signed overflow, AF = carry out
    of bit 3 (SDM Vol. 2 ADD/ADC)."""
    full = a + b + carry
    result = full & ((1 << bits) - 1)
    flags = result_flags(result, bits) | ((a ^ b ^ result) & RFLAGS_AF)
    if full >> bits:
        flags |= RFLAGS_CF
    if ((a ^ result) & (b ^ result)) >> (bits - 1) & 1:
        flags |= RFLAGS_OF
    return result, flags


def sub(a: int, b: int, borrow: int, bits: int) -> tuple[int, int]:
    """SUB/SBB/CMP/NEG (borrow = CF in): CF = unsigned borrow, OF = signed overflow, AF = borrow
    into bit 3 (SDM Vol. 2 SUB/SBB/CMP)."""
    full = a - b - borrow
    result = full & ((1 << bits) - 1)
    flags = result_flags(result, bits) | ((a ^ b ^ result) & RFLAGS_AF)
    if full < 0:
        flags |= RFLAGS_CF
    if ((a ^ b) & (a ^ result)) >> (bits - 1) & 1:
        flags |= RFLAGS_OF
    return result, flags


def logic(result: int, bits: int) -> int:
    """AND/OR/XOR/TEST: OF = CF = 0, SF ZF PF from the result, AF undefined (SDM Vol. 2 AND)."""
    return result_flags(result, bits)


#: Condition codes in SDM encoding order (the low nibble of Jcc/SETcc/CMOVcc, "tttn"), each with
#: the status flags it reads. SDM Vol. 1 Appendix B, Table B-1.
CONDITION_NAMES: Final = (
    "o", "no", "b", "ae", "e", "ne", "be", "a", "s", "ns", "p", "np", "l", "ge", "le", "g",
)  # fmt: skip
CONDITION_READS: Final = (
    RFLAGS_OF, RFLAGS_OF, RFLAGS_CF, RFLAGS_CF, RFLAGS_ZF, RFLAGS_ZF,
    RFLAGS_CF | RFLAGS_ZF, RFLAGS_CF | RFLAGS_ZF, RFLAGS_SF, RFLAGS_SF, RFLAGS_PF, RFLAGS_PF,
    RFLAGS_SF | RFLAGS_OF, RFLAGS_SF | RFLAGS_OF,
    RFLAGS_SF | RFLAGS_OF | RFLAGS_ZF, RFLAGS_SF | RFLAGS_OF | RFLAGS_ZF,
)  # fmt: skip


def condition(cc: int, rflags: int) -> bool:
    """Evaluate condition ``cc`` (0..15, SDM tttn encoding); odd codes negate even ones."""
    base = cc & ~1
    if base == 0:
        value = bool(rflags & RFLAGS_OF)
    elif base == 2:
        value = bool(rflags & RFLAGS_CF)
    elif base == 4:
        value = bool(rflags & RFLAGS_ZF)
    elif base == 6:
        value = bool(rflags & (RFLAGS_CF | RFLAGS_ZF))
    elif base == 8:
        value = bool(rflags & RFLAGS_SF)
    elif base == 10:
        value = bool(rflags & RFLAGS_PF)
    elif base == 12:
        value = bool(rflags & RFLAGS_SF) != bool(rflags & RFLAGS_OF)
    else:
        value = bool(rflags & RFLAGS_ZF) or bool(rflags & RFLAGS_SF) != bool(rflags & RFLAGS_OF)
    return value != bool(cc & 1)
