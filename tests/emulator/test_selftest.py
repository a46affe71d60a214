"""The start-up self-test passes on the pinned Unicorn and names a failed expectation."""

from __future__ import annotations

import pytest

from lassfuzz.emulator import selftest
from lassfuzz.emulator.machine import EmulatorSelfTestError, UnicornMachine


def test_self_test_passes_on_the_pinned_unicorn(machine: UnicornMachine) -> None:
    selftest.check_machine(machine)


def test_version_mismatch_is_named(
    machine: UnicornMachine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(selftest._UNICORN, "__version__", "2.0.0")
    with pytest.raises(EmulatorSelfTestError, match=r"Unicorn 2\.0\.0 is not the pinned 2\.1\.4"):
        selftest.check_machine(machine)
