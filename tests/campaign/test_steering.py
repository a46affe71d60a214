"""Coverage steering: deterministic configs that make under-hit decision cells likelier."""

from __future__ import annotations

import pytest

from lassfuzz.campaign.coverage import REACHABLE_CELLS, Coverage, CoverageRecorder
from lassfuzz.campaign.steering import EXPLORE_EVERY, GROUP_BOOST, focus, neighbourhood, steer
from lassfuzz.generator.config import DEFAULT_CONFIG, GeneratorConfig
from lassfuzz.generator.generate import generate_case
from lassfuzz.matrix import Cell, cells
from lassfuzz.model.engine import ReferenceModel

CELLS = {cell.name: cell for cell in cells()}
RARE = CELLS["cpl0 write wrap stack lass smap smep ac user-page"]


def coverage_of(cases: int, *, steered: bool) -> Coverage:
    """Coverage of cases 0..cases-1 of seed 3 in epochs of 250; steered, each epoch's config
    comes from the coverage of the epochs before it."""
    recorder = CoverageRecorder()
    model = ReferenceModel(observer=recorder)
    coverage = Coverage()
    config = DEFAULT_CONFIG
    for index in range(cases):
        if steered and index % 250 == 0:
            config = steer(DEFAULT_CONFIG, index // 250, coverage.copy().cells)
        case = generate_case(3, index, config)
        recorder.begin(case)
        model.run(case)
        coverage.add(recorder.end())
    return coverage


def cases_hitting(cell: Cell, config: GeneratorConfig, cases: int) -> int:
    recorder = CoverageRecorder()
    model = ReferenceModel(observer=recorder)
    count = 0
    for index in range(cases):
        case = generate_case(4, index, config)
        recorder.begin(case)
        model.run(case)
        count += cell.name in recorder.end().cells
    return count


def test_steer_is_a_pure_function_of_base_epoch_and_hits() -> None:
    hits = {name: position % 3 for position, name in enumerate(sorted(REACHABLE_CELLS))}
    for epoch in range(1, 10):
        assert steer(DEFAULT_CONFIG, epoch, hits) == steer(DEFAULT_CONFIG, epoch, dict(hits))
    assert len({steer(DEFAULT_CONFIG, epoch, hits) for epoch in range(1, 10)}) > 1


def test_every_few_epochs_run_the_base_config() -> None:
    for epoch in (0, EXPLORE_EVERY, 5 * EXPLORE_EVERY):
        assert steer(DEFAULT_CONFIG, epoch, {}) is DEFAULT_CONFIG
    assert steer(DEFAULT_CONFIG, 1, {}) != DEFAULT_CONFIG
    with pytest.raises(ValueError, match="negative"):
        steer(DEFAULT_CONFIG, -1, {})


def test_the_target_is_a_least_hit_cell() -> None:
    names = sorted(REACHABLE_CELLS)
    hits = dict.fromkeys(names, 5)
    hits[names[10]] = 1
    hits[names[20]] = 1
    hits[names[30]] = 0
    assert {neighbourhood(epoch, hits)[0].name for epoch in range(1, 20)} == {names[30]}
    hits[names[30]] = 2
    assert {neighbourhood(epoch, hits)[0].name for epoch in range(1, 20)} == {names[10], names[20]}


def test_the_neighbourhood_is_the_least_hit_cells_of_the_targets_state() -> None:
    hits = dict.fromkeys(REACHABLE_CELLS, 1)
    same_state = {RARE.name, "cpl0 read supervisor-half lass smap smep ac"}
    other_state = "cpl0 read supervisor-half lass smap smep"  # AC clear
    for name in (*same_state, other_state):
        hits[name] = 0
    groups = {frozenset(cell.name for cell in neighbourhood(epoch, hits)) for epoch in range(1, 9)}
    assert groups == {frozenset(same_state), frozenset({other_state})}


def test_focus_gives_a_valid_recordable_config_for_every_cell() -> None:
    for cell in cells():
        config = focus(DEFAULT_CONFIG, [cell])
        assert GeneratorConfig.from_dict(config.to_dict()) == config


def test_focus_moves_the_knobs_toward_the_cell() -> None:
    config = focus(DEFAULT_CONFIG, [RARE])
    base = DEFAULT_CONFIG
    assert config.p_cpl3 < base.p_cpl3
    assert config.p_lass > base.p_lass and config.p_lass_supported > base.p_lass_supported
    assert config.p_smap > base.p_smap and config.p_smep > base.p_smep and config.p_ac > base.p_ac
    assert config.p_wrap_access > base.p_wrap_access
    assert config.p_safe_access < base.p_safe_access
    assert config.p_segment_override > base.p_segment_override
    # The wrap page is at the top of the supervisor half: a user page there is unnatural.
    assert config.p_natural_user_bit < base.p_natural_user_bit
    weights, base_weights = dict(config.groups), dict(base.groups)
    assert weights["push-pop"] == GROUP_BOOST * base_weights["push-pop"]
    assert weights["nop"] == base_weights["nop"]


def test_access_knobs_follow_the_share_of_the_group_that_wants_them() -> None:
    plain = CELLS["cpl0 read supervisor-half lass smap smep ac"]  # RARE's state, no wrap
    wrap_only = focus(DEFAULT_CONFIG, [RARE]).p_wrap_access
    half = focus(DEFAULT_CONFIG, [RARE, plain]).p_wrap_access
    none = focus(DEFAULT_CONFIG, [plain]).p_wrap_access
    assert none < half < wrap_only
    assert focus(DEFAULT_CONFIG, [RARE, plain]).p_cpl3 == focus(DEFAULT_CONFIG, [RARE]).p_cpl3
    with pytest.raises(ValueError, match="at least one cell"):
        focus(DEFAULT_CONFIG, [])


def test_focus_makes_an_under_hit_cell_likelier() -> None:
    base = cases_hitting(RARE, DEFAULT_CONFIG, 300)
    focused = cases_hitting(RARE, focus(DEFAULT_CONFIG, [RARE]), 300)
    assert focused >= 5
    assert focused > 5 * base


def test_a_steered_case_is_reproducible_from_its_recorded_config() -> None:
    config = steer(DEFAULT_CONFIG, 1, {})
    case = generate_case(7, 3, config)
    assert case == generate_case(7, 3, config)
    recorded = GeneratorConfig.from_dict(case.meta["config"])
    assert generate_case(7, 3, recorded) == case


def test_steering_covers_more_cells_than_the_base_config_on_the_same_budget() -> None:
    assert coverage_of(1500, steered=True).covered > coverage_of(1500, steered=False).covered


@pytest.mark.slow
def test_focusing_on_a_reachable_cell_reaches_it() -> None:
    # The premise of "cells covered / reachable cells": a sample of 30 cells spread over every
    # dimension, each hit within a few hundred cases once focused on (benchmarks/coverage_run.py
    # shows a steered run hitting all of them).
    sample = [cell for cell in cells() if cell.name in REACHABLE_CELLS][::250]
    recorder = CoverageRecorder()
    model = ReferenceModel(observer=recorder)

    def reached(cell: Cell) -> bool:
        config = focus(DEFAULT_CONFIG, [cell])
        for index in range(600):
            case = generate_case(9, index, config)
            recorder.begin(case)
            model.run(case)
            if cell.name in recorder.end().cells:
                return True
        return False

    assert [cell.name for cell in sample if not reached(cell)] == []
