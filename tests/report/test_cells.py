"""Folding matrix cell names onto the CPL × kind × half × SMAP/AC heatmap grid."""

from __future__ import annotations

import pytest

from lassfuzz.campaign.coverage import REACHABLE_CELLS
from lassfuzz.matrix import cells
from lassfuzz.report.cells import CellKey, coverage_grid, parse_cell_name


def test_every_matrix_cell_name_parses_to_its_own_flags() -> None:
    for cell in cells():
        assert parse_cell_name(cell.name) == CellKey(
            cell.cpl, cell.kind, cell.region.value, cell.cr4_smap, cell.ac
        ), cell.name


def test_parse_mode_prefix_and_foreign_names() -> None:
    assert parse_cell_name("compat cpl0 write user-half smap la57") == CellKey(
        0, "write", "user-half", True, False
    )
    assert parse_cell_name("cpl2 implicit-read wrap implicit ac") == CellKey(
        2, "implicit-read", "wrap", False, True
    )
    assert parse_cell_name("cpl3 read supervisor-half lass smap ac user-page") == CellKey(
        3, "read", "supervisor-half", True, True
    )
    for name in ("", "cpl3", "cplX read user-half", "cpl3 jump user-half", "cpl3 read middle"):
        assert parse_cell_name(name) is None, name


def test_grid_counts_reachable_cells_and_keeps_others_aside() -> None:
    names = sorted(REACHABLE_CELLS)
    hits = {names[0]: 5, names[1]: 0, "cpl3 read user-half smap la48": 2, "mystery": 9}
    grid = coverage_grid(hits)
    keys = [parse_cell_name(name) for name in names]
    rows = {(key.cpl, key.kind) for key in keys if key is not None}
    assert set(grid.rows) == rows
    assert [cpl for cpl, _ in grid.rows] == sorted(cpl for cpl, _ in grid.rows)
    assert grid.rows[:3] == ((0, "read"), (0, "write"), (0, "fetch"))
    assert len(grid.columns) == 12
    # Every reachable cell lands in exactly one group; the grid agrees with cells_total.
    assert grid.cells == len(REACHABLE_CELLS)
    assert grid.covered == 1
    assert sum(group.hits for group in grid.groups.values()) == 5
    assert grid.outside == (("cpl3 read user-half smap la48", 2), ("mystery", 9))
    # A fetch never wraps around 2^64: that group does not exist.
    assert grid.group((0, "fetch"), ("wrap", False, False)) is None
    first = parse_cell_name(names[0])
    assert first is not None
    group = grid.group((first.cpl, first.kind), (first.half, first.smap, first.ac))
    assert group is not None
    assert (group.covered, group.hits) == (1, 5)


def test_a_universe_of_non_cells_is_a_bug() -> None:
    with pytest.raises(ValueError, match="not a decision cell name"):
        coverage_grid({}, universe=["mystery"])
