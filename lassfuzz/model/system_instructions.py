"""Semantics of the system instructions that use descriptor tables or change privilege:
MOV/POP Sreg, LAR/LSL/VERR/VERW, LGDT/LIDT/LTR/LLDT, SGDT/SIDT/SLDT/STR, INT n/INT3, IRETQ,
far JMP/CALL/RET and call gates, SYSCALL/SYSRET (docs/machine.md "System level"). Comments cite
the SDM Vol. 2 instruction page unless they say otherwise.

They need a case's descriptor tables (``State.system``); without them they are unsupported,
since the selectors and tables they work on do not exist. Plans follow the convention of
lassfuzz.model.instructions: every check before the first register write.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from lassfuzz.arch import (
    EFER_SCE,
    MASK64,
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
    RFLAGS_ZF,
    RSP,
    VEC_BP,
    VEC_GP,
    VEC_NP,
    VEC_SS,
)
from lassfuzz.model.decode import Decoded, Imm, Mem, Reg, SegReg
from lassfuzz.model.descriptors import (
    NO_TABLE,
    TYPE_CALL_GATE,
    TYPE_LDT,
    TYPE_TSS_AVAILABLE,
    TYPE_TSS_BUSY,
    Descriptor,
    canonical_base,
    descriptor_address,
    fetch_segment,
    is_null,
    load_data_segment,
    load_stack_segment,
    read_descriptor,
    read_implicit,
    read_tss,
    read_upper,
    selector_error,
    set_type_bit,
)
from lassfuzz.model.faults import (
    CpuFault,
    SoftwareInterrupt,
    Unsupported,
    general_protection,
    invalid_opcode,
)
from lassfuzz.model.lass import Kind
from lassfuzz.model.memory import LinearMemory, is_canonical
from lassfuzz.model.operands import MemSlot, RegSlot, Slot, pop, push, write_register
from lassfuzz.model.state import (
    CS,
    DS,
    ES,
    FS,
    GS,
    LDTR,
    MASK32,
    SEGMENT_INDEX,
    SS,
    TR,
    Cpu,
    SystemState,
)

Plan = Callable[[Cpu, LinearMemory, int, int], int]
_RCX: Final = 1
_R11: Final = 11
#: SYSRET loads RFLAGS from R11 masked like this, with bit 1 set (SDM Vol. 2 SYSRET).
_SYSRET_RFLAGS: Final = 0x3C_7FD7


class Shape(Exception):
    """The operands are not a form modelled here (the caller names the instruction)."""


def _system(cpu: Cpu, d: Decoded, rip: int) -> SystemState:
    """The case's descriptor tables, or Unsupported: without them these instructions have
    nothing to work on (docs/machine.md, lassfuzz.case.System)."""
    system = cpu.system
    if system is None:
        raise Unsupported(f"{d.describe(rip)} needs descriptor tables (State.system)")
    return system


def _source16(op: object) -> Slot:
    """A selector source: the low 16 bits of a register, or a 16-bit memory operand."""
    if isinstance(op, Reg):
        return RegSlot(op)
    if isinstance(op, Mem):
        return MemSlot(op, 2)
    raise Shape(f"selector operand {op}")


def _read16(source: Slot, cpu: Cpu, mem: LinearMemory, rip: int) -> int:
    return source.get(cpu, mem, source.locate(cpu, mem, rip, Kind.READ)) & 0xFFFF


def _set_zf(cpu: Cpu, value: bool) -> None:
    """LAR/LSL/VERR/VERW write ZF only."""
    cpu.rflags = (cpu.rflags & ~RFLAGS_ZF) | (RFLAGS_ZF if value else 0)
    cpu.undefined &= ~RFLAGS_ZF


def _store_selector(op: object) -> Callable[[Cpu, LinearMemory, int, int], None]:
    """SLDT/STR/MOV r/m, Sreg: a register gets the selector zero-extended to its size (16-bit
    registers keep their upper bits); memory gets 16 bits (an explicit write)."""
    if isinstance(op, Reg):
        index, size = op.index, op.size

        def to_register(cpu: Cpu, mem: LinearMemory, rip: int, value: int) -> None:
            write_register(cpu, index, 0, size, value)

        return to_register
    if isinstance(op, Mem):
        target = MemSlot(op, 2)

        def to_memory(cpu: Cpu, mem: LinearMemory, rip: int, value: int) -> None:
            target.put(cpu, mem, target.locate(cpu, mem, rip, Kind.WRITE), value)

        return to_memory
    raise Shape(f"destination {op}")


# ---- segment registers -----------------------------------------------------------------------


def mov_segment(d: Decoded) -> Plan:
    """MOV Sreg, r/m16 loads a segment register (SS, DS, ES, FS, GS; CS is #UD) through the
    descriptor checks of lassfuzz.model.descriptors; MOV r/m, Sreg stores the selector."""
    a, b = d.operands
    if isinstance(a, SegReg):
        name = a.name
        source = _source16(b)

        def load(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
            _system(cpu, d, rip)
            if name == "cs":
                raise invalid_opcode("MOV CS, r/m16")
            _load_segment(cpu, mem, name, _read16(source, cpu, mem, rip))
            return next_rip

        return load
    if not isinstance(b, SegReg):
        raise Shape("MOV segment operands")
    index = SEGMENT_INDEX[b.name]
    store = _store_selector(a)

    def save(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        store(cpu, mem, rip, _system(cpu, d, rip).selectors[index])
        return next_rip

    return save


def _load_segment(cpu: Cpu, mem: LinearMemory, name: str, selector: int) -> None:
    if name == "ss":
        load_stack_segment(cpu, mem, selector)
    else:
        load_data_segment(cpu, mem, SEGMENT_INDEX[name], selector)


def pop_segment(d: Decoded) -> Plan:
    """POP DS/ES/SS (32-bit code) or FS/GS: pop the operand size (4 or 8 bytes), load the low
    16 bits; RSP changes only when the load succeeds."""
    (a,) = d.operands
    if not isinstance(a, SegReg):
        raise Shape("POP operand")
    name = a.name
    size = d.stack_increment

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        _system(cpu, d, rip)
        value, rsp = pop(cpu, mem, size)
        _load_segment(cpu, mem, name, value & 0xFFFF)
        cpu.gpr[RSP] = rsp
        return next_rip

    return plan


# ---- LAR, LSL, VERR, VERW --------------------------------------------------------------------

#: System types LAR and LSL accept in IA-32e mode (SDM Vol. 2 LAR and LSL, "valid in IA-32e
#: mode" column of their segment-type tables; 16-bit gates and 32-bit types are not valid).
_LAR_SYSTEM: Final = frozenset({TYPE_LDT, TYPE_TSS_AVAILABLE, TYPE_TSS_BUSY, TYPE_CALL_GATE})
_LSL_SYSTEM: Final = frozenset({TYPE_LDT, TYPE_TSS_AVAILABLE, TYPE_TSS_BUSY})


def _inspect(
    cpu: Cpu, mem: LinearMemory, system: SystemState, selector: int, valid_system: frozenset[int]
) -> Descriptor | None:
    """The descriptor LAR/LSL may report, or None (ZF = 0): a null selector or one beyond the
    table limit (no access), a type invalid for the instruction, or DPL < max(CPL, RPL) for
    anything but conforming code. System descriptors are 16 bytes (both halves read)."""
    if is_null(selector):
        return None
    address = descriptor_address(system, selector, 8)
    if address is None:
        return None
    descriptor = read_descriptor(mem, address)
    if descriptor.system:
        upper = None
        if descriptor.type in valid_system:
            upper = read_upper(mem, system, selector, address, descriptor)
        if upper is None:
            return None
        descriptor = upper
    if not descriptor.conforming and descriptor.dpl < max(cpu.cpl, selector & 3):
        return None
    return descriptor


def lar_lsl(d: Decoded) -> Plan:
    """LAR r, r/m16: access rights (masked 0x00F0FF00; 0xFF00 for 16-bit operands); LSL:
    the scaled segment limit. ZF = 1 and the destination written on success, else ZF = 0 and
    the destination unchanged. No fault for a bad selector."""
    a, b = d.operands
    if not isinstance(a, Reg):
        raise Shape("LAR/LSL destination")
    source = _source16(b)
    lar = d.mnemonic == "LAR"
    valid = _LAR_SYSTEM if lar else _LSL_SYSTEM
    index, size = a.index, a.size

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        system = _system(cpu, d, rip)
        descriptor = _inspect(cpu, mem, system, _read16(source, cpu, mem, rip), valid)
        if descriptor is not None:
            value = descriptor.access_rights if lar else descriptor.limit
            write_register(cpu, index, 0, size, value & (0xFF00 if lar and size == 2 else MASK32))
        _set_zf(cpu, descriptor is not None)
        return next_rip

    return plan


def verify(d: Decoded) -> Plan:
    """VERR/VERW r/m16: ZF = 1 if the segment is readable (VERR) or writable (VERW) at
    max(CPL, RPL) (conforming code: no privilege check); null, beyond-limit and system
    selectors give ZF = 0 without a fault."""
    (a,) = d.operands
    source = _source16(a)
    write = d.mnemonic == "VERW"

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        system = _system(cpu, d, rip)
        selector = _read16(source, cpu, mem, rip)
        address = None if is_null(selector) else descriptor_address(system, selector, 8)
        result = False
        if address is not None:
            descriptor = read_descriptor(mem, address)
            allowed = descriptor.writable if write else descriptor.readable
            result = allowed and (
                descriptor.conforming or descriptor.dpl >= max(cpu.cpl, selector & 3)
            )
        _set_zf(cpu, result)
        return next_rip

    return plan


# ---- descriptor-table registers ---------------------------------------------------------------


def _table_operand(d: Decoded) -> tuple[Mem, int]:
    """The m16&64 (64-bit mode) or m16&32 (compatibility mode) operand; 16-bit operand size
    (a 24-bit base) is not modelled."""
    (a,) = d.operands
    if not isinstance(a, Mem) or d.code.endswith("_16"):
        raise Shape("descriptor-table operand")
    return a, a.size - 2


def load_table_register(d: Decoded) -> Plan:
    """LGDT/LIDT: CPL 0 only (#GP(0)); an explicit read of limit (2 bytes) and base (8, or 4
    in compatibility mode). The base is loaded as is."""
    operand, base_size = _table_operand(d)
    source = MemSlot(operand, operand.size)
    idt = d.mnemonic == "LIDT"

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        system = _system(cpu, d, rip)
        if cpu.cpl > 0:
            raise general_protection(f"{d.mnemonic} at CPL {cpu.cpl}")
        value = source.get(cpu, mem, source.locate(cpu, mem, rip, Kind.READ))
        limit, base = value & 0xFFFF, (value >> 16) & ((1 << (base_size * 8)) - 1)
        if idt:
            system.idt_base, system.idt_limit = base, limit
        else:
            system.gdt_base, system.gdt_limit = base, limit
        return next_rip

    return plan


def store_table_register(d: Decoded) -> Plan:
    """SGDT/SIDT: an explicit write of limit and base (10 bytes, 6 in compatibility mode) at
    any CPL (CR4.UMIP is not supported)."""
    operand, base_size = _table_operand(d)
    target = MemSlot(operand, operand.size)
    idt = d.mnemonic == "SIDT"

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        system = _system(cpu, d, rip)
        base, limit = (
            (system.idt_base, system.idt_limit) if idt else (system.gdt_base, system.gdt_limit)
        )
        value = limit | (base & ((1 << (base_size * 8)) - 1)) << 16
        target.put(cpu, mem, target.locate(cpu, mem, rip, Kind.WRITE), value)
        return next_rip

    return plan


def store_system_selector(d: Decoded) -> Plan:
    """SLDT/STR: store LDTR/TR (any CPL)."""
    (a,) = d.operands
    store = _store_selector(a)
    index = LDTR if d.mnemonic == "SLDT" else TR

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        store(cpu, mem, rip, _system(cpu, d, rip).selectors[index])
        return next_rip

    return plan


def load_system_selector(d: Decoded) -> Plan:
    """LTR/LLDT r/m16 at CPL 0 (else #GP(0)): the selector must name the GDT (TI = 0, else
    #GP(selector)) within its limit (16 bytes); LTR needs an available 64-bit TSS and marks it
    busy, LLDT an LDT (#GP(selector)); not present ⇒ #NP(selector); a non-canonical base ⇒
    #GP(selector). LTR with a null selector is #GP(0); LLDT with one makes the LDT unusable."""
    (a,) = d.operands
    source = _source16(a)
    ltr = d.mnemonic == "LTR"
    wanted = TYPE_TSS_AVAILABLE if ltr else TYPE_LDT

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        system = _system(cpu, d, rip)
        if cpu.cpl > 0:
            raise general_protection(f"{d.mnemonic} at CPL {cpu.cpl}")
        selector = _read16(source, cpu, mem, rip)
        if is_null(selector):
            if ltr:
                raise general_protection("LTR with a null selector")
            system.selectors[LDTR] = selector
            system.ldt_base, system.ldt_limit = 0, NO_TABLE
            return next_rip
        error = selector_error(selector)
        address = None if selector & 4 else descriptor_address(system, selector, 16)
        if address is None:
            raise CpuFault(VEC_GP, error, f"{d.mnemonic}: selector {selector:#x} not in the GDT")
        descriptor = read_descriptor(mem, address)
        if not descriptor.system or descriptor.type != wanted:
            raise CpuFault(VEC_GP, error, f"{d.mnemonic}: selector {selector:#x} wrong type")
        descriptor = Descriptor(descriptor.low, read_implicit(mem, (address + 8) & MASK64, 8))
        if not descriptor.present:
            raise CpuFault(VEC_NP, error, f"{d.mnemonic}: selector {selector:#x} not present")
        canonical_base(cpu, descriptor, selector)
        if ltr:
            set_type_bit(mem, address, descriptor, 2)
            system.selectors[TR] = selector
            system.tr_base, system.tr_limit = descriptor.base, descriptor.limit
        else:
            system.selectors[LDTR] = selector
            system.ldt_base, system.ldt_limit = descriptor.base, descriptor.limit
        return next_rip

    return plan


# ---- interrupts and privilege transitions ---------------------------------------------------


def software_interrupt(d: Decoded) -> Plan:
    """INT n / INT3: delivered by the engine through the IDT with the next RIP saved (the gate
    DPL check is part of delivery, lassfuzz.model.events)."""
    if d.mnemonic == "INT3":
        vector = VEC_BP
    elif len(d.operands) == 1 and isinstance(d.operands[0], Imm):
        vector = d.operands[0].value & 0xFF
    else:
        raise Shape("INT operand")

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        _system(cpu, d, rip)
        raise SoftwareInterrupt(vector, next_rip)

    return plan


#: RFLAGS bits IRET loads at any CPL in IA-32e mode (SDM Vol. 2 IRET: RETURN-TO-SAME/OUTER).
_IRET_ANY_CPL: Final = (
    RFLAGS_STATUS | RFLAGS_TF | RFLAGS_DF | RFLAGS_NT | RFLAGS_RF | RFLAGS_AC | RFLAGS_ID
)


class _Return:
    """A checked far return (IRETQ, RET far): the new CS and, on a change of privilege (always
    for IRETQ), SS, with their descriptors and where they lie; applied by :meth:`commit`."""

    __slots__ = ("code", "cs", "cs_address", "new_cpl", "outer", "ss", "ss_address", "stack")

    def __init__(
        self, cpu: Cpu, mem: LinearMemory, cs: int, ss: int | None, target: int, what: str
    ) -> None:
        """The checks of a protected-mode return (SDM Vol. 2 IRET and RET, IA-32e mode):
        RPL >= CPL (#GP(selector)); a non-null present code segment with DPL = RPL (#GP, #NP);
        with ``ss``, RPL = new CPL and a present writable data segment with DPL = new CPL (#GP,
        #SS), null only for a 64-bit return to CPL < 3; a canonical (64-bit) or 32-bit target
        (#GP(0)). Conforming and 16-bit code and non-flat 32-bit segments are not modelled."""
        system = cpu.system
        assert system is not None
        self.cs, self.ss = cs, ss
        self.new_cpl = new_cpl = cs & 3
        if new_cpl < cpu.cpl:
            raise CpuFault(VEC_GP, selector_error(cs), f"{what} to an inner privilege level")
        if is_null(cs):
            raise general_protection(f"{what} with a null CS")
        self.cs_address, code = fetch_segment(mem, system, cs)
        self.code = code
        if not code.code or code.dpl != new_cpl or (code.long and code.default32):
            raise CpuFault(VEC_GP, selector_error(cs), f"{what}: CS {cs:#x} not usable")
        if code.conforming:
            raise Unsupported(f"{what} to a conforming code segment")
        if not code.present:
            raise CpuFault(VEC_NP, selector_error(cs), f"{what}: CS {cs:#x} not present")
        if not code.long and not (code.default32 and code.flat):
            raise Unsupported(f"{what} to a non-flat or 16-bit code segment")
        self.stack: Descriptor | None = None
        self.ss_address = 0
        if ss is not None and is_null(ss):
            if new_cpl == 3 or not code.long or ss & 3 != new_cpl:
                raise general_protection(f"{what} loads a null SS")
        elif ss is not None:
            if ss & 3 != new_cpl:
                raise CpuFault(VEC_GP, selector_error(ss), f"{what}: SS RPL differs from CS RPL")
            self.ss_address, stack = fetch_segment(mem, system, ss)
            if not stack.writable or stack.dpl != new_cpl:
                raise CpuFault(VEC_GP, selector_error(ss), f"{what}: SS {ss:#x} not a stack")
            if not stack.present:
                raise CpuFault(VEC_SS, selector_error(ss), f"{what}: SS {ss:#x} not present")
            if not code.long and not (stack.flat and stack.default32):
                raise Unsupported(f"{what} to a non-flat 32-bit stack")
            self.stack = stack
        _check_target(cpu, code, target, what)
        # On a return to an outer level, data segments the new CPL may not use become null.
        self.outer = [i for i in (DS, ES, FS, GS) if system.segment_dpl[i] < new_cpl]
        if any(i in (FS, GS) and not is_null(system.selectors[i]) for i in self.outer):
            raise Unsupported(f"{what} nulls FS or GS (the hidden base is not modelled)")

    def commit(self, cpu: Cpu, mem: LinearMemory, rsp: int) -> None:
        """Set the A bits (implicit writes), load CS (and SS), RSP, CPL and the mode."""
        system = cpu.system
        assert system is not None
        set_type_bit(mem, self.cs_address, self.code, 1)
        if self.stack is not None:
            set_type_bit(mem, self.ss_address, self.stack, 1)
        for index in self.outer:
            system.selectors[index] = 0
            system.segment_dpl[index] = 3
        system.selectors[CS] = self.cs
        if self.ss is not None:
            system.selectors[SS] = self.ss
        cpu.gpr[RSP] = rsp
        cpu.cpl = self.new_cpl
        cpu.set_long_mode(self.code.long)
        mem.privilege_changed()


def _check_target(cpu: Cpu, code: Descriptor, target: int, what: str) -> None:
    """A far target must be canonical in 64-bit code, within the flat 4 GiB limit in 32-bit
    code (#GP(0) at the transfer itself). LASS does not check it (LASS.md §5)."""
    if code.long and not is_canonical(target, cpu.la57):
        raise general_protection(f"{what} to non-canonical RIP {target:#x}")
    if not code.long and target > MASK32:
        raise general_protection(f"{what} to RIP {target:#x} beyond the CS limit")


def iretq(d: Decoded) -> Plan:
    """IRETQ (64-bit mode): pop RIP, CS, RFLAGS, RSP, SS (SS-segment reads at the current CPL),
    check the CS and SS descriptors (implicit GDT/LDT reads) and return to CPL >= current;
    on a return to an outer level, DS/ES/FS/GS with DPL < new CPL become null. No LASS check
    of the target: the next fetch faults (LASS.md §5). NT = 1 (a task return) is #GP(0)."""

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        _system(cpu, d, rip)
        if cpu.rflags & RFLAGS_NT:
            raise general_protection("IRETQ with RFLAGS.NT = 1 in IA-32e mode")
        rsp = cpu.gpr[RSP]
        new_rip, cs, rflags, new_rsp, ss = (
            mem.read((rsp + 8 * slot) & MASK64, 8, stack=True) for slot in range(5)
        )
        target = _Return(cpu, mem, cs & 0xFFFF, ss & 0xFFFF, new_rip, "IRETQ")
        changeable = _IRET_ANY_CPL
        if cpu.cpl <= (cpu.rflags & RFLAGS_IOPL) >> 12:
            changeable |= RFLAGS_IF
        if cpu.cpl == 0:
            changeable |= RFLAGS_IOPL | RFLAGS_VIF | RFLAGS_VIP
        new_rflags = (cpu.rflags & ~changeable) | (rflags & changeable) | RFLAGS_FIXED1
        if new_rflags & (RFLAGS_TF | RFLAGS_RF):
            raise Unsupported(f"{d.describe(rip)} sets RFLAGS.TF or RF (not modelled)")
        target.commit(cpu, mem, new_rsp)
        cpu.rflags = new_rflags
        cpu.undefined &= ~changeable
        return new_rip

    return plan


def far_return(d: Decoded) -> Plan:
    """RET far [imm16] (RETFQ in 64-bit mode, RETFD in 32-bit code): pop RIP and CS (operand
    size each, SS reads); to an outer level also pop RSP and SS after releasing imm16 bytes,
    and release them again from the new stack. Checks as IRETQ (:class:`_Return`)."""
    size = {"RETFQ": 8, "RETFD": 4}.get(d.code.removesuffix("_IMM16"))
    if size is None or size != (8 if d.bitness == 64 else 4):
        raise Shape(f"{d.code} in {d.bitness}-bit code")
    release = d.operands[0].value & 0xFFFF if d.operands and isinstance(d.operands[0], Imm) else 0

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        _system(cpu, d, rip)
        mask = cpu.stack_mask
        rsp = cpu.gpr[RSP] & mask
        new_rip = mem.read(rsp, size, stack=True)
        cs = mem.read((rsp + size) & mask, size, stack=True) & 0xFFFF
        rsp = (rsp + 2 * size + release) & mask
        ss = None
        if cs & 3 > cpu.cpl:
            new_rsp = mem.read(rsp, size, stack=True)
            ss = mem.read((rsp + size) & mask, size, stack=True) & 0xFFFF
        target = _Return(cpu, mem, cs, ss, new_rip, "RET far")
        if ss is not None:
            rsp = (new_rsp + release) & (MASK64 if target.code.long else MASK32)
        target.commit(cpu, mem, rsp)
        return new_rip

    return plan


def far_transfer(d: Decoded) -> Plan:
    """JMP/CALL far through memory: m16:64 (REX.W) or m16:32, an explicit read of offset and
    selector (SDM Vol. 2 JMP, CALL; Vol. 3A 5.8). The selector names a code segment (same
    privilege: conforming with DPL <= CPL, else RPL <= CPL and DPL = CPL) or a 64-bit call gate
    (DPL >= max(CPL, RPL)) whose code segment must be 64-bit. CALL pushes CS and the return RIP
    (operand size each); CALL through a gate to a more privileged level first switches to
    TSS.RSP[DPL] (an implicit read) with SS = null | DPL and pushes SS, RSP, CS, RIP (8 bytes,
    explicit writes at the new CPL)."""
    (a,) = d.operands
    if not isinstance(a, Mem) or d.code.endswith("1616"):
        raise Shape("far pointer operand")
    call = d.mnemonic == "CALL"
    offset_size = a.size - 2
    width = 8 if d.bitness == 64 else 4
    if call and offset_size != width:
        raise Shape(f"CALL m16:{offset_size * 8} in {d.bitness}-bit code")
    pointer = MemSlot(a, a.size)
    what = f"{d.mnemonic} far"

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        system = _system(cpu, d, rip)
        value = pointer.get(cpu, mem, pointer.locate(cpu, mem, rip, Kind.READ))
        offset = value & ((1 << (offset_size * 8)) - 1)
        selector = (value >> (offset_size * 8)) & 0xFFFF
        if is_null(selector):
            raise general_protection(f"{what} to a null selector")
        address = descriptor_address(system, selector, 8)
        if address is None:
            raise CpuFault(VEC_GP, selector_error(selector), f"{what}: {selector:#x} beyond limit")
        descriptor = read_descriptor(mem, address)
        if descriptor.code:
            return _to_code(cpu, mem, selector, address, descriptor, offset, next_rip)
        if descriptor.system and descriptor.type == TYPE_CALL_GATE:
            gate = read_upper(mem, system, selector, address, descriptor)
            if gate is not None:
                return _through_gate(cpu, mem, selector, gate, next_rip)
        raise CpuFault(VEC_GP, selector_error(selector), f"{what}: {selector:#x} not code/gate")

    def _to_code(
        cpu: Cpu, mem: LinearMemory, selector: int, address: int, code: Descriptor,
        offset: int, next_rip: int,
    ) -> int:  # fmt: skip
        error = selector_error(selector)
        if code.conforming:
            denied = code.dpl > cpu.cpl
        else:
            denied = selector & 3 > cpu.cpl or code.dpl != cpu.cpl
        if denied:
            raise CpuFault(VEC_GP, error, f"{what}: {selector:#x} privilege")
        if not code.present:
            raise CpuFault(VEC_NP, error, f"{what}: {selector:#x} not present")
        if code.long and code.default32:
            raise CpuFault(VEC_GP, error, f"{what}: {selector:#x} has L = D = 1")
        if not code.long and not (code.default32 and code.flat):
            raise Unsupported(f"{what} to a non-flat or 16-bit code segment")
        _check_target(cpu, code, offset, what)
        system = cpu.system
        assert system is not None
        if call:
            rsp = push(cpu, mem, cpu.gpr[RSP], system.selectors[CS], width)
            cpu.gpr[RSP] = push(cpu, mem, rsp, next_rip, width)
        set_type_bit(mem, address, code, 1)
        system.selectors[CS] = (selector & 0xFFFC) | cpu.cpl
        cpu.set_long_mode(code.long)
        mem.privilege_changed()
        return offset

    def _through_gate(
        cpu: Cpu, mem: LinearMemory, selector: int, gate: Descriptor, next_rip: int
    ) -> int:
        system = cpu.system
        assert system is not None
        error = selector_error(selector)
        if not cpu.cs_l:
            raise Unsupported(f"{what} through a call gate from compatibility mode")
        if gate.dpl < max(cpu.cpl, selector & 3) or (gate.high >> 40) & 0x1F:
            raise CpuFault(VEC_GP, error, f"{what}: call gate {selector:#x} privilege or type")
        if not gate.present:
            raise CpuFault(VEC_NP, error, f"{what}: call gate {selector:#x} not present")
        low = gate.low
        target = (low >> 16) & 0xFFFF
        offset = (low & 0xFFFF) | ((low >> 48) & 0xFFFF) << 16 | (gate.high & 0xFFFF_FFFF) << 32
        if is_null(target):
            raise general_protection(f"{what}: call gate with a null code selector")
        code_address, code = fetch_segment(mem, system, target)
        target_error = selector_error(target)
        same_level = code.conforming or not call
        if (
            not code.code
            or code.dpl > cpu.cpl
            or (not call and not code.conforming and code.dpl != cpu.cpl)
        ):
            raise CpuFault(VEC_GP, target_error, f"{what}: gate target {target:#x} privilege")
        if not code.present:
            raise CpuFault(VEC_NP, target_error, f"{what}: gate target {target:#x} not present")
        if not code.long or code.default32:
            raise CpuFault(VEC_GP, target_error, f"{what}: gate target {target:#x} not 64-bit")
        _check_target(cpu, code, offset, what)
        new_cpl = cpu.cpl if same_level else code.dpl
        if call:
            old_cpl, old_rsp = cpu.cpl, cpu.gpr[RSP]
            frame = [system.selectors[CS], next_rip]
            rsp = old_rsp
            if new_cpl < old_cpl:
                rsp = read_tss(cpu, mem, 4 + 8 * new_cpl, 0)
                frame = [system.selectors[SS], old_rsp, *frame]
            cpu.cpl = new_cpl  # the pushes are made at the new CPL
            try:
                for value in frame:
                    rsp = push(cpu, mem, rsp, value, 8)
            except CpuFault:
                cpu.cpl = old_cpl
                raise
            if new_cpl < old_cpl:
                system.selectors[SS] = new_cpl
            cpu.gpr[RSP] = rsp
        set_type_bit(mem, code_address, code, 1)
        system.selectors[CS] = (target & 0xFFFC) | new_cpl
        cpu.cpl = new_cpl
        mem.privilege_changed()
        return offset

    return plan


def syscall(d: Decoded) -> Plan:
    """SYSCALL (#UD with EFER.SCE = 0 or outside 64-bit mode): RCX = next RIP, R11 = RFLAGS,
    RFLAGS &= ~SFMASK and RF cleared, CS = STAR[47:32] & 0xFFFC, SS = STAR[47:32] + 8, CPL 0,
    RIP = LSTAR; the hidden CS/SS are fixed flat 64-bit ones (no descriptor read)."""

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        if not cpu.efer & EFER_SCE or not cpu.cs_l:
            raise invalid_opcode("SYSCALL with EFER.SCE = 0 or outside 64-bit mode")
        system = _system(cpu, d, rip)
        if cpu.undefined:
            raise Unsupported(f"{d.describe(rip)} saves RFLAGS with undefined flags in R11")
        cpu.gpr[_RCX] = next_rip
        cpu.gpr[_R11] = cpu.rflags
        cpu.rflags &= ~(system.sfmask | RFLAGS_RF)
        # SDM SYSCALL: CS = STAR[47:32] AND 0xFFFC, SS = STAR[47:32] + 8 (RPL bits kept).
        base = (system.star >> 32) & 0xFFFF
        system.selectors[CS], system.selectors[SS] = base & 0xFFFC, (base + 8) & 0xFFFF
        cpu.cpl = 0
        mem.privilege_changed()
        return system.lstar

    return plan


def sysret(d: Decoded) -> Plan:
    """SYSRET (#UD with EFER.SCE = 0 or outside 64-bit mode; #GP(0) at CPL > 0): REX.W
    returns to 64-bit mode at RIP = RCX (#GP(0) if not canonical, still at CPL 0), CS =
    STAR[63:48] + 16; without REX.W to compatibility mode at EIP = ECX, CS = STAR[63:48].
    SS = STAR[63:48] + 8, RPL 3, CPL 3, RFLAGS = (R11 & 0x3C7FD7) | 2; no descriptor read.
    The next fetch may fault at CPL 3 with RIP = the target (LASS.md §5)."""
    long = d.mnemonic == "SYSRETQ"

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        if not cpu.efer & EFER_SCE or not cpu.cs_l:
            raise invalid_opcode("SYSRET with EFER.SCE = 0 or outside 64-bit mode")
        system = _system(cpu, d, rip)
        if cpu.cpl > 0:
            raise general_protection(f"SYSRET at CPL {cpu.cpl}")
        target = cpu.gpr[_RCX] if long else cpu.gpr[_RCX] & MASK32
        if not is_canonical(target, cpu.la57):
            raise general_protection(f"SYSRET to non-canonical RIP {target:#x}")
        rflags = (cpu.gpr[_R11] & _SYSRET_RFLAGS) | RFLAGS_FIXED1
        if rflags & RFLAGS_TF:
            raise Unsupported(f"{d.describe(rip)} sets RFLAGS.TF (single-step is not modelled)")
        base = (system.star >> 48) & 0xFFFF
        system.selectors[CS] = ((base + 16 if long else base) | 3) & 0xFFFF
        system.selectors[SS] = ((base + 8) | 3) & 0xFFFF
        cpu.rflags = rflags
        cpu.undefined = 0
        cpu.cpl = 3
        cpu.set_long_mode(long)
        mem.privilege_changed()
        return target

    return plan


#: Mnemonic -> builder, merged into lassfuzz.model.instructions' dispatch.
BUILDERS: Final[dict[str, Callable[[Decoded], Plan]]] = {
    "LAR": lar_lsl,
    "LSL": lar_lsl,
    "VERR": verify,
    "VERW": verify,
    "LGDT": load_table_register,
    "LIDT": load_table_register,
    "SGDT": store_table_register,
    "SIDT": store_table_register,
    "SLDT": store_system_selector,
    "STR": store_system_selector,
    "LTR": load_system_selector,
    "LLDT": load_system_selector,
    "INT": software_interrupt,
    "INT3": software_interrupt,
    "IRETQ": iretq,
    "RETF": far_return,
    "SYSCALL": syscall,
    "SYSRETQ": sysret,
    "SYSRET": sysret,
}
