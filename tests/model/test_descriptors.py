"""Descriptor parsing and the trusted boot of State.system (docs/machine.md "Descriptor tables")."""

from __future__ import annotations

import struct
from dataclasses import replace

from lassfuzz.model.descriptors import Descriptor, selector_error
from lassfuzz.outcome import Status
from lassfuzz.system import (
    KERNEL_CS,
    TSS_LIMIT,
    TYPE_TSS_BUSY,
    USER_CS32,
    segment_descriptor,
    system_descriptor,
)
from tests.model.builders import run
from tests.model.system_builders import SUPERVISOR, system_case


def test_code_descriptor_fields() -> None:
    d = Descriptor(segment_descriptor(code=True, dpl=3, long=True))
    assert (d.code, d.data, d.system, d.dpl, d.present, d.long, d.default32) == (
        True, False, False, 3, True, True, False
    )  # fmt: skip
    assert d.readable and not d.writable and not d.conforming
    assert d.flat and d.limit == 0xFFFF_FFFF


def test_data_descriptor_without_granularity_has_a_byte_limit() -> None:
    raw = segment_descriptor(code=False, dpl=0) & ~(1 << 55)  # G = 0
    d = Descriptor(raw)
    assert d.writable and d.limit == 0xF_FFFF and not d.flat


def test_system_descriptor_base_uses_the_upper_half() -> None:
    low, high = struct.unpack("<QQ", system_descriptor(TYPE_TSS_BUSY, 0xFFFF_8880_1234_5000, 0x67))
    d = Descriptor(low, high)
    assert d.system and d.type == TYPE_TSS_BUSY
    assert d.base == 0xFFFF_8880_1234_5000 and d.limit == TSS_LIMIT


def test_selector_error_keeps_index_and_ti_and_adds_ext() -> None:
    assert selector_error(0x2B) == 0x28
    assert selector_error(0x2F, 1) == 0x2D


def test_boot_rejects_a_cs_that_does_not_match_the_mode() -> None:
    case = system_case("90")
    assert case.state.system is not None
    wrong = replace(case.state.system, cs=USER_CS32 | 3)
    outcome = run(replace(case, state=replace(case.state, system=wrong)))
    assert outcome.status is Status.UNSUPPORTED
    assert "descriptor tables" in outcome.detail


def test_boot_reads_nothing_and_sets_no_accessed_bit() -> None:
    gdt = SUPERVISOR["gdt"]
    case = system_case("90")
    unaccessed = segment_descriptor(code=True, dpl=0, long=True, accessed=False)
    pages = []
    for page in case.pages:
        if page.address == gdt:
            data = bytearray(page.data.ljust(4096, b"\0"))
            data[KERNEL_CS : KERNEL_CS + 8] = struct.pack("<Q", unaccessed)
            page = replace(page, data=bytes(data))
        pages.append(page)
    outcome = run(replace(case, pages=tuple(pages)))
    assert outcome.status is Status.COMPLETED, outcome.detail
    assert outcome.trace == ()
    assert outcome.registers is not None and outcome.registers.system is not None
    assert outcome.registers.system.selectors[0] == KERNEL_CS
