"""Event delivery through the 64-bit IDT (SDM Vol. 3A 6.12, 6.14; Vol. 2 "INT n"), exception
combination into #DF and triple faults (SDM Vol. 3A 6.15, Table 6-5), as docs/machine.md
"Event delivery" fixes it for cases with descriptor tables.

A delivery either completes (the engine commits its stores) or raises the CpuFault that stopped
it, having changed nothing. The IDT, GDT and TSS reads are implicit supervisor accesses; whether
the stack pushes are implicit is LASS.md §7 open point 1, so :class:`Delivery` takes the
interpretation as a parameter and notes when a run reached a push where the two differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from lassfuzz.arch import (
    CR4_SMAP,
    MASK64,
    RFLAGS_AC,
    RFLAGS_IF,
    RFLAGS_NT,
    RFLAGS_RF,
    RFLAGS_TF,
    RFLAGS_VM,
    RSP,
    VEC_DE,
    VEC_DF,
    VEC_GP,
    VEC_NP,
    VEC_PF,
    VEC_SS,
    VEC_TS,
    VECTORS_WITH_ERROR_CODE,
)
from lassfuzz.model.descriptors import (
    TYPE_INTERRUPT_GATE,
    TYPE_TRAP_GATE,
    Descriptor,
    fetch_segment,
    is_null,
    read_implicit,
    read_tss,
    selector_error,
    set_type_bit,
)
from lassfuzz.model.faults import CpuFault, Unsupported
from lassfuzz.model.lass import Kind
from lassfuzz.model.memory import LinearMemory, Location, is_canonical
from lassfuzz.model.state import CS, SS, Cpu
from lassfuzz.outcome import Fault, Status

#: docs/machine.md: at most 32 events per case, then Status.HANG.
MAX_EVENTS: Final = 32
#: SDM Vol. 3A Table 6-4: the contributory exceptions.
_CONTRIBUTORY: Final = frozenset({VEC_DE, VEC_TS, VEC_NP, VEC_SS, VEC_GP})
_CLEARED: Final = RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM
#: IST1..7 and RSP0..2 offsets in the 64-bit TSS (SDM Vol. 3A Figure 8-11).
_TSS_RSP0: Final = 0x04
_TSS_IST1: Final = 0x24


@dataclass(frozen=True)
class Event:
    """An exception or software interrupt to deliver. ``rip`` is the RIP it saves (the faulting
    instruction, or the next one for INT n); ``instruction_rip`` the instruction that raised it,
    to which a fault during its delivery belongs."""

    vector: int
    error_code: int | None
    rip: int
    instruction_rip: int
    software: bool = False
    cr2: int | None = None
    access: str | None = None
    address: int | None = None
    reason: str = ""

    @property
    def ext(self) -> int:
        """EXT (error-code bit 0): 1 while delivering an exception, 0 for INT n/INT3."""
        return 0 if self.software else 1

    @classmethod
    def from_fault(cls, fault: CpuFault, rip: int) -> Event:
        error = fault.error_code if fault.vector in VECTORS_WITH_ERROR_CODE else None
        return cls(
            fault.vector, error, rip, rip, False, fault.cr2, fault.access, fault.address,
            fault.reason,
        )  # fmt: skip

    def report(self) -> Fault:
        return Fault(self.vector, self.error_code, self.rip, self.cr2, self.access, self.address)


def _double_fault(first: int, second: int) -> bool:
    """SDM Vol. 3A Table 6-5: contributory after contributory, or contributory or #PF after
    #PF, is a double fault; every other pair is handled serially."""
    if first in _CONTRIBUTORY:
        return second in _CONTRIBUTORY
    return first == VEC_PF and (second in _CONTRIBUTORY or second == VEC_PF)


class Delivery:
    """Raises events for one run: the events list, the push interpretation, and ``ambiguous``
    (a push was made where LASS.md §7 open point 1 changes the answer)."""

    def __init__(self, *, implicit_pushes: bool) -> None:
        self.implicit_pushes = implicit_pushes
        self.events: list[Fault] = []
        #: Why each event was raised, for Outcome.detail.
        self.reasons: list[str] = []
        self.ambiguous = False

    def raise_event(self, cpu: Cpu, mem: LinearMemory, event: Event) -> Status | None:
        """Deliver ``event`` (and whatever its delivery raises); None when a handler is
        entered, Status.SHUTDOWN on a triple fault, Status.HANG past MAX_EVENTS."""
        while True:
            if len(self.events) >= MAX_EVENTS:
                return Status.HANG
            report = event.report()
            self.events.append(report)
            self.reasons.append(f"{report.name}: {event.reason}")
            try:
                self._deliver(cpu, mem, event)
            except CpuFault as nested:
                mem.discard()
                if event.vector == VEC_DF and not event.software:  # INT 8 is not a #DF
                    self.reasons.append(f"triple fault: {nested.reason}")
                    return Status.SHUTDOWN
                if not event.software and _double_fault(event.vector, nested.vector):
                    rip = event.instruction_rip
                    event = Event(VEC_DF, 0, rip, rip, reason=f"during delivery: {nested.reason}")
                else:
                    event = Event.from_fault(nested, event.instruction_rip)
                continue
            mem.commit()
            mem.privilege_changed()
            return None

    def _deliver(self, cpu: Cpu, mem: LinearMemory, event: Event) -> None:
        system = cpu.system
        assert system is not None
        vector, ext = event.vector, event.ext
        idt_error = vector * 8 + 2 + ext
        # SDM Vol. 2 INT n (IA-32e mode): the 16-byte gate must lie within the IDT limit.
        if vector * 16 + 15 > system.idt_limit:
            raise CpuFault(VEC_GP, idt_error, f"vector {vector:#x} beyond the IDT limit")
        raw = read_implicit(mem, (system.idt_base + vector * 16) & MASK64, 16)
        gate = Descriptor(raw & MASK64, raw >> 64)
        if not gate.system or gate.type not in (TYPE_INTERRUPT_GATE, TYPE_TRAP_GATE):
            raise CpuFault(VEC_GP, idt_error, f"IDT entry {vector:#x} is not a 64-bit gate")
        if event.software and gate.dpl < cpu.cpl:
            raise CpuFault(VEC_GP, vector * 8 + 2, f"INT {vector:#x}: gate DPL < CPL")
        if not gate.present:
            raise CpuFault(VEC_NP, idt_error, f"IDT gate {vector:#x} not present")
        low = gate.low
        selector = (low >> 16) & 0xFFFF
        offset = (low & 0xFFFF) | ((low >> 48) & 0xFFFF) << 16 | (gate.high & 0xFFFF_FFFF) << 32
        ist = (low >> 32) & 7
        # The gate's code segment (SDM Vol. 2 INT n, IA-32e mode).
        if is_null(selector):
            raise CpuFault(VEC_GP, ext, "interrupt gate with a null code selector")
        code_address, code = fetch_segment(mem, system, selector, ext)
        if not code.code or code.dpl > cpu.cpl:
            raise CpuFault(VEC_GP, selector_error(selector, ext), "gate target not code / DPL")
        if not code.present:
            raise CpuFault(VEC_NP, selector_error(selector, ext), "gate target not present")
        if not code.long or code.default32:
            raise CpuFault(VEC_GP, selector_error(selector, ext), "gate target not 64-bit code")
        if code.conforming:
            raise Unsupported(f"interrupt gate {vector:#x} to a conforming code segment")
        new_cpl = code.dpl
        if not is_canonical(offset, cpu.la57):
            raise CpuFault(VEC_GP, ext, f"handler RIP {offset:#x} not canonical")
        # The stack: IST, else RSP[new CPL] on a privilege change, else the current RSP.
        if ist:
            rsp = read_tss(cpu, mem, _TSS_IST1 + 8 * (ist - 1), ext)
        elif new_cpl < cpu.cpl:
            rsp = read_tss(cpu, mem, _TSS_RSP0 + 8 * new_cpl, ext)
        else:
            rsp = cpu.gpr[RSP]
        rsp &= MASK64 & ~0xF
        # SDM Vol. 3A 18.3.1.1: the RFLAGS image of a fault-class exception has RF = 1; every
        # exception here is a fault except #DF (an abort); INT n pushes RF as 0.
        if cpu.undefined:
            raise Unsupported("event delivery pushes RFLAGS with undefined flags")
        image = cpu.rflags | (RFLAGS_RF if not event.software and vector != VEC_DF else 0)
        frame = [system.selectors[SS], cpu.gpr[RSP], image, system.selectors[CS], event.rip]
        if event.error_code is not None:
            frame.append(event.error_code)
        old_cpl, old_long = cpu.cpl, cpu.cs_l
        cpu.cpl = new_cpl
        cpu.set_long_mode(True)
        try:
            for value in frame:
                rsp = (rsp - 8) & MASK64
                mem.store(self._push_location(cpu, mem, rsp, ext), value & MASK64)
            set_type_bit(mem, code_address, code, 1)
        except CpuFault:
            cpu.cpl = old_cpl
            cpu.set_long_mode(old_long)
            raise
        if new_cpl != old_cpl:
            system.selectors[SS] = new_cpl  # a null selector with RPL = new CPL
        system.selectors[CS] = (selector & 0xFFFC) | new_cpl
        cpu.gpr[RSP] = rsp
        cpu.rflags &= ~(_CLEARED | (RFLAGS_IF if gate.type == TYPE_INTERRUPT_GATE else 0))
        cpu.rip = offset

    def _push_location(self, cpu: Cpu, mem: LinearMemory, rsp: int, ext: int) -> Location:
        """Check one 8-byte push of the delivery frame at the new CPL. A canonical or LASS
        failure is the stack fault of delivery, #SS(EXT) (SS is null in 64-bit mode); #PF
        stays. The trace reports the push as explicit under either interpretation."""
        if cpu.cpl < 3 and cpu.cr4 & CR4_SMAP and cpu.rflags & RFLAGS_AC:
            self.ambiguous = True  # LASS rule 5 vs 7 and SMAP's AC exemption differ here
        implicit = self.implicit_pushes
        try:
            location = mem.locate(rsp, 8, Kind.WRITE, stack=not implicit, implicit=implicit)
        except CpuFault as fault:
            if fault.vector == VEC_PF:
                raise
            raise CpuFault(VEC_SS, ext, f"delivery push: {fault.reason}", access="write",
                           address=fault.address) from None  # fmt: skip
        location.implicit = False
        return location
