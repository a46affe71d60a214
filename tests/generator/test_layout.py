"""Initial states and layouts: modes, CPL 1/2, LA57 geometry and descriptor tables."""

from __future__ import annotations

import struct

import pytest
from iced_x86 import Decoder

from lassfuzz.arch import CR4_LA57, CR4_LASS, PAGE_SIZE
from lassfuzz.case import TestCase, case_from_json, case_to_json, is_canonical48
from lassfuzz.generator.generate import GeneratorConfig, generate_case
from lassfuzz.generator.layout import (
    CODE_REGIONS,
    GEOMETRY_48,
    GEOMETRY_57,
    GEOMETRY_COMPAT,
    SUPERVISOR_BOTTOM_PAGE_57,
    TABLE_REGIONS,
    USER_TOP_PAGE_57,
    geometry,
)
from lassfuzz.system import CODE_SELECTOR, STACK_SELECTOR, TSS_SEL, standard_gdt

COMPAT = GeneratorConfig(p_compat=1.0)
LA57 = GeneratorConfig(p_la57=1.0, p_compat=0.0)
SYSTEM = GeneratorConfig(p_system=1.0)


def test_geometry_follows_mode_and_paging_depth() -> None:
    assert geometry("compat", True) is GEOMETRY_COMPAT
    assert geometry("64", True) is GEOMETRY_57
    assert geometry("64", False) is GEOMETRY_48
    for shape in (GEOMETRY_48, GEOMETRY_57, GEOMETRY_COMPAT):
        assert all(shape.canonical(page) for page in shape.boundary_pages)
        assert not any(shape.canonical(page) for page in shape.non_canonical)
        assert shape.home_pages <= set(shape.boundary_pages)
    # LA57 makes the 48-bit hole canonical, but not the 57-bit one.
    assert GEOMETRY_57.canonical(0x0000_8000_0000_0000)
    assert not GEOMETRY_48.canonical(0x0000_8000_0000_0000)
    assert not GEOMETRY_COMPAT.canonical(0x1_0000_0000)


@pytest.fixture(scope="module")
def compat_cases() -> list[TestCase]:
    return [generate_case(3, index, COMPAT) for index in range(80)]


def test_compat_cases_are_32_bit_code_below_4_gib(compat_cases: list[TestCase]) -> None:
    for case in compat_cases:
        state = case.state
        assert state.mode == "compat"
        assert CODE_REGIONS[0] <= case.code_address < CODE_REGIONS[0] + 0x2_0000
        assert case.code_end <= 0xFFFF_FFFF
        assert all(value <= 0xFFFF_FFFF for value in state.gprs)
        assert state.fs_base <= 0xFFFF_FFFF and state.gs_base <= 0xFFFF_FFFF
        others = [page.address for page in case.pages if page.address >> 12 not in _TABLE_FRAMES]
        assert all(address <= 0xFFFF_F000 for address in others)
        decoded = list(Decoder(32, case.code, ip=case.code_address))
        assert sum(i.len for i in decoded) == len(case.code)
        assert not any(i.is_invalid for i in decoded)


def test_compat_system_cases_use_32_bit_code_selectors(compat_cases: list[TestCase]) -> None:
    systems = [case.state for case in compat_cases if case.state.system is not None]
    assert systems
    for state in systems:
        assert state.system is not None
        assert state.system.cs == CODE_SELECTOR[("compat", state.cpl)]
        # No null FS/GS in a 32-bit mode: a use would fault.
        assert state.system.fs == state.system.gs == STACK_SELECTOR[state.cpl]


def test_la57_cases_reach_both_boundaries() -> None:
    cases = [generate_case(4, index, LA57) for index in range(60)]
    listed = {page.address for case in cases for page in case.pages}
    assert all(case.state.cr4 & CR4_LA57 for case in cases)
    assert {USER_TOP_PAGE_57, SUPERVISOR_BOTTOM_PAGE_57, 0x0000_8000_0000_0000} <= listed
    assert any(not is_canonical48(address) for address in listed)
    for case in cases[:10]:
        assert case_from_json(case_to_json(case)) == case


def test_cpl_1_and_2_are_drawn_for_supervisor_cases() -> None:
    config = GeneratorConfig(p_cpl3=0.0, p_cpl12=1.0)
    assert {generate_case(5, index, config).state.cpl for index in range(40)} == {1, 2}


#: Page frames of the descriptor-table regions (tables, handler, kernel stacks).
_TABLE_FRAMES = {(region >> 12) + 2 * slot for region in TABLE_REGIONS for slot in range(7)}


def test_system_tables_are_well_formed_and_vary() -> None:
    cases = [generate_case(6, index, SYSTEM) for index in range(120)]
    halves: set[tuple[str, int]] = set()
    unusual = 0
    for case in cases:
        system = case.state.system
        assert system is not None
        pages = {page.address: page for page in case.pages}
        gdt = pages[system.gdt_base].data.ljust(PAGE_SIZE, b"\0")
        idt = pages[system.idt_base].data.ljust(PAGE_SIZE, b"\0")
        tss_low, tss_high = struct.unpack_from("<QQ", gdt, TSS_SEL)
        tss_base = (tss_low >> 16 & 0xFF_FFFF) | (tss_low >> 56 & 0xFF) << 24 | tss_high << 32
        unusual += gdt[: system.gdt_limit + 1] != standard_gdt(tss_base)
        # The initial CS is a present code descriptor whose DPL is the CPL (docs/machine.md).
        (cs,) = struct.unpack_from("<Q", gdt, system.cs & ~7)
        assert cs >> 47 & 1 and cs >> 43 & 1 and cs >> 45 & 3 == case.state.cpl
        assert bool(cs >> 53 & 1) == (case.state.mode == "64")  # L
        # Gate 0x80 leads to a HLT in a non-writable page.
        low, high = struct.unpack_from("<QQ", idt, 0x80 * 16)
        handler = (low & 0xFFFF) | (low >> 48 & 0xFFFF) << 16 | high << 32
        handler_page = pages[handler & ~(PAGE_SIZE - 1)]
        assert handler_page.data[handler % PAGE_SIZE] == 0xF4 and not handler_page.writable
        assert case.state.efer & 1  # EFER.SCE
        halves.update({("gdt", system.gdt_base >> 63), ("idt", system.idt_base >> 63)})
        halves.add(("tss", tss_base >> 63))
    assert halves == {(table, half) for table in ("gdt", "idt", "tss") for half in (0, 1)}
    assert 0 < unusual < len(cases)


def test_supervisor_code_in_the_user_half_sometimes_starts_with_lass_off() -> None:
    config = GeneratorConfig(p_cpl3=0.0, p_code_other_half=1.0, p_lass=1.0, p_compat=0.0)
    cases = [generate_case(7, index, config) for index in range(60)]
    supported = [case for case in cases if case.state.lass_supported]
    assert all(case.code_address >> 63 == 0 for case in cases)
    assert {bool(case.state.cr4 & CR4_LASS) for case in supported} == {False, True}
