"""Health checks, Hypothesis style: a campaign whose cases cannot mean anything fails loudly.

Two ways a campaign can "pass" while testing nothing: most generated cases are rejected (an
engine skips them as unsupported or fails on them: a generator or engine bug), or most cases
that run make no memory access reaching the LASS check (a generator config too narrow, e.g. only
NOPs). :func:`check_health` raises :class:`HealthCheckError` with one line naming the ratio and
the most common reasons, so the user sees the cause instead of a clean exit.

The supervisor calls it once its totals reach :data:`HEALTH_MIN_CASES` (and may keep calling it
on the running totals; it never raises below that)::

    check_health(
        cases=stats.cases,                  # every case run
        compared=stats.compared,            # cases both engines ran to a comparable outcome
        rejected=reasons,                   # reason -> cases skipped or failed (not compared)
        no_access=no_access,                # compared cases with CaseCoverage.data_accesses == 0
        no_access_reasons=quiet_reasons,    # reason -> such cases, by no_access_reason()
    )

where the worker counts, for each compared case ``seen = recorder.end()`` with no data access,
``no_access_reasons[no_access_reason(seen, result.reference)] += 1``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from lassfuzz.campaign.coverage import CaseCoverage
from lassfuzz.outcome import Outcome

#: Cases before the check judges: enough that a ratio means something, few enough to fail fast.
HEALTH_MIN_CASES: Final = 200
#: The check fails when more than this share of cases is rejected, or of compared cases
#: makes no memory access.
HEALTH_MAX_RATIO: Final = 0.5
#: Reasons named in the message.
_TOP_REASONS: Final = 3


class HealthCheckError(Exception):
    """Most cases are rejected or make no memory access; the message is one line."""


def no_access_reason(seen: CaseCoverage, reference: Outcome) -> str:
    """Why a case made no data access, for grouping: how it ended and what it ran, e.g.
    ``ok after nop`` or ``#PF(0x15) after no instruction`` (a fault on the first fetch)."""
    ran = ", ".join(sorted(seen.families)) or "no instruction"
    return f"{reference.summary} after {ran}"


def check_health(
    *,
    cases: int,
    compared: int,
    rejected: Mapping[str, int],
    no_access: int,
    no_access_reasons: Mapping[str, int] | None = None,
    min_cases: int = HEALTH_MIN_CASES,
) -> None:
    """Raise :class:`HealthCheckError` when, after at least ``min_cases`` cases, more than
    :data:`HEALTH_MAX_RATIO` of them were not compared, or of the compared ones made no data
    access. ``rejected`` and ``no_access_reasons`` name the causes (reason -> cases)."""
    if cases < min_cases:
        return
    not_compared = cases - compared
    if not_compared > HEALTH_MAX_RATIO * cases:
        raise HealthCheckError(
            f"health check failed: {_ratio(not_compared, cases)} cases could not be compared "
            f"(skipped or engine errors); top reasons: {_top(rejected)}. "
            "The generator config, the policy or an engine is broken."
        )
    if no_access > HEALTH_MAX_RATIO * compared:
        raise HealthCheckError(
            f"health check failed: {_ratio(no_access, compared)} compared cases made no memory "
            f"access; top reasons: {_top(no_access_reasons or {})}. "
            "The generator config produces (almost) no memory operands."
        )


def _ratio(part: int, whole: int) -> str:
    return f"{part} of {whole} ({100 * part / whole:.0f}%)"


def _top(reasons: Mapping[str, int]) -> str:
    ranked = sorted(reasons.items(), key=lambda item: (-item[1], item[0]))[:_TOP_REASONS]
    return ", ".join(f"{count} x {reason!r}" for reason, count in ranked) or "none recorded"
