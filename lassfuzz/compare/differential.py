"""Running one case on the reference model and on an emulator, and triaging what differs.

Triage answers two questions about a divergence: its signature (which bucket), and its class:
``lass`` when it goes away with LASS disabled on both sides, ``base`` when it persists (an
emulator deviation unrelated to LASS, reported apart so it does not drown LASS findings).
A divergence in data no LASS rule decides is ``base`` too, even when the LASS-disabled run
hides it (:func:`beyond_lass`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Final

from lassfuzz.arch import CR4_LASS, GPR_NAMES, RFLAGS_AC
from lassfuzz.case import TestCase
from lassfuzz.compare.diff import Comparison, Divergence, Verdict, compare
from lassfuzz.compare.localize import find_culprit
from lassfuzz.compare.signature import Signature, data_signature, signature_of
from lassfuzz.outcome import Engine, Outcome


@dataclass(frozen=True)
class Result:
    """Both outcomes of one case and how they compare."""

    case: TestCase
    reference: Outcome
    emulator: Outcome
    comparison: Comparison


@dataclass(frozen=True)
class Finding:
    """A triaged divergence: what a crash file records."""

    result: Result
    divergence: Divergence
    signature: Signature
    cls: str  # "lass" | "base"


class Differential:
    """The reference model and one emulator, run side by side."""

    def __init__(self, reference: Engine, emulator: Engine, *, trace: bool = False) -> None:
        self.reference = reference
        self.emulator = emulator
        self.trace = trace

    def run(self, case: TestCase) -> Result:
        reference = self.reference.run(case, trace=self.trace)
        emulator = self.emulator.run(case, trace=self.trace)
        return Result(case, reference, emulator, compare(case, reference, emulator))

    def triage(self, result: Result, signature: Signature | None = None) -> Finding:
        """Signature (unless the caller has it) and class of a diverging result (re-runs the
        case with LASS disabled)."""
        divergence = result.comparison.divergence
        if divergence is None:
            raise ValueError("triage needs a diverging result")
        if signature is None:
            signature = self.signature_of(result)
        if beyond_lass(result, divergence):
            cls = "base"
        else:
            without_lass = self.run(lass_disabled(result.case))
            cls = "base" if without_lass.comparison.verdict is Verdict.DIVERGE else "lass"
        return Finding(result, divergence, signature, cls)

    def signature(self, case: TestCase) -> tuple[Result, Signature | None]:
        """Run ``case`` and return the signature of its divergence, if it diverges."""
        result = self.run(case)
        if result.comparison.verdict is not Verdict.DIVERGE:
            return result, None
        return result, self.signature_of(result)

    def signature_of(self, result: Result) -> Signature:
        """The signature of a diverging result: a data signature for a divergence beyond LASS
        that a code prefix already shows (runs the prefixes), else the LASS-context one."""
        divergence = result.comparison.divergence
        if divergence is None:
            raise ValueError("a signature needs a diverging result")
        if beyond_lass(result, divergence):
            culprit = find_culprit(result.case, divergence, self._compare_only)
            if culprit is not None:
                return data_signature(result.case, divergence, culprit)
        return signature_of(result.case, result.reference, result.emulator, divergence)

    def _compare_only(self, case: TestCase) -> tuple[Comparison, str, str]:
        result = self.run(case)
        return result.comparison, result.reference.summary, result.emulator.summary


#: Registers no LASS rule decides (CR4 is MOV CR4's, CPL and EFER the mode's, RIP the
#: ending's; RFLAGS is checked bit by bit, since AC is LASS state).
_DATA_REGISTERS: Final = frozenset({*GPR_NAMES, "cr0", "cr3", "fs_base", "gs_base"})


def beyond_lass(result: Result, divergence: Divergence) -> bool:
    """Whether ``divergence`` lies in data no LASS rule decides: memory, the access trace, a
    general register, or RFLAGS other than AC. The comparison checks status, events and the
    fault first, so both engines ended the same way: LASS allowed and refused the same
    accesses, and the difference is computation (measured: a wrong CMPXCHG16B ZF before a
    LASS #GP looked like ``lass`` because the LASS-disabled run went on and overwrote it)."""
    if divergence.kind in ("memory", "trace"):
        return True
    if divergence.kind != "register":
        return False
    if divergence.field != "rflags":
        return divergence.field in _DATA_REGISTERS
    reference, emulator = result.reference.registers, result.emulator.registers
    assert reference is not None and emulator is not None
    return not (reference.rflags ^ emulator.rflags) & RFLAGS_AC


def lass_disabled(case: TestCase) -> TestCase:
    """``case`` with CR4.LASS clear and LASS not advertised, so no code can turn it on."""
    state = dataclasses.replace(case.state, cr4=case.state.cr4 & ~CR4_LASS, lass_supported=False)
    return dataclasses.replace(case, state=state)
