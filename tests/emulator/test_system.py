"""Descriptor tables and segment registers emulated by the shim (docs/machine.md, System level)."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest

from lassfuzz import system as tables
from lassfuzz.arch import (
    CR4_LASS,
    CR4_PAE,
    RFLAGS_AC,
    RFLAGS_FIXED1,
    RFLAGS_ZF,
    VEC_GP,
    VEC_NP,
    VEC_PF,
)
from lassfuzz.case import Page, materialize
from lassfuzz.emulator.machine import UnicornMachine
from lassfuzz.outcome import Access, Outcome, Status
from lassfuzz.policies import BUILTIN
from tests.emulator.cases import gpr
from tests.emulator.system_cases import SUPERVISOR, USER, system_case

TSS_BASE = SUPERVISOR + 0x2000


def _gdt_with(selector: int, descriptor: int, *, base: int = SUPERVISOR) -> Page:
    """The standard GDT page with one 8-byte slot replaced."""
    table = bytearray(tables.standard_gdt(TSS_BASE))
    table[selector & ~7 : (selector & ~7) + 8] = struct.pack("<Q", descriptor)
    return Page(base, user=not base >> 63, data=bytes(table))


def _first_event(outcome: Outcome) -> str:
    assert outcome.events, outcome.detail
    return outcome.events[0].name


def test_system_registers_are_reported(machine: UnicornMachine) -> None:
    outcome = machine.run(system_case("90"))
    assert outcome.status is Status.COMPLETED
    assert outcome.registers is not None and outcome.registers.system is not None
    system = outcome.registers.system
    user_ds = tables.USER_DS | 3
    assert system.selectors == (
        tables.USER_CS | 3,
        user_ds,
        user_ds,
        user_ds,
        0,
        0,
        tables.TSS_SEL,
        0,
    )
    assert (system.gdt_base, system.gdt_limit) == (SUPERVISOR, tables.GDT_LIMIT)


def test_mov_ds_with_user_half_gdt_smap_ac_is_gp_under_sdm_only(machine: UnicornMachine) -> None:
    """Known answer (issue 6): CPL3 MOV DS, AX, GDT in the user half, SMAP = 1, AC = 1."""
    case = system_case("8ed8", gdt="user", rflags=RFLAGS_FIXED1 | RFLAGS_AC, rax=tables.USER_DS | 3)
    outcome = machine.run(case)
    assert outcome.events[0].name == "#GP(0)" and outcome.events[0].rip == case.code_address
    # Bochs lets AC exempt the implicit read; paging still applies SMAP (AC ignored): #PF.
    bochs = UnicornMachine(BUILTIN["bochs"]).run(case)
    assert bochs.events[0].vector == VEC_PF


def test_mov_ds_loads_and_sets_the_accessed_bit(machine: UnicornMachine) -> None:
    fresh = tables.segment_descriptor(code=False, dpl=3, accessed=False)
    case = system_case("8ed8 8cdb", rax=0x4B, extra_pages=(_gdt_with(0x48, fresh),))
    outcome = machine.run(case, trace=True)
    assert outcome.status is Status.COMPLETED, outcome.detail
    assert gpr(outcome.registers, "rbx") == 0x4B  # MOV EBX, DS reads the shim's selector
    assert outcome.registers is not None and outcome.registers.system is not None
    assert outcome.registers.system.selectors[2] == 0x4B
    assert outcome.trace == (
        Access("read", SUPERVISOR + 0x48, 8, fresh, implicit=True),
        Access("write", SUPERVISOR + 0x4D, 1, 0xF3, implicit=True),
    )
    frame = materialize(case).page_frames[SUPERVISOR]
    assert outcome.memory[frame][0x4D] == 0xF3


@pytest.mark.parametrize(
    ("code", "registers", "vector", "error_code"),
    [
        ("8ed8", {"rax": 0x7B}, VEC_GP, 0x78),  # beyond the GDT limit
        ("8ed8", {"rax": tables.KERNEL_DS}, VEC_GP, tables.KERNEL_DS),  # DPL 0 < CPL 3
        ("8ed0", {"rax": tables.USER_DS | 2}, VEC_GP, tables.USER_DS),  # SS: RPL != CPL
        ("8ed0", {"rax": 0}, VEC_GP, 0),  # null SS at CPL 3
        ("8ed8", {"rax": 0x4B}, VEC_NP, 0x48),  # not present
    ],
)
def test_segment_load_faults(
    machine: UnicornMachine, code: str, registers: dict[str, int], vector: int, error_code: int
) -> None:
    absent = tables.segment_descriptor(code=False, dpl=3, present=False)
    case = system_case(code, extra_pages=(_gdt_with(0x48, absent),), **registers)
    outcome = machine.run(case)
    first = outcome.events[0]
    assert (first.vector, first.error_code, first.rip) == (vector, error_code, case.code_address)


def test_descriptor_queries_and_stores_at_cpl3(machine: UnicornMachine) -> None:
    # mov eax, 0x2b; lar ebx, eax; lsl esi, eax; verr ax; verw ax; sgdt [0x500000];
    # str ecx; mov edx, ss
    code = "b82b000000 0f02d8 0f03f0 0f00e0 0f00e8 0f01042500005000 0f00c9 8cd2"
    outcome = machine.run(system_case(code), trace=True)
    assert outcome.status is Status.COMPLETED, outcome.detail
    registers = outcome.registers
    assert gpr(registers, "rbx") == 0xA0_FB00  # G, L, P, DPL 3, S, type B
    assert gpr(registers, "rsi") == 0xFFFF_FFFF
    assert gpr(registers, "rcx") == tables.TSS_SEL
    assert gpr(registers, "rdx") == tables.USER_DS | 3
    assert registers is not None and not registers.rflags & RFLAGS_ZF  # VERW: code not writable
    assert outcome.trace is not None
    implicit = [access for access in outcome.trace if access.implicit]
    assert len(implicit) == 4 and all(access.address == SUPERVISOR + 0x28 for access in implicit)
    stores = [access for access in outcome.trace if not access.implicit]
    assert stores == [Access("write", 0x50_0000, 10, tables.GDT_LIMIT | SUPERVISOR << 16)]


def test_push_segment_register_is_unsupported(machine: UnicornMachine) -> None:
    outcome = machine.run(system_case("0fa0"))  # push fs
    assert outcome.status is Status.UNSUPPORTED and "push fs" in outcome.detail


def test_verr_of_null_or_out_of_range_selector_clears_zf_without_fault(
    machine: UnicornMachine,
) -> None:
    outcome = machine.run(system_case("0f00e0", rax=0xFFF8, rflags=RFLAGS_FIXED1 | RFLAGS_ZF))
    assert outcome.status is Status.COMPLETED and not outcome.events
    assert outcome.registers is not None and not outcome.registers.rflags & RFLAGS_ZF


def test_lgdt_is_privileged_and_loads_at_cpl0(machine: UnicornMachine) -> None:
    operand = Page(USER, user=True, data=struct.pack("<HQ", 0x7F, SUPERVISOR + 0x8000))
    lgdt = "0f01142500006000"  # lgdt [0x600000]
    user = machine.run(system_case(lgdt, extra_pages=(operand,)))
    assert _first_event(user) == "#GP(0)"
    # CPL0 without SMAP may read the user-half operand.
    kernel = machine.run(system_case(lgdt, cpl=0, cr4=CR4_PAE | CR4_LASS, extra_pages=(operand,)))
    assert kernel.status is Status.COMPLETED, kernel.detail
    assert kernel.registers is not None and kernel.registers.system is not None
    assert (kernel.registers.system.gdt_base, kernel.registers.system.gdt_limit) == (
        SUPERVISOR + 0x8000,
        0x7F,
    )


def test_ltr_needs_an_available_tss_and_sets_busy(machine: UnicornMachine) -> None:
    busy = machine.run(system_case("0f00d8", cpl=0, rax=tables.TSS_SEL))  # ltr ax
    assert _first_event(busy) == f"#GP({tables.TSS_SEL})"
    table = bytearray(tables.standard_gdt(TSS_BASE))
    table[tables.TSS_SEL : tables.TSS_SEL + 16] = tables.system_descriptor(
        tables.TYPE_TSS_AVAILABLE, TSS_BASE, tables.TSS_LIMIT
    )
    gdt = Page(SUPERVISOR, user=False, data=bytes(table))
    case = system_case("0f00d8", cpl=0, rax=tables.TSS_SEL, extra_pages=(gdt,))
    outcome = machine.run(case)
    assert outcome.status is Status.COMPLETED, outcome.detail
    frame = materialize(case).page_frames[SUPERVISOR]
    assert outcome.memory[frame][tables.TSS_SEL + 5] & 0xF == tables.TYPE_TSS_BUSY


def test_initial_cs_must_match_mode_and_cpl(machine: UnicornMachine) -> None:
    case = system_case("90")
    assert case.state.system is not None
    system = replace(case.state.system, cs=tables.KERNEL_CS)  # DPL 0 at CPL 3
    outcome = machine.run(replace(case, state=replace(case.state, system=system)))
    assert outcome.status is Status.UNSUPPORTED and "state.system.cs" in outcome.detail


def test_compat_mode_access_through_null_fs_is_gp(machine: UnicornMachine) -> None:
    # mov eax, fs:[0x500000] in compatibility mode, FS null (standard compat system state).
    outcome = machine.run(system_case("64a100005000", mode="compat"))
    assert outcome.events[0].name == "#GP(0)" and outcome.events[0].rip == 0x40_0000
    plain = machine.run(system_case("a100005000", mode="compat"))  # through DS: flat, fine
    assert plain.status is Status.COMPLETED, plain.detail


def test_compat_rep_with_zero_count_through_null_es_makes_no_access(
    machine: UnicornMachine,
) -> None:
    case = system_case("31c0 8ec0 f3aa", mode="compat")  # xor eax,eax; mov es,ax; rep stosb
    outcome = machine.run(case)
    assert outcome.status is Status.COMPLETED and not outcome.events


def test_compat_mode_access_through_ds_made_null_is_gp(machine: UnicornMachine) -> None:
    # xor eax, eax; mov ds, ax (null: allowed); mov ebx, [0x500000] (through DS: #GP(0))
    outcome = machine.run(system_case("31c0 8ed8 8b1d00005000", mode="compat"))
    assert [(event.name, event.rip) for event in outcome.events] == [("#GP(0)", 0x40_0004)]
