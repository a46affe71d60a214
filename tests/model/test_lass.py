"""The LASS rules module against LASS.md §1–§5, row by row, plus Hypothesis properties."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lassfuzz.arch import (
    CR4_LASS,
    CR4_PAE,
    CR4_SMAP,
    CR4_SMEP,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    MASK64,
    RFLAGS_AC,
    RFLAGS_FIXED1,
    VEC_GP,
    VEC_SS,
)
from lassfuzz.model.lass import Kind, LassDecision, Verdict, check_access

USER = 0x0000_0000_0040_1000
SUPER = 0xFFFF_8000_0000_0000
LONG = EFER_LME | EFER_LMA | EFER_NXE
LASS = CR4_PAE | CR4_LASS


def check(
    address: int,
    kind: Kind = Kind.READ,
    *,
    size: int = 8,
    cpl: int = 0,
    smap: bool = False,
    smep: bool = False,
    ac: bool = False,
    implicit: bool = False,
    stack: bool = False,
    cr4: int = LASS,
    efer: int = LONG,
    cs_l: bool = True,
) -> LassDecision:
    return check_access(
        address,
        size,
        kind,
        implicit=implicit,
        stack=stack,
        cpl=cpl,
        cr4=cr4 | (CR4_SMAP if smap else 0) | (CR4_SMEP if smep else 0),
        rflags=RFLAGS_FIXED1 | (RFLAGS_AC if ac else 0),
        efer=efer,
        cs_l=cs_l,
    )


V, A, D = Verdict.VIOLATION, Verdict.ALLOWED, Verdict.DROPPED

# (LASS.md §3 row, address, check() keyword arguments, verdict). Each row is spelled out for every
# value its "any" columns allow, so that a rule leaking into a neighbouring column shows up.
RULE_TABLE: list[tuple[str, int, dict[str, Any], Verdict]] = [
    *[
        (
            f"1 user {kind.value} smap={smap} ac={ac}",
            SUPER,
            dict(kind=kind, cpl=3, smap=smap, ac=ac),
            V,
        )
        for kind in (Kind.READ, Kind.WRITE)
        for smap in (False, True)
        for ac in (False, True)
    ],
    *[
        (f"1' user {kind.value} own half", USER, dict(kind=kind, cpl=3, smap=True), A)
        for kind in (Kind.READ, Kind.WRITE)
    ],
    *[
        (
            f"2 user fetch smap={smap} ac={ac}",
            SUPER,
            dict(kind=Kind.FETCH, cpl=3, smap=smap, ac=ac),
            V,
        )
        for smap in (False, True)
        for ac in (False, True)
    ],
    ("2' user fetch own half", USER, dict(kind=Kind.FETCH, cpl=3, smap=True), A),
    *[
        (
            f"3 supervisor fetch smap={smap} smep={smep} ac={ac}",
            USER,
            dict(kind=Kind.FETCH, smap=smap, smep=smep, ac=ac),
            V,
        )
        for smap in (False, True)
        for smep in (False, True)
        for ac in (False, True)
    ],
    ("3' supervisor fetch own half", SUPER, dict(kind=Kind.FETCH, smap=True, smep=True), A),
    *[
        (f"4 supervisor {k.value}", USER, dict(kind=k, smap=True), V)
        for k in (Kind.READ, Kind.WRITE)
    ],
    *[
        (f"5 supervisor {k.value} AC", USER, dict(kind=k, smap=True, ac=True), A)
        for k in (Kind.READ, Kind.WRITE)
    ],
    *[
        (f"6 supervisor {k.value} no SMAP ac={ac}", USER, dict(kind=k, ac=ac), A)
        for k in (Kind.READ, Kind.WRITE)
        for ac in (False, True)
    ],
    *[
        (f"7 implicit cpl{cpl} ac={ac}", USER, dict(cpl=cpl, smap=True, ac=ac, implicit=True), V)
        for ac in (False, True)
        for cpl in (0, 3)
    ],
    *[
        (f"8 implicit cpl{cpl} no SMAP ac={ac}", USER, dict(cpl=cpl, ac=ac, implicit=True), A)
        for ac in (False, True)
        for cpl in (0, 3)
    ],
    *[
        (
            f"9 supervisor data smap={smap} ac={ac} implicit={imp}",
            SUPER,
            dict(smap=smap, ac=ac, implicit=imp),
            A,
        )
        for smap in (False, True)
        for ac in (False, True)
        for imp in (False, True)
    ],
]


@pytest.mark.parametrize(
    ("row", "address", "kwargs", "verdict"), RULE_TABLE, ids=[row[0] for row in RULE_TABLE]
)
def test_decision_table_rows(
    row: str, address: int, kwargs: dict[str, Any], verdict: Verdict
) -> None:
    decision = check(address, **kwargs)
    assert decision.verdict is verdict, row
    if verdict is V:
        assert decision.vector == VEC_GP
        assert decision.address == address
        assert f"rule {row[0]}" in decision.rule
    else:
        assert decision.vector is None and decision.address is None


@pytest.mark.parametrize("cpl", [1, 2])
def test_cpl_1_and_2_are_supervisor(cpl: int) -> None:
    # LASS.md §2: supervisor-mode access = CPL < 3, CPL 1 and 2 included.
    assert check(USER, cpl=cpl, smap=True).verdict is V  # rule 4
    assert check(SUPER, cpl=cpl, smap=True).verdict is A  # rule 9
    assert check(USER, Kind.FETCH, cpl=cpl).verdict is V  # rule 3


def test_inactive_without_lma_or_cr4_lass() -> None:
    assert check(SUPER, cpl=3, efer=EFER_LME).verdict is A  # legacy mode: bit set, no effect
    assert check(SUPER, cpl=3, cr4=CR4_PAE).verdict is A
    assert "inactive" in check(USER, Kind.FETCH, cr4=CR4_PAE).rule


def test_stack_access_gives_ss_and_others_gp() -> None:
    assert check(SUPER, cpl=3, stack=True).vector == VEC_SS
    assert check(USER, Kind.WRITE, smap=True, stack=True).vector == VEC_SS
    assert check(SUPER, cpl=3).vector == VEC_GP
    assert check(USER, smap=True, implicit=True).vector == VEC_GP  # §4: implicit → #GP
    assert check(SUPER, Kind.FETCH, cpl=3).vector == VEC_GP


def test_wrap_past_2_64_violates_at_first_user_byte() -> None:
    # §3: an 8-byte supervisor read at 0xFFFF_FFFF_FFFF_FFFC touches user bytes 0..3.
    decision = check(0xFFFF_FFFF_FFFF_FFFC, smap=True)
    assert (decision.verdict, decision.address) == (V, 0)
    assert check(0xFFFF_FFFF_FFFF_FFF8, smap=True).verdict is A  # ends exactly at 2^64 - 1
    assert check(0xFFFF_FFFF_FFFF_FFFC, smap=True, ac=True).verdict is A  # rule 5
    # A user access that wraps starts in the supervisor half: the first byte violates.
    assert check(0xFFFF_FFFF_FFFF_FFFC, cpl=3).address == 0xFFFF_FFFF_FFFF_FFFC


def test_user_access_crossing_into_supervisor_half() -> None:
    decision = check(0x7FFF_FFFF_FFFF_FFFE, cpl=3, size=4)
    assert (decision.verdict, decision.address) == (V, 1 << 63)
    assert check(0x7FFF_FFFF_FFFF_FFFC, cpl=3, size=4).verdict is A


def test_prefetch_is_dropped_never_faults() -> None:
    dropped = check(SUPER, Kind.PREFETCH, cpl=3, size=1)
    assert (dropped.verdict, dropped.vector, dropped.address) == (D, None, SUPER)
    assert check(USER, Kind.PREFETCH, smap=True, size=1, stack=True).verdict is D
    assert check(USER, Kind.PREFETCH, smap=True, ac=True, size=1).verdict is A


def test_compatibility_mode_counts_bit_63_as_zero() -> None:
    # §1 / D1: every supervisor fetch faults, user accesses never do, supervisor data follows SMAP.
    assert check(SUPER, Kind.FETCH, cs_l=False).verdict is V
    assert check(SUPER, cpl=3, cs_l=False).verdict is A
    assert check(SUPER, Kind.FETCH, cpl=3, cs_l=False).verdict is A
    assert check(SUPER, smap=True, cs_l=False).verdict is V
    assert check(SUPER, smap=True, ac=True, cs_l=False).verdict is A


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(address=-1), "not a u64"),
        (dict(address=1 << 64), "not a u64"),
        (dict(size=0), "size"),
        (dict(cpl=4), "CPL"),
        (dict(implicit=True, stack=True), "open point"),
        (dict(kind=Kind.FETCH, stack=True), "fetch"),
        (dict(kind=Kind.FETCH, implicit=True), "fetch"),
        (dict(kind=Kind.PREFETCH, implicit=True), "prefetch"),
    ],
)
def test_bad_input_is_named(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check(**{"address": USER, **kwargs})


# ---------------------------------------------------------------- properties

EDGES = (0, 1 << 63, (1 << 63) - 1, MASK64, USER, SUPER, 0xFFFF_FFFF_FFFF_FFFC, 0x7FFF_FFFF_FFFF)
addresses = st.one_of(
    st.sampled_from(EDGES),
    st.sampled_from(EDGES).flatmap(lambda e: st.integers(-20, 20).map(lambda d: (e + d) & MASK64)),
    st.integers(0, MASK64),
)
cr4s = st.builds(
    lambda smap, smep, lass: CR4_PAE | smap | smep | lass,
    st.sampled_from([0, CR4_SMAP]),
    st.sampled_from([0, CR4_SMEP]),
    st.sampled_from([0, CR4_LASS]),
)
rflagss = st.sampled_from([RFLAGS_FIXED1, RFLAGS_FIXED1 | RFLAGS_AC])
efers = st.sampled_from([LONG, EFER_LME, EFER_LMA])


@st.composite
def accesses(draw: st.DrawFn) -> dict[str, Any]:
    """Any legal argument set of check_access."""
    kind = draw(st.sampled_from(list(Kind)))
    implicit = kind in (Kind.READ, Kind.WRITE) and draw(st.booleans())
    stack = kind is not Kind.FETCH and not implicit and draw(st.booleans())
    return dict(
        address=draw(addresses),
        size=draw(st.sampled_from([1, 2, 4, 8, 16, 64])),
        kind=kind,
        implicit=implicit,
        stack=stack,
        cpl=draw(st.integers(0, 3)),
        cr4=draw(cr4s),
        rflags=draw(rflagss),
        efer=draw(efers),
        cs_l=draw(st.booleans()),
    )


@given(accesses())
def test_lass_off_or_lma_clear_allows_everything(args: dict[str, Any]) -> None:
    if args["cr4"] & CR4_LASS and args["efer"] & EFER_LMA:
        args["cr4"] &= ~CR4_LASS
    assert check_access(**args).verdict is A


@given(accesses(), addresses, st.sampled_from([Kind.READ, Kind.WRITE, Kind.FETCH]))
def test_user_access_to_bit63_byte_always_violates(
    args: dict[str, Any], address: int, kind: Kind
) -> None:
    args.update(address=address | (1 << 63), kind=kind, cpl=3, implicit=False, efer=LONG, cs_l=True)
    args["cr4"] |= CR4_LASS
    if kind is Kind.FETCH:
        args["stack"] = False
    assert check_access(**args).verdict is V  # whatever SMAP and AC say


@given(accesses())
def test_ac_never_changes_a_fetch(args: dict[str, Any]) -> None:
    args.update(kind=Kind.FETCH, implicit=False, stack=False)
    with_ac = check_access(**{**args, "rflags": args["rflags"] | RFLAGS_AC})
    without_ac = check_access(**{**args, "rflags": args["rflags"] & ~RFLAGS_AC})
    assert with_ac == without_ac


@given(accesses())
def test_vector_is_ss_exactly_for_stack_violations(args: dict[str, Any]) -> None:
    decision = check_access(**args)
    if decision.verdict is V:
        assert (decision.vector == VEC_SS) == args["stack"]
        assert decision.vector in (VEC_GP, VEC_SS)
    else:
        assert decision.vector is None


@given(accesses())
def test_multibyte_access_violates_iff_some_byte_does(args: dict[str, Any]) -> None:
    decision = check_access(**args)
    per_byte = [
        check_access(**{**args, "address": (args["address"] + i) & MASK64, "size": 1})
        for i in range(args["size"])
    ]
    offenders = [d for d in per_byte if d.verdict is not A]
    if offenders:
        assert decision.verdict is offenders[0].verdict
        assert decision.address == offenders[0].address  # the first byte in access order
        assert decision.vector == offenders[0].vector
    else:
        assert decision.verdict is A
