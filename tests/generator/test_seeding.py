"""case_seed: the pure-Python SeedSequence gives numpy's words for every seed and index."""

from __future__ import annotations

import random

import numpy as np
import pytest

from lassfuzz.generator.seeding import case_seed

#: Word-count edges: one word, two, four (the pool size), more than the pool.
EDGES = (
    0, 1, 2, (1 << 32) - 1, 1 << 32, (1 << 64) - 1, 1 << 64, (1 << 128) - 1, 1 << 128, 1 << 200,
)  # fmt: skip


def numpy_seed(seed: int, index: int) -> int:
    words = np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(4)
    return int.from_bytes(words.tobytes(), "little")


@pytest.mark.parametrize("seed", EDGES)
def test_matches_numpy_at_word_edges(seed: int) -> None:
    for index in EDGES:
        assert case_seed(seed, index) == numpy_seed(seed, index)


def test_matches_numpy_on_random_seeds_and_indices() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        seed = rng.getrandbits(rng.choice((8, 31, 32, 33, 64, 100, 129)))
        index = rng.getrandbits(rng.choice((1, 12, 32, 33, 64)))
        assert case_seed(seed, index) == numpy_seed(seed, index), (seed, index)
