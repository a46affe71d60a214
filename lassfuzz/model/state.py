"""The mutable CPU state of one run: the registers the outcome reports, plus what the access
path needs as explicit inputs (CPL, CS.L, LA57) and, for cases with descriptor tables, the
segment and system registers (docs/machine.md "System level").
"""

from __future__ import annotations

from typing import Final

from lassfuzz.arch import CR4_LA57, MASK64
from lassfuzz.case import SELECTOR_NAMES, State
from lassfuzz.outcome import Registers, SystemRegisters

MASK32: Final = 0xFFFF_FFFF
#: Positions in :attr:`SystemState.selectors` (the order of lassfuzz.case.SELECTOR_NAMES).
CS, SS, DS, ES, FS, GS, TR, LDTR = range(8)
SEGMENT_INDEX: Final = {name: index for index, name in enumerate(SELECTOR_NAMES)}


class SystemState:
    """Selectors and the hidden parts the model needs (SDM Vol. 3A 3.4.3, 2.4): descriptor-table
    registers, the TSS and LDT base/limit, and each data segment's DPL (IRET nulls data
    segments less privileged than the new CPL, SDM Vol. 2 IRET)."""

    __slots__ = (
        "gdt_base",
        "gdt_limit",
        "idt_base",
        "idt_limit",
        "ldt_base",
        "ldt_limit",
        "lstar",
        "segment_dpl",
        "selectors",
        "sfmask",
        "star",
        "tr_base",
        "tr_limit",
    )

    def __init__(self, state: State) -> None:
        system = state.system
        assert system is not None
        self.selectors: list[int] = list(system.selectors)
        self.segment_dpl: list[int] = [0] * 8
        self.gdt_base = system.gdt_base
        self.gdt_limit = system.gdt_limit
        self.idt_base = system.idt_base
        self.idt_limit = system.idt_limit
        self.tr_base = self.tr_limit = 0
        self.ldt_base = self.ldt_limit = 0
        self.star = system.star
        self.lstar = system.lstar
        self.sfmask = system.sfmask

    def registers(self) -> SystemRegisters:
        return SystemRegisters(
            selectors=tuple(self.selectors),
            gdt_base=self.gdt_base,
            gdt_limit=self.gdt_limit,
            idt_base=self.idt_base,
            idt_limit=self.idt_limit,
        )


class Cpu:
    """Registers during a run. ``undefined`` is the RFLAGS mask the SDM currently leaves
    undefined (docs/machine.md "Control registers, CPUID, flags"). ``ip_mask`` and
    ``stack_mask`` are the instruction-pointer and stack-pointer widths of the current mode
    (64-bit mode: 64 bits; compatibility mode with CS.D = SS.B = 1: 32 bits)."""

    __slots__ = (
        "cpl",
        "cr0",
        "cr3",
        "cr4",
        "cs_l",
        "efer",
        "fs_base",
        "gpr",
        "gs_base",
        "ip_mask",
        "la57",
        "lass_supported",
        "rflags",
        "rip",
        "stack_mask",
        "system",
        "undefined",
    )

    def __init__(self, state: State, *, rip: int, cr3: int) -> None:
        self.gpr: list[int] = list(state.gprs)
        self.rip = rip
        self.rflags = state.rflags
        self.cr0 = state.cr0
        self.cr3 = cr3
        self.cr4 = state.cr4
        self.efer = state.efer
        self.cpl = state.cpl
        self.fs_base = state.fs_base
        self.gs_base = state.gs_base
        self.lass_supported = state.lass_supported
        # MOV CR4 may not change LA57 (docs/machine.md), so it is fixed for the run.
        self.la57 = bool(state.cr4 & CR4_LA57)
        self.system = None if state.system is None else SystemState(state)
        self.undefined = 0
        self.cs_l = True
        self.ip_mask = self.stack_mask = MASK64
        self.set_long_mode(state.mode == "64")

    def set_long_mode(self, long: bool) -> None:
        """Enter 64-bit mode (CS.L = 1) or compatibility mode (CS.L = 0, CS.D = SS.B = 1)."""
        self.cs_l = long
        self.ip_mask = self.stack_mask = MASK64 if long else MASK32

    def registers(self) -> Registers:
        """The architectural registers as the outcome reports them."""
        return Registers(
            gprs=tuple([value & MASK64 for value in self.gpr]),
            rip=self.rip,
            rflags=self.rflags,
            cr0=self.cr0,
            cr3=self.cr3,
            cr4=self.cr4,
            efer=self.efer,
            cpl=self.cpl,
            fs_base=self.fs_base,
            gs_base=self.gs_base,
            system=None if self.system is None else self.system.registers(),
        )
