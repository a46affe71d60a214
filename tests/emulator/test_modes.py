"""Modes on the Unicorn machine: CPL 1/2, compatibility mode, LA57, context switches."""

from __future__ import annotations

from typing import Any

import pytest
import unicorn
from unicorn.unicorn_const import UC_ARCH_X86, UC_MODE_64
from unicorn.x86_const import (
    UC_CPU_X86_BROADWELL,
    UC_X86_REG_CS,
    UC_X86_REG_IDTR,
    UC_X86_REG_RAX,
    UC_X86_REG_XMM9,
)

from lassfuzz.arch import CR4_LA57, CR4_LASS, CR4_PAE, CR4_SMAP, VEC_GP
from lassfuzz.case import COMPAT_CODE_ADDRESS, DEFAULT_CODE_ADDRESS, Page, State, TestCase
from lassfuzz.emulator.machine import UnicornMachine
from lassfuzz.emulator.modes import BOOT_SELECTORS, ContextSwitch, boot_contexts
from lassfuzz.emulator.port import FastPort
from lassfuzz.outcome import Status
from lassfuzz.policies import BUILTIN
from tests.emulator.cases import USER_DATA, gpr

LASS = CR4_PAE | CR4_LASS


def _uc() -> Any:
    uc = unicorn.Uc(UC_ARCH_X86, UC_MODE_64)
    uc.ctl_set_cpu_model(UC_CPU_X86_BROADWELL)
    uc.mem_map(0, 0x10_0000)
    return uc


def test_boot_enters_every_mode_and_cpl() -> None:
    uc = _uc()
    contexts = boot_contexts(uc, gdt=0x1000, code=0x2000, stack_top=0x4000, landing=0x3000)
    assert set(contexts) == set(BOOT_SELECTORS)
    for key, context in contexts.items():
        uc.context_restore(context)
        assert uc.reg_read(UC_X86_REG_CS) == BOOT_SELECTORS[key][0]


def test_switch_context_keeps_case_registers() -> None:
    uc = _uc()
    contexts = boot_contexts(uc, gdt=0x1000, code=0x2000, stack_top=0x4000, landing=0x3000)
    uc.context_restore(contexts[("64", 0)])
    xmm = 0x1122_3344_5566_7788_99AA_BBCC_DDEE_FF00
    uc.reg_write(UC_X86_REG_XMM9, xmm)
    uc.reg_write(UC_X86_REG_RAX, 7)
    uc.reg_write(UC_X86_REG_IDTR, (0, 0xFFFF_8000_0000_1000, 0xFFF, 0))
    ContextSwitch(FastPort(uc)).switch(contexts[("compat", 3)])
    assert uc.reg_read(UC_X86_REG_XMM9) == xmm
    assert uc.reg_read(UC_X86_REG_RAX) == 7
    assert uc.reg_read(UC_X86_REG_IDTR)[1:3] == (0xFFFF_8000_0000_1000, 0xFFF)
    assert uc.reg_read(UC_X86_REG_CS) == BOOT_SELECTORS[("compat", 3)][0]


@pytest.mark.parametrize("cpl", [1, 2])
def test_cpl1_and_cpl2_are_supervisor(machine: UnicornMachine, cpl: int) -> None:
    state = State(cpl=cpl, cr4=LASS | CR4_SMAP, gprs=(0, 0, 0, USER_DATA) + (0,) * 12)
    read = TestCase(
        state, bytes.fromhex("488b03"), DEFAULT_CODE_ADDRESS[cpl], (Page(USER_DATA, user=True),)
    )
    outcome = machine.run(read)  # supervisor read of the user half with SMAP, AC = 0
    assert outcome.summary == "#GP(0)" and "LASS" in outcome.detail
    assert outcome.registers is not None and outcome.registers.cpl == cpl
    without_smap = TestCase(
        State(cpl=cpl, cr4=LASS), bytes.fromhex("f4"), DEFAULT_CODE_ADDRESS[cpl]
    )
    halted = machine.run(without_smap)  # HLT above CPL0
    assert halted.fault is not None and halted.fault.vector == VEC_GP


def test_compat_mode_decodes_32_bit_code(machine: UnicornMachine) -> None:
    state = State(mode="compat", cpl=3, cr4=LASS, gprs=(5,) + (0,) * 15)
    outcome = machine.run(TestCase(state, bytes.fromhex("4040"), COMPAT_CODE_ADDRESS))
    assert outcome.status is Status.COMPLETED
    assert gpr(outcome.registers, "rax") == 7  # two INC EAX, not REX prefixes


def test_compat_cpl0_fetch_with_lass_is_gp_except_under_bochs(machine: UnicornMachine) -> None:
    case = TestCase(State(mode="compat", cpl=0, cr4=LASS), bytes.fromhex("90"), COMPAT_CODE_ADDRESS)
    outcome = machine.run(case)
    assert outcome.fault is not None
    assert (outcome.fault.vector, outcome.fault.error_code, outcome.fault.rip) == (
        VEC_GP,
        0,
        COMPAT_CODE_ADDRESS,
    )
    assert UnicornMachine(BUILTIN["bochs"]).run(case).status is Status.COMPLETED


def test_compat_data_address_is_32_bit(machine: UnicornMachine) -> None:
    # mov eax, [ebx + 8] with EBX = 0xFFFF_FFFC: the linear address wraps to 4 (page 0).
    state = State(mode="compat", cpl=3, cr4=LASS, gprs=(0, 0, 0, 0xFFFF_FFFC) + (0,) * 12)
    page = Page(0, user=True, data=bytes(4) + (0x1234).to_bytes(4, "little"))
    outcome = machine.run(TestCase(state, bytes.fromhex("8b4308"), COMPAT_CODE_ADDRESS, (page,)))
    assert outcome.status is Status.COMPLETED
    assert gpr(outcome.registers, "rax") == 0x1234


def test_la57_walks_five_levels_and_widens_canonical(machine: UnicornMachine) -> None:
    address = 0x0080_0000_0000_0000  # canonical only with 57-bit addresses
    page = Page(address, user=True, data=(42).to_bytes(8, "little"))
    state = State(cpl=3, cr4=LASS | CR4_LA57, gprs=(0, 0, 0, address) + (0,) * 12)
    outcome = machine.run(TestCase(state, bytes.fromhex("488b03"), 0x40_0000, (page,)))
    assert outcome.status is Status.COMPLETED and gpr(outcome.registers, "rax") == 42
    beyond = State(cpl=3, cr4=LASS | CR4_LA57, gprs=(0, 0, 0, 1 << 56) + (0,) * 12)
    faulted = machine.run(TestCase(beyond, bytes.fromhex("488b03"), 0x40_0000))
    assert faulted.summary == "#GP(0)" and "non-canonical" in faulted.detail


def test_mov_cr4_changing_la57_is_gp(machine: UnicornMachine) -> None:
    state = State(cpl=0, cr4=LASS | CR4_LA57, gprs=(LASS,) + (0,) * 15)
    outcome = machine.run(TestCase(state, bytes.fromhex("0f22e0"), DEFAULT_CODE_ADDRESS[0]))
    assert outcome.summary == "#GP(0)"
    assert outcome.registers is not None and outcome.registers.cr4 == LASS | CR4_LA57
