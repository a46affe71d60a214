"""The run loop of cases with descriptor tables (``State.system``) on the Unicorn machine.

Such a case continues after an exception, so one ``emu_start`` is not one case: the loop runs
Unicorn until something stops it, lets the shim deliver the event through the IDT
(:mod:`lassfuzz.emulator.events`), applies the resulting transition — restoring the QEMU
context of the new (mode, CPL) when they change, since QEMU cannot change CPL on request — and
starts Unicorn again at the new RIP, until the case completes, halts, shuts down or hangs.

Almost every instruction gets a code hook here (system cases are a small share of a campaign;
see :func:`_hooked_ranges` for the exceptions): it dispatches the instructions the shim
emulates (descriptor loads, INT n, IRETQ, SYSCALL, SYSRET, far transfers), finds them in
handler code the pre-scan never saw, records RFLAGS before each instruction (exact for the
frame a fault pushes), and snapshots branches, because QEMU commits a branch to a
non-canonical target before its fetch faults, while the architecture faults at the branch with
no side effect.

The loop uses the machine's internals (its ``Uc``, reset, interpretation and outcome
building): it is the machine's second run path, kept in its own module.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import iced_x86 as iced
from iced_x86 import FlowControl, Mnemonic, OpAccess
from unicorn.unicorn_const import UC_HOOK_MEM_READ, UC_HOOK_MEM_WRITE, UC_PROT_EXEC
from unicorn.x86_const import UC_X86_REG_EFLAGS, UC_X86_REG_RIP, UC_X86_REG_RSP

from lassfuzz.arch import MASK64, PAGE_SIZE, VEC_GP
from lassfuzz.case import MemoryImage, TestCase
from lassfuzz.emulator.decode import Intercept, Prescan, intercept_for
from lassfuzz.emulator.events import Events, Shutdown, TooManyEvents, Transition
from lassfuzz.emulator.far import FarTransfers, is_far_transfer
from lassfuzz.emulator.memory import SystemFault, SystemUnsupported
from lassfuzz.emulator.port import UcError
from lassfuzz.emulator.shim import FILL_KINDS, GPR_IDS, CaseRun, Refusal, Stop, is_canonical
from lassfuzz.emulator.system import SystemState, is_null
from lassfuzz.outcome import Fault, Outcome, Status

if TYPE_CHECKING:
    from lassfuzz.emulator.machine import UnicornMachine, _Execution

_GPRS: Final = tuple(GPR_IDS.values())
_INFO: Final = iced.InstructionInfoFactory()
_DATA_SEGMENTS: Final = ("ds", "es", "fs", "gs")
#: RFLAGS bits that are reserved (bit 1 reads as 1; bits 3, 5, 15, 22-63 as 0).
_RESERVED_RFLAGS: Final = ~0x3F_7FD7 & MASK64
_TRANSITIONS: Final = frozenset(
    {
        Mnemonic.INT,
        Mnemonic.INT3,
        Mnemonic.IRETQ,
        Mnemonic.SYSCALL,
        Mnemonic.SYSRETQ,
        Mnemonic.SYSRET,
    }
)


@dataclass(frozen=True)
class _Branch:
    """State before a branch, to undo it if its target turns out non-canonical."""

    address: int
    gprs: tuple[int, ...]
    stack: tuple[tuple[int, bytes], ...]  # (physical address, bytes) a near CALL overwrites


class SystemRun:
    """One system case on ``machine``: hooks, the loop and the outcome."""

    def __init__(self, machine: UnicornMachine, run: CaseRun, system: SystemState) -> None:
        self.machine = machine
        self.uc = machine._port
        self.run = run
        self.system = system
        self.events = Events(run, system)
        self.far = FarTransfers(self.events)
        self.initial_cs_l = run.cs_l
        self.pending: Transition | None = None
        self.final: Stop | None = None
        self.branch: _Branch | None = None
        self.first_refusal: Refusal | None = None
        self.until_page = 0
        #: The code hooks, installed for a (mode, null data segments) state: in compatibility
        #: mode the instructions using a null DS/ES/FS/GS need one (_hooked_ranges).
        self.code_hooks: list[int] = []
        self.hook_key: tuple[bool, ...] | None = None
        self.quiet = False  # answer fills without any walk (hook changes, not case accesses)
        # Route the machine's fill hook through _fill (an instance attribute shadows the method).
        self._case_fill = run.fill
        run.fill = self._fill  # type: ignore[method-assign]
        #: Where the last transition starts: (RIP, whether that instruction completed).
        self.stopped_at: tuple[int, bool] = (0, False)

    # ----------------------------------------------------------------------------- hooks

    def _fill(self, page: int, access: int, entry: Any) -> bool:
        """The shim's fill, except after emulation was told to stop (a refused fill, an
        exception, a hook's decision): then Unicorn still looks up the block at the ``until``
        address (measured), a fill that is no access of the case. Walking it would set A bits
        the architecture never sets once a privilege change made that page fetchable, and
        refusing it through the shim would replace the refusal that ended the segment."""
        stopping = (
            self.quiet
            or self.first_refusal is not None
            or self.machine._vector is not None
            or self.run.stop is not None
            or self.pending is not None
            or self.final is not None
        )
        if stopping:
            return False
        if (
            FILL_KINDS[access] == "fetch"
            and page == self.until_page
            and self.uc.reg_read(UC_X86_REG_RIP) & ~(PAGE_SIZE - 1) != page
        ):
            return self._until_lookup(page, entry)
        granted = self._case_fill(page, access, entry)
        if not granted and self.first_refusal is None:
            self.first_refusal = self.run.refusal
        return bool(granted)

    def on_code(self, address: int, size: int) -> None:
        run = self.run
        run.flags_at_hook = (address, run.uc.reg_read(UC_X86_REG_EFLAGS))
        self.branch = None
        prescanned = address in run.scan.instructions
        if prescanned and run.cs_l != self.initial_cs_l:
            self._finish(Stop(Status.UNSUPPORTED, detail=f"code at {address:#x} run in two modes"))
            return
        instruction = run.instruction_at(address)
        if instruction is None:
            return  # not decodable: QEMU raises #UD or the fetch faults
        try:
            if not run.cs_l:
                self.system.check_null_segments(instruction)
            if instruction.mnemonic in _TRANSITIONS or is_far_transfer(instruction):
                self._transition(instruction)
            elif self.system.emulates(instruction):
                self.system.execute(instruction)
                self._resume_after(instruction)
            else:
                self._other(instruction, prescanned)
        except SystemFault as failure:
            self.stopped_at = (address, False)
            self._drop_trace_of(address)
            self._deliver(failure.fault)
        except SystemUnsupported as error:
            self._finish(Stop(Status.UNSUPPORTED, detail=str(error)))

    def _resume_after(self, instruction: iced.Instruction) -> None:
        """Continue after an emulated instruction by stopping Unicorn and starting it again
        at the next RIP: writing RIP inside the hook instead made QEMU raise a spurious #DB
        at the next instruction after a CMPXCHG16B earlier in the block (measured)."""
        run = self.run
        self.stopped_at = (instruction.ip, True)
        mask = MASK64 if run.cs_l else 0xFFFF_FFFF
        self.pending = Transition(
            run.cpl,
            "64" if run.cs_l else "compat",
            instruction.next_ip & mask,
            run.uc.reg_read(UC_X86_REG_RSP),
            # Read in the hook, where QEMU's flags are exact (LAR/LSL/VERR/VERW set ZF), and
            # written again once Unicorn stopped: leaving a hooked instruction restores a
            # stale lazy-flags operation over them (measured: ADD; LSL lost AF).
            run.uc.reg_read(UC_X86_REG_EFLAGS),
        )
        self.uc.emu_stop()

    def _transition(self, instruction: iced.Instruction) -> None:
        events = self.events
        self.stopped_at = (instruction.ip, True)
        if is_far_transfer(instruction):
            self._apply_later(lambda: self.far.execute(instruction))
        elif instruction.mnemonic in (Mnemonic.INT, Mnemonic.INT3):
            self._apply_later(lambda: events.software_interrupt(instruction))
        elif instruction.mnemonic == Mnemonic.IRETQ:
            self._apply_later(lambda: events.iretq(instruction))
        elif instruction.mnemonic == Mnemonic.SYSCALL:
            self._apply_later(lambda: events.syscall(instruction))
        else:
            self._apply_later(lambda: events.sysret(instruction))

    def _apply_later(self, compute: Any) -> None:
        """Compute a transition in the hook; the loop applies it after stopping Unicorn."""
        try:
            self.pending = compute()
        except Shutdown:
            self._finish(Stop(Status.SHUTDOWN, detail="triple fault"))
            return
        except TooManyEvents as error:
            self._finish(Stop(Status.HANG, detail=str(error)))
            return
        except SystemUnsupported as error:
            self._finish(Stop(Status.UNSUPPORTED, detail=str(error)))
            return
        self.uc.emu_stop()

    def _deliver(self, fault: Fault) -> None:
        rflags = self.run.rflags_at_fault(fault.rip, self.run.uc.reg_read(UC_X86_REG_EFLAGS))
        self._apply_later(lambda: self.events.deliver(fault, rflags=rflags))
        if self.final is not None and self.final.status is Status.SHUTDOWN:
            # Registers as left before the failed delivery: RIP and RFLAGS of the event.
            self.final = dataclasses.replace(self.final, rip=fault.rip)
            self.uc.reg_write(UC_X86_REG_EFLAGS, rflags)

    def _other(self, instruction: iced.Instruction, prescanned: bool) -> None:
        run = self.run
        address = instruction.ip
        kind = run.scan.intercepts.get(address) if prescanned else intercept_for(instruction)
        if kind is None:
            if instruction.flow_control != FlowControl.NEXT:
                self.branch = self._snapshot(instruction)
            return
        if prescanned:
            run.intercept(address)
        elif kind is Intercept.HLT:
            if run.cpl == 0:
                self._finish(Stop(Status.HALTED, rip=instruction.next_ip & MASK64))
        elif kind is Intercept.POPF:
            run._popf(address)
        elif kind is not Intercept.PRIVILEGED_UNSUPPORTED or run.cpl == 0:
            detail = f"{instruction} at {address:#x}, outside the pre-scanned code"
            self._finish(Stop(Status.UNSUPPORTED, detail=detail))

    def _finish(self, stop: Stop) -> None:
        self.final = stop
        self.uc.emu_stop()

    def _snapshot(self, instruction: iced.Instruction) -> _Branch:
        gprs = self.uc.reg_read_batch(_GPRS)
        stack: tuple[tuple[int, bytes], ...] = ()
        if instruction.is_call_near or instruction.is_call_near_indirect:
            width = 8 if self.run.cs_l else 4
            rsp = self.uc.reg_read(UC_X86_REG_RSP)
            pieces = self.system.memory.physical((rsp - width) & MASK64, width) or []
            stack = tuple((frame, self.uc.mem_read(frame, size)) for frame, size in pieces)
        return _Branch(instruction.ip, gprs, stack)

    # ----------------------------------------------------------------------------- loop

    def execute(self, case: TestCase) -> tuple[_Execution, Stop]:
        """Run to the end; returns the last raw execution (for the outcome) and the stop."""
        machine, run = self.machine, self.run
        self.until_page = case.code_end & ~(PAGE_SIZE - 1)
        start = case.code_address
        while True:
            self._install_hooks()
            machine._vector = None
            run.refusal = self.first_refusal = None
            run.stop = None
            self.pending = None
            execution = self._emulate(start, case.code_end)
            run.refusal = self.first_refusal
            if self.uc.reg_read(UC_X86_REG_EFLAGS) & _RESERVED_RFLAGS:
                # QEMU's lazy flags can decode to garbage (measured after CMP; CMPXCHG16B:
                # 0xffffffd3); carried into the next segment it would even set TF.
                detail = "Unicorn computed RFLAGS with reserved bits set (lazy-flags state)"
                return execution, Stop(Status.UNSUPPORTED, detail=detail)
            self._restore_hook_flags()
            if self.final is not None:
                return execution, self.final
            if self.pending is None:
                stop = self._interpret(case, execution)
                if stop.status is not Status.FAULT or stop.fault is None:
                    return execution, stop
                fault = self._undo_noncanonical_branch(stop.fault)
                self._drop_trace_of(fault.rip)
                self.stopped_at = (fault.rip, False)
                self._deliver(fault)
                if self.final is not None:
                    return execution, self.final
            assert self.pending is not None
            self._count_instructions()
            # QEMU keeps the exception it raised as old_exception and would turn the next one
            # into #DF (shared/UNICORN.md): a context restore clears it.
            self._apply(self.pending, fresh_context=execution.vector is not None)
            start = self.pending.rip
            if start == case.code_end:  # the end is checked before every instruction
                return execution, Stop(Status.COMPLETED)

    def _interpret(self, case: TestCase, execution: _Execution) -> Stop:
        """The machine's reading of an ending, with two differences. An exception QEMU
        raised wins over a refused fill: after it Unicorn still looks up the block at the
        ``until`` address, whose fetch the shim may refuse (measured: ``div`` raising #DE,
        then a fetch fill of the code's last page). And reaching ``code_end`` completes the
        case even where the current CPL could not fetch there (the end is checked before
        every fetch; after a privilege change the case's code page may be out of reach)."""
        if execution.vector is not None and self.run.stop is None:
            rip = self.uc.reg_read(UC_X86_REG_RIP)
            return self.machine._qemu_exception(execution.vector, rip)
        stop = self.machine._interpret(case, execution)
        fault = stop.fault
        if fault is not None and fault.access == "fetch" and fault.rip == case.code_end:
            return Stop(Status.COMPLETED)
        return stop

    def _emulate(self, start: int, until: int) -> _Execution:
        """One ``emu_start`` from ``start``; the machine's block hook enforces the budget."""
        from lassfuzz.emulator.machine import _Execution  # machine imports this module

        machine = self.machine
        error: int | None = None
        started = time.monotonic()
        try:
            machine._uc.emu_start(
                start,
                until,
                timeout=0 if machine.timeout is None else int(machine.timeout * 1_000_000),
            )
        except UcError as failure:
            error = int(getattr(failure, "errno", -1))
        return _Execution(self.run, error, machine._vector, time.monotonic() - started)

    def _until_lookup(self, page: int, entry: Any) -> bool:
        """Unicorn looks up the block at ``until`` when it leaves emulation, also after an
        invalid opcode (no hook tells the shim): a fetch fill of the end page while RIP is
        elsewhere is that look-up, no access of the case. It is mapped without any check or
        A bit (refusing it would turn the #UD into a refused fetch); the TLB is flushed at
        every transition, so the entry serves no later fetch."""
        pieces = self.system.memory.physical(page, 1)
        if pieces is None:
            return False
        entry.paddr = pieces[0][0]
        entry.perms = UC_PROT_EXEC
        return True

    def _install_hooks(self) -> None:
        """(Re)install the code hooks when the mode or the set of null data-segment
        registers changed; translated blocks carry the old hooks, so they are dropped."""
        system = self.system
        key = (self.run.cs_l, *(is_null(system.selectors[name]) for name in _DATA_SEGMENTS))
        if key == self.hook_key:
            return
        self.quiet = True
        try:
            for handle in self.code_hooks:
                self.uc.hook_del(handle)
            self.code_hooks = [
                self.uc.hook_code(begin, end, self.on_code)
                for begin, end in _hooked_ranges(self.run.scan, system)
            ]
            if self.hook_key is not None:
                self.machine._uc.ctl_flush_tb()
        finally:
            self.quiet = False
        self.hook_key = key

    def _restore_hook_flags(self) -> None:
        """Unicorn stopped by a hook decision at the hooked instruction: RFLAGS as read in
        that hook (leaving the hook restored a stale lazy-flags operation, see
        :meth:`_resume_after`). Transitions write their own RFLAGS later."""
        run = self.run
        hooked = run.flags_at_hook
        stopped_by_hook = self.final is not None or run.stop is not None
        if hooked is not None and stopped_by_hook and hooked[0] == self.uc.reg_read(UC_X86_REG_RIP):
            self.uc.reg_write(UC_X86_REG_EFLAGS, hooked[1])

    def _count_instructions(self) -> None:
        """The block hook counted the whole last block on entry; a transition leaves it at
        ``stopped_at`` (a completed INT/IRETQ/SYSCALL/SYSRET counts, a faulting one not)."""
        run = self.run
        address, completed = self.stopped_at
        run.entered = run.executed(address) + int(completed)
        run.last_block = ()

    def _apply(self, transition: Transition, *, fresh_context: bool = False) -> None:
        run = self.run
        mode = "64" if run.cs_l else "compat"
        if fresh_context or (transition.cpl, transition.mode) != (run.cpl, mode):
            self.machine._switch_context((transition.mode, transition.cpl))
            run.cpl = transition.cpl
            run.cs_l = transition.mode == "64"
        # Fills were answered for the old CPL and mode, and the end-page look-up is unchecked.
        run.flush_tlb()
        self.uc.reg_write(UC_X86_REG_RSP, transition.rsp)
        self.uc.reg_write(UC_X86_REG_EFLAGS, transition.rflags)
        self.uc.reg_write(UC_X86_REG_RIP, transition.rip)
        run.flags_at_hook = None

    def _undo_noncanonical_branch(self, fault: Fault) -> Fault:
        """QEMU committed a branch whose target is not canonical and faulted on the fetch:
        undo the branch and fault at it (docs/machine.md, checks step 1)."""
        branch = self.branch
        if (
            branch is None
            or fault.vector != VEC_GP
            or fault.access != "fetch"
            or is_canonical(fault.rip, self.run.bits)
        ):
            return fault
        self.uc.reg_write_batch(_GPRS, branch.gprs)
        for frame, data in branch.stack:
            self.uc.mem_write(frame, data)
        self.run._undo_bits(branch.address)
        self.uc.reg_write(UC_X86_REG_RIP, branch.address)
        self._drop_trace_of(branch.address)
        return Fault(VEC_GP, 0, branch.address, access="fetch", address=fault.rip)

    def _drop_trace_of(self, rip: int) -> None:
        """A faulting instruction leaves no trace entries: those made at ``rip`` in the
        current block (the shim's trace records each entry's origin)."""
        run = self.run
        if run.trace is None:
            return
        origin = (rip, run.blocks_entered)
        while run.trace_origins and run.trace_origins[-1] == origin:
            run.trace.pop()
            run.trace_origins.pop()


def _hooked_ranges(scan: Prescan, system: SystemState) -> list[tuple[int, int]]:
    """Address ranges for the code hook: everything except the pre-scanned instructions the
    shim need not see, so that code outside the pre-scan (handlers, targets of transitions) is
    hooked completely, and the case's own code as sparsely as the machine's other path.

    Code hooks disturb QEMU's lazy flags: a hook materialises them while QEMU's record for
    restoring the instruction's state keeps the older lazy operation, so leaving a hooked
    instruction early (a stop, a fault) can leave RFLAGS wrong (measured: ``adc; cpuid`` with a
    hook on CPUID loses AF). A pre-scanned instruction keeps its hook only when the shim must
    act there: an intercept or an instruction the shim emulates, a branch (its snapshot undoes
    a branch to a non-canonical target), an instruction reading flags and memory (exact flags
    for its faults), or, in compatibility mode, a memory operand through a null segment
    register. Measured on the 802 system cases among 2,400 generated ones: 796 of the 797
    comparable outcomes agree with the model (the other: Unicorn's CMPXCHG8B flags); with every
    instruction hooked, 790 agreed.
    """
    compat = not system.run.cs_l
    skipped = sorted(
        address
        for address, instruction in scan.instructions.items()
        if address not in scan.intercepts
        and instruction.flow_control == FlowControl.NEXT
        and not system.emulates(instruction)  # MOV/PUSH from a segment register
        and not (compat and system.uses_null_segment(instruction))
        and not _reads_flags_and_memory(instruction)
    )
    ranges = []
    begin = 0
    for address in skipped:
        if address > begin:
            ranges.append((begin, address - 1))
        begin = address + 1
    ranges.append((begin, MASK64))
    return ranges


def _reads_flags_and_memory(instruction: iced.Instruction) -> bool:
    """SETcc m, ADC m, PUSHF...: a fault the shim raises in one of these leaves QEMU's RFLAGS
    stale (the machine's other path re-runs the case with a hook there); a hook gives the
    exact value up front."""
    return bool(instruction.rflags_read) and any(
        used.access != OpAccess.NO_MEM_ACCESS for used in _INFO.info(instruction).used_memory()
    )


def run_system_case(
    machine: UnicornMachine, case: TestCase, image: MemoryImage, scan: Prescan, *, trace: bool
) -> Outcome:
    """Run a case with ``State.system`` on ``machine`` (docs/machine.md, "System level")."""
    assert case.state.system is not None
    run = CaseRun(
        machine._port,
        case,
        image,
        scan,
        machine.policy,
        machine.policy_name,
        shim=True,
        trace=trace,
    )
    machine._reset(case, image, None, set())
    try:
        system = SystemState(run, case.state.system)
    except SystemUnsupported as error:
        return Outcome(machine.name, Status.UNSUPPORTED, detail=str(error))
    run.hooks_foreign_code = True
    driver = SystemRun(machine, run, system)
    hooks = []
    if trace:
        hooks.append(
            machine._uc.hook_add(
                UC_HOOK_MEM_READ | UC_HOOK_MEM_WRITE,
                lambda _uc, access, address, size, value, _ud: run.on_memory(
                    access, address, size, value
                ),
            )
        )
    machine._run = run
    try:
        execution, stop = driver.execute(case)
    finally:
        driver.quiet = True  # hook deletion makes Unicorn fill the TLB: no case access
        for handle in hooks + driver.code_hooks:
            machine._port.hook_del(handle)
        machine._exec_frames |= run.exec_frames
    stop = machine._within_budget(stop, run)
    outcome = machine._outcome(execution, stop, image)
    registers = outcome.registers
    if registers is not None:
        registers = dataclasses.replace(registers, system=system.registers())
    return dataclasses.replace(
        outcome, registers=registers, fault=None, events=tuple(driver.events.raised)
    )
