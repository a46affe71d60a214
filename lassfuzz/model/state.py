"""The mutable CPU state of one run: the registers the outcome reports, plus what the access
path needs as explicit inputs (CPL, CS.L) so that compatibility mode and CPL 1/2 can come later.
"""

from __future__ import annotations

from lassfuzz.arch import MASK64
from lassfuzz.case import State
from lassfuzz.outcome import Registers


class Cpu:
    """Registers during a run. ``undefined`` is the RFLAGS mask the SDM currently leaves
    undefined (docs/machine.md "Control registers, CPUID, flags")."""

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
        "lass_supported",
        "rflags",
        "rip",
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
        self.cs_l = True  # docs/machine.md: cases start in 64-bit mode (CS.L = 1)
        self.fs_base = state.fs_base
        self.gs_base = state.gs_base
        self.lass_supported = state.lass_supported
        self.undefined = 0

    def registers(self) -> Registers:
        """The architectural registers as the outcome reports them."""
        return Registers(
            gprs=tuple(value & MASK64 for value in self.gpr),
            rip=self.rip,
            rflags=self.rflags,
            cr0=self.cr0,
            cr3=self.cr3,
            cr4=self.cr4,
            efer=self.efer,
            cpl=self.cpl,
            fs_base=self.fs_base,
            gs_base=self.gs_base,
        )
