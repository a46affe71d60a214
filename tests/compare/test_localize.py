"""Localizing data divergences (lassfuzz.compare.localize) and the data signatures built on it."""

from __future__ import annotations

import dataclasses

from lassfuzz.arch import CR4_LASS, CR4_PAE, CR4_SMAP, RFLAGS_AC, RFLAGS_CF, RFLAGS_FIXED1
from lassfuzz.case import DEFAULT_CODE_ADDRESS, Page, State, TestCase
from lassfuzz.compare.diff import Comparison, Divergence, Verdict
from lassfuzz.compare.differential import Differential, lass_disabled
from lassfuzz.compare.localize import find_culprit
from lassfuzz.model.engine import ReferenceModel
from lassfuzz.outcome import Outcome

USER_DATA = 0x50_0000
SUPERVISOR = 0xFFFF_8000_0000_0000
#: neg eax: the instruction the fake emulator below gets wrong.
NEG_EAX = bytes.fromhex("f7d8")


class NegFlagsBug:
    """The reference model, except that RFLAGS.CF comes out flipped once the code executed
    contains NEG EAX: an emulator bug in one instruction's flags, whatever follows it."""

    name = "emulator"

    def __init__(self) -> None:
        self._model = ReferenceModel()

    def run(self, case: TestCase, *, trace: bool = False) -> Outcome:
        outcome = self._model.run(case, trace=trace)
        if NEG_EAX not in case.code or outcome.registers is None:
            return outcome
        registers = dataclasses.replace(
            outcome.registers, rflags=outcome.registers.rflags ^ RFLAGS_CF
        )
        return dataclasses.replace(outcome, engine=self.name, registers=registers)


def user_case(code: str, *, cpl: int = 3, smap: bool = False, ac: bool = False) -> TestCase:
    state = State(
        cpl=cpl,
        cr4=CR4_PAE | CR4_LASS | (CR4_SMAP if smap else 0),
        rflags=RFLAGS_FIXED1 | (RFLAGS_AC if ac else 0),
        gprs=(0, 0, 0, USER_DATA, 0, 0, SUPERVISOR) + (0,) * 9,  # rbx: user data, rsi: high
    )
    pages = (Page(USER_DATA, user=True), Page(SUPERVISOR, user=False))
    return TestCase(state, bytes.fromhex(code), DEFAULT_CODE_ADDRESS[cpl], pages)


def test_the_culprit_is_the_first_instruction_whose_prefix_diverges() -> None:
    case = user_case("4801c0 f7d8 488903")  # add rax, rax; neg eax; mov [rbx], rax
    calls: list[bytes] = []

    def run(prefix: TestCase) -> tuple[Comparison, str, str]:
        calls.append(prefix.code)
        if NEG_EAX in prefix.code:
            divergence = Divergence("register", "rflags", "0x2", "0x3")
            return Comparison(Verdict.DIVERGE, divergence), "ok", "ok"
        return Comparison(Verdict.AGREE), "ok", "ok"

    wanted = Divergence("register", "rflags", "0x46", "0x47")
    culprit = find_culprit(case, wanted, run)
    assert culprit is not None
    assert (culprit.family, culprit.mnemonic) == ("unary", "neg")
    assert calls == [case.code[:3], case.code[:5]]  # stops at the first diverging prefix


def test_no_culprit_when_no_prefix_diverges_in_the_same_field() -> None:
    case = user_case("4801c0 f7d8")

    def run(prefix: TestCase) -> tuple[Comparison, str, str]:
        divergence = Divergence("register", "rax", "0x1", "0x2")  # another field
        return Comparison(Verdict.DIVERGE, divergence), "ok", "ok"

    assert find_culprit(case, Divergence("register", "rflags", "0", "1"), run) is None


def test_one_instruction_bug_is_one_bucket_whatever_follows_it() -> None:
    """A flags bug in NEG followed by different faulting instructions, at different CPLs and
    SMAP/AC: one data signature naming NEG, class base."""
    differential = Differential(ReferenceModel(), NegFlagsBug())
    cases = [
        user_case("f7d8 488b06"),  # CPL3 read of the supervisor half: LASS #GP
        user_case("f7d8 48893e", cpl=0, smap=True),  # CPL0 SMAP write of a supervisor page: ok
        user_case("4801c0 f7d8 48ff03", cpl=0, smap=True, ac=True),  # inc [rbx]
    ]
    signatures = set()
    for case in cases:
        result, signature = differential.signature(case)
        assert signature is not None, result.comparison
        assert differential.triage(result, signature).cls == "base"
        signatures.add(signature)
    (signature,) = signatures
    assert (signature.divergence, signature.family, signature.culprit) == (
        "register:rflags",
        "unary",
        "neg",
    )
    assert signature.describe() == (
        "register:rflags [unary: neg] computed differently: reference ok emulator ok"
    )


def test_lass_divergences_keep_their_lass_context() -> None:
    """A divergence in the fault itself is not localized: its signature is the LASS one."""

    class NoLass(NegFlagsBug):
        def run(self, case: TestCase, *, trace: bool = False) -> Outcome:
            outcome = self._model.run(lass_disabled(case), trace=trace)
            return dataclasses.replace(outcome, engine=self.name)

    differential = Differential(ReferenceModel(), NoLass())
    _, signature = differential.signature(user_case("488b06"))
    assert signature is not None and signature.culprit == ""
    assert (signature.cpl, signature.access, signature.half) == (3, "read", "supervisor")
