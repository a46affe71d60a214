"""Decision-cell and family coverage recorded through the reference model's observer."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lassfuzz.arch import CR4_LASS, CR4_SMAP, GPR_NAMES, RFLAGS_AC
from lassfuzz.campaign.coverage import (
    REACHABLE_CELLS,
    CaseCoverage,
    Coverage,
    CoverageError,
    CoverageRecorder,
)
from lassfuzz.case import (
    COMPAT_CODE_ADDRESS,
    DEFAULT_CODE_ADDRESS,
    DEFAULT_CR4,
    DEFAULT_RFLAGS,
    Page,
    State,
    TestCase,
)
from lassfuzz.generator.generate import generate_case
from lassfuzz.matrix import Cell, cell_case, cells
from lassfuzz.model.engine import ReferenceModel

SUPERVISOR_DATA = 0xFFFF_8000_0000_0000
USER_DATA = 0x0000_0000_1000_0000
#: A cell name the matrix does not have (an implicit write: setting a descriptor's A bit).
OUTSIDE = "cpl0 implicit-write supervisor-half implicit"


def record(case: TestCase) -> CaseCoverage:
    recorder = CoverageRecorder()
    model = ReferenceModel(observer=recorder)
    recorder.begin(case)
    model.run(case)
    return recorder.end()


def code_fetch(cell: Cell) -> str:
    """The cell of fetching a matrix case's own code (natural half and page for its CPL)."""
    return dataclasses.replace(
        cell,
        kind="fetch",
        implicit=False,
        stack=False,
        address=DEFAULT_CODE_ADDRESS[cell.cpl],
        size=2,
        page_user=cell.cpl == 3,
    ).name


def record_cells(chosen: list[Cell]) -> dict[str, frozenset[str]]:
    """Each cell's name -> the cells its matrix case hit."""
    recorder = CoverageRecorder()
    model = ReferenceModel(observer=recorder)
    seen = {}
    for cell in chosen:
        case = cell_case(cell)
        recorder.begin(case)
        model.run(case)
        seen[cell.name] = recorder.end().cells
    return seen


def load_case(cpl: int, address: int, *, cr4: int, rflags: int, user: bool) -> TestCase:
    """``mov rax, [rbx]`` with RBX = ``address``, on a page with the given U/S bit."""
    gprs = dict.fromkeys(GPR_NAMES, 0)
    gprs["rbx"] = address
    state = State(cpl=cpl, gprs=tuple(gprs[name] for name in GPR_NAMES), cr4=cr4, rflags=rflags)
    return TestCase(
        state=state,
        code=bytes.fromhex("488b03"),
        code_address=DEFAULT_CODE_ADDRESS[cpl],
        pages=(Page(address & ~0xFFF, user=user),),
    )


def test_cpl0_load_from_user_page_with_ac_hits_exactly_its_cell_and_the_code_fetch() -> None:
    case = load_case(
        0,
        USER_DATA + 8,
        cr4=DEFAULT_CR4 | CR4_LASS | CR4_SMAP,
        rflags=DEFAULT_RFLAGS | RFLAGS_AC,
        user=True,
    )
    seen = record(case)
    assert seen.cells == {
        "cpl0 read user-half lass smap ac user-page",
        "cpl0 fetch supervisor-half lass smap ac",
    }
    assert seen.families == {"mov"}
    assert seen.data_accesses == 1


def test_violating_access_is_recorded_although_it_faults() -> None:
    case = load_case(
        3, SUPERVISOR_DATA, cr4=DEFAULT_CR4 | CR4_LASS, rflags=DEFAULT_RFLAGS, user=False
    )
    seen = record(case)
    assert "cpl3 read supervisor-half lass" in seen.cells
    assert seen.data_accesses == 1


def test_each_explicit_64_bit_matrix_case_hits_its_cell_and_its_code_fetch_only() -> None:
    chosen = [
        cell
        for cell in cells()
        if cell.mode == "64" and cell.cpl in (0, 3) and not cell.implicit and not cell.la57
    ]
    seen = record_cells(chosen)
    expected = {cell.name: {cell.name, code_fetch(cell)} for cell in chosen}
    assert {name: set(hit) for name, hit in seen.items() if hit != expected[name]} == {}


@pytest.mark.slow
def test_every_matrix_case_hits_its_own_cell() -> None:
    # Implicit-read cases also read other tables, and faults are delivered through the IDT.
    # A compatibility-mode supervisor fetch cell with LASS on never gets past fetching its own
    # code (below 4 GiB, so in the user half): its case hits only that first fetch.
    def fetches_own_code_only(cell: Cell) -> bool:
        return cell.mode == "compat" and cell.kind == "fetch" and cell.cpl < 3 and cell.cr4_lass

    chosen = [cell for cell in cells() if not fetches_own_code_only(cell)]
    seen = record_cells(chosen)
    assert [name for name, hit in seen.items() if name not in hit] == []


def test_access_to_an_unmapped_page_counts_as_access_but_hits_no_cell() -> None:
    case = load_case(0, SUPERVISOR_DATA, cr4=DEFAULT_CR4, rflags=DEFAULT_RFLAGS, user=False)
    case = dataclasses.replace(case, pages=())
    seen = record(case)
    assert seen.data_accesses == 1
    assert seen.cells == {"cpl0 fetch supervisor-half lass-cpuid"}


def test_non_present_page_hits_no_cell() -> None:
    case = load_case(0, SUPERVISOR_DATA, cr4=DEFAULT_CR4, rflags=DEFAULT_RFLAGS, user=False)
    case = dataclasses.replace(case, pages=(Page(SUPERVISOR_DATA, user=False, present=False),))
    assert record(case).cells == {"cpl0 fetch supervisor-half lass-cpuid"}


def test_a_listed_code_page_gives_the_fetch_its_u_s_bit() -> None:
    case = load_case(0, SUPERVISOR_DATA, cr4=DEFAULT_CR4, rflags=DEFAULT_RFLAGS, user=False)
    code_page = Page(DEFAULT_CODE_ADDRESS[0], user=True, writable=False)
    case = dataclasses.replace(case, pages=(*case.pages, code_page))
    assert "cpl0 fetch supervisor-half lass-cpuid user-page" in record(case).cells


def test_compatibility_mode_instructions_get_their_32_bit_family() -> None:
    # 0x40 is INC EAX in 32-bit code (a REX prefix in 64-bit code).
    state = State(mode="compat", cpl=3)
    case = TestCase(state=state, code=b"\x40", code_address=COMPAT_CODE_ADDRESS)
    seen = record(case)
    assert seen.families == {"unary"}
    assert seen.cells == {"compat cpl3 fetch user-half lass-cpuid user-page"}


def test_recorder_ignores_runs_outside_begin_and_end() -> None:
    recorder = CoverageRecorder()
    model = ReferenceModel(observer=recorder)
    case = load_case(0, SUPERVISOR_DATA, cr4=DEFAULT_CR4, rflags=DEFAULT_RFLAGS, user=False)
    model.run(case)  # e.g. a triage re-run: not recorded
    recorder.begin(case)
    seen = recorder.end()
    assert seen == CaseCoverage(frozenset(), frozenset(), 0)
    with pytest.raises(RuntimeError, match="without begin"):
        recorder.end()


def test_observer_does_not_change_outcomes() -> None:
    plain = ReferenceModel()
    observed = ReferenceModel(observer=CoverageRecorder())  # never armed: reports are dropped
    recorder = CoverageRecorder()
    armed = ReferenceModel(observer=recorder)
    for index in range(40):
        case = generate_case(5, index)
        recorder.begin(case)
        outcomes = {repr(engine.run(case)) for engine in (plain, observed, armed)}
        recorder.end()
        assert len(outcomes) == 1


def test_generated_cases_hit_matrix_cells_or_cells_of_dimensions_the_matrix_lacks() -> None:
    recorder = CoverageRecorder()
    model = ReferenceModel(observer=recorder)
    coverage = Coverage()
    for index in range(400):
        case = generate_case(2, index)
        recorder.begin(case)
        model.run(case)
        coverage.add(recorder.end())
    outside = set(+coverage.cells) - REACHABLE_CELLS
    extra_dimensions = {"compat", "cpl1", "cpl2", "implicit"}
    assert [name for name in outside if not extra_dimensions & set(name.split())] == []
    assert coverage.covered > 100  # a few hundred cases already spread widely
    assert {"mov", "alu", "push-pop"} <= set(coverage.families)


def test_add_counts_cases_and_returns_first_hits() -> None:
    coverage = Coverage()
    first = CaseCoverage(frozenset({"b", "a"}), frozenset({"mov"}), 2)
    assert coverage.add(first) == ("a", "b")
    assert coverage.add(first) == ()
    assert coverage.cells == {"a": 2, "b": 2}
    assert coverage.families == {"mov": 2}


def test_merge_adds_counts_and_names_new_cells() -> None:
    name = next(iter(sorted(REACHABLE_CELLS)))
    total = Coverage({name: 1}, {"mov": 3})
    new = total.merge(Coverage({name: 2, "other": 1}, {"alu": 1}))
    assert new == ("other",)
    assert total.cells == {name: 3, "other": 1}
    assert total.families == {"mov": 3, "alu": 1}
    assert (total.covered, total.total) == (1, len(REACHABLE_CELLS))
    assert name not in total.uncovered()
    assert len(total.uncovered()) == len(REACHABLE_CELLS) - 1


def test_copy_is_independent() -> None:
    original = Coverage({"a": 1})
    snapshot = original.copy()
    original.add(CaseCoverage(frozenset({"a"}), frozenset(), 1))
    assert snapshot.cells == {"a": 1}


def test_json_round_trip_lists_every_reachable_cell() -> None:
    name = sorted(REACHABLE_CELLS)[3]
    coverage = Coverage({name: 4, OUTSIDE: 2}, {"mov": 5})
    document = json.loads(json.dumps(coverage.to_dict()))
    assert document["cells_total"] == len(REACHABLE_CELLS)
    assert set(document["cells"]) == REACHABLE_CELLS | {OUTSIDE}
    assert document["cells"][name] == 4
    assert document["families"] == {"mov": 5}
    again = Coverage.from_dict(document)
    assert +again.cells == +coverage.cells
    assert again.families == coverage.families
    assert again.covered == 1  # the cell outside the reachable set does not count


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"cells": {}, "extra": 1}, "unknown key"),
        ({"cells": []}, "cells must be an object"),
        ({"cells": {"a": -1}}, r"cells\['a'\]"),
        ({"families": {"mov": "3"}}, r"families\['mov'\]"),
        ({"cells": {"a": True}}, "is not a count"),
    ],
)
def test_from_dict_rejects_bad_documents(document: dict[str, object], message: str) -> None:
    with pytest.raises(CoverageError, match=message):
        Coverage.from_dict(document)
