"""The access path (canonical -> LASS -> paging): the issue's acceptance properties, checked
against the LASS rules module on random single accesses, plus canonical-check details."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from lassfuzz.arch import (
    CR4_LASS,
    CR4_PAE,
    CR4_SMAP,
    MASK64,
    PAGE_MASK,
    PTE_A,
    PTE_D,
    RFLAGS_AC,
    RFLAGS_FIXED1,
    VEC_GP,
    VEC_PF,
    VEC_SS,
)
from lassfuzz.case import Page, TestCase, materialize
from lassfuzz.model.lass import Kind, Verdict, check_access
from lassfuzz.model.memory import is_canonical
from lassfuzz.outcome import Outcome, Status
from tests.model.builders import KERNEL_DATA, USER_DATA, leaf_entry, make_case, run

#: Addresses around the interesting boundaries: page 0, the top of the user half, the bottom of
#: the supervisor half, the top of the address space (wrapping to 0) and ordinary pages.
ANCHORS = (
    0,
    0x1000,
    0x0000_7FFF_FFFF_F000,
    0xFFFF_8000_0000_0000,
    0xFFFF_FFFF_FFFF_F000,
    USER_DATA,
    KERNEL_DATA,
)
OFFSETS = (0, 0x10, 0xFF9, 0xFFC, 0xFFE, 0xFFF)


@dataclass(frozen=True)
class Form:
    """One way to make a data access: code per size, the base register, SS-segment or not."""

    name: str
    code: dict[int, str]
    base: str
    stack: bool
    kind: Kind


def _sized(prefix: str, opcode8: str, opcode: str, modrm: str) -> dict[int, str]:
    return {
        1: prefix + opcode8 + modrm,
        2: "66" + prefix + opcode + modrm,
        4: prefix + opcode + modrm,
        8: prefix + "48" + opcode + modrm,
    }


FORMS = (
    Form("load [rbx]", _sized("", "8a", "8b", "03"), "rbx", False, Kind.READ),
    Form("store [rbx]", _sized("", "88", "89", "03"), "rbx", False, Kind.WRITE),
    Form("add [rbx], reg", _sized("", "00", "01", "03"), "rbx", False, Kind.WRITE),
    Form("load [rsp]", _sized("", "8a", "8b", "0424"), "rsp", True, Kind.READ),
    Form("load [rbp+0]", _sized("", "8a", "8b", "4500"), "rbp", True, Kind.READ),
    Form("load ss:[rbx]", _sized("36", "8a", "8b", "03"), "rbx", True, Kind.READ),
    Form("load fs:[rsp]", _sized("64", "8a", "8b", "0424"), "rsp", False, Kind.READ),
    Form("push rax", {8: "50"}, "rsp", True, Kind.WRITE),
)


@dataclass(frozen=True)
class Access:
    case: TestCase
    form: Form
    address: int
    size: int


@st.composite
def accesses(draw: st.DrawFn, lass: bool | None = None) -> Access:
    form = draw(st.sampled_from(FORMS))
    size = draw(st.sampled_from(sorted(form.code)))
    address = (draw(st.sampled_from(ANCHORS)) + draw(st.sampled_from(OFFSETS))) & MASK64
    cpl = draw(st.sampled_from((0, 3)))
    lass_on = draw(st.booleans()) if lass is None else lass
    cr4 = CR4_PAE | (CR4_SMAP if draw(st.booleans()) else 0) | (CR4_LASS if lass_on else 0)
    rflags = RFLAGS_FIXED1 | (RFLAGS_AC if draw(st.booleans()) else 0)
    pages = []
    for page in sorted({address & PAGE_MASK, (address + size - 1) & PAGE_MASK}):
        if is_canonical(page):
            flags = draw(st.tuples(st.booleans(), st.booleans(), st.booleans()))
            pages.append(Page(page, user=flags[0], writable=flags[1], present=flags[2]))
    # PUSH writes below RSP; the other forms address exactly their base register.
    base_value = (address + size) & MASK64 if form.name == "push rax" else address
    regs = {form.base: base_value, "rax": 0x1122_3344_5566_7788}
    case = make_case(form.code[size], cpl=cpl, regs=regs, pages=pages, cr4=cr4, rflags=rflags)
    return Access(case, form, address, size)


def lass_decision(access: Access) -> Verdict:
    state = access.case.state
    return check_access(
        access.address, access.size, access.form.kind, implicit=False, stack=access.form.stack,
        cpl=state.cpl, cr4=state.cr4, rflags=state.rflags, efer=state.efer, cs_l=True,
    ).verdict  # fmt: skip


def canonical(access: Access) -> bool:
    last = (access.address + access.size - 1) & MASK64
    return is_canonical(access.address) and is_canonical(last)


def data_leaves(access: Access, memory: dict[int, bytes] | Outcome) -> list[int]:
    frames = memory.memory if isinstance(memory, Outcome) else memory
    return [leaf_entry(access.case, frames, page.address) for page in access.case.pages]


@settings(max_examples=300, deadline=None)
@given(accesses(lass=True))
def test_lass_violation_sets_no_ad_bit_and_is_never_a_page_fault(access: Access) -> None:
    violation = canonical(access) and lass_decision(access) is Verdict.VIOLATION
    event(f"LASS violation: {violation}")
    if not violation:
        return
    outcome = run(access.case)
    assert outcome.fault is not None
    assert outcome.fault.vector in (VEC_GP, VEC_SS)
    assert outcome.fault.vector != VEC_PF
    assert outcome.detail.startswith("LASS.md")
    before = data_leaves(access, dict(materialize(access.case).frames))
    assert data_leaves(access, outcome) == before
    assert outcome.trace == ()


@settings(max_examples=200, deadline=None)
@given(accesses(lass=False))
def test_lass_off_never_gives_a_lass_fault(access: Access) -> None:
    outcome = run(access.case)
    assert "LASS.md" not in outcome.detail
    if outcome.fault is not None and outcome.fault.vector in (VEC_GP, VEC_SS):
        assert not canonical(access)


@settings(max_examples=300, deadline=None)
@given(accesses())
def test_ss_exactly_for_ss_segment_accesses(access: Access) -> None:
    outcome = run(access.case)
    fault = outcome.fault.name if outcome.fault else "none"
    event(f"{fault} from an {'SS' if access.form.stack else 'other'}-segment access")
    if outcome.fault is not None and outcome.fault.vector in (VEC_GP, VEC_SS):
        assert (outcome.fault.vector == VEC_SS) == access.form.stack


@settings(max_examples=200, deadline=None)
@given(accesses())
def test_allowed_accesses_set_accessed_and_dirty(access: Access) -> None:
    outcome = run(access.case)
    if outcome.fault is not None:
        return
    for entry in data_leaves(access, outcome):
        assert entry & PTE_A
        assert bool(entry & PTE_D) == (access.form.kind is Kind.WRITE)


@pytest.mark.parametrize(
    ("address", "first_bad_byte"),
    [
        (0x0000_7FFF_FFFF_FFF8, None),  # the last user qword
        (0x0000_7FFF_FFFF_FFFC, 0x0000_8000_0000_0000),  # runs into the non-canonical hole
        (0xFFFF_7FFF_FFFF_FFFC, 0xFFFF_7FFF_FFFF_FFFC),  # starts in it
        (0xFFFF_FFFF_FFFF_FFFC, None),  # wraps to 0: canonical throughout (LASS off)
    ],
)
def test_canonical_check_covers_every_byte(address: int, first_bad_byte: int | None) -> None:
    touched = {address & PAGE_MASK, ((address + 7) & MASK64) & PAGE_MASK}
    pages = [Page(page, user=False) for page in sorted(touched) if is_canonical(page)]
    outcome = run(make_case("488b03", regs={"rbx": address}, pages=pages, cr4=CR4_PAE))
    if first_bad_byte is None:
        assert outcome.status is Status.COMPLETED
    else:
        assert outcome.fault is not None
        assert (outcome.fault.name, outcome.fault.address) == ("#GP(0)", first_bad_byte)
