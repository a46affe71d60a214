"""Far JMP/CALL through memory, 64-bit call gates and far RET, done by the shim for cases with
descriptor tables (docs/machine.md, "Event delivery": far transfers).

QEMU would load CS itself, reading descriptors through a TLB that cannot mark them implicit, and
a CPL or mode change needs a context switch anyway, so these are emulated like IRETQ: checks
first (descriptor reads implicit, the memory operand and stack accesses explicit), then a
:class:`~lassfuzz.emulator.events.Transition` the run loop applies. Forms outside the contract
(direct far pointers, 16-bit operands, call gates from compatibility mode, conforming targets)
answer UNSUPPORTED.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import iced_x86 as iced
from iced_x86 import Code
from unicorn.x86_const import UC_X86_REG_EFLAGS, UC_X86_REG_RSP

from lassfuzz.arch import MASK64, VEC_GP, VEC_NP
from lassfuzz.emulator.decode import memory_accesses
from lassfuzz.emulator.descriptors import TYPE_ACCESSED, TYPE_CALL_GATE, Descriptor
from lassfuzz.emulator.events import Events, Transition, check_target
from lassfuzz.emulator.memory import SystemUnsupported, gp
from lassfuzz.emulator.system import is_null, selector_fault

if TYPE_CHECKING:
    from lassfuzz.emulator.shim import CaseRun

_MASK32: Final = 0xFFFF_FFFF
#: Far forms by code: (kind, operand size in bytes, mode it is valid in).
_FORMS: Final = {
    Code.JMP_M1664: ("jmp", 8, None),
    Code.JMP_M1632: ("jmp", 4, None),
    Code.CALL_M1664: ("call", 8, "64"),
    Code.CALL_M1632: ("call", 4, "compat"),
    Code.RETFQ: ("ret", 8, "64"),
    Code.RETFQ_IMM16: ("ret", 8, "64"),
    Code.RETFD: ("ret", 4, "compat"),
    Code.RETFD_IMM16: ("ret", 4, "compat"),
}


def is_far_transfer(instruction: iced.Instruction) -> bool:
    """Whether ``instruction`` is one of the far forms this module emulates (or refuses)."""
    return instruction.code in _FORMS


class FarTransfers:
    """Far JMP/CALL/RET for one run, on top of its :class:`Events`."""

    def __init__(self, events: Events) -> None:
        self.events = events
        self.run: CaseRun = events.run
        self.system = events.system
        self.memory = events.memory

    def execute(self, instruction: iced.Instruction) -> Transition:
        kind, size, mode = _FORMS[instruction.code]
        current = "64" if self.run.cs_l else "compat"
        if mode is not None and mode != current:
            raise SystemUnsupported(f"{instruction} at {instruction.ip:#x} in {current} mode")
        if kind == "ret":
            return self._ret(instruction, size)
        (operand,) = (
            access
            for access in memory_accesses(instruction, self.run.register, self.run.segment_base)
            if access.kind == "read"
        )
        pointer = self.memory.read(
            operand.address, size + 2, instruction.ip, implicit=False, stack=operand.stack
        )
        offset, selector = pointer & ((1 << (8 * size)) - 1), (pointer >> (8 * size)) & 0xFFFF
        return self._transfer(instruction, kind, size, offset, selector)

    # ----------------------------------------------------------------------------- JMP / CALL

    def _transfer(
        self, instruction: iced.Instruction, kind: str, size: int, offset: int, selector: int
    ) -> Transition:
        run, system = self.run, self.system
        rip = instruction.ip
        if is_null(selector):
            raise gp(0, rip, f"far {kind} to a null selector")
        found = system.read_descriptor(selector, rip)
        assert found is not None
        descriptor, address = found
        if not descriptor.s:
            if descriptor.type != TYPE_CALL_GATE:
                raise selector_fault(VEC_GP, selector, rip, f"far {kind}: not code or a gate")
            return self._through_gate(instruction, kind, selector, descriptor, address)
        if not descriptor.code:
            raise selector_fault(VEC_GP, selector, rip, f"far {kind} to a data segment")
        if descriptor.conforming:
            raise SystemUnsupported(f"far {kind} to conforming code segment {selector:#x}")
        if selector & 3 > run.cpl or descriptor.dpl != run.cpl:
            raise selector_fault(VEC_GP, selector, rip, f"far {kind}: privilege check")
        if not descriptor.present:
            raise selector_fault(VEC_NP, selector, rip, f"far {kind}: CS not present")
        mode = _code_mode(descriptor, selector)
        check_target(offset, mode, run.bits, rip, f"far {kind}")
        cs = (selector & 0xFFFC) | run.cpl
        rsp = run.uc.reg_read(UC_X86_REG_RSP)
        if kind == "call":
            rsp = self._push(rsp, (system.selectors["cs"], instruction.next_ip), size, run.cpl, rip)
        system.set_type_bit(descriptor, address, TYPE_ACCESSED, rip)
        system.selectors["cs"], system.hidden["cs"] = cs, descriptor
        return Transition(run.cpl, mode, offset, rsp, run.uc.reg_read(UC_X86_REG_EFLAGS))

    def _through_gate(
        self,
        instruction: iced.Instruction,
        kind: str,
        gate_selector: int,
        low: Descriptor,
        address: int,
    ) -> Transition:
        """A 64-bit call gate (SDM Vol. 3A 5.8.6): checks, stack switch for an inner CALL."""
        run, system = self.run, self.system
        rip = instruction.ip
        if not run.cs_l:
            raise SystemUnsupported(f"call gate {gate_selector:#x} from compatibility mode")
        gate = system.read_upper(low, address, rip)
        if not gate.upper_type_ok() or gate.dpl < max(run.cpl, gate_selector & 3):
            raise selector_fault(VEC_GP, gate_selector, rip, f"far {kind}: gate checks")
        if not gate.present:
            raise selector_fault(VEC_NP, gate_selector, rip, f"far {kind}: gate not present")
        selector = gate.gate_selector
        if is_null(selector):
            raise gp(0, rip, f"far {kind}: gate with a null code selector")
        found = system.read_descriptor(selector, rip)
        assert found is not None
        code, code_address = found
        if not code.code:
            raise selector_fault(VEC_GP, selector, rip, f"far {kind}: gate target not code")
        if code.conforming:
            raise SystemUnsupported(f"call gate to conforming code segment {selector:#x}")
        if code.dpl > run.cpl or (kind == "jmp" and code.dpl != run.cpl):
            raise selector_fault(VEC_GP, selector, rip, f"far {kind}: gate target privilege")
        if not code.present:
            raise selector_fault(VEC_NP, selector, rip, f"far {kind}: gate target not present")
        if not code.long or code.default32:
            raise selector_fault(VEC_GP, selector, rip, f"far {kind}: gate target not 64-bit")
        target = gate.gate_offset
        check_target(target, "64", run.bits, rip, f"far {kind}")
        new_cpl = code.dpl
        rsp = run.uc.reg_read(UC_X86_REG_RSP)
        if kind == "call":
            words: tuple[int, ...] = (system.selectors["cs"], instruction.next_ip)
            if new_cpl < run.cpl:
                words = (system.selectors["ss"], rsp, *words)
                rsp = self.events.tss_read(4 + 8 * new_cpl, rip, 0)  # not aligned
            rsp = self._push(rsp, words, 8, new_cpl, rip)
        system.set_type_bit(code, code_address, TYPE_ACCESSED, rip)
        if new_cpl < run.cpl:
            system.selectors["ss"], system.hidden["ss"] = new_cpl, None
        system.selectors["cs"], system.hidden["cs"] = (selector & 0xFFFC) | new_cpl, code
        return Transition(new_cpl, "64", target, rsp, run.uc.reg_read(UC_X86_REG_EFLAGS))

    def _push(self, rsp: int, words: tuple[int, ...], size: int, cpl: int, rip: int) -> int:
        """Push ``words`` (first pushed first) at ``cpl``: explicit stack writes, all checked
        before any is stored. Returns the new RSP."""
        run = self.run
        mask = MASK64 if run.cs_l else _MASK32
        saved = run.cpl
        run.cpl = cpl
        prepared = []
        try:
            for index in range(len(words)):
                address = (rsp - size * (index + 1)) & mask
                pieces = self.memory.prepare_write(address, size, rip, implicit=False, stack=True)
                prepared.append((address, pieces))
        finally:
            run.cpl = saved
        for (address, pieces), word in zip(prepared, words, strict=True):
            self.memory.commit_write(pieces, address, word, size, rip, implicit=False)
        return (rsp - size * len(words)) & mask

    # ----------------------------------------------------------------------------- RET far

    def _ret(self, instruction: iced.Instruction, size: int) -> Transition:
        """RET far [imm16]: pop RIP and CS; to an outer level also RSP and SS, after releasing
        imm16 bytes, which are released again from the new stack (SDM RET)."""
        run = self.run
        rip = instruction.ip
        release = instruction.immediate16 if instruction.op_count else 0
        mask = MASK64 if run.cs_l else _MASK32
        rsp = run.uc.reg_read(UC_X86_REG_RSP)
        popped = self.memory.read(rsp, 2 * size, rip, implicit=False, stack=True)
        word = (1 << (8 * size)) - 1
        new_rip, cs = popped & word, (popped >> (8 * size)) & 0xFFFF
        rsp = (rsp + 2 * size + release) & mask
        ss: int | None = None
        if cs & 3 > run.cpl:
            outer = self.memory.read(rsp, 2 * size, rip, implicit=False, stack=True)
            new_rsp, ss = outer & word, (outer >> (8 * size)) & 0xFFFF
        target = self.events.check_return(rip, cs, ss, new_rip, "RET far")
        if target.code.conforming:
            raise SystemUnsupported(f"RET far to conforming code segment {cs:#x}")
        self.events.commit_return(target, rip)
        if ss is not None:
            rsp = (new_rsp + release) & (MASK64 if target.mode == "64" else _MASK32)
        return Transition(target.cpl, target.mode, new_rip, rsp, run.uc.reg_read(UC_X86_REG_EFLAGS))


def _code_mode(code: Descriptor, selector: int) -> str:
    if code.long:
        return "64"
    if code.default32 and code.flat:
        return "compat"
    raise SystemUnsupported(f"far transfer to 16-bit or non-flat code segment {selector:#x}")
