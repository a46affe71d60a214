"""The LASS access rules as one pure function: the reference model's specification.

Everything here follows /work/shared/LASS.md §1–§5 (the SDM wins over Bochs and KVM). The caller
classifies the access (kind, implicit, stack) and passes the final linear address; this module
decides whether LASS objects. Canonicality, segmentation and paging are the caller's business:
"allowed" only means "LASS does not object" (LASS.md §3, last line).

This module must stay independent of ``lassfuzz.emulator`` and ``lassfuzz.policies``: the
emulator implements its own rules, so a wrong rule cannot hide by being shared.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from lassfuzz.arch import BIT63, CR4_LASS, CR4_SMAP, EFER_LMA, MASK64, RFLAGS_AC, VEC_GP, VEC_SS

_SPACE: Final = MASK64 + 1
_SDM: Final = "SDM Vol. 3A ch. 4 'Operation of LASS'"


class Kind(enum.Enum):
    """What the access is for. PREFETCH covers PREFETCHh/PREFETCHW/CLDEMOTE (LASS.md §5)."""

    READ = "read"
    WRITE = "write"
    FETCH = "fetch"
    PREFETCH = "prefetch"


class Verdict(enum.Enum):
    """LASS's answer: no objection, a fault, or a silently dropped prefetch."""

    ALLOWED = "allowed"
    VIOLATION = "violation"
    DROPPED = "dropped"


@dataclass(frozen=True)
class LassDecision:
    """The verdict, the fault vector (13 #GP or 12 #SS, violations only), the rule that decided
    (for ``Outcome.detail``) and the first violating byte (violations and drops only)."""

    verdict: Verdict
    vector: int | None
    rule: str
    address: int | None


def _allowed(rule: str) -> LassDecision:
    return LassDecision(Verdict.ALLOWED, None, rule, None)


# Shared ALLOWED decisions: the hot path allocates only when LASS objects.
_INACTIVE: Final = _allowed("LASS.md §1: LASS inactive (needs EFER.LMA = 1 and CR4.LASS = 1)")
_USER_DATA_OK: Final = _allowed("LASS.md §3 rule 1: user data access within the user half")
_USER_FETCH_OK: Final = _allowed("LASS.md §3 rule 2: user fetch within the user half")
_SUPERVISOR_FETCH_OK: Final = _allowed(
    "LASS.md §3 rule 3: supervisor fetch within the supervisor half"
)
_SUPERVISOR_AC_OK: Final = _allowed(
    "LASS.md §3 rule 5: supervisor explicit data access to the user half with SMAP = 1, AC = 1"
)
_SUPERVISOR_NO_SMAP_OK: Final = _allowed(
    "LASS.md §3 rules 6/8: supervisor data access to the user half with SMAP = 0"
)
_SUPERVISOR_HIGH_OK: Final = _allowed(
    "LASS.md §3 rule 9: supervisor data access within the supervisor half"
)

# Violation texts, by LASS.md §3 row.
_RULE1: Final = f"LASS.md §3 rule 1 ({_SDM}): user data access to the supervisor half"
_RULE2: Final = f"LASS.md §3 rule 2 ({_SDM}): user instruction fetch from the supervisor half"
_RULE3: Final = (
    f"LASS.md §3 rule 3 ({_SDM}): supervisor instruction fetch from the user half "
    "(SMEP and AC irrelevant)"
)
_RULE4: Final = (
    f"LASS.md §3 rule 4 ({_SDM}): supervisor explicit data access to the user half "
    "with SMAP = 1, AC = 0"
)
_RULE7: Final = (
    f"LASS.md §3 rule 7 ({_SDM}): supervisor implicit data access to the user half "
    "with SMAP = 1 (AC ignored)"
)


def _first_byte_in_half(start: int, size: int, supervisor: bool) -> int | None:
    """First byte, in access order, of ``start .. start+size-1`` (mod 2^64) in the given half.

    Going upward from ``start``, the access enters the supervisor half at 2^63 and the user half
    only by wrapping to 0, so one comparison replaces a per-byte loop.
    """
    if bool(start & BIT63) == supervisor:
        return start
    entry = BIT63 if supervisor else _SPACE  # distance measured from 0; _SPACE wraps to 0
    return (entry & MASK64) if entry - start < size else None


def check_access(
    address: int,
    size: int,
    kind: Kind,
    *,
    implicit: bool,
    stack: bool,
    cpl: int,
    cr4: int,
    rflags: int,
    efer: int,
    cs_l: bool,
) -> LassDecision:
    """Decide one access of ``size`` bytes at linear ``address`` (bytes wrap modulo 2^64).

    ``implicit``: a supervisor-mode implicit access (descriptor tables, IDT, TSS: LASS.md §2).
    ``stack``: an SS-segment data access (PUSH/POP/CALL/RET..., RSP/RBP base, SS: prefix), which
    faults with #SS(0) instead of #GP(0) (LASS.md §4). ``cs_l``: CS.L, False in compatibility
    mode, where bit 63 counts as 0 (LASS.md §1).

    Exempt accesses (branch targets before the fetch, INVLPG/INVPCID addresses: LASS.md §5) are
    not checked at all, so callers do not call this for them; CLFLUSH/CLFLUSHOPT/CLWB are a
    1-byte READ. The open points of LASS.md §7 cannot be expressed here: an implicit stack access
    (event-delivery pushes, shadow stacks) is rejected with ValueError, as are other meaningless
    combinations (an implicit or SS-segment fetch, an implicit prefetch), a ``size`` < 1, a CPL
    outside 0..3 or an address outside u64.
    """
    if not 0 <= address <= MASK64:
        raise ValueError(f"LASS check: address {address:#x} is not a u64")
    if not 1 <= size <= _SPACE:
        raise ValueError(f"LASS check: access size {size} is not in 1..2^64")
    if not 0 <= cpl <= 3:
        raise ValueError(f"LASS check: CPL {cpl} is not in 0..3")
    if implicit and stack:
        raise ValueError("LASS check: implicit stack accesses are an open point (LASS.md §7)")
    if kind is Kind.FETCH and (implicit or stack):
        raise ValueError("LASS check: an instruction fetch is neither implicit nor SS-segment")
    if kind is Kind.PREFETCH and implicit:
        raise ValueError("LASS check: a software prefetch is never an implicit access")

    # LASS.md §1: active only with IA32_EFER.LMA = 1 and CR4.LASS = 1 (64-bit and compat mode).
    if not (efer & EFER_LMA and cr4 & CR4_LASS):
        return _INACTIVE

    user = cpl == 3 and not implicit  # LASS.md §2: user-mode access = CPL3 and not implicit
    if kind is Kind.FETCH:
        # LASS.md §3 rows 2 and 3; §5: AC never affects fetches, SMEP is irrelevant.
        if user:
            bad = _first_byte_in_half(address, size, supervisor=True) if cs_l else None
            return _violation(_RULE2, VEC_GP, bad) if bad is not None else _USER_FETCH_OK
        bad = _first_byte_in_half(address, size, supervisor=False) if cs_l else address
        return _violation(_RULE3, VEC_GP, bad) if bad is not None else _SUPERVISOR_FETCH_OK

    # Data access (READ, WRITE, PREFETCH). LASS.md §4: #SS(0) for SS-segment accesses.
    vector = VEC_SS if stack else VEC_GP
    if user:
        # LASS.md §3 row 1: any byte with bit 63 = 1 (never in compatibility mode).
        bad = _first_byte_in_half(address, size, supervisor=True) if cs_l else None
        if bad is None:
            return _USER_DATA_OK
        return _drop_or_violate(kind, _RULE1, vector, bad)
    # Supervisor data: the user half is blocked only under SMAP (rows 4-8); row 9 otherwise.
    if not cr4 & CR4_SMAP:
        return _SUPERVISOR_NO_SMAP_OK  # rows 6 and 8
    if not implicit and rflags & RFLAGS_AC:
        return _SUPERVISOR_AC_OK  # row 5: STAC/POPF lift it for explicit accesses only
    bad = _first_byte_in_half(address, size, supervisor=False) if cs_l else address
    if bad is None:
        return _SUPERVISOR_HIGH_OK  # row 9
    return _drop_or_violate(kind, _RULE7 if implicit else _RULE4, vector, bad)


def _violation(rule: str, vector: int, address: int) -> LassDecision:
    return LassDecision(Verdict.VIOLATION, vector, rule, address)


def _drop_or_violate(kind: Kind, rule: str, vector: int, address: int) -> LassDecision:
    """LASS.md §5: a software prefetch that would violate is dropped silently (no fault)."""
    if kind is Kind.PREFETCH:
        return LassDecision(Verdict.DROPPED, None, f"LASS.md §5: prefetch dropped; {rule}", address)
    return _violation(rule, vector, address)
