"""The reference model engine: runs a case on the lassfuzz virtual CPU (docs/machine.md).

Fetch -> decode (cached) -> plan -> commit, one instruction (or REP iteration) at a time, with
the end conditions of docs/machine.md "Running a case" checked before every instruction.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Final

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
from lassfuzz.model.faults import CpuFault, Halted, Unsupported
from lassfuzz.model.instructions import Plan, compile_plan, cr0_problem, cr4_allowed
from lassfuzz.model.memory import MAX_INSTRUCTION_LENGTH, LinearMemory, is_canonical
from lassfuzz.model.physical import PhysicalMemory
from lassfuzz.model.state import Cpu
from lassfuzz.outcome import Fault, Outcome, Status

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

    def __init__(self, *, max_instructions: int = 10_000) -> None:
        if max_instructions < 0:
            raise ValueError(f"max_instructions must be >= 0, got {max_instructions}")
        self.max_instructions = max_instructions
        self._decoder = InstructionDecoder()
        # Fetch windows (up to 15 bytes at RIP) and exact instruction bytes -> plan or the
        # reason it is unsupported. Plans do not depend on RIP (decode.py), so both are shared
        # by every case this model runs.
        self._windows: dict[bytes, _Entry] = {}
        self._plans: dict[bytes, _Entry] = {}

    def run(self, case: TestCase, *, trace: bool = False) -> Outcome:
        """Run ``case``; any failure of the model itself becomes Status.ERROR, not a raise."""
        try:
            return self._run(case, trace)
        except Exception as error:  # the engine's own bug: report it, never crash a campaign
            return Outcome(
                engine=self.name,
                status=Status.ERROR,
                detail=f"reference model failed: {type(error).__name__}: {error}",
            )

    def _run(self, case: TestCase, trace: bool) -> Outcome:
        try:
            image = materialize(case)
        except CaseFormatError as error:
            return self._unsupported(f"case layout: {error}")
        problem = unsupported_state(case.state)
        if problem:
            return self._unsupported(f"initial state: {problem}")
        cpu = Cpu(case.state, rip=case.code_address, cr3=image.cr3)
        phys = PhysicalMemory(image.frames)
        mem = LinearMemory(cpu, phys, trace=trace)
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
                cpu.rip = plan(cpu, mem, rip, (rip + decoded.length) & MASK64)
            except CpuFault as raised:
                mem.discard()
                cpu.rip = rip
                status, fault = Status.FAULT, raised
                break
            except Halted:
                mem.commit()
                count += 1
                status = Status.HALTED
                break
            except Unsupported as error:
                return self._unsupported(str(error), instructions=count)
            mem.commit()
            count += 1
        outcome = Outcome(
            engine=self.name,
            status=status,
            registers=cpu.registers(),
            fault=None if fault is None else _fault(fault, cpu.rip),
            memory=phys.snapshot(),
            trace=None if mem.trace is None else tuple(mem.trace),
            undefined_flags=cpu.undefined,
            instructions=count,
            detail="" if fault is None else fault.reason,
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
        return outcome

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
        try:
            entry = self._lookup(window)
        except NeedMoreBytes:
            next_page = (rip + PAGE_SIZE - offset) & MASK64
            try:
                following = mem.fetch_page(next_page)
            except CpuFault as fault:
                fault.wrapped_fetch = next_page == 0
                raise
            window += bytes(following[: MAX_INSTRUCTION_LENGTH - len(window)])
            entry = self._lookup(window)
        if isinstance(entry, str):
            raise Unsupported(f"{entry} at {rip:#x}")
        return entry

    def _lookup(self, window: bytes) -> _Entry:
        entry = self._windows.get(window)
        if entry is None:
            try:
                decoded = self._decoder.decode(window)
            except Unsupported as error:
                entry = f"unsupported: {error}"
            else:
                entry = self._plans.get(decoded.raw)
                if entry is None:
                    try:
                        entry = (decoded, compile_plan(decoded))
                    except Unsupported as error:
                        name = f"'{decoded.text}' ({decoded.raw.hex(' ')})"
                        entry = f"unsupported instruction {name}: {error}"
                    _remember(self._plans, decoded.raw, entry)
            _remember(self._windows, window, entry)
        return entry


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
        if not is_canonical(base):
            return f"{name} {base:#x} is not canonical"
    return None
