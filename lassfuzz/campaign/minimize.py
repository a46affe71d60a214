"""Shrink a failing case while it keeps failing the same way (``lassfuzz minimize``).

Passes run in order, and the whole round repeats until it changes nothing or the budget of
``still_fails`` calls runs out: drop chunks of instructions (ddmin), drop single instructions,
simplify operands, simplify the initial state. The caller's predicate decides what "the same
failure" means (same divergence signature); the minimizer only proposes smaller candidates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Final

from lassfuzz.arch import CR4_PAE, PAGE_MASK, RFLAGS_FIXED1
from lassfuzz.campaign.program import OPERAND_STEPS, EncodeError, Program
from lassfuzz.case import CaseFormatError, Page, State, TestCase

#: Values a register or base is snapped to: the edges of the halves, of canonical space (last
#: page below each hole, first address in it) and of the address space.
BOUNDARIES: Final = (
    0,
    0x0000_7FFF_FFFF_F000,
    0x0000_8000_0000_0000,
    0x8000_0000_0000_0000,
    0xFFFF_7FFF_FFFF_F000,
    0xFFFF_8000_0000_0000,
    0xFFFF_FFFF_FFFF_F000,
)
#: How many of the nearest boundaries a value may be snapped to (nearest first).
_SNAP_CANDIDATES: Final = 3

_CaseKey = tuple[State, bytes, int, tuple[Page, ...]]


@dataclass(frozen=True)
class MinimizeStep:
    """Progress after one pass: candidates accepted and tried in it, instructions left."""

    pass_name: str
    accepted: int
    tried: int
    instructions: int


class _BudgetExhausted(Exception):
    """Raised inside a pass when ``max_tries`` predicate calls have been made."""


def _key(case: TestCase) -> _CaseKey:
    return case.state, case.code, case.code_address, case.pages


class _Search:
    """The case kept so far and the bookkeeping of one :func:`minimize` call."""

    def __init__(
        self, case: TestCase, still_fails: Callable[[TestCase], bool], max_tries: int
    ) -> None:
        self.case = case
        self.program = Program.decode(case.code, case.code_address)
        self.accepted = 0
        self.tries = 0
        self._still_fails = still_fails
        self._max_tries = max_tries
        self._rejected: set[_CaseKey] = set()

    def try_program(self, program: Program) -> bool:
        """Keep ``program`` as the code if the case still fails with it."""
        try:
            code = program.encode()
        except EncodeError:
            return False
        if self._try(lambda: replace(self.case, code=code)):
            self.program = program
            return True
        return False

    def try_state(self, **changes: Any) -> bool:
        """Keep the state with ``changes`` (field name → value) if the case still fails."""
        return self._try(lambda: replace(self.case, state=replace(self.case.state, **changes)))

    def try_pages(self, pages: tuple[Page, ...]) -> bool:
        return self._try(lambda: replace(self.case, pages=pages))

    def try_page(self, index: int, page: Page) -> bool:
        pages = self.case.pages
        return self.try_pages((*pages[:index], page, *pages[index + 1 :]))

    def _try(self, build: Callable[[], TestCase]) -> bool:
        """Run the predicate on a candidate; accept it only if it fails twice, as kept.

        The second call is on the very object kept, so a flaky engine cannot smuggle in a
        case that does not reproduce. Rejected candidates are remembered and never rerun.
        """
        try:
            candidate = build()
        except CaseFormatError:
            return False
        key = _key(candidate)
        if key == _key(self.case) or key in self._rejected:
            return False
        if self._check(candidate) and self._check(candidate):
            self.case = candidate
            self.accepted += 1
            return True
        self._rejected.add(key)
        return False

    def _check(self, candidate: TestCase) -> bool:
        if self.tries >= self._max_tries:
            raise _BudgetExhausted
        self.tries += 1
        try:
            return self._still_fails(candidate)
        except CaseFormatError:
            return False


# --------------------------------------------------------------------------------------------
# Code passes
# --------------------------------------------------------------------------------------------


def _drop_chunks(search: _Search) -> None:
    """ddmin over the item list: try dropping halves, then quarters, ... of what is left."""
    parts = 2
    while len(search.program) >= 2:
        size = len(search.program)
        chunk = -(-size // parts)
        dropped = any(
            search.try_program(search.program.without(range(start, start + chunk)))
            for start in range(0, size, chunk)
        )
        if dropped:
            parts = max(parts - 1, 2)
        elif parts >= size:
            return
        else:
            parts = min(parts * 2, size)


def _drop_single(search: _Search) -> None:
    """Try dropping each item, last first (later items rarely feed earlier ones)."""
    for index in reversed(range(len(search.program))):
        search.try_program(search.program.without((index,)))


def _simplify_operands(search: _Search) -> None:
    """Apply each operand step to each instruction, keeping the first variant that fails."""
    for index in range(len(search.program)):
        for step in OPERAND_STEPS:
            instruction = search.program.items[index].instruction
            if instruction is None:
                break
            for variant in step(instruction):
                if search.try_program(search.program.with_instruction(index, variant)):
                    break


# --------------------------------------------------------------------------------------------
# State passes
# --------------------------------------------------------------------------------------------


def _set_bits(value: int) -> Iterator[int]:
    return (1 << bit for bit in range(64) if value >> bit & 1)


def _zero_registers(search: _Search) -> None:
    gprs = search.case.state.gprs
    if any(gprs):
        search.try_state(gprs=(0,) * len(gprs))
    for index in range(len(gprs)):
        current = search.case.state.gprs
        if current[index]:
            search.try_state(gprs=(*current[:index], 0, *current[index + 1 :]))


def _clear_bits(search: _Search, name: str, keep: int) -> None:
    """Clear every bit of control value ``name`` outside ``keep``: all at once, then one by one."""
    value: int = getattr(search.case.state, name)
    if value & ~keep and not search.try_state(**{name: value & keep}):
        for bit in _set_bits(value & ~keep):
            current: int = getattr(search.case.state, name)
            search.try_state(**{name: current & ~bit})


def _clear_flags(search: _Search) -> None:
    _clear_bits(search, "rflags", RFLAGS_FIXED1)
    _clear_bits(search, "cr4", CR4_PAE)
    for name in ("fs_base", "gs_base"):
        if getattr(search.case.state, name):
            search.try_state(**{name: 0})


def _drop_pages(search: _Search) -> None:
    if search.case.pages and not search.try_pages(()):
        for index in reversed(range(len(search.case.pages))):
            pages = search.case.pages
            search.try_pages((*pages[:index], *pages[index + 1 :]))


def _default_page(page: Page) -> Page:
    """The page as a case file that names only its address and data would build it."""
    return Page(page.address, user=not page.address >> 63, data=page.data)


def _reset_page_flags(search: _Search) -> None:
    for index in range(len(search.case.pages)):
        page = search.case.pages[index]
        default = _default_page(page)
        if page == default or search.try_page(index, default):
            continue
        for flag in ("user", "writable", "nx", "present", "accessed", "dirty"):
            current = search.case.pages[index]
            wanted = getattr(default, flag)
            if getattr(current, flag) != wanted:
                search.try_page(index, replace(current, **{flag: wanted}))


def _clear_page_data(search: _Search) -> None:
    """Zero page bytes: the whole page, then halves, quarters, ... of what must stay."""
    for index in range(len(search.case.pages)):
        ranges = [(0, len(search.case.pages[index].data))]
        while ranges:
            low, high = ranges.pop(0)
            page = search.case.pages[index]
            if not any(page.data[low:high]):
                continue
            data = page.data[:low] + bytes(high - low) + page.data[high:]
            if not search.try_page(index, replace(page, data=data.rstrip(b"\0"))) and (
                high - low > 1
            ):
                middle = (low + high) // 2
                ranges += [(low, middle), (middle, high)]


def snap_candidates(value: int) -> list[int]:
    """Simpler values near ``value``: its page start, then the nearest :data:`BOUNDARIES`."""
    if value in BOUNDARIES:
        return []
    nearest = sorted(BOUNDARIES, key=lambda boundary: (abs(boundary - value), boundary))
    page_start = value & PAGE_MASK
    candidates = [page_start] if page_start != value else []
    candidates += [b for b in nearest if b not in candidates]
    return candidates[:_SNAP_CANDIDATES]


def _snap(search: _Search) -> None:
    for index in range(len(search.case.state.gprs)):
        for value in snap_candidates(search.case.state.gprs[index]):
            gprs = search.case.state.gprs
            if search.try_state(gprs=(*gprs[:index], value, *gprs[index + 1 :])):
                break
    for name in ("fs_base", "gs_base"):
        for value in snap_candidates(getattr(search.case.state, name)):
            if search.try_state(**{name: value}):
                break


def _simplify_state(search: _Search) -> None:
    for step in (
        _zero_registers,
        _clear_flags,
        _drop_pages,
        _clear_page_data,
        _reset_page_flags,
        _snap,
    ):
        step(search)


_PASSES: Final[tuple[tuple[str, Callable[[_Search], None]], ...]] = (
    ("drop-chunks", _drop_chunks),
    ("drop-instructions", _drop_single),
    ("simplify-operands", _simplify_operands),
    ("simplify-state", _simplify_state),
)


def minimize(
    case: TestCase,
    still_fails: Callable[[TestCase], bool],
    *,
    progress: Callable[[MinimizeStep], None] | None = None,
    max_tries: int = 5000,
) -> TestCase:
    """The smallest case found that ``still_fails``, or ``case`` itself if none is smaller.

    ``still_fails(case)`` must be True (the caller checked it). ``max_tries`` bounds the number
    of predicate calls; ``progress`` hears about every pass as it ends.
    """
    search = _Search(case, still_fails, max_tries)
    while True:
        accepted_before_round = search.accepted
        for name, run in _PASSES:
            accepted, tries = search.accepted, search.tries
            exhausted = False
            try:
                run(search)
            except _BudgetExhausted:
                exhausted = True
            if progress is not None:
                progress(
                    MinimizeStep(
                        name, search.accepted - accepted, search.tries - tries, len(search.program)
                    )
                )
            if exhausted:
                return search.case
        if search.accepted == accepted_before_round:
            return search.case
