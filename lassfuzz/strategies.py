"""Hypothesis strategies for lassfuzz cases, for use in your own property tests.

They run the very generator behind ``lassfuzz run`` (:func:`lassfuzz.generator.generate.build_case`)
with Hypothesis supplying the choices, so they draw the same kind of cases and shrink through the
generator's choices: fewer instructions, simpler instruction groups, earlier options.

    from hypothesis import given
    from lassfuzz.strategies import cases

    @given(cases())
    def test_model_never_errors(case):
        assert ReferenceModel().run(case).status is not Status.ERROR
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from hypothesis import strategies as st

from lassfuzz.case import State, TestCase
from lassfuzz.generator.choices import BOOLEAN_RESOLUTION, Weighted, boolean_from_ticket
from lassfuzz.generator.config import DEFAULT_CONFIG, GeneratorConfig
from lassfuzz.generator.generate import GENERATOR_VERSION, build_case
from lassfuzz.generator.layout import draw_setup

__all__ = ["DrawChooser", "GeneratorConfig", "cases", "states"]

T = TypeVar("T")


class DrawChooser:
    """A :class:`lassfuzz.generator.choices.Chooser` backed by a Hypothesis ``draw``.

    Every choice is an integer draw, so Hypothesis shrinks each towards its first option.
    """

    def __init__(self, draw: st.DrawFn) -> None:
        self._draw = draw

    def integer(self, lo: int, hi: int) -> int:
        if lo > hi:
            raise ValueError(f"empty integer range [{lo}, {hi}]")
        return self._draw(st.integers(lo, hi))

    def boolean(self, p: float) -> bool:
        if p <= 0.0 or p >= 1.0:
            return boolean_from_ticket(0, p)  # certain: no choice to shrink
        return boolean_from_ticket(self._draw(st.integers(0, BOOLEAN_RESOLUTION - 1)), p)

    def choice(self, options: Sequence[T]) -> T:
        if not options:
            raise ValueError("choice from an empty sequence")
        return options[self.integer(0, len(options) - 1)]

    def weighted(self, table: Weighted[T]) -> T:
        return table.pick(self.integer(0, table.total - 1))

    def data(self, size: int) -> bytes:
        return self._draw(st.binary(min_size=size, max_size=size))


def _checked(config: GeneratorConfig) -> GeneratorConfig:
    if not isinstance(config, GeneratorConfig):
        raise TypeError(f"expected a GeneratorConfig, got {type(config).__name__}")
    return config


def cases(config: GeneratorConfig = DEFAULT_CONFIG) -> st.SearchStrategy[TestCase]:
    """Generated test cases (state, pages and code), shrinking towards short, simple code."""
    config = _checked(config)

    @st.composite
    def draw_case(draw: st.DrawFn) -> TestCase:
        meta = {"generator": GENERATOR_VERSION, "source": "hypothesis"}
        return build_case(DrawChooser(draw), config, meta)

    return draw_case()


def states(config: GeneratorConfig = DEFAULT_CONFIG) -> st.SearchStrategy[State]:
    """Initial machine states as the generator draws them (CPL, CR0/CR4, RFLAGS, GPRs...)."""
    config = _checked(config)

    @st.composite
    def draw_state(draw: st.DrawFn) -> State:
        return draw_setup(DrawChooser(draw), config).state()

    return draw_state()
