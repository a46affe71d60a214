"""Decision-cell coverage folded onto the axes a human can read: CPL × kind × half × SMAP/AC.

``coverage.json`` counts hits per ``lassfuzz matrix`` cell name (:attr:`lassfuzz.matrix.Cell.name`,
e.g. ``cpl3 read supervisor-half lass smap ac user-page``). The matrix has hundreds of cells, too
many for one picture, so the report groups them by the four dimensions LASS decisions hinge on
most and aggregates over the other flags (stack, LASS/CPUID, SMEP, page U/S). Each group counts
its cells among the cells the generator can reach (the campaign's ``cells_total``, so the picture
agrees with the summary) and how many of those were hit. Cells hit outside that set (implicit
accesses, other modes) are kept aside and listed rather than silently dropped or folded in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from lassfuzz.campaign.coverage import REACHABLE_CELLS
from lassfuzz.matrix import Region

#: Access kinds in row order (``implicit-read``: a descriptor-table read, an implicit access).
KINDS: Final = ("read", "write", "fetch", "implicit-read")
HALVES: Final = tuple(region.value for region in Region)
#: (CR4.SMAP, RFLAGS.AC) column order inside each half.
SMAP_AC: Final = ((False, False), (False, True), (True, False), (True, True))


@dataclass(frozen=True)
class CellKey:
    """The heatmap coordinates of one cell."""

    cpl: int
    kind: str
    half: str
    smap: bool
    ac: bool


def parse_cell_name(name: str) -> CellKey | None:
    """The key of a ``Cell.name``; None for a name in another format."""
    words = name.split()
    if words and not words[0].startswith("cpl"):
        words = words[1:]  # a mode word (``32``, ``compat``); the matrix omits it for 64-bit
    if len(words) < 3 or not words[0].removeprefix("cpl").isdigit():
        return None
    cpl, kind, half, flags = int(words[0][3:]), words[1], words[2], set(words[3:])
    if kind not in KINDS or half not in HALVES:
        return None
    return CellKey(cpl, kind, half, "smap" in flags, "ac" in flags)


@dataclass(frozen=True)
class Group:
    """Cells sharing one key: how many exist, how many were hit, total hits."""

    cells: int
    covered: int
    hits: int


@dataclass(frozen=True)
class CoverageGrid:
    """Rows are (CPL, kind), columns are (half, SMAP, AC); a missing group has no cells."""

    rows: tuple[tuple[int, str], ...]
    columns: tuple[tuple[str, bool, bool], ...]
    groups: Mapping[CellKey, Group]
    outside: tuple[tuple[str, int], ...]  # (name, hits) of hit cells not in the grid, sorted

    @property
    def covered(self) -> int:
        return sum(group.covered for group in self.groups.values())

    @property
    def cells(self) -> int:
        return sum(group.cells for group in self.groups.values())

    def group(self, row: tuple[int, str], column: tuple[str, bool, bool]) -> Group | None:
        (cpl, kind), (half, smap, ac) = row, column
        return self.groups.get(CellKey(cpl, kind, half, smap, ac))


def coverage_grid(
    hits: Mapping[str, int], universe: Iterable[str] = REACHABLE_CELLS
) -> CoverageGrid:
    """Fold ``hits`` (cell name → hits) onto the grid of the cells in ``universe``."""
    inside = frozenset(universe)
    members: dict[CellKey, list[str]] = {}
    for name in sorted(inside):
        key = parse_cell_name(name)
        if key is None:
            raise ValueError(f"not a decision cell name: {name!r}")
        members.setdefault(key, []).append(name)
    outside = tuple(
        (name, count) for name, count in sorted(hits.items()) if count > 0 and name not in inside
    )
    groups = {
        key: Group(
            cells=len(group),
            covered=sum(1 for name in group if hits.get(name, 0) > 0),
            hits=sum(hits.get(name, 0) for name in group),
        )
        for key, group in members.items()
    }
    # Only the rows the universe has: the matrix grows (modes, CPLs, kinds) and a row of
    # empty squares would read as "never covered" rather than "does not exist".
    present = {(key.cpl, key.kind) for key in groups}
    return CoverageGrid(
        rows=tuple(sorted(present, key=lambda row: (row[0], KINDS.index(row[1])))),
        columns=tuple((half, smap, ac) for half in HALVES for smap, ac in SMAP_AC),
        groups=MappingProxyType(groups),
        outside=outside,
    )
