"""Start-up self-test: the Unicorn facts the machine relies on, checked on the live machine.

Unicorn's behaviour here is empirical (shared/UNICORN.md), so a different build could silently
change results. Each check names the expectation it tests; a failure raises
:class:`~lassfuzz.emulator.machine.EmulatorSelfTestError` before any case runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import unicorn

from lassfuzz.arch import MASK64, VEC_GP
from lassfuzz.case import Page, State, TestCase, materialize
from lassfuzz.outcome import Status

if TYPE_CHECKING:
    from lassfuzz.emulator.machine import UnicornMachine

PINNED_UNICORN: Final = "2.1.4"
_UNICORN: Final[Any] = unicorn  # the binding does not declare __version__ for mypy
_USER_CODE: Final = 0x40_0000
_USER_DATA: Final = 0x50_0000


def check_machine(machine: UnicornMachine) -> None:
    """Run the self-test cases on ``machine``; raise EmulatorSelfTestError on any mismatch."""
    from lassfuzz.emulator.machine import EmulatorSelfTestError

    def expect(condition: bool, what: str) -> None:
        if not condition:
            raise EmulatorSelfTestError(f"Unicorn self-test failed: {what}")

    expect(
        _UNICORN.__version__ == PINNED_UNICORN,
        f"Unicorn {_UNICORN.__version__} is not the pinned {PINNED_UNICORN}",
    )
    user = State(cpl=3, gprs=(0x1111,) + (0,) * 15)
    # mov rax, cr4 at CPL3: CPL3 was really entered (QEMU raises #GP for a privileged insn).
    privileged = machine.run(TestCase(user, bytes.fromhex("0f20e0"), _USER_CODE))
    expect(
        privileged.fault is not None
        and (privileged.fault.vector, privileged.fault.rip) == (VEC_GP, _USER_CODE),
        f"MOV from CR4 at CPL3 gives #GP at the instruction (got {privileged.summary})",
    )
    # mov rax, [0x8000_0000_0000_0000]: a refused fill aborts cleanly, RAX untouched.
    noncanonical = bytes.fromhex("48a10000000000000080")
    aborted = machine.run(TestCase(user, noncanonical, _USER_CODE))
    expect(
        aborted.fault is not None
        and aborted.fault.rip == _USER_CODE
        and aborted.registers is not None
        and aborted.registers.gprs[0] == 0x1111,
        f"a refused TLB fill faults at the instruction with no effect (got {aborted.summary})",
    )
    # mov [rbx], rax across into a non-present page: no torn store.
    store = State(cpl=3, gprs=(MASK64, 0, 0, _USER_DATA + 0xFFC) + (0,) * 12)
    pages = (Page(_USER_DATA, user=True), Page(_USER_DATA + 0x1000, user=True, present=False))
    case = TestCase(store, bytes.fromhex("488903"), _USER_CODE, pages)
    torn = machine.run(case)
    first_frame = materialize(case).page_frames[_USER_DATA]
    expect(
        torn.status is Status.FAULT and not any(torn.memory[first_frame]),
        "a page-crossing store that faults on its second page writes nothing",
    )
