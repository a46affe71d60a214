"""Coverage of a campaign: which LASS decision cells and instruction families its cases reach.

A *decision cell* is a cell of ``lassfuzz matrix`` (:class:`lassfuzz.matrix.Cell`), named by
:attr:`Cell.name`: the inputs of one LASS decision (mode, CPL, access kind, implicit, SS segment,
address half or the 2^64 wrap, CPUID/CR4.LASS, SMAP, SMEP, RFLAGS.AC, LA57) plus the U/S bit
of the page accessed. The reference model reports every access it LASS-checks to an observer
(:mod:`lassfuzz.model.observe`); :class:`CoverageRecorder` is that observer and turns the
accesses of one run into a :class:`CaseCoverage`. An access hits the cell whose flags it has
if its first byte lies on a present page (every matrix cell accesses a present page); an access
to an unmapped or non-present page still counts as a data access but hits no cell.

Usage (the campaign's chunk runner)::

    recorder = CoverageRecorder()
    model = ReferenceModel(max_instructions=..., observer=recorder)
    differential = Differential(model, emulator)
    ...
    recorder.begin(case)
    try:
        result = differential.run(case)      # triage re-runs come later: not recorded
    finally:
        seen = recorder.end()                # CaseCoverage: cells, families, data_accesses
    new_cells = coverage.add(seen)           # Coverage; the cells this case hit first

``Coverage`` counts *cases*: a cell's hits are the number of cases that hit it at least once
(likewise families), so a loop cannot inflate a count. ``Coverage.merge`` adds another
coverage (a chunk's, a resumed run's); ``to_dict``/``from_dict`` are the ``coverage.json``
document (docs/campaign.md). ``covered``/``total`` count the cells the generator can reach
(:data:`REACHABLE_CELLS`); hits on other cells (e.g. implicit writes, outside the matrix) are kept
and reported but do not count toward ``covered``.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from lassfuzz.arch import (
    CR4_LA57,
    CR4_LASS,
    CR4_SMAP,
    CR4_SMEP,
    MASK64,
    PAGE_MASK,
    PAGE_SIZE,
    RFLAGS_AC,
)
from lassfuzz.families import family_at
from lassfuzz.matrix import Cell, Region, cells
from lassfuzz.model.lass import Kind

if TYPE_CHECKING:
    from lassfuzz.case import TestCase
    from lassfuzz.model.decode import Decoded
    from lassfuzz.model.state import Cpu

_SPACE: Final = MASK64 + 1
#: CR4 bits that are cell dimensions.
_DECIDING_CR4: Final = CR4_LASS | CR4_SMAP | CR4_SMEP | CR4_LA57
#: Family-cache bound (distinct instruction encodings), so that memory stays bounded overnight.
_CACHE_LIMIT: Final = 100_000


def _reachable(cell: Cell) -> bool:
    """Whether generated cases (lassfuzz.generator) can make an access in ``cell``.

    Combinations that cannot exist at all are not matrix cells in the first place
    (``matrix._legal``: CR4.LASS without its CPUID bit, an SS-segment fetch or descriptor read,
    a fetch across 2^64, 32-bit explicit addresses above 4 GiB). Of the rest, the generator
    draws the mode, CPL 0-3, LA57, the CPUID bit, CR4.LASS/SMAP/SMEP and RFLAGS.AC per case (and
    toggles CR4 and AC at run time) and every data page's U/S bit independently of its half;
    explicit data accesses reach both halves (safe and unsafe targets, boundary pages) and the
    2^64 wrap (``p_wrap_access``), with and without SS (stack instructions, RSP/RBP bases, SS:
    overrides); fetches reach both halves on pages with either U/S bit (code in the other half,
    landing pads, code pages contradicting the CPL); descriptor-table reads reach tables in
    either half, on supervisor or (sometimes) user pages.

    The one exception: a descriptor read never straddles 2^64, because the generator's tables
    are page-aligned in table regions far below the top page (``layout.TABLE_REGIONS``), so
    the ``implicit-read wrap`` cells are unreachable.
    """
    return not (cell.implicit and cell.region is Region.WRAP)


#: The cells the generator can reach: the denominator of "cells covered". Cells outside the
#: matrix that cases also reach (e.g. implicit writes) are counted and reported, not totalled.
REACHABLE_CELLS: Final = frozenset(cell.name for cell in cells() if _reachable(cell))


@dataclass(frozen=True)
class CaseCoverage:
    """What one run reached: decision cells (``Cell.name``), instruction families started
    (:mod:`lassfuzz.families`), and the number of data accesses that reached the LASS check."""

    cells: frozenset[str]
    families: frozenset[str]
    data_accesses: int


_Key = tuple[bool, int, Kind, bool, bool, int, bool, int, int, bool]
_cell_names: dict[_Key, str] = {}
_families: dict[tuple[bytes, int], str] = {}


class CoverageRecorder:
    """A :class:`lassfuzz.model.observe.Observer` recording one run at a time.

    Between :meth:`begin` and :meth:`end` it records; otherwise (e.g. during triage re-runs of
    the same model) it ignores what the model reports.
    """

    def __init__(self) -> None:
        #: Page base -> U/S bit for the present pages of the case being recorded; None = idle.
        self._user: dict[int, bool] | None = None
        #: Each distinct access key with the first (address, size) that had it.
        self._accesses: dict[_Key, tuple[int, int]] = {}
        #: (bytes, bitness) of each distinct instruction started.
        self._encodings: set[tuple[bytes, int]] = set()
        self._data_accesses = 0

    def begin(self, case: TestCase) -> None:
        """Start recording a run of ``case`` (page U/S bits come from the case's pages: cases
        never write their page tables, docs/machine.md "TLB")."""
        listed = {page.address: page for page in case.pages}
        user = {address: page.user for address, page in listed.items() if page.present}
        # Code pages the case does not list are implicit (TestCase.all_pages, which would copy
        # their data: too slow here): present, with U/S = the CPL3-ness of the case.
        first = case.code_address & PAGE_MASK
        spanned = ((case.code_address & ~PAGE_MASK) + len(case.code) + PAGE_SIZE - 1) // PAGE_SIZE
        for number in range(spanned):
            base = (first + number * PAGE_SIZE) & MASK64
            if base not in listed:
                user[base] = case.state.cpl == 3
        self._user = user
        self._accesses = {}
        self._encodings = set()
        self._data_accesses = 0

    def end(self) -> CaseCoverage:
        """Stop recording and return what the run reached."""
        if self._user is None:
            raise RuntimeError("CoverageRecorder.end() without begin()")
        self._user = None
        return CaseCoverage(
            cells=frozenset(_cell_name(key, *where) for key, where in self._accesses.items()),
            families=frozenset(_family(encoding) for encoding in self._encodings),
            data_accesses=self._data_accesses,
        )

    def instruction(self, decoded: Decoded) -> None:
        if self._user is not None:
            self._encodings.add((decoded.raw, decoded.bitness))

    def access(
        self, cpu: Cpu, address: int, size: int, kind: Kind, *, implicit: bool, stack: bool
    ) -> None:
        user = self._user
        if user is None:
            return
        if kind is not Kind.FETCH:
            self._data_accesses += 1
        page_user = user.get(address & PAGE_MASK)
        if page_user is None:
            return
        # Region as Cell.region computes it: the wrap first (only data accesses can wrap: a
        # fetch is reported up to its page's end), else the half of the first byte.
        region = 2 if address + size > _SPACE else address >> 63
        key = (
            cpu.cs_l, cpu.cpl, kind, implicit, stack, region, cpu.lass_supported,
            cpu.cr4 & _DECIDING_CR4, cpu.rflags & RFLAGS_AC, page_user,
        )  # fmt: skip
        if key not in self._accesses:
            self._accesses[key] = (address, size)


def _cell_name(key: _Key, address: int, size: int) -> str:
    """The ``Cell.name`` of an access key (cached: there are at most a few thousand keys)."""
    name = _cell_names.get(key)
    if name is None:
        cs_l, cpl, kind, implicit, stack, _, lass_supported, cr4, ac, page_user = key
        name = Cell(
            mode="64" if cs_l else "compat",
            cpl=cpl,
            # The matrix names implicit accesses by kind: "implicit-read" (descriptor reads).
            kind=f"implicit-{kind.value}" if implicit else kind.value,
            implicit=implicit,
            stack=stack,
            address=address,
            size=size,
            cr4_lass=bool(cr4 & CR4_LASS),
            cr4_smap=bool(cr4 & CR4_SMAP),
            cr4_smep=bool(cr4 & CR4_SMEP),
            ac=bool(ac),
            page_user=page_user,
            lass_supported=lass_supported,
            # The matrix has no LA57 variant of a compatibility-mode explicit access (its
            # addresses lie below 4 GiB, where LA57 changes nothing: matrix._legal).
            la57=bool(cr4 & CR4_LA57) and (cs_l or implicit),
        ).name
        _cell_names[key] = name
    return name


def _family(encoding: tuple[bytes, int]) -> str:
    family = _families.get(encoding)
    if family is None:
        if len(_families) >= _CACHE_LIMIT:
            _families.clear()
        # Decoded at 0 like the model's own decoder: the family never depends on the address.
        raw, bitness = encoding
        family = _families[encoding] = family_at(raw, 0, bitness)
    return family


class CoverageError(ValueError):
    """A coverage document that cannot be read; the message names the field."""


class Coverage:
    """Hit counts (in cases) per decision cell and per instruction family; mutable, it is the
    campaign's running total. Snapshot it with :meth:`copy` before handing it to steering."""

    def __init__(
        self, cells: Mapping[str, int] | None = None, families: Mapping[str, int] | None = None
    ) -> None:
        self.cells: collections.Counter[str] = collections.Counter(cells or {})
        self.families: collections.Counter[str] = collections.Counter(families or {})

    def add(self, case: CaseCoverage) -> tuple[str, ...]:
        """Count one case; returns the cells it hit first (sorted), for ``corpus/``."""
        return self._count(dict.fromkeys(case.cells, 1), dict.fromkeys(case.families, 1))

    def merge(self, other: Coverage) -> tuple[str, ...]:
        """Add ``other``'s counts; returns the cells that were not hit before (sorted)."""
        return self._count(other.cells, other.families)

    def _count(self, cells: Mapping[str, int], families: Mapping[str, int]) -> tuple[str, ...]:
        new = sorted(name for name, hits in cells.items() if hits and not self.cells[name])
        self.cells.update(cells)
        self.families.update(families)
        return tuple(new)

    def copy(self) -> Coverage:
        return Coverage(self.cells, self.families)

    @property
    def covered(self) -> int:
        """Reachable cells hit at least once."""
        return sum(1 for name in REACHABLE_CELLS if self.cells[name])

    @property
    def total(self) -> int:
        """Reachable cells (:data:`REACHABLE_CELLS`)."""
        return len(REACHABLE_CELLS)

    def uncovered(self) -> tuple[str, ...]:
        """Reachable cells never hit, sorted."""
        return tuple(sorted(name for name in REACHABLE_CELLS if not self.cells[name]))

    def to_dict(self) -> dict[str, Any]:
        """The ``coverage.json`` document: every reachable cell (0 when never hit, so the file
        says what is missing), any other cell hit, every family hit, and ``cells_total``."""
        cell_hits = {name: self.cells[name] for name in sorted(REACHABLE_CELLS | set(+self.cells))}
        return {
            "cells": cell_hits,
            "families": dict(sorted((+self.families).items())),
            "cells_total": self.total,
        }

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> Coverage:
        """Read a ``coverage.json`` document (``cells_total`` is recomputed, not trusted)."""
        unknown = sorted(set(document) - {"cells", "families", "cells_total"})
        if unknown:
            raise CoverageError(f"coverage: unknown key(s) {', '.join(unknown)}")
        return cls(_counts(document, "cells"), _counts(document, "families"))


def _counts(document: Mapping[str, Any], field: str) -> dict[str, int]:
    counts = document.get(field, {})
    if not isinstance(counts, Mapping):
        raise CoverageError(f"coverage: {field} must be an object of name -> hits")
    for name, hits in counts.items():
        if not isinstance(hits, int) or isinstance(hits, bool) or hits < 0:
            raise CoverageError(f"coverage: {field}[{name!r}] = {hits!r} is not a count")
    return dict(counts)
