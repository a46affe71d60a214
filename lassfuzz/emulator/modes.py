"""Operating modes of the Unicorn machine: one saved QEMU context per (mode, CPL).

QEMU keeps the CPL and the code size (CS.L, CS.D, SS.B) in hidden segment state that
``reg_write`` cannot reach in 64-bit mode (writing CS or SS stores the selector only, measured),
so every (mode, CPL) pair is entered once at start-up through a real IRETQ from CPL0 — into a
64-bit code segment for mode "64", a 32-bit one (CS.L = 0, CS.D = 1) for "compat" — and saved
as a context. A case restores the context of its initial mode and CPL; a privilege or mode
change during a case restores another one and carries the case-visible registers over
(:class:`ContextSwitch`). Measured on 2.1.4: after an IRETQ to a CS with L = 0, QEMU decodes
32-bit code (``40`` is INC EAX, not a REX prefix).

The machine's boot GDT below lives in machine-only memory; QEMU reads it only during these
boot IRETQs (cases with descriptor tables have the shim emulate every descriptor load).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

from unicorn.x86_const import (
    UC_X86_REG_CR0,
    UC_X86_REG_CR3,
    UC_X86_REG_CR4,
    UC_X86_REG_CS,
    UC_X86_REG_EFLAGS,
    UC_X86_REG_FPCW,
    UC_X86_REG_FPSW,
    UC_X86_REG_FPTAG,
    UC_X86_REG_FS_BASE,
    UC_X86_REG_GDTR,
    UC_X86_REG_GS_BASE,
    UC_X86_REG_IDTR,
    UC_X86_REG_MXCSR,
    UC_X86_REG_RIP,
    UC_X86_REG_RSP,
    UC_X86_REG_ST0,
    UC_X86_REG_XMM0,
)

from lassfuzz.case import MODES
from lassfuzz.emulator.port import FastPort, RawRegisters
from lassfuzz.emulator.shim import GPR_IDS

MSR_EFER: Final = 0xC000_0080
_FLAT: Final = 0x00CF_0000_0000_FFFF  # base 0, limit 0xFFFFF, G = 1, D/B = 1
_CODE64: Final = 0x0020_9A00_0000_0000  # L = 1, D = 0


def _descriptor(*, dpl: int, code: bool, long: bool = False) -> int:
    if code and long:
        return _CODE64 | dpl << 45
    kind = 0x9A if code else 0x92  # present, S = 1, execute/read or read/write
    return _FLAT | (kind | dpl << 5) << 40


def _selectors() -> dict[tuple[str, int], tuple[int, int]]:
    """(mode, CPL) → (CS, SS) selectors of the boot GDT (RPL = CPL)."""
    table: dict[tuple[str, int], tuple[int, int]] = {}
    for cpl in range(4):
        stack = 0x10 + 0x10 * cpl
        table[("64", cpl)] = (0x08 + 0x10 * cpl | cpl, stack | cpl)
        table[("compat", cpl)] = (0x48 + 0x08 * cpl | cpl, stack | cpl)
    return table


#: Boot GDT: for CPL n, 64-bit code at 0x08 + 16n and flat data at 0x10 + 16n; 32-bit code at
#: 0x48 + 8n. Data segments are flat with B = 1 so that a compatibility-mode stack is 32-bit.
BOOT_GDT: Final = (
    0,
    *(
        descriptor
        for cpl in range(4)
        for descriptor in (
            _descriptor(dpl=cpl, code=True, long=True),
            _descriptor(dpl=cpl, code=False),
        )
    ),
    *(_descriptor(dpl=cpl, code=True) for cpl in range(4)),
)
BOOT_SELECTORS: Final[Mapping[tuple[str, int], tuple[int, int]]] = MappingProxyType(_selectors())
_IRETQ: Final = bytes.fromhex("48cf")

#: Case-visible registers QEMU holds that a context switch must carry over: GPRs, RIP, RFLAGS,
#: control registers, FS/GS bases, descriptor-table registers, SSE and x87 state.
_CARRIED: Final = (
    *GPR_IDS.values(),
    UC_X86_REG_RIP,
    UC_X86_REG_EFLAGS,
    UC_X86_REG_CR0,
    UC_X86_REG_CR3,
    UC_X86_REG_CR4,
    UC_X86_REG_FS_BASE,
    UC_X86_REG_GS_BASE,
    UC_X86_REG_GDTR,
    UC_X86_REG_IDTR,
    *range(UC_X86_REG_XMM0, UC_X86_REG_XMM0 + 16),
    UC_X86_REG_MXCSR,
    UC_X86_REG_FPCW,
    UC_X86_REG_FPSW,
    UC_X86_REG_FPTAG,
    *range(UC_X86_REG_ST0, UC_X86_REG_ST0 + 8),
)


def boot_contexts(
    uc: Any, *, gdt: int, code: int, stack_top: int, landing: int
) -> dict[tuple[str, int], Any]:
    """Enter every (mode, CPL) from the reset state (64-bit CPL0) through an IRETQ at ``code``
    and save each as a context. ``gdt``, ``code``, ``stack_top`` and ``landing`` are physical
    machine-only addresses (the fill hook maps them identically while no case runs)."""
    uc.mem_write(gdt, b"".join(struct.pack("<Q", descriptor) for descriptor in BOOT_GDT))
    uc.reg_write(UC_X86_REG_GDTR, (0, gdt, 8 * len(BOOT_GDT) - 1, 0))
    uc.mem_write(code, _IRETQ)
    reset = uc.context_save()
    contexts: dict[tuple[str, int], Any] = {}
    for mode in MODES:
        for cpl in range(4):
            cs, ss = BOOT_SELECTORS[(mode, cpl)]
            uc.context_restore(reset)
            frame = struct.pack("<5Q", landing, cs, 0x2, stack_top, ss)
            uc.mem_write(stack_top - 0x100, frame)
            uc.reg_write(UC_X86_REG_RSP, stack_top - 0x100)
            uc.emu_start(code, landing, count=1)
            if uc.reg_read(UC_X86_REG_CS) != cs or uc.reg_read(UC_X86_REG_RIP) != landing:
                raise RuntimeError(
                    f"boot: IRETQ to {mode}-mode CPL{cpl} failed "
                    f"(CS {uc.reg_read(UC_X86_REG_CS):#x}, RIP {uc.reg_read(UC_X86_REG_RIP):#x})"
                )
            contexts[(mode, cpl)] = uc.context_save()
    return contexts


class ContextSwitch:
    """Restores a saved context (another mode or CPL) keeping every case-visible register:
    the carried registers travel as raw bytes, so XMM, x87 and GDTR/IDTR need no conversion."""

    def __init__(self, port: FastPort) -> None:
        self._port = port
        self._carried = RawRegisters(port, _CARRIED)

    def switch(self, context: Any) -> None:
        port = self._port
        self._carried.save()
        efer = port.msr_read(MSR_EFER)
        port.context_restore(context)
        port.msr_write(MSR_EFER, efer)
        self._carried.restore()
