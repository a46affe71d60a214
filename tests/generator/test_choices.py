"""The random chooser and weighted tables."""

from __future__ import annotations

import collections

import pytest

from lassfuzz.generator.choices import (
    BOOLEAN_RESOLUTION,
    RandomChooser,
    Weighted,
    boolean_from_ticket,
)


def test_streams_are_independent_and_reproducible() -> None:
    first = [RandomChooser.for_case(1, 0).integer(0, 1 << 62) for _ in range(2)]
    assert first[0] == first[1]
    assert RandomChooser.for_case(1, 0).integer(0, 1 << 62) != RandomChooser.for_case(1, 1).integer(
        0, 1 << 62
    )


def test_integer_bounds_inclusive_including_wide_ranges() -> None:
    chooser = RandomChooser.for_case(0, 0)
    small = {chooser.integer(3, 5) for _ in range(200)}
    assert small == {3, 4, 5}
    wide = [chooser.integer(0, (1 << 64) - 1) for _ in range(200)]
    assert all(0 <= v < 1 << 64 for v in wide) and max(wide) > 1 << 60
    with pytest.raises(ValueError, match="empty"):
        chooser.integer(2, 1)


def test_weighted_follows_weights_and_drops_zero_weights() -> None:
    table = Weighted.of([("a", 1), ("never", 0), ("b", 3)])
    assert table.options == ("a", "b")
    assert table.pick(0) == "a" and table.pick(table.total - 1) == "b"
    chooser = RandomChooser.for_case(0, 1)
    counts = collections.Counter(chooser.weighted(table) for _ in range(4000))
    assert set(counts) == {"a", "b"}
    assert 2.4 < counts["b"] / counts["a"] < 3.8


def test_weighted_rejects_bad_tables() -> None:
    with pytest.raises(ValueError, match="positive weight"):
        Weighted.of([("a", 0)])
    with pytest.raises(ValueError, match="negative"):
        Weighted.of([("a", -1)])


def test_boolean_ticket_mapping_shrinks_to_false() -> None:
    assert boolean_from_ticket(0, 0.5) is False
    assert boolean_from_ticket(BOOLEAN_RESOLUTION - 1, 0.5) is True
    assert boolean_from_ticket(0, 1.0) is True
    assert boolean_from_ticket(BOOLEAN_RESOLUTION - 1, 0.0) is False
    with pytest.raises(ValueError, match="probability"):
        boolean_from_ticket(0, 1.5)


def test_choice_and_data() -> None:
    chooser = RandomChooser.for_case(2, 2)
    assert {chooser.choice("xyz") for _ in range(100)} == {"x", "y", "z"}
    assert len(chooser.data(17)) == 17
    with pytest.raises(ValueError, match="empty"):
        chooser.choice([])
