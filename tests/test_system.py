"""Descriptor-table construction (lassfuzz.system) against hand-computed SDM encodings."""

from __future__ import annotations

import struct

import pytest

from lassfuzz.case import System
from lassfuzz.system import (
    CODE_SELECTOR,
    EXTRA_SEL,
    GDT_LIMIT,
    GDT_LIMIT_WITH_EXTRA,
    IDT_LIMIT,
    KERNEL_CS,
    KERNEL_DS,
    STACK_SELECTOR,
    TSS_LIMIT,
    TSS_SEL,
    TYPE_INTERRUPT_GATE,
    TYPE_LDT,
    USER_CS,
    USER_CS32,
    USER_DS,
    Tables,
    gate,
    gdt_with_ldt,
    segment_descriptor,
    standard_gdt,
    standard_idt,
    system_descriptor,
    tss,
)

# The flat descriptors Linux puts in its GDT (arch/x86/kernel/cpu/common.c, with A set).
KERNEL_CODE64 = 0x00AF_9B00_0000_FFFF
KERNEL_DATA = 0x00CF_9300_0000_FFFF
USER_CODE64 = 0x00AF_FB00_0000_FFFF
USER_CODE32 = 0x00CF_FB00_0000_FFFF
USER_DATA = 0x00CF_F300_0000_FFFF


def descriptor(table: bytes, selector: int) -> int:
    return int(struct.unpack_from("<Q", table, selector & ~7)[0])


def test_segment_descriptors_match_sdm_encodings() -> None:
    assert segment_descriptor(code=True, dpl=0, long=True) == KERNEL_CODE64
    assert segment_descriptor(code=False, dpl=0) == KERNEL_DATA
    assert segment_descriptor(code=True, dpl=3, long=True) == USER_CODE64
    assert segment_descriptor(code=True, dpl=3) == USER_CODE32
    assert segment_descriptor(code=False, dpl=3) == USER_DATA
    assert segment_descriptor(code=False, dpl=3, accessed=False) == USER_DATA & ~(1 << 40)
    assert segment_descriptor(code=False, dpl=3, present=False) == USER_DATA & ~(1 << 47)


def test_standard_gdt_layout_and_variants() -> None:
    base = 0xFFFF_FFFF_C000_2000
    gdt = standard_gdt(base)
    assert len(gdt) == GDT_LIMIT + 1
    assert descriptor(gdt, 0) == 0
    assert descriptor(gdt, KERNEL_CS) == KERNEL_CODE64
    assert descriptor(gdt, KERNEL_DS) == KERNEL_DATA
    assert descriptor(gdt, USER_CS32) == USER_CODE32
    assert descriptor(gdt, USER_DS) == USER_DATA
    assert descriptor(gdt, USER_CS) == USER_CODE64
    for (mode, cpl), selector in CODE_SELECTOR.items():
        code = descriptor(gdt, selector)
        assert selector & 3 == cpl and code >> 45 & 3 == cpl and code >> 43 & 1
        assert bool(code >> 53 & 1) == (mode == "64")  # L
    for cpl, selector in STACK_SELECTOR.items():
        data = descriptor(gdt, selector)
        assert selector & 3 == cpl and data >> 45 & 3 == cpl and not data >> 43 & 1
    assert gdt[TSS_SEL : TSS_SEL + 16] == system_descriptor(0xB, base, TSS_LIMIT)
    # Variants change exactly the named bits.
    variant = standard_gdt(
        base,
        unaccessed=frozenset({USER_DS}),
        not_present=frozenset({KERNEL_DS}),
        dpl=((0x48, 3),),
        tss_busy=False,
    )
    assert descriptor(variant, USER_DS) == USER_DATA & ~(1 << 40)
    assert descriptor(variant, KERNEL_DS) == KERNEL_DATA & ~(1 << 47)
    assert descriptor(variant, 0x48) >> 45 & 3 == 3
    assert variant[TSS_SEL + 5] == 0x89  # present, available 64-bit TSS
    changed = [i for i in range(len(gdt)) if gdt[i] != variant[i]]
    assert changed == sorted([USER_DS + 5, KERNEL_DS + 5, 0x48 + 5, TSS_SEL + 5])


def test_system_descriptor_splits_base_and_limit() -> None:
    low, high = struct.unpack("<QQ", system_descriptor(0xB, 0x1234_5678_9ABC_DEF0, 0x67))
    assert low == 0x67 | 0xDEF0 << 16 | 0xBC << 32 | 0x8B << 40 | 0x9A << 56
    assert high == 0x1234_5678


def test_gates_and_idt() -> None:
    handler = 0xFFFF_FFFF_8123_4567
    low, high = struct.unpack("<QQ", gate(TYPE_INTERRUPT_GATE, KERNEL_CS, handler, dpl=3, ist=1))
    assert low == 0x4567 | KERNEL_CS << 16 | 1 << 32 | 0xEE << 40 | 0x8123 << 48
    assert high == 0xFFFF_FFFF
    idt = standard_idt(handler, dpl=0, ist=2)
    assert len(idt) == IDT_LIMIT + 1
    assert idt[0x80 * 16 : 0x81 * 16] == gate(TYPE_INTERRUPT_GATE, KERNEL_CS, handler, ist=2)
    assert len({idt[v * 16 : v * 16 + 16] for v in range(256)}) == 1


def test_tss_fields_at_their_offsets() -> None:
    image = tss(rsp=(0x1000, 0x2000, 0x3000), ist=(0x4000, 0, 0, 0, 0, 0, 0x7000))
    assert len(image) == TSS_LIMIT + 1
    assert struct.unpack_from("<QQQ", image, 4) == (0x1000, 0x2000, 0x3000)
    assert struct.unpack_from("<Q", image, 0x24)[0] == 0x4000  # IST1
    assert struct.unpack_from("<Q", image, 0x54)[0] == 0x7000  # IST7
    assert struct.unpack_from("<H", image, 0x66)[0] == TSS_LIMIT + 1  # no I/O bitmap


def test_gdt_with_ldt_appends_an_ldt_descriptor() -> None:
    gdt = gdt_with_ldt(0x2000, 0x1000_0000, 7)
    assert len(gdt) == GDT_LIMIT_WITH_EXTRA + 1
    assert gdt[EXTRA_SEL : EXTRA_SEL + 16] == system_descriptor(TYPE_LDT, 0x1000_0000, 7)


TABLES = Tables(
    gdt=0xFFFF_FFFF_C000_0000,
    idt=0x0000_0000_C000_1000,
    tss=0xFFFF_FFFF_C000_2000,
    handler=0xFFFF_FFFF_C000_3100,
    rsp0=0xFFFF_FFFF_C000_5000,
)


def test_tables_contents_pages_and_system() -> None:
    contents = TABLES.contents()
    assert set(contents) == {TABLES.gdt, TABLES.idt, TABLES.tss, 0xFFFF_FFFF_C000_3000}
    assert contents[0xFFFF_FFFF_C000_3000][0x100:] == b"\xf4"  # the handler: HLT
    pages = {page.address: page for page in TABLES.pages(user=True)}
    assert all(page.user for page in pages.values())
    assert not pages[0xFFFF_FFFF_C000_3000].writable and pages[TABLES.gdt].writable
    assert TABLES.system(mode="compat", cpl=3) == System(
        gdt_base=TABLES.gdt,
        gdt_limit=GDT_LIMIT,
        idt_base=TABLES.idt,
        idt_limit=IDT_LIMIT,
        cs=USER_CS32 | 3,
        ss=USER_DS | 3,
        ds=USER_DS | 3,
        es=USER_DS | 3,
        tr=TSS_SEL,
        star=USER_CS32 << 48 | KERNEL_CS << 32,
    )


def test_unusual_tables_set_ist_and_gate_dpl() -> None:
    tables = Tables(**{**TABLES.__dict__, "ist1": 0xFFFF_FFFF_C000_6000, "gate_dpl": 0})
    contents = tables.contents()
    idt = contents[0xC000_1000]
    low, _ = struct.unpack_from("<QQ", idt, 0x80 * 16)
    assert low >> 32 & 7 == 1 and low >> 45 & 3 == 0
    assert struct.unpack_from("<Q", contents[tables.tss], 0x24)[0] == 0xFFFF_FFFF_C000_6000


def test_tables_need_distinct_pages() -> None:
    clash = Tables(**{**TABLES.__dict__, "idt": TABLES.gdt})
    with pytest.raises(ValueError, match="distinct pages"):
        clash.contents()


def test_call_gate_follows_the_standard_slots() -> None:
    target = 0xFFFF_FFFF_C000_3100
    tables = Tables(**{**TABLES.__dict__, "call_gate": target})
    gdt = tables.contents()[tables.gdt]
    assert len(gdt) == GDT_LIMIT_WITH_EXTRA + 1
    assert gdt[: GDT_LIMIT + 1] == standard_gdt(tables.tss)
    low, high = struct.unpack_from("<QQ", gdt, EXTRA_SEL)
    assert low == 0x3100 | KERNEL_CS << 16 | 0xEC << 40 | 0xC000 << 48  # present, DPL 3, type C
    assert high == 0xFFFF_FFFF
    assert tables.system(mode="64", cpl=3).gdt_limit == GDT_LIMIT_WITH_EXTRA
    assert TABLES.system(mode="64", cpl=3).gdt_limit == GDT_LIMIT
