"""Coverage steering: bias generation toward the decision cells a campaign has hit least.

Determinism is the constraint. Case ``i`` is ``generate_case(seed, i, config)``, so steering may
only choose ``config``, and must choose it as a pure function of things every machine agrees
on: the base config, the chunk's *epoch*, and the coverage of epochs that finished before it
(never of chunks still running, whose finishing order depends on timing)::

    config = steer(base, epoch, hits)    # hits: cell name -> cases, e.g. Coverage.cells

The same three inputs always give the same config; the campaign records the config of each
epoch (:mod:`lassfuzz.campaign.epochs`), and ``generate_case`` records it in every case's
``meta``, so any case can be rebuilt from the record or by recomputing it.

How a config is chosen. Every :data:`EXPLORE_EVERY`-th epoch runs ``base`` unchanged, so that the
unsteered distribution stays represented. Any other epoch *focuses* on a group of cells: a
target picked among the reachable cells with the fewest hits (a different one per epoch, spread
by the epoch number), together with every other least-hit cell that shares its *state* (mode,
CPL, LA57, CPUID/CR4.LASS, SMAP, SMEP, AC: what a case mostly fixes at its start). A case has
one initial state but makes many accesses, so one focused epoch can fill in all the missing
cells of a state. :func:`focus` maps the group onto the generator's knobs: each state
probability moves most of the way toward the group's value; the knobs that shape accesses (page
U/S bias, safe accesses, the 2^64 wrap, stack and code in the other half, SS overrides,
descriptor tables) move toward the share of the group's cells that want them; and the
instruction groups that make the group's kinds of access get :data:`GROUP_BOOST` times their
weight.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Final

from lassfuzz.campaign.coverage import REACHABLE_CELLS
from lassfuzz.generator.config import GeneratorConfig
from lassfuzz.matrix import Cell, Region, cells

#: One epoch in this many runs the base config unchanged (epoch 0 included).
EXPLORE_EVERY: Final = 4
#: How far a focused probability moves from its base value toward the group's value.
STRENGTH: Final = 0.85
#: The probabilities standing for "every cell of the group wants it" and "none does".
_WANTED: Final = 0.95
_UNWANTED: Final = 0.05
#: Weight multiplier for the instruction groups that make the group's kinds of access.
GROUP_BOOST: Final = 4
#: Instruction groups making each kind of access (SS-segment ones for "stack").
_GROUPS_FOR: Final = {
    "read": frozenset({"mov", "movx", "alu", "cmov", "bt", "string", "push-pop"}),
    "write": frozenset({"mov", "alu", "unary", "xchg", "cmpxchg", "setcc", "string", "push-pop"}),
    "stack": frozenset({"push-pop", "call-ret", "enter-leave", "flags"}),
    "fetch": frozenset({"jmp", "call-ret"}),  # branches to landing pads
    "implicit-read": frozenset({"sreg", "lar", "int"}),  # descriptor and IDT reads
}
#: Multiplier spreading consecutive epochs over the candidate cells (Knuth's 2^32 / phi).
_SPREAD: Final = 2_654_435_761

_CELLS: Final = {cell.name: cell for cell in cells() if cell.name in REACHABLE_CELLS}


def steer(base: GeneratorConfig, epoch: int, hits: Mapping[str, int]) -> GeneratorConfig:
    """The generator config for ``epoch``, from the coverage (cell name -> hits) of the epochs
    that finished before it. Pure: the same arguments always give the same config."""
    if epoch < 0:
        raise ValueError(f"epoch {epoch} is negative")
    if epoch % EXPLORE_EVERY == 0:
        return base
    return focus(base, neighbourhood(epoch, hits))


def _state(cell: Cell) -> tuple[object, ...]:
    return (
        cell.mode, cell.cpl, cell.la57, cell.lass_supported, cell.cr4_lass, cell.cr4_smap,
        cell.cr4_smep, cell.ac,
    )  # fmt: skip


def neighbourhood(epoch: int, hits: Mapping[str, int]) -> tuple[Cell, ...]:
    """The cells ``epoch`` focuses on: a least-hit target first, then the other least-hit
    cells of the target's state."""
    fewest = min(hits.get(name, 0) for name in _CELLS)
    candidates = [_CELLS[name] for name in sorted(_CELLS) if hits.get(name, 0) == fewest]
    goal = candidates[epoch * _SPREAD % len(candidates)]
    state = _state(goal)
    return (goal, *(cell for cell in candidates if cell is not goal and _state(cell) == state))


def _natural(cell: Cell) -> Region:
    """The half the cell's CPL works in: where the generator puts code, stack and safe
    accesses (compatibility-mode code lives below 4 GiB, in the user half)."""
    return Region.USER if cell.cpl == 3 or cell.mode == "compat" else Region.SUPERVISOR


def focus(base: GeneratorConfig, group: Sequence[Cell]) -> GeneratorConfig:
    """``base`` biased toward cases making accesses in ``group``, cells that share their state
    (:func:`neighbourhood`); the state is taken from the first."""
    if not group:
        raise ValueError("focus needs at least one cell")
    first = group[0]

    def toward(value: float, share: float) -> float:
        goal = _UNWANTED + (_WANTED - _UNWANTED) * share
        return round(value + STRENGTH * (goal - value), 3)

    def shared(value: float, among: Sequence[Cell], wants: Callable[[Cell], bool]) -> float:
        """``value`` moved toward the share of ``among`` that ``wants`` it (kept if none)."""
        if not among:
            return value
        return toward(value, sum(map(wants, among)) / len(among))

    fetches = [cell for cell in group if cell.kind == "fetch"]
    explicit = [cell for cell in group if cell.kind in ("read", "write")]
    stack = [cell for cell in explicit if cell.stack]
    implicit = [cell for cell in group if cell.implicit]
    boosted = frozenset().union(
        *(_GROUPS_FOR["stack" if cell.stack else cell.kind] for cell in group),
        *(_GROUPS_FOR[cell.kind] for cell in stack),
    )
    return dataclasses.replace(
        base,
        p_cpl3=toward(base.p_cpl3, first.cpl == 3),
        p_cpl12=toward(base.p_cpl12, first.cpl in (1, 2)),
        p_compat=toward(base.p_compat, first.mode == "compat"),
        p_la57=toward(base.p_la57, first.la57),
        p_lass_supported=toward(base.p_lass_supported, first.lass_supported),
        p_lass=toward(base.p_lass, first.cr4_lass),
        p_smap=toward(base.p_smap, first.cr4_smap),
        p_smep=toward(base.p_smep, first.cr4_smep),
        p_ac=toward(base.p_ac, first.ac),
        # A page's U/S bit is "natural" when it agrees with its half (the wrap cells' first
        # byte is at the top of the supervisor half).
        p_natural_user_bit=shared(
            base.p_natural_user_bit,
            [*explicit, *fetches],
            lambda cell: cell.page_user == (cell.region is Region.USER),
        ),
        # Fetches outside the natural half, or (landing pads lying in the half opposite the
        # code) from an unnatural page of the natural half, start with code in the other half.
        p_code_other_half=shared(
            base.p_code_other_half,
            fetches,
            lambda cell: (
                cell.region is not _natural(cell) or cell.page_user != (cell.region is Region.USER)
            ),
        ),
        p_stack_other_half=shared(
            base.p_stack_other_half, stack, lambda cell: cell.region is not _natural(cell)
        ),
        # Safe accesses go to writable pages of the natural half whose U/S bit suits the CPL.
        p_safe_access=shared(
            base.p_safe_access,
            explicit,
            lambda cell: cell.region is _natural(cell) and cell.page_user == (cell.cpl == 3),
        ),
        p_wrap_access=shared(base.p_wrap_access, explicit, lambda cell: cell.region is Region.WRAP),
        # SS: is one of the three overrides, and makes any memory operand an SS access.
        p_segment_override=shared(base.p_segment_override, explicit, lambda cell: cell.stack),
        p_system=toward(base.p_system, 1.0) if implicit else base.p_system,
        p_table_user_half=shared(
            base.p_table_user_half, implicit, lambda cell: cell.region is Region.USER
        ),
        groups=tuple(
            (name, weight * GROUP_BOOST if name in boosted else weight)
            for name, weight in base.groups
        ),
    )
