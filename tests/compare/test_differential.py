"""Triage classes: ``base`` when a divergence persists without LASS or lies beyond LASS."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from lassfuzz.arch import CR4_LASS, CR4_PAE, RFLAGS_AC, RFLAGS_FIXED1, RFLAGS_ZF, VEC_GP
from lassfuzz.case import State, TestCase
from lassfuzz.compare.differential import Differential
from lassfuzz.outcome import Fault, Outcome, Registers, Status

CASE = TestCase(
    state=State(cr4=CR4_PAE | CR4_LASS, lass_supported=True),
    code=b"\x90",
    code_address=0xFFFF_FFFF_8000_0000,
)
_REGISTERS = Registers(
    gprs=(0,) * 16,
    rip=0xFFFF_FFFF_8000_0000,
    rflags=RFLAGS_FIXED1,
    cr0=0,
    cr3=0x1000,
    cr4=CR4_PAE | CR4_LASS,
    efer=0xD00,
    cpl=0,
    fs_base=0,
    gs_base=0,
)
#: Both engines end with the same LASS #GP; the LASS-disabled run of the case agrees.
_LASS_GP = Fault(VEC_GP, 0, 0xFFFF_FFFF_8000_0000)


class FakeEngine:
    """Returns ``changed(registers)`` at the LASS #GP with LASS on, a plain agreeing
    completion with LASS off (as when the LASS-disabled run takes another path)."""

    def __init__(self, name: str, changed: Callable[[Registers], Registers]) -> None:
        self.name = name
        self.changed = changed

    def run(self, case: TestCase, *, trace: bool = False) -> Outcome:
        if not case.state.cr4 & CR4_LASS:
            return Outcome(self.name, Status.COMPLETED, registers=_REGISTERS)
        registers = self.changed(_REGISTERS)
        return Outcome(self.name, Status.FAULT, registers=registers, fault=_LASS_GP)


def _class(change: Callable[[Registers], Registers]) -> str:
    differential = Differential(FakeEngine("model", lambda r: r), FakeEngine("unicorn", change))
    result = differential.run(CASE)
    return differential.triage(result).cls


@pytest.mark.parametrize(
    "change",
    [
        lambda r: dataclasses.replace(r, rflags=r.rflags | RFLAGS_ZF),
        lambda r: dataclasses.replace(r, gprs=(1, *r.gprs[1:])),
    ],
    ids=["status-flag", "gpr"],
)
def test_data_divergence_at_the_same_ending_is_base(
    change: Callable[[Registers], Registers],
) -> None:
    assert _class(change) == "base"


@pytest.mark.parametrize(
    "change",
    [
        lambda r: dataclasses.replace(r, rflags=r.rflags | RFLAGS_AC),
        lambda r: dataclasses.replace(r, cr4=r.cr4 & ~CR4_LASS),
    ],
    ids=["ac-flag", "cr4"],
)
def test_lass_state_divergence_hidden_without_lass_is_lass(
    change: Callable[[Registers], Registers],
) -> None:
    assert _class(change) == "lass"
