"""Building descriptor tables for cases: descriptors, gates, a TSS and a standard GDT layout.

This is case *construction* (used by the generator, the matrix and hand-written corpus cases), not
engine logic: each engine parses descriptors on its own (docs/machine.md, "System level").
The encodings follow SDM Vol. 3A 3.4.5 (segment descriptors), 6.14.1 (64-bit IDT gates),
5.8.3.1 (64-bit call gates) and 8.7 (64-bit TSS).
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import Final

from lassfuzz.arch import VEC_DF
from lassfuzz.case import Page, System

# Standard GDT slots. The layout suits SYSCALL/SYSRET: STAR[47:32] = KERNEL_CS (SS = +8) and
# STAR[63:48] = USER_CS32 (SYSRET to 64-bit loads CS = +16, SS = +8).
NULL: Final = 0x00
KERNEL_CS: Final = 0x08  # 64-bit code, DPL 0
KERNEL_DS: Final = 0x10  # data, DPL 0
USER_CS32: Final = 0x18  # 32-bit code, DPL 3 (compatibility mode)
USER_DS: Final = 0x20  # data, DPL 3
USER_CS: Final = 0x28  # 64-bit code, DPL 3
TSS_SEL: Final = 0x30  # 64-bit TSS (16 bytes: slots 6 and 7)
RING1_CS: Final = 0x40  # 64-bit code, DPL 1
RING1_DS: Final = 0x48
RING2_CS: Final = 0x50  # 64-bit code, DPL 2
RING2_DS: Final = 0x58
KERNEL_CS32: Final = 0x60  # 32-bit code, DPL 0
RING1_CS32: Final = 0x68
RING2_CS32: Final = 0x70
GDT_SLOTS: Final = 15
GDT_LIMIT: Final = GDT_SLOTS * 8 - 1
#: One more 16-byte system descriptor after the standard slots: an LDT descriptor
#: (:func:`gdt_with_ldt`) or a 64-bit call gate (:attr:`Tables.call_gate`).
EXTRA_SEL: Final = GDT_SLOTS * 8
GDT_LIMIT_WITH_EXTRA: Final = EXTRA_SEL + 16 - 1
IDT_LIMIT: Final = 256 * 16 - 1
TSS_LIMIT: Final = 0x67

#: Code and stack selectors (RPL = DPL = CPL) for each mode and CPL.
CODE_SELECTOR: Final = {
    ("64", 0): KERNEL_CS,
    ("64", 1): RING1_CS | 1,
    ("64", 2): RING2_CS | 2,
    ("64", 3): USER_CS | 3,
    ("compat", 0): KERNEL_CS32,
    ("compat", 1): RING1_CS32 | 1,
    ("compat", 2): RING2_CS32 | 2,
    ("compat", 3): USER_CS32 | 3,
}
STACK_SELECTOR: Final = {0: KERNEL_DS, 1: RING1_DS | 1, 2: RING2_DS | 2, 3: USER_DS | 3}

# Descriptor type values (S = 1 code/data, S = 0 system).
TYPE_DATA_RW: Final = 0x3  # read/write, accessed
TYPE_CODE_RX: Final = 0xB  # execute/read, accessed
TYPE_TSS_AVAILABLE: Final = 0x9
TYPE_TSS_BUSY: Final = 0xB
TYPE_LDT: Final = 0x2
TYPE_CALL_GATE: Final = 0xC
TYPE_INTERRUPT_GATE: Final = 0xE
TYPE_TRAP_GATE: Final = 0xF


def segment_descriptor(
    *,
    code: bool,
    dpl: int,
    long: bool = False,
    default32: bool = True,
    present: bool = True,
    accessed: bool = True,
) -> int:
    """A flat (base 0, limit 4 GiB, G = 1) code or data descriptor.

    ``accessed`` presets the A bit so that loading it needs no implicit descriptor write.
    """
    kind = TYPE_CODE_RX if code else TYPE_DATA_RW
    if not accessed:
        kind &= ~1
    access = kind | 0x10 | (dpl & 3) << 5 | (0x80 if present else 0)
    flags = 0x8  # G
    if code and long:
        flags |= 0x2  # L (D must be 0)
    elif default32:
        flags |= 0x4  # D/B
    return 0xFFFF | access << 40 | 0xF << 48 | flags << 52


def system_descriptor(kind: int, base: int, limit: int, *, dpl: int = 0) -> bytes:
    """A 16-byte 64-bit system descriptor (TSS or LDT)."""
    low = (
        (limit & 0xFFFF)
        | (base & 0xFF_FFFF) << 16
        | (kind | (dpl & 3) << 5 | 0x80) << 40
        | ((limit >> 16) & 0xF) << 48
        | ((base >> 24) & 0xFF) << 56
    )
    return struct.pack("<QQ", low, base >> 32)


def gate(
    kind: int, selector: int, offset: int, *, dpl: int = 0, ist: int = 0, present: bool = True
) -> bytes:
    """A 16-byte 64-bit interrupt, trap or call gate."""
    low = (
        (offset & 0xFFFF)
        | selector << 16
        | (ist & 7) << 32
        | (kind | (dpl & 3) << 5 | (0x80 if present else 0)) << 40
        | ((offset >> 16) & 0xFFFF) << 48
    )
    return struct.pack("<QQ", low, offset >> 32)


def tss(*, rsp: tuple[int, int, int] = (0, 0, 0), ist: tuple[int, ...] = (0,) * 7) -> bytes:
    """A 104-byte 64-bit TSS with RSP0-2 and IST1-7 (no I/O bitmap)."""
    return struct.pack("<I3Q Q7Q QHH", 0, *rsp, 0, *ist, 0, 0, TSS_LIMIT + 1)


@functools.lru_cache(maxsize=256)  # the generator builds the same few tables over and over
def standard_gdt(
    tss_base: int,
    *,
    unaccessed: frozenset[int] = frozenset(),
    not_present: frozenset[int] = frozenset(),
    dpl: tuple[tuple[int, int], ...] = (),
    tss_busy: bool = True,
) -> bytes:
    """The standard GDT (slot layout above): flat segments with A preset, TSS busy (as TR is
    loaded).

    The keywords make edge cases: descriptors (by selector) with the A bit clear, so that a load
    writes it back (an implicit supervisor write); not present; with another DPL; and an
    available TSS, which LTR accepts (and marks busy, another implicit write). ``dpl`` holds
    (selector, DPL) pairs.
    """
    dpls = dict(dpl)
    table = bytearray(GDT_SLOTS * 8)
    for selector, (code, level, long) in _SEGMENTS.items():
        descriptor = segment_descriptor(
            code=code,
            dpl=dpls.get(selector, level),
            long=long,
            present=selector not in not_present,
            accessed=selector not in unaccessed,
        )
        table[selector : selector + 8] = struct.pack("<Q", descriptor)
    kind = TYPE_TSS_BUSY if tss_busy else TYPE_TSS_AVAILABLE
    table[TSS_SEL : TSS_SEL + 16] = system_descriptor(kind, tss_base, TSS_LIMIT)
    return bytes(table)


def gdt_with_ldt(tss_base: int, ldt_base: int, ldt_limit: int) -> bytes:
    """The standard GDT followed by an LDT descriptor at :data:`EXTRA_SEL` (limit
    :data:`GDT_LIMIT_WITH_EXTRA`)."""
    return standard_gdt(tss_base) + system_descriptor(TYPE_LDT, ldt_base, ldt_limit)


#: The standard code and data segments: selector -> (code, DPL, 64-bit code).
_SEGMENTS: Final = {
    KERNEL_CS: (True, 0, True),
    KERNEL_DS: (False, 0, False),
    USER_CS32: (True, 3, False),
    USER_DS: (False, 3, False),
    USER_CS: (True, 3, True),
    RING1_CS: (True, 1, True),
    RING1_DS: (False, 1, False),
    RING2_CS: (True, 2, True),
    RING2_DS: (False, 2, False),
    KERNEL_CS32: (True, 0, False),
    RING1_CS32: (True, 1, False),
    RING2_CS32: (True, 2, False),
}
#: The data (stack) segments, for selector choices.
DATA_SELECTORS: Final = (KERNEL_DS, RING1_DS, RING2_DS, USER_DS)


@functools.lru_cache(maxsize=256)
def standard_idt(
    handler: int, *, vectors: range = range(256), dpl: int = 3, ist: int = 0, df_ist: int = 0
) -> bytes:
    """An IDT whose gates (interrupt gates to KERNEL_CS, DPL ``dpl``, stack table entry
    ``ist``) all point at ``handler``; the #DF gate uses stack table entry ``df_ist`` if set."""
    table = bytearray(IDT_LIMIT + 1)
    entry = gate(TYPE_INTERRUPT_GATE, KERNEL_CS, handler, dpl=dpl, ist=ist)
    for vector in vectors:
        table[vector * 16 : vector * 16 + 16] = entry
    if df_ist and VEC_DF in vectors:
        table[VEC_DF * 16 : VEC_DF * 16 + 16] = gate(
            TYPE_INTERRUPT_GATE, KERNEL_CS, handler, dpl=dpl, ist=df_ist
        )
    return bytes(table)


@dataclass(frozen=True)
class Tables:
    """Where a case's standard tables go (page-aligned linear addresses) and what they hold."""

    gdt: int
    idt: int
    tss: int
    handler: int  # the common exception handler's code address (HLT: ends the case at CPL0)
    rsp0: int
    #: When non-zero, TSS.IST1 holds it and every gate switches to it (gate IST = 1).
    ist1: int = 0
    #: When non-zero, TSS.IST2 holds it and the #DF gate switches to it (IST = 2), as Linux
    #: does: a fault while delivering another one is then delivered on a known-good stack.
    df_stack: int = 0
    #: DPL of every IDT gate (3: INT n is allowed from every CPL).
    gate_dpl: int = 3
    #: Selectors whose descriptors have the A bit clear, are not present, or another DPL.
    unaccessed: frozenset[int] = frozenset()
    not_present: frozenset[int] = frozenset()
    dpl: tuple[tuple[int, int], ...] = ()
    #: The TSS descriptor's type: busy (as after LTR) or available (LTR then succeeds).
    tss_busy: bool = True
    #: When non-zero, a 64-bit call gate (DPL 3: usable from any CPL) to KERNEL_CS at this
    #: offset follows the standard slots, at :data:`EXTRA_SEL`: a far CALL through it from
    #: CPL > 0 switches to TSS.RSP0.
    call_gate: int = 0

    def contents(self) -> dict[int, bytes]:
        """Page address -> page data for the GDT, IDT, TSS and handler pages."""
        gdt = standard_gdt(
            self.tss,
            unaccessed=self.unaccessed,
            not_present=self.not_present,
            dpl=self.dpl,
            tss_busy=self.tss_busy,
        )
        if self.call_gate:
            gdt += gate(TYPE_CALL_GATE, KERNEL_CS, self.call_gate, dpl=3)
        contents = {
            self.gdt: gdt,
            self.idt: standard_idt(
                self.handler,
                dpl=self.gate_dpl,
                ist=1 if self.ist1 else 0,
                df_ist=2 if self.df_stack else 0,
            ),
            self.tss: tss(rsp=(self.rsp0, 0, 0), ist=(self.ist1, self.df_stack, 0, 0, 0, 0, 0)),
            self.handler & ~0xFFF: b"\0" * (self.handler & 0xFFF) + b"\xf4",  # hlt
        }
        if len(contents) != 4:
            raise ValueError("GDT, IDT, TSS and handler need four distinct pages")
        return contents

    def pages(self, *, user: bool = False) -> tuple[Page, ...]:
        """The pages holding the tables and the handler (``user`` sets their U/S bit)."""
        return tuple(
            Page(address, user=user, data=data, writable=address != self.handler & ~0xFFF)
            for address, data in self.contents().items()
        )

    def system(self, *, mode: str, cpl: int) -> System:
        """The System for a case starting at ``cpl`` in ``mode`` with these tables."""
        stack = STACK_SELECTOR[cpl]
        return System(
            gdt_base=self.gdt,
            gdt_limit=GDT_LIMIT_WITH_EXTRA if self.call_gate else GDT_LIMIT,
            idt_base=self.idt,
            idt_limit=IDT_LIMIT,
            cs=CODE_SELECTOR[(mode, cpl)],
            ss=stack,
            ds=stack,
            es=stack,
            tr=TSS_SEL,
            star=USER_CS32 << 48 | KERNEL_CS << 32,
        )
