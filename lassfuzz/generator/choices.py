"""The choice sources the generator draws from.

The generation logic is written once against :class:`Chooser`. :class:`RandomChooser` backs the
seeded, fast path (:func:`lassfuzz.generator.generate.generate_case`); the Hypothesis strategies
back it with ``draw`` so that shrinking works through the same choices. Every choice shrinks
towards its *first* option (``integer`` towards ``lo``, ``boolean`` towards False), so option
lists are written simplest first.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from lassfuzz.generator.seeding import case_seed

T = TypeVar("T")

#: Resolution of :meth:`Chooser.boolean` probabilities for choosers that draw integers.
BOOLEAN_RESOLUTION = 1 << 16
_FLOAT_SPAN = 1 << 53


@dataclass(frozen=True, eq=False)
class Weighted(Generic[T]):
    """Options with positive integer weights, precomputed once for fast weighted draws."""

    options: tuple[T, ...]
    cumulative: tuple[int, ...]

    @classmethod
    def of(cls, pairs: Sequence[tuple[T, int]]) -> Weighted[T]:
        """Build from ``(option, weight)`` pairs; zero-weight options are dropped."""
        options: list[T] = []
        cumulative: list[int] = []
        total = 0
        for option, weight in pairs:
            if weight < 0:
                raise ValueError(f"negative weight {weight} for option {option!r}")
            if weight:
                total += weight
                options.append(option)
                cumulative.append(total)
        if not options:
            raise ValueError("a weighted choice needs at least one option with positive weight")
        return cls(tuple(options), tuple(cumulative))

    @property
    def total(self) -> int:
        return self.cumulative[-1]

    def pick(self, ticket: int) -> T:
        """The option owning ``ticket`` in ``[0, total)``; ticket 0 is the first option."""
        return self.options[bisect.bisect_right(self.cumulative, ticket)]


class Chooser(Protocol):
    """A source of choices. Implementations differ only in where the randomness comes from."""

    def integer(self, lo: int, hi: int) -> int:
        """An integer in ``[lo, hi]`` (inclusive); shrinks towards ``lo``."""
        ...

    def boolean(self, p: float) -> bool:
        """True with probability ``p``; shrinks towards False."""
        ...

    def choice(self, options: Sequence[T]) -> T:
        """One of ``options`` uniformly; shrinks towards the first."""
        ...

    def weighted(self, table: Weighted[T]) -> T:
        """One option of ``table`` by weight; shrinks towards the first."""
        ...

    def data(self, size: int) -> bytes:
        """``size`` arbitrary bytes; shrinks towards zeros."""
        ...


def boolean_from_ticket(ticket: int, p: float) -> bool:
    """Map a ticket in ``[0, BOOLEAN_RESOLUTION)`` to a boolean that is True with probability
    ``p``; ticket 0 maps to False (unless ``p`` is 1), so shrinking a ticket yields False."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"probability {p} is not in [0, 1]")
    return ticket >= BOOLEAN_RESOLUTION - round(p * BOOLEAN_RESOLUTION)


class RandomChooser:
    """A :class:`Chooser` over a private ``random.Random`` (never the global one)."""

    __slots__ = ("_random", "_rng")  # a case makes some 200 choices: attribute reads count

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._random = rng.random  # bound once: most choices are one call of it

    @classmethod
    def for_case(cls, seed: int, index: int) -> RandomChooser:
        """The independent stream of case ``index`` under ``seed``.

        numpy's SeedSequence spawn keys give statistically independent streams per index, so a
        case depends only on (seed, index), not on which worker or in what order it was made
        (:func:`lassfuzz.generator.seeding.case_seed` computes the same seed as numpy, faster).
        """
        if seed < 0 or index < 0:
            raise ValueError(f"seed and index must be non-negative (got {seed}, {index})")
        return cls(random.Random(case_seed(seed, index)))

    # ``random()`` is several times cheaper than ``randrange``. It has 53 bits, so for spans up
    # to 2^53 every value is reachable and the bias is below span / 2^53 (irrelevant for
    # fuzzing); power-of-two spans (64-bit words) take exact random bits.
    def integer(self, lo: int, hi: int) -> int:
        span = hi - lo + 1
        if span > _FLOAT_SPAN:
            if not span & (span - 1):
                return lo + self._rng.getrandbits(span.bit_length() - 1)
            return lo + self._rng.randrange(span)
        if span <= 0:
            raise ValueError(f"empty integer range [{lo}, {hi}]")
        return lo + int(self._random() * span)

    def boolean(self, p: float) -> bool:
        return self._random() < p

    def choice(self, options: Sequence[T]) -> T:
        if not options:
            raise ValueError("choice from an empty sequence")
        return options[int(self._random() * len(options))]

    def weighted(self, table: Weighted[T]) -> T:
        cumulative = table.cumulative  # table.pick(ticket), inlined: a draw per instruction
        return table.options[bisect.bisect_right(cumulative, int(self._random() * cumulative[-1]))]

    def data(self, size: int) -> bytes:
        return self._rng.randbytes(size)
