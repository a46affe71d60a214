"""Descriptor decoding against the case builders of lassfuzz.system."""

from __future__ import annotations

import struct

from lassfuzz import system as tables
from lassfuzz.emulator.descriptors import (
    TYPE_INTERRUPT_GATE,
    TYPE_TSS_BUSY,
    Descriptor,
)


def test_code_and_data_descriptors() -> None:
    code = Descriptor(tables.segment_descriptor(code=True, dpl=3, long=True))
    assert (code.code, code.long, code.default32, code.dpl, code.present) == (
        True,
        True,
        False,
        3,
        True,
    )
    assert code.readable and not code.writable and code.accessed and code.flat
    data = Descriptor(tables.segment_descriptor(code=False, dpl=0, accessed=False, present=False))
    assert (data.data, data.writable, data.accessed, data.present) == (True, True, False, False)
    compat = Descriptor(tables.segment_descriptor(code=True, dpl=1))
    assert not compat.long and compat.default32 and compat.dpl == 1


def test_system_descriptor_has_a_64_bit_base() -> None:
    low, high = struct.unpack(
        "<QQ", tables.system_descriptor(TYPE_TSS_BUSY, 0xFFFF_8000_1234_5000, 0x67)
    )
    tss = Descriptor(low, high)
    assert not tss.s and tss.type == TYPE_TSS_BUSY
    assert (tss.base, tss.limit) == (0xFFFF_8000_1234_5000, 0x67)
    assert tss.upper_type_ok()


def test_gate_fields() -> None:
    raw = tables.gate(TYPE_INTERRUPT_GATE, 0x08, 0xFFFF_8000_0010_3000, dpl=3, ist=2)
    gate = Descriptor(*struct.unpack("<QQ", raw))
    assert (gate.type, gate.dpl, gate.ist, gate.gate_selector) == (TYPE_INTERRUPT_GATE, 3, 2, 0x08)
    assert gate.gate_offset == 0xFFFF_8000_0010_3000 and gate.present
