"""Divergence signatures: what makes two findings "the same bug".

A signature keeps the coarse facts a developer would sort findings by (LASS.md section 8 axes):
the divergence kind, both outcomes' classes, the faulting access's kind and address half, the
CPL, SMAP/AC, and the instruction family. It deliberately leaves out addresses, register values
and case indices, so one bug hit from many random cases lands in one bucket.

A divergence in computed data (``beyond_lass``) has a *data signature* instead: the
instruction that computed it (:mod:`lassfuzz.compare.localize`), the divergence kind and the
mode, and none of the LASS context, which has nothing to do with it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from lassfuzz.arch import CR4_SMAP, RFLAGS_AC
from lassfuzz.case import TestCase
from lassfuzz.compare.diff import Divergence
from lassfuzz.compare.localize import Culprit, divergence_key
from lassfuzz.families import family_at
from lassfuzz.outcome import Fault, Outcome

MAX_INSTRUCTION_LENGTH = 15


@dataclass(frozen=True)
class Signature:
    """The bucket a divergence falls in. ``id`` is a stable short hash of the fields."""

    divergence: str  # kind, plus the register name for register divergences
    reference: str  # outcome class: ok, #GP(0), #PF(0x5), ...
    emulator: str
    access: str  # read / write / fetch / none
    half: str  # user / supervisor / none
    cpl: int
    smap: bool
    ac: bool
    family: str
    mode: str = "64"  # "64" or "compat"
    #: Data signatures only: the mnemonic (with prefixes) of the instruction that computed the
    #: divergence; the LASS context fields are then neutral (access and half "none", CPL 0).
    culprit: str = ""

    @property
    def id(self) -> str:
        fields = asdict(self)
        if not self.culprit:  # ids of signatures without a culprit predate the field
            del fields["culprit"]
        text = json.dumps(fields, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()

    def describe(self) -> str:
        flags = "compat " if self.mode != "64" else ""
        if self.culprit:
            return (
                f"{self.divergence} [{self.family}: {self.culprit}] {flags}computed differently: "
                f"reference {self.reference} emulator {self.emulator}"
            )
        flags += f"cpl{self.cpl} {self.access} {self.half}-half"
        flags += " smap" if self.smap else ""
        flags += " ac" if self.ac else ""
        return (
            f"{self.divergence} [{self.family}] {flags}: "
            f"reference {self.reference} emulator {self.emulator}"
        )


#: The emulator's outcome class when its first fault (if any) is not at the reference's first
#: fault: it went past the fault the architecture raises there, and what it did next (completed,
#: faulted later, shut down), like the kind of the first difference that made, depends on the
#: rest of the case, not on the bug; the divergence is then MISSED_FAULT. Measured on the bochs
#: policy's two deviations, 60 s: 451 signatures before, 242 with family "fetch" for fetch
#: faults, 88 with this too.
ELSEWHERE = "elsewhere"
MISSED_FAULT = "missed-fault"


def signature_of(
    case: TestCase, reference: Outcome, emulator: Outcome, divergence: Divergence
) -> Signature:
    """Compute the signature of ``divergence`` between two outcomes of ``case``."""
    fault = _describing_fault(reference, emulator)
    expected, seen = _first_fault(reference), _first_fault(emulator)
    kind, reference_class, emulator_class = (
        divergence_key(divergence),
        reference.summary,
        emulator.summary,
    )
    if expected is not None and (seen is None or seen.rip != expected.rip):
        # How the reference's delivery of the fault ended is downstream of the miss too.
        kind, reference_class, emulator_class = MISSED_FAULT, expected.name, ELSEWHERE
    access, half = "none", "none"
    if fault is not None and fault.access is not None:
        access = fault.access
    if fault is not None and fault.address is not None:
        half = "supervisor" if fault.address >> 63 else "user"
    return Signature(
        divergence=kind,
        reference=reference_class,
        emulator=emulator_class,
        access=access,
        half=half,
        cpl=case.state.cpl,
        smap=bool(case.state.cr4 & CR4_SMAP),
        ac=bool(case.state.rflags & RFLAGS_AC),
        family=family_at_fault(case, fault),
        mode=case.state.mode,
    )


def data_signature(case: TestCase, divergence: Divergence, culprit: Culprit) -> Signature:
    """The signature of a divergence in computed data, localized to ``culprit``."""
    return Signature(
        divergence=divergence_key(divergence),
        reference=culprit.reference,
        emulator=culprit.emulator,
        access="none",
        half="none",
        cpl=0,
        smap=False,
        ac=False,
        family=culprit.family,
        mode=case.state.mode,
        culprit=culprit.mnemonic,
    )


def _first_fault(outcome: Outcome) -> Fault | None:
    """The fault that ended the case, or for cases with an IDT the first event."""
    if outcome.fault is not None:
        return outcome.fault
    return outcome.events[0] if outcome.events else None


def _describing_fault(reference: Outcome, emulator: Outcome) -> Fault | None:
    """The fault that explains the divergence: the reference's if any, else the emulator's."""
    return _first_fault(reference) or _first_fault(emulator)


def family_at_fault(case: TestCase, fault: Fault | None) -> str:
    """Family of the faulting instruction when it lies in the case's code, else a coarse label.

    A fetch fault's instruction was never fetched, so its bytes say nothing about the fault
    (and its RIP is often a branch target outside the code): its family is "fetch".
    """
    if fault is None:
        return "none"
    if fault.access == "fetch":
        return "fetch"
    offset = (fault.rip - case.code_address) & 0xFFFF_FFFF_FFFF_FFFF
    if offset >= len(case.code):
        return "outside-code"
    bits = 32 if case.state.mode == "compat" else 64
    return family_at(case.code[offset : offset + MAX_INSTRUCTION_LENGTH], fault.rip, bits)
