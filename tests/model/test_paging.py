"""#PF error codes, CR2 and Accessed/Dirty bits (SDM Vol. 3A 4.6-4.8, docs/machine.md)."""

from __future__ import annotations

import pytest

from lassfuzz.arch import (
    CR0_WP,
    CR4_LA57,
    CR4_PAE,
    CR4_SMAP,
    CR4_SMEP,
    EFER_LMA,
    EFER_LME,
    PTE_A,
    PTE_D,
    RFLAGS_AC,
    RFLAGS_FIXED1,
)
from lassfuzz.case import DEFAULT_CR0, Page, materialize
from lassfuzz.model.paging import walk
from lassfuzz.model.physical import PhysicalMemory
from lassfuzz.outcome import Status
from tests.model.builders import KERNEL_DATA, USER_DATA, leaf_entry, make_case, run

LOAD = "488b00"  # mov rax, [rax]
STORE = "488900"  # mov [rax], rax
JUMP = "ffe0"  # jmp rax


@pytest.mark.parametrize(
    ("code", "cpl", "page", "cr4", "error"),
    [
        (LOAD, 3, Page(KERNEL_DATA, user=False), CR4_PAE, 0x5),  # user read, supervisor page
        (STORE, 3, Page(USER_DATA, user=False), CR4_PAE, 0x7),  # user write, supervisor page
        (STORE, 3, Page(USER_DATA, user=True, writable=False), CR4_PAE, 0x7),  # user write, RO
        (STORE, 0, Page(KERNEL_DATA, user=False, writable=False), CR4_PAE, 0x3),  # WP = 1
        (LOAD, 0, Page(USER_DATA, user=True), CR4_PAE | CR4_SMAP, 0x1),  # SMAP, AC = 0
        (STORE, 0, Page(USER_DATA, user=True), CR4_PAE | CR4_SMAP, 0x3),
        (JUMP, 0, Page(USER_DATA, user=True), CR4_PAE | CR4_SMEP, 0x11),  # SMEP
        (JUMP, 0, Page(KERNEL_DATA, user=False, nx=True), CR4_PAE, 0x11),  # NX
        (JUMP, 3, Page(USER_DATA, user=True, nx=True), CR4_PAE, 0x15),
        (LOAD, 0, Page(KERNEL_DATA, user=False, present=False), CR4_PAE, 0x0),
        (STORE, 0, Page(KERNEL_DATA, user=False, present=False), CR4_PAE, 0x2),
        (LOAD, 3, Page(USER_DATA, user=True, present=False), CR4_PAE, 0x4),
        (STORE, 3, Page(USER_DATA, user=True, present=False), CR4_PAE, 0x6),
        (JUMP, 0, Page(KERNEL_DATA, user=False, present=False), CR4_PAE, 0x10),
    ],
)
def test_error_code_and_cr2(code: str, cpl: int, page: Page, cr4: int, error: int) -> None:
    address = page.address + 0x123
    case = make_case(code, cpl=cpl, regs={"rax": address}, pages=[page], cr4=cr4)
    outcome = run(case)
    assert outcome.fault is not None
    assert (outcome.fault.vector, outcome.fault.error_code, outcome.fault.cr2) == (
        14,
        error,
        address,
    )
    # No leaf A/D bit for a faulting access; registers untouched except a branch's RIP.
    assert leaf_entry(case, outcome.memory, address) & (PTE_A | PTE_D) == 0
    expected_rip = address if code == JUMP else case.code_address
    assert outcome.fault.rip == expected_rip


def test_ac_lifts_smap() -> None:
    page = Page(USER_DATA, user=True, data=b"\x01")
    outcome = run(
        make_case(
            LOAD,
            regs={"rax": USER_DATA},
            pages=[page],
            cr4=CR4_PAE | CR4_SMAP,
            rflags=RFLAGS_FIXED1 | RFLAGS_AC,
        )
    )
    assert outcome.status is Status.COMPLETED


def test_supervisor_write_to_read_only_page_without_wp() -> None:
    page = Page(KERNEL_DATA, user=False, writable=False)
    case = make_case(
        STORE, regs={"rax": KERNEL_DATA}, pages=[page], cr4=CR4_PAE, cr0=DEFAULT_CR0 & ~CR0_WP
    )
    assert run(case).status is Status.COMPLETED


def test_fetch_fault_has_no_id_bit_without_nxe_or_smep() -> None:
    page = Page(KERNEL_DATA, user=False, present=False)
    case = make_case(
        JUMP, regs={"rax": KERNEL_DATA}, pages=[page], cr4=CR4_PAE, efer=EFER_LME | EFER_LMA
    )
    outcome = run(case)
    assert outcome.fault is not None and outcome.fault.error_code == 0


def test_nx_bit_without_nxe_is_a_reserved_bit_fault() -> None:
    page = Page(KERNEL_DATA, user=False, nx=True)
    case = make_case(
        LOAD, regs={"rax": KERNEL_DATA}, pages=[page], cr4=CR4_PAE, efer=EFER_LME | EFER_LMA
    )
    outcome = run(case)
    assert outcome.fault is not None and outcome.fault.name == "#PF(0x9)"  # RSVD | P


def test_page_crossing_fault_reports_the_second_page() -> None:
    first = Page(KERNEL_DATA, user=False)
    second = Page(KERNEL_DATA + 0x1000, user=False, present=False)
    case = make_case(LOAD, regs={"rax": KERNEL_DATA + 0xFFC}, pages=[first, second], cr4=CR4_PAE)
    outcome = run(case)
    assert outcome.fault is not None
    assert (outcome.fault.name, outcome.fault.cr2) == ("#PF(0x0)", KERNEL_DATA + 0x1000)
    # The first piece was allowed, so its walk set its Accessed bit (docs/machine.md).
    assert leaf_entry(case, outcome.memory, KERNEL_DATA) & PTE_A
    assert outcome.trace == ()


def test_page_crossing_access_reads_both_frames() -> None:
    first = Page(KERNEL_DATA, user=False, data=b"\0" * 0xFFC + b"\x01\x02\x03\x04")
    second = Page(KERNEL_DATA + 0x1000, user=False, data=b"\x05\x06\x07\x08")
    case = make_case(LOAD, regs={"rax": KERNEL_DATA + 0xFFC}, pages=[first, second], cr4=CR4_PAE)
    outcome = run(case)
    assert outcome.registers is not None
    assert outcome.registers.gprs[0] == 0x0807060504030201


def test_accessed_and_dirty_bits() -> None:
    read_page = Page(KERNEL_DATA, user=False)
    write_page = Page(KERNEL_DATA + 0x1000, user=False)
    code = "488b03 488901"  # mov rax, [rbx]; mov [rcx], rax
    regs = {"rbx": KERNEL_DATA, "rcx": KERNEL_DATA + 0x1000}
    case = make_case(code, regs=regs, pages=[read_page, write_page], cr4=CR4_PAE)
    outcome = run(case)
    assert leaf_entry(case, outcome.memory, KERNEL_DATA) & (PTE_A | PTE_D) == PTE_A
    assert leaf_entry(case, outcome.memory, KERNEL_DATA + 0x1000) & (PTE_A | PTE_D) == PTE_A | PTE_D


def test_walk_sets_non_leaf_accessed_bits_even_when_the_leaf_faults() -> None:
    case = make_case("90", pages=[Page(KERNEL_DATA, user=False)], cr4=CR4_PAE)
    image = materialize(case)
    phys = PhysicalMemory(image.frames)
    with pytest.raises(Exception, match="PTE not present"):
        walk(phys, image.cr3, KERNEL_DATA + 0x1000, EFER_LMA)
    entry = image.cr3
    for shift in (39, 30, 21):
        location = (entry & 0x000F_FFFF_FFFF_F000) + ((KERNEL_DATA >> shift) & 0x1FF) * 8
        entry = phys.read_u64(location)
        assert entry & PTE_A


def test_wrapping_access_checks_page_zero_first() -> None:
    """docs/machine.md: pages are checked from the lowest address, so page 0 decides first."""
    top = Page(0xFFFF_FFFF_FFFF_F000, user=False, writable=False)
    case = make_case(STORE, regs={"rax": 0xFFFF_FFFF_FFFF_FFFC}, pages=[top], cr4=CR4_PAE)
    outcome = run(case)
    assert outcome.fault is not None
    assert (outcome.fault.name, outcome.fault.cr2) == ("#PF(0x2)", 0)  # page 0 is not mapped


def test_la57_walk_has_five_levels_and_marks_each_non_leaf_entry() -> None:
    address = 0xFF00_0000_1234_5000  # canonical only with 5-level paging
    case = make_case("90", cr4=CR4_PAE | CR4_LA57, pages=[Page(address, user=False)])
    image = materialize(case)
    phys = PhysicalMemory(image.frames)
    translation = walk(phys, image.cr3, address, EFER_LME | EFER_LMA, la57=True)
    assert translation.frame == image.page_frames[address]
    # PML5E, PML4E, PDPTE and PDE each got their Accessed bit.
    entry = image.cr3
    for shift in (48, 39, 30, 21):
        location = (entry & 0x000F_FFFF_FFFF_F000) + ((address >> shift) & 0x1FF) * 8
        entry = phys.read_u64(location)
        assert entry & PTE_A


def test_unmarked_walk_writes_nothing() -> None:
    case = make_case("90", pages=[Page(KERNEL_DATA, user=False)])
    image = materialize(case)
    phys = PhysicalMemory(image.frames)
    walk(phys, image.cr3, KERNEL_DATA, EFER_LME | EFER_LMA, mark=False)
    assert phys.snapshot() == image.frames
