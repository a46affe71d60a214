"""Arithmetic flags and condition codes against Python big-int arithmetic."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lassfuzz.arch import RFLAGS_AF, RFLAGS_CF, RFLAGS_OF, RFLAGS_PF, RFLAGS_SF, RFLAGS_ZF
from lassfuzz.model import flags

SIZES = st.sampled_from([8, 16, 32, 64])


@st.composite
def operands(draw: st.DrawFn) -> tuple[int, int, int, int]:
    bits = draw(SIZES)
    top = (1 << bits) - 1
    return bits, draw(st.integers(0, top)), draw(st.integers(0, top)), draw(st.integers(0, 1))


def signed(value: int, bits: int) -> int:
    return value - (1 << bits) if value >> (bits - 1) else value


def parity_flag(result: int) -> int:
    return RFLAGS_PF if bin(result & 0xFF).count("1") % 2 == 0 else 0


@given(operands())
def test_add_matches_big_int_arithmetic(ops: tuple[int, int, int, int]) -> None:
    bits, a, b, carry = ops
    result, status = flags.add(a, b, carry, bits)
    assert result == (a + b + carry) % (1 << bits)
    assert bool(status & RFLAGS_CF) == (a + b + carry >= 1 << bits)
    true_signed = signed(a, bits) + signed(b, bits) + carry
    assert bool(status & RFLAGS_OF) == (true_signed != signed(result, bits))
    assert bool(status & RFLAGS_AF) == ((a & 0xF) + (b & 0xF) + carry > 0xF)
    assert bool(status & RFLAGS_ZF) == (result == 0)
    assert bool(status & RFLAGS_SF) == (signed(result, bits) < 0)
    assert status & RFLAGS_PF == parity_flag(result)


@given(operands())
def test_sub_matches_big_int_arithmetic(ops: tuple[int, int, int, int]) -> None:
    bits, a, b, borrow = ops
    result, status = flags.sub(a, b, borrow, bits)
    assert result == (a - b - borrow) % (1 << bits)
    assert bool(status & RFLAGS_CF) == (a < b + borrow)
    true_signed = signed(a, bits) - signed(b, bits) - borrow
    assert bool(status & RFLAGS_OF) == (true_signed != signed(result, bits))
    assert bool(status & RFLAGS_AF) == ((a & 0xF) < (b & 0xF) + borrow)
    assert bool(status & RFLAGS_ZF) == (result == 0)
    assert status & RFLAGS_PF == parity_flag(result)


def test_known_flag_values() -> None:
    # 0x7F + 1 = 0x80 at 8 bits: signed overflow, AF from bit 3, SF, no carry.
    assert flags.add(0x7F, 1, 0, 8) == (0x80, RFLAGS_OF | RFLAGS_AF | RFLAGS_SF)
    # 0 - 1 at 32 bits: borrow, AF, SF, parity of 0xFF is even.
    assert flags.sub(0, 1, 0, 32) == (0xFFFF_FFFF, RFLAGS_CF | RFLAGS_AF | RFLAGS_SF | RFLAGS_PF)
    # AND result 0: ZF and PF; CF/OF never set by logic().
    assert flags.logic(0, 64) == RFLAGS_ZF | RFLAGS_PF


@given(st.integers(0, 15), st.integers(0, 0xFFF))
def test_conditions_follow_sdm_table(cc: int, rflags: int) -> None:
    cf, zf = bool(rflags & RFLAGS_CF), bool(rflags & RFLAGS_ZF)
    sf, of, pf = bool(rflags & RFLAGS_SF), bool(rflags & RFLAGS_OF), bool(rflags & RFLAGS_PF)
    expected = [of, cf, zf, cf or zf, sf, pf, sf != of, zf or sf != of][cc >> 1]
    assert flags.condition(cc, rflags) == (expected != bool(cc & 1))


@given(st.integers(0, 15), st.integers(0, 0xFFF))
def test_condition_reads_only_its_flags(cc: int, rflags: int) -> None:
    """Flipping a flag outside CONDITION_READS never changes the outcome."""
    others = (RFLAGS_CF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF | RFLAGS_PF) & ~flags.CONDITION_READS[
        cc
    ]
    assert flags.condition(cc, rflags) == flags.condition(cc, rflags ^ others)


def test_flag_names() -> None:
    assert flags.flag_names(RFLAGS_AF | RFLAGS_CF) == "CF AF"
