"""The public Hypothesis strategies."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st
from iced_x86 import Decoder, EncodingKind

from lassfuzz.case import State, TestCase, case_from_json, case_to_json
from lassfuzz.families import family_of
from lassfuzz.generator.config import GROUPS, GeneratorConfig
from lassfuzz.strategies import DrawChooser, cases, states

FAST = settings(
    max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def bits(case: TestCase) -> int:
    return 32 if case.state.mode == "compat" else 64


def count(case: TestCase) -> int:
    return sum(1 for _ in Decoder(bits(case), case.code, ip=case.code_address))


@FAST
@given(cases(GeneratorConfig(max_instructions=8)))
def test_drawn_cases_are_valid(case: TestCase) -> None:
    assert 1 <= count(case) <= 8
    assert case_from_json(case_to_json(case)) == case
    for instruction in Decoder(bits(case), case.code, ip=case.code_address):
        assert instruction.encoding == EncodingKind.LEGACY
        assert family_of(instruction) in GROUPS
    assert case.meta["source"] == "hypothesis"


@FAST
@given(states())
def test_drawn_states(state: State) -> None:
    assert state.cpl in (0, 1, 2, 3) and state.mode in ("64", "compat")
    assert state.gpr("rsp") != 0 or state.gpr("rbp") != 0


@pytest.mark.slow
def test_shrinks_to_the_smallest_case_with_three_instructions() -> None:
    found = find(cases(), lambda case: count(case) >= 3, settings=settings(database=None))
    assert count(found) == 3
    # The simplest group is a one-byte NOP.
    assert found.code == bytes.fromhex("909090")


def test_config_type_is_checked() -> None:
    with pytest.raises(TypeError, match="GeneratorConfig"):
        cases({"max_instructions": 3})  # type: ignore[arg-type]


@FAST
@given(st.data())
def test_draw_chooser_respects_bounds(data: st.DataObject) -> None:
    chooser = DrawChooser(data.draw)
    assert 3 <= chooser.integer(3, 9) <= 9
    assert chooser.choice("abc") in "abc"
    assert chooser.boolean(0.0) is False and chooser.boolean(1.0) is True
    assert len(chooser.data(5)) == 5
