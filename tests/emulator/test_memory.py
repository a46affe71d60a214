"""The shim's own linear accesses (lassfuzz.emulator.memory): byte order of accesses that wrap."""

from __future__ import annotations

from lassfuzz import system as tables
from lassfuzz.arch import CR4_PAE, MASK64
from lassfuzz.case import Page, materialize
from lassfuzz.emulator.machine import UnicornMachine
from lassfuzz.outcome import Status
from tests.emulator.system_cases import system_case

TOP_PAGE = MASK64 & ~0xFFF


def test_selector_read_wrapping_past_2_64_takes_its_low_byte_from_the_top_page(
    machine: UnicornMachine,
) -> None:
    """MOV DS, [2**64 - 1]: byte 0 of the selector is the last byte of the address space,
    byte 1 the first; checks go page 0 first, but the value keeps byte order."""
    selector = tables.USER_DS | 3
    pages = (
        Page(TOP_PAGE, user=False, data=bytes(0xFFF) + bytes([selector])),
        Page(0, user=False, data=b"\x00\xf2"),  # 0xF2 would be the low byte if swapped
    )
    case = system_case("8e18", cpl=0, cr4=CR4_PAE, rax=MASK64, extra_pages=pages)
    outcome = machine.run(case)
    assert outcome.status is Status.COMPLETED, (outcome.detail, outcome.events)
    assert outcome.registers is not None and outcome.registers.system is not None
    assert outcome.registers.system.selectors[2] == selector


def test_write_wrapping_past_2_64_stores_its_low_bytes_on_the_top_page(
    machine: UnicornMachine,
) -> None:
    """SGDT [2**64 - 2]: the 2-byte limit goes to the top page, the 8-byte base to page 0."""
    pages = (Page(TOP_PAGE, user=False), Page(0, user=False))
    case = system_case("0f0100", cpl=0, cr4=CR4_PAE, rax=MASK64 - 1, extra_pages=pages)
    outcome = machine.run(case)
    assert outcome.status is Status.COMPLETED, (outcome.detail, outcome.events)
    frames = materialize(case).page_frames
    limit = outcome.memory[frames[TOP_PAGE]][0xFFE:]
    base = outcome.memory[frames[0]][:8]
    assert int.from_bytes(limit, "little") == tables.GDT_LIMIT
    gdt_base = case.state.system.gdt_base if case.state.system else None
    assert int.from_bytes(base, "little") == gdt_base
