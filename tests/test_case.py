"""Case documents: defaults, strict reading, round trips, and the materialized image."""

from __future__ import annotations

import json

import pytest

from lassfuzz.arch import PTE_A, PTE_NX, PTE_P, PTE_RW, PTE_US
from lassfuzz.case import (
    DEFAULT_CODE_ADDRESS,
    PHYS_DATA_BASE,
    CaseFormatError,
    Page,
    State,
    TestCase,
    case_from_json,
    case_to_json,
    materialize,
)


def read_pte(image_frames: dict[int, bytes] | object, cr3: int, address: int) -> int:
    frames = dict(image_frames)  # type: ignore[call-overload]
    table = cr3
    for shift in (39, 30, 21, 12):
        slot = (address >> shift) & 0x1FF
        entry = int.from_bytes(frames[table][slot * 8 : slot * 8 + 8], "little")
        if shift == 12:
            return entry
        table = entry & 0x000F_FFFF_FFFF_F000
    raise AssertionError


def test_minimal_hand_written_case_gets_documented_defaults() -> None:
    case = case_from_json('{"version": 1, "state": {"cpl": 3}, "code": {"bytes": "90"}}')
    assert case.code_address == DEFAULT_CODE_ADDRESS[3]
    assert case.state.cr0 == 0x80010033 and case.state.cr4 == 0x20 and case.state.efer == 0xD00
    assert case.state.rflags == 0x2 and case.state.lass_supported
    (code_page,) = case.all_pages()
    assert code_page.user and not code_page.writable and code_page.data[0] == 0x90


def test_round_trip_preserves_every_field() -> None:
    case = TestCase(
        state=State(cpl=3, gprs=tuple(range(16)), rflags=0x40202, cr4=0x8200020, fs_base=0x10),
        code=bytes.fromhex("488b03f4"),
        code_address=0x401FFE,
        pages=(Page(0xFFFF_8000_0000_0000, user=True, nx=True, data=b"\x01\x02"),),
        meta={"description": "x"},
    )
    assert case_from_json(case_to_json(case)) == case


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ('{"state": {}, "code": {"bytes": "90"}}', "missing 'version'"),
        ('{"version": 2, "code": {"bytes": "90"}}', "unsupported case format version 2"),
        ('{"version": 1, "code": {"bytes": "9"}}', "code.bytes: not a hex string"),
        ('{"version": 1, "code": {"bytes": "90"}, "colour": 1}', "unknown key(s) colour"),
        ('{"version": 1, "state": {"cpl": 4}, "code": {"bytes": "90"}}', "state.cpl 4"),
        ('{"version": 1, "state": {"regs": {"rzz": 1}}, "code": {"bytes": "90"}}', "rzz"),
        (
            '{"version": 1, "code": {"bytes": "90"}, "pages": [{"address": "0x1001"}]}',
            "page-aligned",
        ),
        (
            '{"version": 1, "code": {"bytes": "90"}, "pages": [{"address": "0x800000000000"}]}',
            "canonical",
        ),
        ('{"version": 1, "state": {"rflags": true}, "code": {"bytes": "90"}}', "boolean"),
        ("[1, 2", "not valid JSON"),
    ],
)
def test_malformed_documents_name_the_problem(document: str, message: str) -> None:
    with pytest.raises(CaseFormatError, match=message.replace("(", r"\(").replace(")", r"\)")):
        case_from_json(document)


def test_materialize_builds_four_level_tables_with_the_page_flags() -> None:
    case = TestCase(
        state=State(),
        code=b"\xf4",
        code_address=0xFFFF_FFFF_8000_0000,
        pages=(
            Page(0xFFFF_8000_0000_0000, user=True, writable=False, nx=True, accessed=True),
            Page(0x0, user=False, data=b"\xaa"),
        ),
    )
    image = materialize(case)
    assert image.cr3 == 0x1000
    for address, page in ((0xFFFF_8000_0000_0000, case.pages[0]), (0, case.pages[1])):
        pte = read_pte(image.frames, image.cr3, address)
        assert pte & 0x000F_FFFF_FFFF_F000 == image.page_frames[address]
        assert bool(pte & PTE_US) == page.user
        assert bool(pte & PTE_RW) == page.writable
        assert bool(pte & PTE_NX) == page.nx
        assert bool(pte & PTE_A) == page.accessed
        assert pte & PTE_P
    assert image.frames[image.page_frames[0]][0] == 0xAA
    assert min(image.page_frames.values()) == PHYS_DATA_BASE
    assert set(image.table_frames) < set(image.frames)


def test_materialize_is_deterministic() -> None:
    case = case_from_json(
        json.dumps(
            {
                "version": 1,
                "code": {"bytes": "90"},
                "pages": [{"address": hex(a)} for a in (0x5000, 0xFFFF_FFFF_FFFF_F000, 0)],
            }
        )
    )
    assert materialize(case) == materialize(case)
    assert list(materialize(case).page_frames) == sorted(materialize(case).page_frames)


def test_listing_a_page_twice_is_an_error() -> None:
    with pytest.raises(CaseFormatError, match="listed twice"):
        TestCase(
            State(), b"\x90", 0x400000, pages=(Page(0x1000, user=True), Page(0x1000, user=True))
        )
