"""One machine per test module: the tests also exercise context reuse across cases."""

from __future__ import annotations

import pytest

from lassfuzz.emulator.machine import UnicornMachine


@pytest.fixture(scope="module")
def machine() -> UnicornMachine:
    return UnicornMachine()
