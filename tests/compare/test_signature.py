"""Divergence signatures: what they keep, and what they drop so one bug stays one bucket."""

from __future__ import annotations

import dataclasses

from lassfuzz.arch import CR4_PAE, CR4_SMAP, VEC_GP, VEC_PF
from lassfuzz.case import DEFAULT_CODE_ADDRESS, State, TestCase
from lassfuzz.compare.diff import first_divergence
from lassfuzz.compare.signature import ELSEWHERE, MISSED_FAULT, Signature, signature_of
from lassfuzz.outcome import Fault, Outcome, Status
from tests.compare.test_diff import outcome

CODE = DEFAULT_CODE_ADDRESS[3]
#: mov rax, [rbx]; add [rcx], al: a load, then a read-modify-write at CODE + 3
CASE = TestCase(State(cpl=3, cr4=CR4_PAE | CR4_SMAP), bytes.fromhex("488b03 0001"), CODE)
HIGH = 0xFFFF_8000_0000_0000


def signature(reference: Outcome, emulator: Outcome, case: TestCase = CASE) -> Signature:
    divergence = first_divergence(case, reference, emulator)
    assert divergence is not None
    return signature_of(case, reference, emulator, divergence)


def faulted(vector: int, rip: int, access: str, address: int, code: int = 0) -> Outcome:
    fault = Fault(vector, code, rip, cr2=address if vector == VEC_PF else None,
                  access=access, address=address)  # fmt: skip
    return outcome(status=Status.FAULT, fault=fault)


def test_a_fault_signature_keeps_the_lass_context() -> None:
    lass = faulted(VEC_GP, CODE, "read", HIGH)
    paging = faulted(VEC_PF, CODE, "read", HIGH, code=0x5)
    found = signature(lass, paging)
    assert (
        found.describe()
        == "vector [mov] cpl3 read supervisor-half smap: reference #GP(0) emulator #PF(0x5)"
    )


def test_an_emulator_that_misses_a_fault_is_one_bucket_whatever_it_did_next() -> None:
    """Completing, faulting later (on the ADD) or with another vector there: all "missed"."""
    reference = faulted(VEC_GP, CODE, "read", HIGH)
    went_on = [
        outcome(),
        faulted(VEC_PF, CODE + 3, "write", 0x1000, code=0x7),
        faulted(VEC_GP, CODE + 3, "write", HIGH),
    ]
    found = {signature(reference, emulator) for emulator in went_on}
    (only,) = found
    assert (only.divergence, only.reference, only.emulator) == (MISSED_FAULT, "#GP(0)", ELSEWHERE)
    assert (only.family, only.access, only.half) == ("mov", "read", "supervisor")


def test_a_fetch_faults_family_is_fetch_not_the_unfetched_instruction() -> None:
    """The first fetch of compatibility-mode code at CPL0 faults under LASS: whichever
    instruction lies there, the signature is the same."""
    signatures = set()
    for code in ("488b03", "0001", "90"):
        case = dataclasses.replace(CASE, code=bytes.fromhex(code))
        fetch = faulted(VEC_GP, CODE, "fetch", CODE)
        signatures.add(signature(fetch, outcome(), case))
    (only,) = signatures
    assert only.family == "fetch"
