"""The reference model engine: runs a case on the lassfuzz virtual CPU (docs/machine.md).

Fetch -> decode (cached) -> plan -> commit, one instruction (or REP iteration) at a time, with
the end conditions of docs/machine.md "Running a case" checked before every instruction. In a
case with descriptor tables, exceptions and INT n are delivered through the IDT
(lassfuzz.model.events) and the case continues in the handler.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Final

from lassfuzz.arch import (
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    EFER_SCE,
    MASK64,
    PAGE_MASK,
    PAGE_SIZE,
    RFLAGS_AC,
    RFLAGS_DF,
    RFLAGS_FIXED1,
    RFLAGS_ID,
    RFLAGS_IF,
    RFLAGS_IOPL,
    RFLAGS_NT,
    RFLAGS_RF,
    RFLAGS_STATUS,
    RFLAGS_TF,
    RFLAGS_VIF,
    RFLAGS_VIP,
    RFLAGS_VM,
)
from lassfuzz.case import CaseFormatError, State, TestCase, materialize
from lassfuzz.model.decode import Decoded, InstructionDecoder, NeedMoreBytes
from lassfuzz.model.descriptors import boot
from lassfuzz.model.events import Delivery, Event
from lassfuzz.model.faults import CpuFault, Halted, SoftwareInterrupt, Unsupported
from lassfuzz.model.instructions import Plan, compile_plan, cr0_problem, cr4_allowed
from lassfuzz.model.memory import MAX_INSTRUCTION_LENGTH, LinearMemory, is_canonical
from lassfuzz.model.observe import Observer
from lassfuzz.model.physical import PhysicalMemory
from lassfuzz.model.state import Cpu
from lassfuzz.outcome import Fault, Outcome, Status

if TYPE_CHECKING:
    import iced_x86 as iced

#: RFLAGS bits that exist (SDM Vol. 1 3.4.3); the others are reserved.
_RFLAGS_DEFINED: Final = (
    RFLAGS_STATUS | RFLAGS_FIXED1 | RFLAGS_TF | RFLAGS_IF | RFLAGS_DF | RFLAGS_IOPL | RFLAGS_NT
    | RFLAGS_RF | RFLAGS_VM | RFLAGS_AC | RFLAGS_VIF | RFLAGS_VIP | RFLAGS_ID
)  # fmt: skip
_EFER_SUPPORTED: Final = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE
#: Decode caches are dropped when they grow past this many entries (bounded memory overnight).
_CACHE_LIMIT: Final = 100_000

_Entry = tuple[Decoded, Plan] | str


class ReferenceModel:
    """An independent interpreter of the lassfuzz virtual CPU, written from the SDM."""

    name = "model"

    def __init__(self, *, max_instructions: int = 10_000, observer: Observer | None = None) -> None:
        if max_instructions < 0:
            raise ValueError(f"max_instructions must be >= 0, got {max_instructions}")
        self.max_instructions = max_instructions
        #: Told of every instruction and LASS-checked access (lassfuzz.model.observe).
        self.observer = observer
        self._decoder = InstructionDecoder()
        # Per code bitness (64, 32): fetch windows (up to 15 bytes at RIP) and exact
        # instruction bytes -> plan or the reason it is unsupported. Plans do not depend on RIP
        # (decode.py), so both are shared by every case this model runs.
        self._caches: dict[int, tuple[dict[bytes, _Entry], dict[bytes, _Entry]]] = {
            64: ({}, {}),
            32: ({}, {}),
        }

    def run(self, case: TestCase, *, trace: bool = False) -> Outcome:
        """Run ``case``; any failure of the model itself becomes Status.ERROR, not a raise.

        LASS.md §7 open point 1: when an event-delivery push was made where treating it as an
        implicit access changes the answer (supervisor, CR4.SMAP = 1, RFLAGS.AC = 1), the case
        is run again with implicit pushes and that outcome, if different, is an alternative.
        """
        try:
            outcome, ambiguous = self._run(case, trace, self.observer, implicit_pushes=False)
            if ambiguous:
                other, _ = self._run(case, trace, None, implicit_pushes=True)
                if _comparable(other) != _comparable(outcome):
                    note = "open point: event-delivery pushes as implicit accesses"
                    alternative = replace(other, detail=f"{other.detail} ({note})")
                    outcome = replace(outcome, alternatives=(*outcome.alternatives, alternative))
            return outcome
        except Exception as error:  # the engine's own bug: report it, never crash a campaign
            return Outcome(
                engine=self.name,
                status=Status.ERROR,
                detail=f"reference model failed: {type(error).__name__}: {error}",
            )

    def _run(
        self, case: TestCase, trace: bool, observer: Observer | None, *, implicit_pushes: bool
    ) -> tuple[Outcome, bool]:
        """One run: the outcome, and whether it reached LASS.md §7 open point 1."""
        try:
            image = materialize(case)
        except CaseFormatError as error:
            return self._unsupported(f"case layout: {error}"), False
        problem = unsupported_state(case.state)
        if problem:
            return self._unsupported(f"initial state: {problem}"), False
        cpu = Cpu(case.state, rip=case.code_address, cr3=image.cr3)
        phys = PhysicalMemory(image.frames)
        if cpu.system is not None:
            problem = boot(cpu, phys, case.state)
            if problem:
                return self._unsupported(f"initial state: descriptor tables: {problem}"), False
        mem = LinearMemory(cpu, phys, trace=trace, observer=observer)
        delivery = Delivery(implicit_pushes=implicit_pushes)
        end = case.code_end
        budget = self.max_instructions
        count = 0
        status = Status.COMPLETED
        fault: CpuFault | None = None
        while True:
            rip = cpu.rip
            if rip == end:
                break
            if count >= budget:
                status = Status.HANG
                break
            try:
                decoded, plan = self._fetch(mem, rip)
                if observer is not None:
                    observer.instruction(decoded)
                cpu.rip = plan(cpu, mem, rip, (rip + decoded.length) & cpu.ip_mask)
            except CpuFault as raised:
                mem.discard()
                cpu.rip = rip
                if cpu.system is None:  # no IDT: the fault ends the case
                    status, fault = Status.FAULT, raised
                    break
                if raised.wrapped_fetch:
                    # The saved RIP is LASS.md §7's open point, and the handler's run depends
                    # on it: no single outcome to tolerate alternatives of.
                    note = "open point: RIP of a fetch wrapping past 2^64, delivered by the IDT"
                    return self._unsupported(note, instructions=count), False
                event = Event.from_fault(raised, rip)
            except SoftwareInterrupt as interrupt:
                count += 1
                event = Event(interrupt.vector, None, interrupt.return_rip, rip, software=True,
                              reason=f"INT {interrupt.vector:#x}")  # fmt: skip
            except Halted:
                mem.commit()
                count += 1
                status = Status.HALTED
                break
            except Unsupported as error:
                return self._unsupported(str(error), instructions=count), False
            else:
                mem.commit()
                count += 1
                continue
            try:
                ended = delivery.raise_event(cpu, mem, event)
            except Unsupported as error:
                return self._unsupported(str(error), instructions=count), False
            if ended is not None:
                status = ended
                break
        outcome = Outcome(
            engine=self.name,
            status=status,
            registers=cpu.registers(),
            fault=None if fault is None else _fault(fault, cpu.rip),
            memory=phys.snapshot(),
            trace=None if mem.trace is None else tuple(mem.trace),
            undefined_flags=cpu.undefined,
            instructions=count,
            detail=fault.reason if fault is not None else "; ".join(delivery.reasons),
            events=tuple(delivery.events),
        )
        if fault is not None and fault.wrapped_fetch:
            # LASS.md §7: which RIP a fetch wrapping past 2^64 reports is open; tolerate the
            # wrapped address (0) as well as the instruction's first byte.
            assert outcome.registers is not None and outcome.fault is not None
            alternative = replace(
                outcome,
                registers=replace(outcome.registers, rip=0),
                fault=replace(outcome.fault, rip=0),
                detail=f"{fault.reason} (open point: RIP of a fetch wrapping past 2^64)",
            )
            outcome = replace(outcome, alternatives=(alternative,))
        return outcome, delivery.ambiguous

    def _unsupported(self, detail: str, *, instructions: int = 0) -> Outcome:
        return Outcome(
            engine=self.name, status=Status.UNSUPPORTED, detail=detail, instructions=instructions
        )

    def _fetch(self, mem: LinearMemory, rip: int) -> tuple[Decoded, Plan]:
        """Fetch and decode the instruction at ``rip``. Its bytes are fetched page by page:
        the next page is checked only if the instruction continues onto it."""
        frame = mem.fetch_page(rip)
        offset = rip & ~PAGE_MASK
        window = bytes(frame[offset : offset + MAX_INSTRUCTION_LENGTH])
        bitness = 64 if mem.cpu.cs_l else 32
        try:
            entry = self._lookup(window, bitness)
        except NeedMoreBytes:
            next_page = (rip + PAGE_SIZE - offset) & MASK64
            if next_page > mem.cpu.ip_mask:
                raise Unsupported(
                    f"instruction at {rip:#x} wraps past 2^32 in 32-bit code"
                ) from None
            try:
                following = mem.fetch_page(next_page)
            except CpuFault as fault:
                fault.wrapped_fetch = next_page == 0
                raise
            window += bytes(following[: MAX_INSTRUCTION_LENGTH - len(window)])
            entry = self._lookup(window, bitness)
        if isinstance(entry, str):
            raise Unsupported(f"{entry} at {rip:#x}")
        return entry

    def _lookup(self, window: bytes, bitness: int) -> _Entry:
        windows, plans = self._caches[bitness]
        entry = windows.get(window)
        if entry is None:
            try:
                raw, instruction = self._decoder.instruction_at(window, bitness)
            except Unsupported as error:
                entry = f"unsupported: {error}"
            else:
                # The description and plan depend on the instruction's bytes alone, so every
                # window that starts with them shares them.
                entry = plans.get(raw)
                if entry is None:
                    entry = self._plan(raw, instruction, bitness)
                    _remember(plans, raw, entry)
            _remember(windows, window, entry)
        return entry

    def _plan(self, raw: bytes, instruction: iced.Instruction | None, bitness: int) -> _Entry:
        """Describe and compile one instruction, or say why it is unsupported."""
        try:
            decoded = self._decoder.describe(raw, instruction, bitness)
        except Unsupported as error:
            return f"unsupported: {error}"
        try:
            return decoded, compile_plan(decoded)
        except Unsupported as error:
            name = f"'{decoded.text}' ({decoded.raw.hex(' ')})"
            return f"unsupported instruction {name}: {error}"


def _comparable(outcome: Outcome) -> Outcome:
    """What two interpretations of an open point must share to be the same answer."""
    return replace(outcome, detail="", alternatives=(), instructions=0)


def _remember(cache: dict[bytes, _Entry], key: bytes, entry: _Entry) -> None:
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[key] = entry


def _fault(fault: CpuFault, rip: int) -> Fault:
    return Fault(
        vector=fault.vector,
        error_code=fault.error_code,
        rip=rip,
        cr2=fault.cr2,
        access=fault.access,
        address=fault.address,
    )


def unsupported_state(state: State) -> str | None:
    """Why the model cannot start from ``state`` (docs/machine.md), or None."""
    if state.system is not None and not is_canonical(state.system.lstar, state.la57):
        return f"LSTAR {state.system.lstar:#x} is not canonical (WRMSR would refuse it)"
    if state.rflags & ~_RFLAGS_DEFINED or not state.rflags & RFLAGS_FIXED1:
        return f"RFLAGS {state.rflags:#x} has reserved bits wrong"
    for bit, name in ((RFLAGS_TF, "TF"), (RFLAGS_VM, "VM"), (RFLAGS_RF, "RF")):
        if state.rflags & bit:
            return f"RFLAGS.{name} set (not modelled)"
    cr0 = cr0_problem(state.cr0)
    if cr0 is not None:
        return cr0[1]
    bad = state.cr4 & ~cr4_allowed(state.lass_supported)
    if bad:
        return f"CR4 {state.cr4:#x} has unsupported bit(s) {bad:#x}"
    if not state.cr4 & CR4_PAE:
        return "CR4.PAE clear (64-bit mode needs PAE)"
    if state.efer & ~_EFER_SUPPORTED or state.efer & (EFER_LME | EFER_LMA) != EFER_LME | EFER_LMA:
        return f"EFER {state.efer:#x}: needs LME and LMA, and only SCE/NXE besides"
    for name, base in (("fs_base", state.fs_base), ("gs_base", state.gs_base)):
        if not is_canonical(base, state.la57):
            return f"{name} {base:#x} is not canonical"
    return None
