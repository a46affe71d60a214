"""Health checks: a campaign that rejects most cases or never touches memory fails loudly."""

from __future__ import annotations

import collections

import pytest

from lassfuzz.campaign.coverage import CoverageRecorder
from lassfuzz.campaign.health import (
    HEALTH_MIN_CASES,
    HealthCheckError,
    check_health,
    no_access_reason,
)
from lassfuzz.generator.config import GeneratorConfig
from lassfuzz.generator.generate import generate_case
from lassfuzz.model.engine import ReferenceModel
from lassfuzz.outcome import Status


def test_a_config_of_only_nops_fails_the_no_access_check() -> None:
    config = GeneratorConfig(groups=(("nop", 1),))
    recorder = CoverageRecorder()
    model = ReferenceModel(observer=recorder)
    compared = no_access = 0
    reasons: collections.Counter[str] = collections.Counter()
    for index in range(HEALTH_MIN_CASES):
        case = generate_case(1, index, config)
        recorder.begin(case)
        outcome = model.run(case)
        seen = recorder.end()
        if outcome.status.comparable:
            compared += 1
            if not seen.data_accesses:
                no_access += 1
                reasons[no_access_reason(seen, outcome)] += 1
    with pytest.raises(HealthCheckError) as raised:
        check_health(
            cases=HEALTH_MIN_CASES,
            compared=compared,
            rejected={},
            no_access=no_access,
            no_access_reasons=reasons,
        )
    message = str(raised.value)
    assert f"{no_access} of {compared} (" in message
    assert "made no memory access" in message
    assert "after nop'" in message
    assert "\n" not in message


def test_mostly_rejected_cases_fail_with_the_ratio_and_top_reasons() -> None:
    rejected = {"unsupported instruction a": 150, "engine error b": 30, "c": 2, "d": 1}
    with pytest.raises(HealthCheckError) as raised:
        check_health(cases=200, compared=17, rejected=rejected, no_access=0)
    message = str(raised.value)
    assert "183 of 200 (92%) cases could not be compared" in message
    assert "150 x 'unsupported instruction a', 30 x 'engine error b', 2 x 'c'" in message
    assert "'d'" not in message


def test_healthy_or_too_early_campaigns_pass() -> None:
    check_health(cases=HEALTH_MIN_CASES - 1, compared=0, rejected={}, no_access=0)
    check_health(cases=400, compared=300, rejected={"x": 100}, no_access=150)
    with pytest.raises(HealthCheckError, match="top reasons: none recorded"):
        check_health(cases=400, compared=300, rejected={}, no_access=151)


def test_no_access_reason_names_the_end_and_what_ran() -> None:
    recorder = CoverageRecorder()
    model = ReferenceModel(observer=recorder)
    case = generate_case(1, 0, GeneratorConfig(groups=(("nop", 1),)))
    recorder.begin(case)
    outcome = model.run(case)
    seen = recorder.end()
    assert outcome.status in (Status.COMPLETED, Status.FAULT)
    assert no_access_reason(seen, outcome) == f"{outcome.summary} after nop"
