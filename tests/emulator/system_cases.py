"""Hand-built cases with descriptor tables for the emulator tests (lassfuzz.system layouts)."""

from __future__ import annotations

import struct
from dataclasses import replace
from typing import Final

from lassfuzz import system as tables
from lassfuzz.arch import CR4_LASS, CR4_PAE, CR4_SMAP, EFER_SCE, GPR_NAMES, RFLAGS_FIXED1
from lassfuzz.case import Page, State, TestCase

SUPERVISOR: Final = 0xFFFF_8000_0010_0000
USER: Final = 0x0000_0000_0060_0000
HANDLER: Final = SUPERVISOR + 0x3000  # HLT (lassfuzz.system.Tables.pages)
KERNEL_STACK: Final = SUPERVISOR + 0x5000  # top of the page at SUPERVISOR + 0x4000
RSP0: Final = SUPERVISOR + 0x5000
USER_STACK: Final = 0x50_1000  # top of the user page at 0x50_0000
USER_CODE: Final = 0x40_0000
KERNEL_CODE: Final = 0xFFFF_FFFF_8000_0000
LASS_SMAP: Final = CR4_PAE | CR4_LASS | CR4_SMAP
_HALF: Final = {"supervisor": SUPERVISOR, "user": USER}


def system_case(
    code_hex: str,
    *,
    cpl: int = 3,
    mode: str = "64",
    gdt: str = "supervisor",
    idt: str = "supervisor",
    tss: str = "supervisor",
    cr4: int = LASS_SMAP,
    rflags: int = RFLAGS_FIXED1,
    syscall: bool = False,
    code_address: int | None = None,
    extra_pages: tuple[Page, ...] = (),
    **registers: int,
) -> TestCase:
    """A case with the standard tables; ``gdt``/``idt``/``tss`` choose the half each lies in
    (its pages' U/S bit follows the half). RSP defaults to the kernel stack at CPL 0-2 and to
    the user stack at CPL 3; registers by name."""
    layout = tables.Tables(
        gdt=_HALF[gdt],
        idt=_HALF[idt] + 0x1000,
        tss=_HALF[tss] + 0x2000,
        handler=HANDLER,
        rsp0=RSP0,
    )
    pages = [replace(page, user=not page.address >> 63) for page in layout.pages()]
    pages += [Page(SUPERVISOR + 0x4000, user=False), Page(0x50_0000, user=True)]
    listed = {page.address for page in extra_pages}
    pages = [page for page in pages if page.address not in listed] + list(extra_pages)
    values = dict.fromkeys(GPR_NAMES, 0)
    values["rsp"] = USER_STACK if cpl == 3 else KERNEL_STACK
    values.update(registers)
    system = layout.system(mode=mode, cpl=cpl)
    state = State(
        mode=mode,
        cpl=cpl,
        cr4=cr4,
        rflags=rflags,
        gprs=tuple(values[name] for name in GPR_NAMES),
        system=system,
    )
    if syscall:
        state = replace(state, efer=state.efer | EFER_SCE)
    if code_address is None:
        code_address = USER_CODE if cpl == 3 or mode == "compat" else KERNEL_CODE
    return TestCase(state, bytes.fromhex(code_hex.replace(" ", "")), code_address, tuple(pages))


def iret_frame(rip: int, cs: int, rflags: int, rsp: int, ss: int) -> Page:
    """The kernel stack page holding an IRETQ frame at KERNEL_STACK - 40."""
    data = bytes(0x1000 - 40) + struct.pack("<5Q", rip, cs, rflags, rsp, ss)
    return Page(SUPERVISOR + 0x4000, user=False, data=data)


def idt_page(*gates: tuple[int, int, int, int]) -> Page:
    """An IDT page (at the standard place) with (vector, handler, dpl, ist) interrupt gates to
    the kernel CS; other vectors have no gate."""
    table = bytearray(256 * 16)
    for vector, handler, dpl, ist in gates:
        table[vector * 16 : vector * 16 + 16] = tables.gate(
            tables.TYPE_INTERRUPT_GATE, tables.KERNEL_CS, handler, dpl=dpl, ist=ist
        )
    return Page(SUPERVISOR + 0x1000, user=False, data=bytes(table))
