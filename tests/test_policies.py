"""The built-in LASS policies against LASS.md §3 and §6, and policy loading."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lassfuzz.arch import (
    CR4_LASS,
    CR4_PAE,
    CR4_SMAP,
    EFER_LMA,
    EFER_LME,
    MASK64,
    RFLAGS_AC,
    RFLAGS_FIXED1,
)
from lassfuzz.policies import (
    BUILTIN,
    PolicyAccess,
    PolicyError,
    bochs,
    load_policy,
    none,
    sdm,
)

USER = 0x0000_0000_0040_1000
SUPER = 0xFFFF_8000_0000_0000


def access(
    address: int,
    kind: str = "read",
    *,
    size: int = 8,
    cpl: int = 0,
    smap: bool = False,
    ac: bool = False,
    implicit: bool = False,
    cs_l: bool = True,
) -> PolicyAccess:
    return PolicyAccess(
        address=address,
        size=size,
        kind=kind,
        implicit=implicit,
        cpl=cpl,
        cr4=CR4_PAE | CR4_LASS | (CR4_SMAP if smap else 0),
        rflags=RFLAGS_FIXED1 | (RFLAGS_AC if ac else 0),
        efer=EFER_LME | EFER_LMA,
        cs_l=cs_l,
    )


@pytest.mark.parametrize(
    ("case", "violates"),
    [
        # rows of LASS.md §3
        (access(SUPER, "read", cpl=3), True),  # 1
        (access(SUPER, "write", cpl=3), True),  # 1
        (access(SUPER, "fetch", cpl=3), True),  # 2
        (access(USER, "fetch", cpl=0, smap=True, ac=True), True),  # 3
        (access(USER, "read", smap=True), True),  # 4
        (access(USER, "write", smap=True, ac=True), False),  # 5
        (access(USER, "write", smap=False), False),  # 6
        (access(USER, "read", smap=True, ac=True, implicit=True), True),  # 7
        (access(USER, "read", smap=False, implicit=True), False),  # 8
        (access(SUPER, "write", smap=True), False),  # 9
        (access(USER, "read", cpl=3), False),  # user to user
        (access(SUPER, "fetch", cpl=0), False),  # supervisor fetch from supervisor half
        (access(USER, "read", cpl=2, smap=True), True),  # CPL 1/2 are supervisor
        (access(USER, "read", cpl=3, smap=True, implicit=True), True),  # implicit at CPL3
        (access(MASK64 - 3, "read", smap=True), True),  # wraps into user bytes 0..3
        (access(MASK64 - 3, "read", cpl=3), True),  # user bytes and supervisor bytes
        (access(SUPER, "read", cpl=3, cs_l=False), False),  # compatibility: bit 63 is 0
        (access(SUPER, "fetch", cpl=0, cs_l=False), True),  # every CPL0 fetch faults
        (access(SUPER, "read", cpl=0, smap=True, cs_l=False), True),  # explicit: bit 63 is 0
        # implicit accesses keep bit 63 in compatibility mode (64-bit GDTR/IDTR/TR bases)
        (access(SUPER, "read", cpl=3, smap=True, implicit=True, cs_l=False), False),
        (access(USER, "read", cpl=3, smap=True, implicit=True, cs_l=False), True),
        (access(USER, "read", cpl=0, smap=False, implicit=True, cs_l=False), False),
        (access(MASK64 - 3, "read", smap=True, implicit=True, cs_l=False), True),  # wraps
    ],
)
def test_sdm_rules(case: PolicyAccess, violates: bool) -> None:
    assert sdm(case) is violates


def test_bochs_differs_from_sdm_on_exactly_d1_and_d2() -> None:
    d1 = access(SUPER, "fetch", cpl=0, cs_l=False)
    d1_implicit = access(USER, "read", cpl=3, smap=True, implicit=True, cs_l=False)
    d2 = access(USER, "read", smap=True, ac=True, implicit=True)
    for case in (d1, d1_implicit, d2):
        assert (sdm(case), bochs(case)) == (True, False)


@given(
    address=st.integers(0, MASK64),
    size=st.sampled_from([1, 2, 4, 8, 16]),
    kind=st.sampled_from(["read", "write", "fetch"]),
    cpl=st.sampled_from([0, 1, 2, 3]),
    smap=st.booleans(),
    ac=st.booleans(),
)
def test_implicit_accesses_are_decided_alike_in_both_modes_by_sdm_never_by_bochs(
    address: int, size: int, kind: str, cpl: int, smap: bool, ac: bool
) -> None:
    """D1 covers implicit accesses too: Bochs checks nothing in compatibility mode, where the
    SDM decides an implicit access on its 64-bit address exactly as in 64-bit mode."""
    compat = access(address, kind, size=size, cpl=cpl, smap=smap, ac=ac, implicit=True, cs_l=False)
    long = access(address, kind, size=size, cpl=cpl, smap=smap, ac=ac, implicit=True)
    assert sdm(compat) == sdm(long)
    assert not bochs(compat)


@given(
    address=st.integers(0, MASK64),
    size=st.sampled_from([1, 2, 4, 8, 16]),
    kind=st.sampled_from(["read", "write", "fetch"]),
    cpl=st.sampled_from([0, 1, 2, 3]),
    smap=st.booleans(),
    ac=st.booleans(),
    implicit=st.booleans(),
)
def test_bochs_agrees_with_sdm_in_64_bit_mode_except_implicit_with_ac(
    address: int, size: int, kind: str, cpl: int, smap: bool, ac: bool, implicit: bool
) -> None:
    case = access(address, kind, size=size, cpl=cpl, smap=smap, ac=ac, implicit=implicit)
    if implicit and ac and kind != "fetch":
        assert not bochs(case)
    else:
        assert bochs(case) == sdm(case)
    assert not none(case)


def test_policy_access_rejects_bad_kind_and_size() -> None:
    with pytest.raises(ValueError, match="kind"):
        access(USER, "execute")
    with pytest.raises(ValueError, match="size"):
        access(USER, size=0)


@pytest.fixture
def user_module() -> Iterator[str]:
    module = types.ModuleType("lassfuzz_test_user_policy")
    module.strict = lambda access: True  # type: ignore[attr-defined]
    module.not_callable = 42  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    yield module.__name__
    del sys.modules[module.__name__]


def test_load_builtins_and_default() -> None:
    assert load_policy(None) == ("sdm", sdm)
    for name, policy in BUILTIN.items():
        assert load_policy(name) == (name, policy)


def test_load_user_policy(user_module: str) -> None:
    name, policy = load_policy(f"{user_module}:strict")
    assert name == f"{user_module}:strict"
    assert policy(access(USER)) is True


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nonsense", "unknown policy 'nonsense'"),
        ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
        ("{module}:missing", "has no attribute 'missing'"),
        ("{module}:not_callable", "'not_callable' is not callable"),
        (":f", "unknown policy"),
    ],
)
def test_load_policy_errors_name_the_cause(user_module: str, spec: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        load_policy(spec.format(module=user_module))
