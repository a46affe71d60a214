"""The shim's page walk on materialized images: permissions, error codes, A bits."""

from __future__ import annotations

import pytest

from lassfuzz.arch import (
    CR0_WP,
    CR4_PAE,
    CR4_SMAP,
    CR4_SMEP,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    PFEC_I,
    PFEC_P,
    PFEC_RSVD,
    PFEC_U,
    PFEC_W,
    PTE_A,
    PTE_D,
    RFLAGS_AC,
    RFLAGS_FIXED1,
)
from lassfuzz.case import Page, State, TestCase, materialize
from lassfuzz.emulator.paging import MmuState, Walk, WalkUnsupported, walk

DATA = 0x50_0000
LONG = EFER_LME | EFER_LMA | EFER_NXE


def walk_page(
    page: Page,
    address: int | None = None,
    *,
    cpl: int = 0,
    cr4: int = CR4_PAE,
    ac: bool = False,
    efer: int = LONG,
) -> Walk:
    image = materialize(TestCase(State(), b"\x90", 0xFFFF_FFFF_8000_0000, (page,)))

    def read(physical: int) -> int:
        frame = physical & ~0xFFF
        return int.from_bytes(
            image.frames[frame][physical - frame : physical - frame + 8], "little"
        )

    rflags = RFLAGS_FIXED1 | (RFLAGS_AC if ac else 0)
    mmu = MmuState(cpl, CR0_WP, cr4, rflags, efer)
    target = page.address if address is None else address
    return walk(read, image.frames.__contains__, image.cr3, target, mmu)


def test_user_page_allows_user_everything() -> None:
    result = walk_page(Page(DATA, user=True), cpl=3)
    assert result.error == {}
    assert len(result.accessed) == 3  # fresh non-leaf entries get their A bit


def test_not_present_leaf_gives_error_codes_per_kind() -> None:
    result = walk_page(Page(DATA, user=True, present=False), cpl=3)
    assert result.error == {"read": PFEC_U, "write": PFEC_U | PFEC_W, "fetch": PFEC_U | PFEC_I}


def test_unmapped_address_faults_without_a_leaf() -> None:
    result = walk_page(Page(DATA, user=True), 0x7000_0000_0000)
    assert result.leaf is None and result.error["read"] == 0


@pytest.mark.parametrize(
    ("page", "cpl", "cr4", "ac", "errors"),
    [
        (Page(DATA, user=False), 3, CR4_PAE, False, {"read", "write", "fetch"}),
        (Page(DATA, user=True, writable=False), 3, CR4_PAE, False, {"write"}),
        (Page(DATA, user=True, writable=False), 0, CR4_PAE, False, {"write"}),  # CR0.WP
        (Page(DATA, user=True, nx=True), 3, CR4_PAE, False, {"fetch"}),
        (Page(DATA, user=True), 0, CR4_PAE | CR4_SMAP, False, {"read", "write"}),
        (Page(DATA, user=True), 0, CR4_PAE | CR4_SMAP, True, set()),
        (Page(DATA, user=True), 0, CR4_PAE | CR4_SMEP, False, {"fetch"}),
    ],
)
def test_protection(page: Page, cpl: int, cr4: int, ac: bool, errors: set[str]) -> None:
    result = walk_page(page, cpl=cpl, cr4=cr4, ac=ac)
    assert set(result.error) == errors
    for code in result.error.values():
        assert code & PFEC_P


def test_nx_fetch_error_code_has_the_instruction_bit() -> None:
    assert (
        walk_page(Page(DATA, user=True, nx=True), cpl=3).error["fetch"] == PFEC_P | PFEC_U | PFEC_I
    )


def test_nx_with_nxe_clear_is_a_reserved_bit_fault() -> None:
    result = walk_page(Page(DATA, user=True, nx=True), efer=EFER_LME | EFER_LMA)
    assert result.error["read"] == PFEC_P | PFEC_RSVD


def test_frame_outside_the_image_is_unsupported() -> None:
    with pytest.raises(WalkUnsupported, match="outside the case image"):
        walk(lambda _: 0, lambda _: False, 0x1000, DATA, MmuState(0, 0, CR4_PAE, 2, LONG))


@pytest.mark.parametrize("present", [True, False], ids=["present", "not-present"])
def test_a_refreshed_walk_equals_a_fresh_one_after_a_d_updates(present: bool) -> None:
    """CaseRun.walk replays a page's first walk: once its A/D bits are set (or taken back),
    the refreshed walk must be exactly what walking the updated tables gives."""
    image = materialize(
        TestCase(
            State(), b"\x90", 0xFFFF_FFFF_8000_0000, (Page(DATA, user=False, present=present),)
        )
    )
    tables = {frame: bytearray(data) for frame, data in image.frames.items()}

    def read(physical: int) -> int:
        frame = physical & ~0xFFF
        return int.from_bytes(tables[frame][physical - frame : physical - frame + 8], "little")

    def fresh() -> Walk:
        return walk(read, tables.__contains__, image.cr3, DATA, mmu)

    def set_bits(physical: int, bits: int) -> None:
        frame = physical & ~0xFFF
        value = read(physical) | bits
        tables[frame][physical - frame : physical - frame + 8] = value.to_bytes(8, "little")

    mmu = MmuState(0, CR0_WP, CR4_PAE, RFLAGS_FIXED1, LONG)
    first = fresh()
    assert first.accessed and first.refreshed(read) is first  # nothing changed yet
    set_bits(first.accessed[0], PTE_A)
    assert first.refreshed(read) == fresh()
    for address in first.accessed:
        set_bits(address, PTE_A)
    if first.leaf_address is not None:
        set_bits(first.leaf_address, PTE_A | PTE_D)
    assert first.refreshed(read) == fresh()
    assert fresh().accessed == ()
