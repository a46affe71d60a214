"""The Unicorn machine: one long-lived ``Uc`` that runs lassfuzz cases, with or without the shim.

Set-up is done once: Broadwell CPU model (Haswell ignores SMAP), the case RAM mapped, a GDT and a
boot stub above ``PHYS_CASE_END``, every (mode, CPL) entered through a real IRETQ and saved as
a context (:mod:`lassfuzz.emulator.modes`). Per case: restore a context, reset memory, write
the case's registers, flush the TLB and the translated code, run, and turn Unicorn's events into
an :class:`Outcome`. Cases with descriptor tables run in :mod:`lassfuzz.emulator.sysrun`.

With the shim (the default) Unicorn runs in virtual-TLB mode and the shim's fill hook is the MMU
(see :mod:`lassfuzz.emulator.shim`). ``shim=False`` is *plain Unicorn* for benchmarks: its own
``Uc`` with QEMU's own page walk (``UC_TLB_CPU``), no Python hook but the exception one, so the
benchmark charges the shim with everything it adds (walk in Python, intercepts, pre-scan).

A branch to a non-canonical target must fault at the branch (QEMU commits it and faults at
the target): that case is re-run (it is deterministic), stopping at that branch.

The instruction budget is counted in the shim's block hook, not with ``emu_start(count=...)``:
Unicorn implements ``count`` as a code hook on every instruction, and a code hook makes QEMU's
lazy flags wrong when the hooked instruction faults (:meth:`CaseRun.rflags_at_fault`); it also
costs a helper call per instruction.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final

import unicorn
from unicorn.unicorn_const import (
    UC_ARCH_X86,
    UC_CTL_IO_WRITE,
    UC_CTL_TLB_FLUSH,
    UC_ERR_EXCEPTION,
    UC_ERR_INSN_INVALID,
    UC_HOOK_BLOCK,
    UC_HOOK_INSN,
    UC_HOOK_INTR,
    UC_HOOK_MEM_READ,
    UC_HOOK_MEM_WRITE,
    UC_HOOK_TLB_FILL,
    UC_MODE_64,
    UC_PROT_ALL,
    UC_TLB_CPU,
    UC_TLB_VIRTUAL,
)
from unicorn.x86_const import (
    UC_CPU_X86_BROADWELL,
    UC_X86_INS_CPUID,
    UC_X86_REG_CR0,
    UC_X86_REG_CR2,
    UC_X86_REG_CR3,
    UC_X86_REG_CR4,
    UC_X86_REG_EFLAGS,
    UC_X86_REG_FS_BASE,
    UC_X86_REG_GS_BASE,
    UC_X86_REG_RIP,
)

from lassfuzz.arch import (
    CR0_AM,
    CR0_PE,
    CR0_PG,
    CR4_LA57,
    CR4_LASS,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    PAGE_SIZE,
    RFLAGS_TF,
    VEC_GP,
    VEC_PF,
    VEC_UD,
    VECTORS_WITH_ERROR_CODE,
)
from lassfuzz.case import PHYS_CASE_END, CaseFormatError, MemoryImage, TestCase, materialize
from lassfuzz.emulator.decode import MAX_INSTRUCTION_BYTES, Prescan, prescan
from lassfuzz.emulator.modes import MSR_EFER, ContextSwitch, boot_contexts
from lassfuzz.emulator.port import FastPort, UcError
from lassfuzz.emulator.shim import GPR_IDS, SUPPORTED_CR4, CaseRun, Stop, is_canonical
from lassfuzz.emulator.sysrun import run_system_case
from lassfuzz.outcome import Fault, Outcome, Registers, Status
from lassfuzz.policies import BUILTIN, DEFAULT_POLICY, Policy

#: Unicorn's Python binding is untyped for x86.
_UNICORN: Final[Any] = unicorn
#: Machine-only physical memory above the case RAM: GDT, boot code, boot stack, landing pad.
GDT_BASE: Final = PHYS_CASE_END
BOOT_CODE: Final = PHYS_CASE_END + PAGE_SIZE
BOOT_STACK_TOP: Final = PHYS_CASE_END + 3 * PAGE_SIZE
LANDING: Final = PHYS_CASE_END + 3 * PAGE_SIZE
MACHINE_END: Final = PHYS_CASE_END + 4 * PAGE_SIZE
_ZERO_PAGE: Final = bytes(PAGE_SIZE)
_UC_GPRS: Final = tuple(GPR_IDS[key] for key in sorted(GPR_IDS))
#: What _reset writes, in order (CR4 before CR0: the order the boot wrote them in).
_INITIAL_REGISTERS: Final = (
    *_UC_GPRS,
    UC_X86_REG_CR4,
    UC_X86_REG_CR0,
    UC_X86_REG_CR3,
    UC_X86_REG_EFLAGS,
    UC_X86_REG_FS_BASE,
    UC_X86_REG_GS_BASE,
    UC_X86_REG_RIP,
)
_FINAL_REGISTERS: Final = (
    *(GPR_IDS[key] for key in sorted(GPR_IDS)),
    UC_X86_REG_RIP,
    UC_X86_REG_EFLAGS,
    UC_X86_REG_CR0,
    UC_X86_REG_CR3,
    UC_X86_REG_CR4,
    UC_X86_REG_FS_BASE,
    UC_X86_REG_GS_BASE,
)


class EmulatorSelfTestError(RuntimeError):
    """Unicorn does not behave as the machine was validated against; the message says how."""


@dataclass(frozen=True)
class Watch:
    """Extra code hooks for a re-run: ``callback(run, address)`` before each listed address."""

    addresses: frozenset[int]
    callback: Callable[[CaseRun, int], None]


@dataclass(frozen=True)
class _Execution:
    """What one ``emu_start`` left behind, before interpretation."""

    run: CaseRun
    error: int | None
    vector: int | None
    seconds: float


class UnicornMachine:
    """Runs cases on Unicorn 2.1.4 with the LASS shim (an :class:`~lassfuzz.outcome.Engine`)."""

    name = "unicorn"

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        shim: bool = True,
        max_instructions: int = 10_000,
        policy_name: str | None = None,
        timeout: float | None = None,
    ) -> None:
        """``timeout`` (seconds) arms Unicorn's wall-clock timer as a safety net. It is off by
        default: the timer starts a thread per run (~100 us, four times a short case's cost),
        and ``max_instructions`` already bounds every run (REP iterations count)."""
        if max_instructions < 1:
            raise ValueError(f"max_instructions {max_instructions} must be positive")
        self.policy: Policy = BUILTIN[DEFAULT_POLICY] if policy is None else policy
        self.policy_name = policy_name or _policy_name(self.policy)
        self.shim = shim
        self.max_instructions = max_instructions
        self.timeout = timeout
        self._run: CaseRun | None = None  # None while booting: the fill hook maps identity
        self._vector: int | None = None
        self._used_frames: set[int] = set()
        self._exec_frames: set[int] = set()
        self._previous_code: tuple[int, int] | None = None
        self._uc = self._create()
        self._port = FastPort(self._uc)
        self._context_switch = ContextSwitch(self._port)
        self._contexts = self._boot()
        from lassfuzz.emulator.selftest import check_machine

        check_machine(self)

    # ------------------------------------------------------------------------- set-up

    def _create(self) -> Any:  # unicorn's x86 Uc API is untyped
        uc = _UNICORN.Uc(UC_ARCH_X86, UC_MODE_64)
        uc.ctl_set_cpu_model(UC_CPU_X86_BROADWELL)  # before mem_map: Haswell ignores SMAP
        uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL if self.shim else UC_TLB_CPU)
        uc.mem_map(0, MACHINE_END)
        uc.hook_add(UC_HOOK_INTR, self._on_interrupt)
        if self.shim:
            uc.hook_add(UC_HOOK_TLB_FILL, self._on_fill)
            uc.hook_add(UC_HOOK_BLOCK, self._on_block)
            uc.hook_add(UC_HOOK_INSN, self._on_cpuid, aux1=UC_X86_INS_CPUID)
        return uc

    def _boot(self) -> dict[tuple[str, int], Any]:
        """Enter every (mode, CPL) through real IRETQs (writing CS does not change CPL)."""
        try:
            contexts = boot_contexts(
                self._uc, gdt=GDT_BASE, code=BOOT_CODE, stack_top=BOOT_STACK_TOP, landing=LANDING
            )
        except RuntimeError as error:
            raise EmulatorSelfTestError(str(error)) from None
        if self.shim:
            # Boot counted its IRETQs with Unicorn's instruction counter (a code hook). The
            # first run without ``count`` deletes that hook, and the deletion invalidates
            # translated code through fetch fills: do it now, while the fill hook maps
            # identity, not inside a case whose shim would take the fills for the case's.
            self._uc.emu_start(LANDING, LANDING)
        return contexts

    def _switch_context(self, key: tuple[str, int]) -> None:
        """Enter the saved (mode, CPL) ``key`` mid-case, keeping the case's registers."""
        self._context_switch.switch(self._contexts[key])

    # ------------------------------------------------------------------------- hooks

    def _on_fill(self, uc: Any, address: int, access: int, entry: Any, _: object) -> bool:
        run = self._run
        if run is None:  # booting, or invalidating translated code by physical address
            if address >= MACHINE_END:
                return False
            entry.paddr = address
            entry.perms = UC_PROT_ALL
            return True
        return run.fill(address, access, entry)

    def _on_interrupt(self, uc: Any, vector: int, _: object) -> None:
        self._vector = vector
        uc.emu_stop()

    def _on_block(self, uc: Any, address: int, size: int, _: object) -> None:
        run = self._run
        if run is None:
            return
        stop = run.check_block(address)
        spent = run.entered >= self.max_instructions
        if run.new_block(address, size) and spent:
            # The budget ran out before this block: the model stops there too. A block that
            # starts within the budget and runs past it is judged by _within_budget.
            stop = Stop(Status.HANG, detail=f"budget of {self.max_instructions} instructions spent")
        if stop is not None:
            run.stop = stop
            uc.emu_stop()

    def _on_cpuid(self, uc: Any, _: object) -> int:
        assert self._run is not None
        return self._run.cpuid()

    def _on_intercept(self, address: int, size: int) -> None:
        assert self._run is not None
        self._run.intercept(address)

    # ------------------------------------------------------------------------- running

    def run(self, case: TestCase, *, trace: bool = False) -> Outcome:
        """Run ``case`` from its initial state to completion, a fault, HLT or the budget."""
        reason = _unsupported_state(case)
        if reason is not None:
            return Outcome(self.name, Status.UNSUPPORTED, detail=reason)
        try:
            image = materialize(case)
        except CaseFormatError as error:
            return Outcome(self.name, Status.UNSUPPORTED, detail=f"case layout: {error}")
        scan = prescan(
            case.code,
            case.code_address,
            _following_bytes(case, image),
            bitness=64 if case.state.mode == "64" else 32,
        )
        if case.state.system is not None:
            if not self.shim:  # descriptor tables and event delivery are the shim's work
                return Outcome(
                    self.name, Status.UNSUPPORTED, detail="system tables without the shim"
                )
            try:
                return run_system_case(self, case, image, scan, trace=trace)
            except UcError as error:
                return Outcome(self.name, Status.ERROR, detail=f"unicorn: {error}")
        try:
            execution = self._execute(case, image, scan, trace=trace)
            stop = self._interpret(case, execution)
            if _is_noncanonical_branch(stop, execution.run.bits):
                execution, stop = self._fault_at_branch(case, image, scan, stop, trace=trace)
            elif stop.fault is not None and execution.run.flags_clobbered(stop.fault.rip):
                execution = self._with_hooked_flags(case, image, scan, stop.fault.rip, trace=trace)
            stop = self._within_budget(stop, execution.run)
        except UcError as error:
            return Outcome(self.name, Status.ERROR, detail=f"unicorn: {error}")
        return self._outcome(execution, stop, image)

    def _execute(
        self,
        case: TestCase,
        image: MemoryImage,
        scan: Prescan,
        *,
        trace: bool,
        watch: Watch | None = None,
        rerun_of: CaseRun | None = None,
    ) -> _Execution:
        """Reset the machine for ``case`` and run it. A re-run of the case just run
        (``rerun_of``) restores only the frames that run wrote."""
        uc = self._uc
        run = CaseRun(
            self._port,
            case,
            image,
            scan,
            self.policy,
            self.policy_name,
            shim=self.shim,
            trace=trace,
        )
        watched = (
            {image.page_frames.get(address & ~(PAGE_SIZE - 1)) for address in watch.addresses}
            if watch
            else set()
        )
        self._reset(case, image, rerun_of, {frame for frame in watched if frame is not None})
        hooks = self._case_hooks(run, scan, trace=trace, watch=watch)
        self._run = run
        self._vector = None
        error: int | None = None
        started = time.monotonic()
        try:
            uc.emu_start(
                case.code_address,
                case.code_end,
                timeout=0 if self.timeout is None else int(self.timeout * 1_000_000),
                # Plain Unicorn has no block hook to count in: it uses Unicorn's counter.
                count=0 if self.shim else self.max_instructions,
            )
        except UcError as failure:
            error = int(getattr(failure, "errno", -1))
        finally:
            for handle in hooks:
                self._port.hook_del(handle)
            self._exec_frames |= run.exec_frames
        return _Execution(run, error, self._vector, time.monotonic() - started)

    def _reset(
        self,
        case: TestCase,
        image: MemoryImage,
        rerun_of: CaseRun | None,
        watched_frames: set[int],
    ) -> None:
        """Memory, translated code, context, registers and TLB for a fresh case."""
        uc = self._uc
        if rerun_of is not None:
            self._invalidate_code(watched_frames)
            for frame in rerun_of.written_frames:
                uc.mem_write(frame, image.frames[frame])
        else:
            self._invalidate_code()
            # With the shim the tables stay in Python (CaseRun.tables); QEMU's walk needs them.
            frames = image.frames.keys() - image.table_frames if self.shim else image.frames.keys()
            self._port.write_frames(
                {frame: _ZERO_PAGE for frame in self._used_frames - frames}
                | {frame: image.frames[frame] for frame in frames}
            )
            self._used_frames = set(frames)
        state = case.state
        # Restoring a context also clears QEMU's stale old_exception.
        uc.context_restore(self._contexts[(state.mode, state.cpl)])
        self._port.msr_write(MSR_EFER, state.efer)
        self._port.reg_write_batch(
            _INITIAL_REGISTERS,
            (
                *state.gprs,
                state.cr4,
                state.cr0,
                image.cr3,
                state.rflags,
                state.fs_base,
                state.gs_base,
                case.code_address,
            ),
        )
        uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
        self._previous_code = (case.code_address, len(case.code) + MAX_INSTRUCTION_BYTES)

    def _invalidate_code(self, frames: set[int] | None = None) -> None:
        """Drop translated code of the previous case (``mem_write`` does not invalidate TBs),
        or only of ``frames`` (a re-run's new code hooks exist only in fresh TBs).

        TBs are keyed by physical address. With the shim, the fill hook maps identity while no
        case runs, so the frames the previous case could execute are invalidated directly; plain
        Unicorn still has the previous case's paging, so its code range is invalidated linearly.
        """
        uc = self._uc
        self._run = None
        if self.shim:
            for frame in self._exec_frames if frames is None else frames:
                uc.ctl_remove_cache(frame, frame + PAGE_SIZE)
            if frames is None:
                self._exec_frames = set()
        elif self._previous_code is not None:
            address, size = self._previous_code
            uc.ctl_remove_cache(address, address + size)

    def _case_hooks(
        self,
        run: CaseRun,
        scan: Prescan,
        *,
        trace: bool,
        watch: Watch | None,
    ) -> list[int]:
        if not self.shim:
            return []
        port = self._port
        hooks = [
            port.hook_code(address, address, self._on_intercept) for address in scan.intercepts
        ]
        if watch is not None:

            def on_watched(address: int, size: int) -> None:
                watch.callback(run, address)

            hooks += [port.hook_code(address, address, on_watched) for address in watch.addresses]
        if trace:
            hooks.append(
                self._uc.hook_add(
                    UC_HOOK_MEM_READ | UC_HOOK_MEM_WRITE,
                    lambda _uc, access, address, size, value, _ud: run.on_memory(
                        access, address, size, value
                    ),
                )
            )
        return hooks

    # ------------------------------------------------------------------------- results

    def _interpret(self, case: TestCase, execution: _Execution) -> Stop:
        """Unicorn's raw ending (hook decision, refused fill, exception, error) → a Stop."""
        run = execution.run
        rip = self._uc.reg_read(UC_X86_REG_RIP)
        if run.stop is not None:
            return run.stop
        if execution.error == UC_ERR_EXCEPTION and run.refusal is not None:
            return run.fault_from_refusal(rip)
        if execution.vector is not None:
            return self._qemu_exception(execution.vector, rip)
        if execution.error == UC_ERR_INSN_INVALID:
            return Stop(Status.FAULT, Fault(VEC_UD, None, rip), detail="invalid opcode")
        if execution.error is not None:
            return Stop(Status.ERROR, detail=f"unicorn: {_UNICORN.UcError(execution.error)}")
        if rip == case.code_end:
            return Stop(Status.COMPLETED)
        if self.timeout is not None and execution.seconds >= self.timeout:
            return Stop(Status.HANG, detail=f"wall-clock timeout ({self.timeout} s)")
        return Stop(Status.HANG, detail=f"budget of {self.max_instructions} instructions spent")

    def _qemu_exception(self, vector: int, rip: int) -> Stop:
        """An exception QEMU raised itself (privileged instruction, #DE, ...): error code 0."""
        if vector == VEC_PF:
            if self.shim:
                return Stop(Status.ERROR, detail="QEMU raised #PF although the shim is the MMU")
            cr2 = self._uc.reg_read(UC_X86_REG_CR2)
            return Stop(Status.FAULT, Fault(VEC_PF, 0, rip, cr2=cr2), detail="plain Unicorn #PF")
        error_code = 0 if vector in VECTORS_WITH_ERROR_CODE else None
        return Stop(Status.FAULT, Fault(vector, error_code, rip), detail="raised by QEMU")

    def _fault_at_branch(
        self, case: TestCase, image: MemoryImage, scan: Prescan, stop: Stop, *, trace: bool
    ) -> tuple[_Execution, Stop]:
        """A branch to a non-canonical target faults *at the branch*, with no side effects;
        QEMU reports RIP = target after committing them. The block hook saw which branch ended
        the last block and how often it ran: re-run the (deterministic) case, stopping just
        before that execution of it."""
        assert stop.fault is not None and self._run is not None
        last = self._run.last_branch()
        if last is None:
            return self._execute(case, image, scan, trace=trace), Stop(
                Status.UNSUPPORTED,
                detail=f"fetch of non-canonical {stop.fault.rip:#x} without a branch",
            )
        branch, occurrence = last
        seen = 0
        target = stop.fault.rip

        def stop_at_branch(run: CaseRun, address: int) -> None:
            nonlocal seen
            if address != branch:
                return
            seen += 1
            if seen == occurrence:
                run.flags_at_hook = (address, run.uc.reg_read(UC_X86_REG_EFLAGS))
                fault = Fault(VEC_GP, 0, branch, access="fetch", address=target)
                detail = f"branch to non-canonical {target:#x}"
                run.stop = Stop(Status.FAULT, fault, detail=detail)
                run.uc.emu_stop()

        watch = Watch(frozenset({branch}), stop_at_branch)
        execution = self._execute(case, image, scan, trace=trace, watch=watch, rerun_of=self._run)
        assert execution.run.stop is not None
        return execution, execution.run.stop

    def _with_hooked_flags(
        self, case: TestCase, image: MemoryImage, scan: Prescan, rip: int, *, trace: bool
    ) -> _Execution:
        """Re-run the (deterministic) case with a code hook on the instruction at ``rip``,
        whose fault left RFLAGS clobbered (:meth:`CaseRun.flags_clobbered`): the hook reads
        RFLAGS before each execution of it, and the last read is the value at the fault."""

        def record(run: CaseRun, address: int) -> None:
            run.flags_at_hook = (address, run.uc.reg_read(UC_X86_REG_EFLAGS))

        watch = Watch(frozenset({rip}), record)
        return self._execute(case, image, scan, trace=trace, watch=watch, rerun_of=self._run)

    def _within_budget(self, stop: Stop, run: CaseRun) -> Stop:
        """The block hook stops a run at the first block that starts past the budget, so the
        last block may have run past it: an ending there came after the budget ran out.
        The model checks the budget before each instruction, so a fault needs fewer than
        ``max_instructions`` instructions before it, completion or HLT at most that many."""
        if not self.shim:
            return stop  # Unicorn's own counter stopped it exactly
        if stop.status is Status.FAULT:
            limit = self.max_instructions - 1
        elif stop.status in (Status.COMPLETED, Status.HALTED):
            limit = self.max_instructions
        else:
            return stop
        if run.executed(_stop_rip(stop)) > limit:
            return Stop(Status.HANG, detail=f"budget of {self.max_instructions} instructions spent")
        return stop

    def _outcome(self, execution: _Execution, stop: Stop, image: MemoryImage) -> Outcome:
        port = self._port
        values = port.reg_read_batch(_FINAL_REGISTERS)
        gprs = values[:16]
        rip, rflags, cr0, cr3, cr4, fs_base, gs_base = values[16:]
        if stop.fault is not None:
            rflags = execution.run.rflags_at_fault(stop.fault.rip, rflags)
        registers = Registers(
            gprs=gprs,
            rip=stop.rip if stop.rip is not None else rip,
            rflags=rflags,
            cr0=cr0,
            cr3=cr3,
            cr4=cr4,
            efer=port.msr_read(MSR_EFER),
            cpl=execution.run.cpl,
            fs_base=fs_base,
            gs_base=gs_base,
        )
        run = execution.run
        tables: Mapping[int, bytearray] = run.tables if self.shim else {}
        # Without the shim's grant (or its own store) QEMU cannot write a frame.
        written: Collection[int] = run.written_frames if self.shim else image.frames.keys()
        emulated = port.read_frames(frame for frame in image.frames if frame in written)
        memory = {
            frame: bytes(tables[frame])
            if frame in tables
            else emulated.get(frame, image.frames[frame])
            for frame in image.frames
        }
        if stop.status is Status.HANG:
            instructions = self.max_instructions
        else:
            instructions = execution.run.executed(_stop_rip(stop)) if self.shim else 0
        return Outcome(
            engine=self.name,
            status=stop.status,
            registers=registers,
            fault=stop.fault,
            memory=memory,
            trace=execution.run.final_trace(None if stop.fault is None else stop.fault.rip),
            instructions=instructions,
            detail=stop.detail,
        )


def _stop_rip(stop: Stop) -> int | None:
    """Where a run stopped, for counting: the faulting instruction, or past the HLT."""
    return stop.fault.rip if stop.fault is not None else stop.rip


def _policy_name(policy: Policy) -> str:
    for name, builtin in BUILTIN.items():
        if builtin is policy:
            return name
    module = getattr(policy, "__module__", "?")
    return f"{module}:{getattr(policy, '__qualname__', repr(policy))}"


def _unsupported_state(case: TestCase) -> str | None:
    """Initial states the machine does not model (docs/machine.md)."""
    state = case.state
    supported_cr4 = SUPPORTED_CR4 | CR4_LA57 | (CR4_LASS if state.lass_supported else 0)
    if state.cr4 & ~supported_cr4 or not state.cr4 & CR4_PAE:
        return f"initial CR4 {state.cr4:#x} has unsupported bits or lacks PAE"
    if state.cr0 & CR0_AM:
        return "CR0.AM = 1 (alignment checking is not modelled)"
    if not state.cr0 & CR0_PG or not state.cr0 & CR0_PE or state.cr0 >> 32:
        return f"initial CR0 {state.cr0:#x} is not a paged protected-mode value"
    if state.efer & (EFER_LME | EFER_LMA) != EFER_LME | EFER_LMA:
        return f"initial EFER {state.efer:#x} is not long mode"
    if state.rflags & RFLAGS_TF:
        return "RFLAGS.TF = 1 (single-step is not modelled)"
    if not is_canonical(case.code_address, 57 if state.la57 else 48):
        return f"code address {case.code_address:#x} is not canonical"
    return None


def _following_bytes(case: TestCase, image: MemoryImage) -> bytes:
    """The image bytes right after the code (an instruction may run past ``code_end``)."""
    end = case.code_end
    page = end & ~(PAGE_SIZE - 1)
    frame = image.page_frames.get(page)
    if frame is None:
        return b""
    offset = end - page
    return bytes(image.frames[frame][offset : offset + MAX_INSTRUCTION_BYTES])


def _is_noncanonical_branch(stop: Stop, bits: int) -> bool:
    fault = stop.fault
    return (
        fault is not None
        and fault.vector == VEC_GP
        and fault.access == "fetch"
        and not is_canonical(fault.rip, bits)
    )
