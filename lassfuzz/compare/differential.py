"""Running one case on the reference model and on an emulator, and triaging what differs.

Triage answers two questions about a divergence: its signature (which bucket), and its class:
``lass`` when it goes away with LASS disabled on both sides, ``base`` when it persists (an
emulator deviation unrelated to LASS, reported apart so it does not drown LASS findings).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lassfuzz.arch import CR4_LASS
from lassfuzz.case import TestCase
from lassfuzz.compare.diff import Comparison, Divergence, Verdict, compare
from lassfuzz.compare.signature import Signature, signature_of
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

    def triage(self, result: Result) -> Finding:
        """Signature and class of a diverging result (re-runs the case with LASS disabled)."""
        divergence = result.comparison.divergence
        if divergence is None:
            raise ValueError("triage needs a diverging result")
        signature = signature_of(result.case, result.reference, result.emulator, divergence)
        without_lass = self.run(lass_disabled(result.case))
        cls = "base" if without_lass.comparison.verdict is Verdict.DIVERGE else "lass"
        return Finding(result, divergence, signature, cls)

    def signature(self, case: TestCase) -> tuple[Result, Signature | None]:
        """Run ``case`` and return the signature of its divergence, if it diverges."""
        result = self.run(case)
        divergence = result.comparison.divergence
        if result.comparison.verdict is not Verdict.DIVERGE or divergence is None:
            return result, None
        return result, signature_of(case, result.reference, result.emulator, divergence)


def lass_disabled(case: TestCase) -> TestCase:
    """``case`` with CR4.LASS clear and LASS not advertised, so no code can turn it on."""
    state = dataclasses.replace(case.state, cr4=case.state.cr4 & ~CR4_LASS, lass_supported=False)
    return dataclasses.replace(case, state=state)
