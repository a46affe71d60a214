"""Event delivery and privilege transitions, done by the shim (docs/machine.md, "Event
delivery").

Unicorn never delivers through an IDT (exceptions stop at ``UC_HOOK_INTR``; ``int n`` ignores
the gate), its SYSCALL only calls a hook, and QEMU cannot be told which descriptor reads are
implicit. So for cases with ``State.system`` the shim computes these transitions itself: IDT
delivery (gate and code-descriptor reads, TSS.RSP0/IST stack switch, the 5-word frame, #DF and
triple fault), INT n/INT3, IRETQ, SYSCALL and SYSRET. Each computation either raises a new
exception (:class:`~lassfuzz.emulator.memory.SystemFault`, which delivery combines per SDM
Table 6-5) or returns a :class:`Transition`: the new CPL, mode and registers, which the run
loop applies (restoring the context of the new (mode, CPL) when they change).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import iced_x86 as iced
from iced_x86 import Mnemonic
from unicorn.x86_const import (
    UC_X86_REG_EFLAGS,
    UC_X86_REG_R11,
    UC_X86_REG_RCX,
    UC_X86_REG_RSP,
)

from lassfuzz.arch import (
    EFER_SCE,
    MASK64,
    RFLAGS_FIXED1,
    RFLAGS_IF,
    RFLAGS_IOPL,
    RFLAGS_NT,
    RFLAGS_RF,
    RFLAGS_TF,
    RFLAGS_VM,
    VEC_BP,
    VEC_DE,
    VEC_DF,
    VEC_GP,
    VEC_NP,
    VEC_PF,
    VEC_SS,
    VEC_TS,
    VEC_UD,
)
from lassfuzz.emulator.descriptors import (
    TYPE_ACCESSED,
    TYPE_INTERRUPT_GATE,
    TYPE_TRAP_GATE,
    Descriptor,
)
from lassfuzz.emulator.memory import SystemFault, SystemUnsupported, gp
from lassfuzz.emulator.shim import is_canonical
from lassfuzz.emulator.system import SystemState, is_null, selector_fault
from lassfuzz.outcome import Fault

if TYPE_CHECKING:
    from lassfuzz.emulator.shim import CaseRun

MAX_EVENTS: Final = 32
_CONTRIBUTORY: Final = frozenset({VEC_DE, VEC_TS, VEC_NP, VEC_SS, VEC_GP})
#: RFLAGS bits IRETQ loads from the stack (IOPL and IF conditionally; VM is 0 in IA-32e mode).
_IRET_FLAGS: Final = 0x3F_7FD5 & ~RFLAGS_VM
_SYSRET_FLAGS: Final = 0x3C_7FD7
#: Hidden CS/SS that SYSCALL and SYSRET load (flat; no descriptor read).
_FLAT_CODE64: Final = Descriptor(0x00AF_9B00_0000_FFFF)
_FLAT_DATA: Final = Descriptor(0x00CF_9300_0000_FFFF)


@dataclass(frozen=True)
class Return:
    """A checked return target: CS (and SS, when popped) with their descriptors, mode, CPL."""

    cs: int
    code: Descriptor
    code_address: int
    ss: int | None
    stack: Descriptor | None
    stack_address: int
    mode: str
    cpl: int


def check_target(target: int, mode: str, bits: int, rip: int, what: str) -> None:
    """A far transfer's target: canonical in 64-bit mode, below 4 GiB in 32-bit code."""
    if mode == "64" and not is_canonical(target, bits):
        raise gp(0, rip, f"{what} to non-canonical {target:#x}")
    if mode == "compat" and target >> 32:
        raise gp(0, rip, f"{what} to {target:#x} beyond the 32-bit code segment")


class Shutdown(Exception):
    """A triple fault: a fault while delivering #DF."""


class TooManyEvents(Exception):
    """More than :data:`MAX_EVENTS` events in one case (docs/machine.md: a hang)."""


@dataclass(frozen=True)
class Transition:
    """Where execution continues: CPL, mode ("64"/"compat") and the registers to write."""

    cpl: int
    mode: str
    rip: int
    rsp: int
    rflags: int


class Events:
    """Event delivery and privilege transitions for one run with descriptor tables."""

    def __init__(self, run: CaseRun, system: SystemState) -> None:
        self.run = run
        self.system = system
        self.memory = system.memory
        self.raised: list[Fault] = []

    # ----------------------------------------------------------------------------- delivery

    def deliver(
        self, fault: Fault, *, rflags: int, software: bool = False, origin: int | None = None
    ) -> Transition:
        """Deliver ``fault`` through the IDT: an exception, or INT n/INT3 when ``software``
        (then ``fault.rip`` is the next instruction and ``origin`` the INT's address, the RIP
        of faults raised by its delivery). Faults during delivery combine per SDM Table 6-5;
        raises :class:`Shutdown` on a triple fault. ``rflags`` is RFLAGS at the event.

        Each event whose delivery is attempted is recorded; a fault during a delivery only as
        what is delivered next (itself, or the #DF), and the triple fault not at all."""
        event, ext = fault, 0 if software else 1
        at = fault.rip if origin is None else origin
        while True:
            self._record(event)
            mark = self._trace_mark()
            # Exceptions here are faults: their RFLAGS image has RF = 1 (SDM Vol. 3A
            # 18.3.1.1), except #DF; INT n/INT3 push RF = 0.
            image = rflags | RFLAGS_RF if ext and event.vector != VEC_DF else rflags & ~RFLAGS_RF
            try:
                return self._deliver_once(event, at, rflags=image, ext=ext, software=software)
            except SystemFault as failure:
                self._trace_rollback(mark)  # a failed delivery commits nothing, traced or not
                new = failure.fault
                if event.vector == VEC_DF:
                    raise Shutdown(failure.detail) from None
                # INT n is no exception: whatever its vector, a fault delivering it is serial.
                if not software and _double_fault(event.vector, new.vector):
                    new = Fault(VEC_DF, 0, at)
                event, ext, software = new, 1, False

    def _trace_mark(self) -> int:
        return 0 if self.run.trace is None else len(self.run.trace)

    def _trace_rollback(self, mark: int) -> None:
        run = self.run
        if run.trace is not None:
            del run.trace[mark:]
            del run.trace_origins[mark:]

    def _record(self, event: Fault) -> None:
        self.raised.append(event)
        if len(self.raised) > MAX_EVENTS:
            raise TooManyEvents(f"more than {MAX_EVENTS} events")

    def _deliver_once(
        self, event: Fault, rip: int, *, rflags: int, ext: int, software: bool
    ) -> Transition:
        """One delivery attempt; faults it raises are attributed to ``rip``."""
        run, system = self.run, self.system
        vector = event.vector
        idt_base, idt_limit = system.idtr
        gate_code = vector * 8 + 2 + ext
        if vector * 16 + 15 > idt_limit:
            raise gp(gate_code, rip, f"vector {vector:#x} beyond the IDT limit")
        gate = Descriptor(
            *_split(self.memory.read((idt_base + vector * 16) & MASK64, 16, rip, implicit=True))
        )
        if gate.s or gate.type not in (TYPE_INTERRUPT_GATE, TYPE_TRAP_GATE):
            raise gp(gate_code, rip, f"IDT entry {vector:#x} is not a 64-bit interrupt/trap gate")
        if software and gate.dpl < run.cpl:
            raise gp(vector * 8 + 2, rip, f"INT {vector:#x}: gate DPL {gate.dpl} < CPL")
        if not gate.present:
            raise SystemFault(Fault(VEC_NP, gate_code, rip), f"IDT gate {vector:#x} not present")
        selector = gate.gate_selector
        if is_null(selector):
            raise gp(ext, rip, "interrupt gate with a null code selector")
        found = system.read_descriptor(selector, rip)
        assert found is not None
        code, code_address = found
        if not code.code or not code.long or code.default32 or code.dpl > run.cpl:
            raise gp((selector & 0xFFFC) + ext, rip, f"gate code selector {selector:#x}")
        if code.conforming:
            raise SystemUnsupported(f"interrupt gate to conforming code segment {selector:#x}")
        if not code.present:
            raise SystemFault(
                Fault(VEC_NP, (selector & 0xFFFC) + ext, rip), f"code {selector:#x} not present"
            )
        new_cpl = code.dpl
        old_rsp = run.uc.reg_read(UC_X86_REG_RSP)
        if gate.ist:
            rsp = self.tss_read(0x24 + 8 * (gate.ist - 1), rip, ext)
        elif new_cpl < run.cpl:
            rsp = self.tss_read(4 + 8 * new_cpl, rip, ext)
        else:
            rsp = old_rsp
        rsp &= ~0xF  # the pushes' own canonical checks decide (#SS(EXT)), not RSP's value
        words = [
            system.selectors["ss"],
            old_rsp,
            rflags,
            system.selectors["cs"],
            event.rip,
        ]
        if event.error_code is not None:
            words.append(event.error_code)
        self._push_frame(rsp, words, new_cpl, rip, ext)
        system.set_type_bit(code, code_address, TYPE_ACCESSED, rip)
        # Commit: nothing above changed architectural state but A/D bits and the trace.
        system.selectors["cs"] = (selector & 0xFFFC) | new_cpl
        system.hidden["cs"] = code
        if new_cpl < run.cpl:
            system.selectors["ss"], system.hidden["ss"] = new_cpl, None
        cleared = RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM
        if gate.type == TYPE_INTERRUPT_GATE:
            cleared |= RFLAGS_IF
        return Transition(
            new_cpl, "64", gate.gate_offset, (rsp - 8 * len(words)) & MASK64, rflags & ~cleared
        )

    def tss_read(self, offset: int, rip: int, ext: int) -> int:
        """An 8-byte TSS field (RSPn or ISTn): an implicit read; beyond the limit ⇒ #TS."""
        tss = self.system.tss
        if tss is None or offset + 7 > tss[1]:
            code = (self.system.selectors["tr"] & 0xFFFC) + ext
            raise SystemFault(Fault(VEC_TS, code, rip), f"TSS field {offset:#x} beyond the limit")
        return self.memory.read((tss[0] + offset) & MASK64, 8, rip, implicit=True)

    def _push_frame(self, rsp: int, words: list[int], cpl: int, rip: int, ext: int) -> None:
        """The frame pushes: 8-byte supervisor writes at the new CPL in 64-bit mode, checked
        highest address first; none is stored unless all pass (#SS(EXT) for a canonical or
        LASS violation, #PF for paging)."""
        run = self.run
        saved = run.cpl, run.cs_l
        run.cpl, run.cs_l = cpl, True
        prepared = []
        try:
            for index in range(len(words)):
                address = (rsp - 8 * (index + 1)) & MASK64
                pieces = self.memory.prepare_write(address, 8, rip, implicit=False, stack=True)
                prepared.append((address, pieces))
        except SystemFault as failure:
            if failure.fault.vector == VEC_SS:
                raise SystemFault(Fault(VEC_SS, ext, rip), failure.detail) from None
            raise
        finally:
            run.cpl, run.cs_l = saved
        for (address, pieces), word in zip(prepared, words, strict=True):
            self.memory.commit_write(pieces, address, word, 8, rip, implicit=False)

    # ----------------------------------------------------------------------------- instructions

    def software_interrupt(self, instruction: iced.Instruction) -> Transition:
        """INT n / INT3 at ``instruction`` (trap: the saved RIP is the next instruction)."""
        vector = VEC_BP if instruction.mnemonic == Mnemonic.INT3 else instruction.immediate8
        event = Fault(vector, None, instruction.next_ip & MASK64)
        rflags = self.run.uc.reg_read(UC_X86_REG_EFLAGS)
        return self.deliver(event, rflags=rflags, software=True, origin=instruction.ip)

    def iretq(self, instruction: iced.Instruction) -> Transition:
        """IRETQ: pop RIP, CS, RFLAGS, RSP, SS (explicit SS-segment reads), check CS and SS."""
        run = self.run
        rip = instruction.ip
        if not run.cs_l:
            raise SystemUnsupported(f"IRET in compatibility mode at {rip:#x}")
        if run.uc.reg_read(UC_X86_REG_EFLAGS) & RFLAGS_NT:
            raise gp(0, rip, "IRETQ with RFLAGS.NT = 1 (task return)")
        rsp = run.uc.reg_read(UC_X86_REG_RSP)
        frame = self.memory.read(rsp, 40, rip, implicit=False, stack=True)
        new_rip, cs, new_rflags, new_rsp, ss = _split(frame, 5)
        target = self.check_return(rip, cs & 0xFFFF, ss & 0xFFFF, new_rip, "IRETQ")
        if new_rflags & (RFLAGS_TF | RFLAGS_RF):
            raise SystemUnsupported("IRETQ setting TF or RF (debug traps are not modelled)")
        old_rflags = run.uc.reg_read(UC_X86_REG_EFLAGS)
        mask = _IRET_FLAGS
        if run.cpl > 0:
            mask &= ~RFLAGS_IOPL
            if run.cpl > (old_rflags & RFLAGS_IOPL) >> 12:
                mask &= ~RFLAGS_IF
        rflags = (old_rflags & ~mask) | (new_rflags & mask) | RFLAGS_FIXED1
        self.commit_return(target, rip)
        # RSP is loaded whole, also for compatibility mode (only RET far masks it).
        return Transition(target.cpl, target.mode, new_rip, new_rsp, rflags)

    def check_return(self, rip: int, cs: int, ss: int | None, new_rip: int, what: str) -> Return:
        """The checks of a return (IRETQ, RET far) to ``cs`` (and ``ss`` when popped): the
        descriptors are read before the RPL checks (SDM IRET). Commits nothing."""
        run, system = self.run, self.system
        if is_null(cs):
            raise gp(0, rip, f"{what} to a null CS")
        new_cpl = cs & 3
        found = system.read_descriptor(cs, rip)
        assert found is not None
        code, code_address = found
        if new_cpl < run.cpl:
            raise selector_fault(VEC_GP, cs, rip, f"{what} to an inner privilege level")
        if not code.code or (code.dpl > new_cpl if code.conforming else code.dpl != new_cpl):
            raise selector_fault(VEC_GP, cs, rip, f"{what}: CS {cs:#x} fails the type/DPL checks")
        if not code.present:
            raise selector_fault(VEC_NP, cs, rip, f"{what}: CS {cs:#x} not present")
        if not code.long and not (code.default32 and code.flat):
            raise SystemUnsupported(f"{what} to 16-bit or non-flat code segment {cs:#x}")
        mode = "64" if code.long else "compat"
        stack: Descriptor | None = None
        stack_address = 0
        if ss is not None and is_null(ss):
            if new_cpl == 3 or mode != "64" or ss & 3 != new_cpl:
                raise gp(0, rip, f"{what}: null SS")
        elif ss is not None:
            found = system.read_descriptor(ss, rip)
            assert found is not None
            stack, stack_address = found
            if ss & 3 != new_cpl or not stack.writable or stack.dpl != new_cpl:
                raise selector_fault(VEC_GP, ss, rip, f"{what}: SS {ss:#x} fails the checks")
            if not stack.present:
                raise selector_fault(VEC_SS, ss, rip, f"{what}: SS {ss:#x} not present")
        check_target(new_rip, mode, run.bits, rip, what)
        if new_cpl > run.cpl:
            self._check_nulling(new_cpl)
        return Return(cs, code, code_address, ss, stack, stack_address, mode, new_cpl)

    def commit_return(self, target: Return, rip: int) -> None:
        """A/D bits, CS (and SS) and the data-segment nulling of a checked return."""
        system = self.system
        system.set_type_bit(target.code, target.code_address, TYPE_ACCESSED, rip)
        if target.stack is not None:
            system.set_type_bit(target.stack, target.stack_address, TYPE_ACCESSED, rip)
        system.selectors["cs"], system.hidden["cs"] = target.cs, target.code
        if target.ss is not None:
            system.selectors["ss"], system.hidden["ss"] = target.ss, target.stack
        if target.cpl > self.run.cpl:
            self._null_data_segments(target.cpl)

    def _outlawed(self, cpl: int) -> list[str]:
        """Data-segment registers a return to ``cpl`` makes null (DPL < CPL, not conforming)."""
        return [
            name
            for name in ("ds", "es", "fs", "gs")
            if (descriptor := self.system.hidden[name]) is not None
            and not descriptor.conforming
            and descriptor.dpl < cpl
        ]

    def _check_nulling(self, cpl: int) -> None:
        """Nulling FS/GS on a return (their bases) is outside the machine (docs/machine.md)."""
        if {"fs", "gs"} & set(self._outlawed(cpl)):
            raise SystemUnsupported("return to an outer level that nulls FS or GS")

    def _null_data_segments(self, cpl: int) -> None:
        """On a return to an outer level, DS/ES the new CPL may not use become null."""
        for name in self._outlawed(cpl):
            self.system.load_null(name)

    def syscall(self, instruction: iced.Instruction) -> Transition:
        run, system = self.run, self.system
        if not run.efer & EFER_SCE or not run.cs_l:
            raise SystemFault(Fault(VEC_UD, None, instruction.ip), "SYSCALL: #UD")
        next_rip = instruction.next_ip & MASK64
        rflags = run.uc.reg_read(UC_X86_REG_EFLAGS)
        run.uc.reg_write(UC_X86_REG_RCX, next_rip)
        run.uc.reg_write(UC_X86_REG_R11, rflags)
        cs = (system.star >> 32) & 0xFFFC
        system.selectors["cs"], system.hidden["cs"] = cs, _FLAT_CODE64
        system.selectors["ss"], system.hidden["ss"] = (cs + 8) & 0xFFFF, _FLAT_DATA
        new_rflags = (rflags & ~system.sfmask & ~RFLAGS_RF) | RFLAGS_FIXED1
        return Transition(0, "64", system.lstar, run.uc.reg_read(UC_X86_REG_RSP), new_rflags)

    def sysret(self, instruction: iced.Instruction) -> Transition:
        run, system = self.run, self.system
        rip = instruction.ip
        if not run.efer & EFER_SCE or not run.cs_l:
            raise SystemFault(Fault(VEC_UD, None, rip), "SYSRET: #UD")
        if run.cpl:
            raise gp(0, rip, f"SYSRET at CPL {run.cpl}")
        target = run.uc.reg_read(UC_X86_REG_RCX)
        base = (system.star >> 48) & 0xFFFF
        if instruction.mnemonic == Mnemonic.SYSRETQ:
            if not is_canonical(target, run.bits):
                raise gp(0, rip, f"SYSRET to non-canonical {target:#x}")
            mode, cs, code = "64", (base + 16) | 3, _USER_CODE64
        else:  # to compatibility mode: EIP = ECX
            mode, cs, code, target = "compat", base | 3, _USER_CODE32, target & 0xFFFF_FFFF
        system.selectors["cs"], system.hidden["cs"] = cs & 0xFFFF, code
        system.selectors["ss"], system.hidden["ss"] = ((base + 8) | 3) & 0xFFFF, _USER_DATA
        rflags = (run.uc.reg_read(UC_X86_REG_R11) & _SYSRET_FLAGS) | RFLAGS_FIXED1
        return Transition(3, mode, target, run.uc.reg_read(UC_X86_REG_RSP), rflags)


_USER_CODE64: Final = Descriptor(_FLAT_CODE64.low | 3 << 45)
_USER_CODE32: Final = Descriptor(0x00CF_FB00_0000_FFFF)
_USER_DATA: Final = Descriptor(_FLAT_DATA.low | 3 << 45)


def _double_fault(first: int, second: int) -> bool:
    """SDM Table 6-5: contributory after contributory or #PF, and #PF after #PF, is #DF."""
    if second in _CONTRIBUTORY:
        return first in _CONTRIBUTORY or first == VEC_PF
    return second == VEC_PF and first == VEC_PF


def _split(value: int, count: int = 2) -> tuple[int, ...]:
    """The little-endian u64 words of a multi-word read."""
    return tuple((value >> (64 * index)) & MASK64 for index in range(count))
