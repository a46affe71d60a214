"""Instruction semantics, one builder per family, each compiling a Decoded into a Plan.

A Plan runs one instruction (or one REP iteration) and returns the next RIP:
``plan(cpu, mem, rip, next_rip) -> rip'``. Every plan does all its checks (memory ``locate``,
privilege, canonical branch targets) before its first register write, and memory stores are
held back by LinearMemory until the engine commits, so faults are precise (docs/machine.md).
Comments cite the SDM Vol. 2 instruction page unless they say otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from lassfuzz.arch import (
    CR0_AM,
    CR0_CD,
    CR0_EM,
    CR0_ET,
    CR0_MP,
    CR0_NE,
    CR0_NW,
    CR0_PE,
    CR0_PG,
    CR0_TS,
    CR0_WP,
    CR4_LA57,
    CR4_LASS,
    CR4_OSFXSR,
    CR4_OSXMMEXCPT,
    CR4_PAE,
    CR4_PGE,
    CR4_PSE,
    CR4_SMAP,
    CR4_SMEP,
    MASK64,
    RBP,
    RFLAGS_AC,
    RFLAGS_CF,
    RFLAGS_DF,
    RFLAGS_ID,
    RFLAGS_IF,
    RFLAGS_IOPL,
    RFLAGS_NT,
    RFLAGS_RF,
    RFLAGS_STATUS,
    RFLAGS_TF,
    RFLAGS_VM,
    RFLAGS_ZF,
    RSP,
)
from lassfuzz.model import flags, system_instructions
from lassfuzz.model.decode import Branch, ControlReg, Decoded, Imm, Mem, Reg, SegReg, StringMem
from lassfuzz.model.faults import Halted, Unsupported, general_protection, invalid_opcode
from lassfuzz.model.lass import Kind
from lassfuzz.model.memory import LinearMemory, Location, is_canonical
from lassfuzz.model.operands import (
    MemSlot,
    RegSlot,
    Slot,
    check_usable,
    compat_linear,
    effective_address,
    linear_address,
    pop,
    push,
    segment_base,
    sign_extend,
    slot,
    write_register,
)
from lassfuzz.model.state import MASK32, SEGMENT_INDEX, Cpu

Plan = Callable[[Cpu, LinearMemory, int, int], int]
_RAX: Final = 0
_RCX: Final = 1
_RDX: Final = 2
_RBX: Final = 3
_READ: Final = Kind.READ
_WRITE: Final = Kind.WRITE


class _Shape(Exception):
    """The operands are not a form this family models (becomes Unsupported with the name)."""


# ---- shared pieces ---------------------------------------------------------------------------


def _set_status(cpu: Cpu, status: int, written: int = RFLAGS_STATUS, undefined: int = 0) -> None:
    """Write the ``written`` status flags; of those, ``undefined`` are left undefined."""
    cpu.rflags = (cpu.rflags & ~written) | (status & written)
    cpu.undefined = (cpu.undefined & ~written) | undefined


def _require_defined(cpu: Cpu, reads: int, d: Decoded, rip: int) -> None:
    """docs/machine.md: reading a flag the SDM left undefined makes the case unsupported."""
    bad = cpu.undefined & reads
    if bad:
        raise Unsupported(f"{d.describe(rip)} reads undefined flag(s) {flags.flag_names(bad)}")


def _branch_target(cpu: Cpu, target: int, d: Decoded) -> int:
    """A near branch to a non-canonical target faults at the branch itself (SDM JMP/CALL/RET
    64-bit mode: #GP(0)); LASS does not check branch targets (LASS.md §5). Compatibility-mode
    targets are 32-bit offsets within the flat 4 GiB CS limit, so they cannot fault."""
    if not is_canonical(target, cpu.la57):
        raise general_protection(f"{d.text}: non-canonical branch target {target:#x}")
    return target


def _stack_size(d: Decoded, suffix: str) -> int:
    """Operand size of a stack-using instruction from its iced code suffix ("W", "D", "Q");
    16-bit near branches truncate RIP to 16 bits and are not modelled."""
    size = {"W": 2, "D": 4, "Q": 8}.get(suffix)
    if size is None:
        raise _Shape(f"operand size of {d.code}")
    return size


def _operands(d: Decoded, count: int) -> tuple[object, ...]:
    if len(d.operands) != count:
        raise _Shape(f"{len(d.operands)} operands")
    return d.operands


def _gp_slot(op: object, size: int | None = None) -> Slot:
    if not isinstance(op, Reg | Mem | Imm):
        raise _Shape(f"operand {op}")
    return slot(op, size)


# ---- data movement ---------------------------------------------------------------------------


def _mov(d: Decoded) -> Plan:
    a, b = _operands(d, 2)
    if isinstance(a, ControlReg) or isinstance(b, ControlReg):
        return _mov_cr(d, a, b)
    if isinstance(a, SegReg) or isinstance(b, SegReg):
        return system_instructions.mov_segment(d)
    dst = _gp_slot(a)
    src = _gp_slot(b, dst.size)

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        value = src.get(cpu, mem, src.locate(cpu, mem, rip, _READ))
        dst.put(cpu, mem, dst.locate(cpu, mem, rip, _WRITE), value)
        return next_rip

    return plan


def _extend(d: Decoded) -> Plan:
    """MOVZX zero-extends; MOVSX and MOVSXD sign-extend the source to the destination size."""
    a, b = _operands(d, 2)
    dst = _gp_slot(a)
    src = _gp_slot(b)
    signed = d.mnemonic != "MOVZX"

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        value = src.get(cpu, mem, src.locate(cpu, mem, rip, _READ))
        if signed:
            value = sign_extend(value, src.bits) & dst.mask
        dst.put(cpu, mem, None, value)
        return next_rip

    return plan


def _lea(d: Decoded) -> Plan:
    """LEA stores the effective address (no segment base, no access), truncated to the
    operand size."""
    a, b = _operands(d, 2)
    if not isinstance(a, Reg) or not isinstance(b, Mem):
        raise _Shape("LEA needs a register and a memory operand")
    dst = RegSlot(a)
    offset = effective_address(b)

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        dst.put(cpu, mem, None, offset(cpu, rip))
        return next_rip

    return plan


def _cmov(d: Decoded) -> Plan:
    """The source is read (and may fault) whatever the condition; in 64-bit mode a 32-bit
    CMOVcc zero-extends the destination even when the condition is false."""
    a, b = _operands(d, 2)
    dst = _gp_slot(a)
    src = _gp_slot(b, dst.size)
    cc = _condition(d)
    reads = flags.CONDITION_READS[cc]

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        _require_defined(cpu, reads, d, rip)
        value = src.get(cpu, mem, src.locate(cpu, mem, rip, _READ))
        if flags.condition(cc, cpu.rflags):
            dst.put(cpu, mem, None, value)
        elif dst.size == 4:
            dst.put(cpu, mem, None, dst.get(cpu, mem, None))
        return next_rip

    return plan


def _setcc(d: Decoded) -> Plan:
    (a,) = _operands(d, 1)
    dst = _gp_slot(a)
    cc = _condition(d)
    reads = flags.CONDITION_READS[cc]

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        _require_defined(cpu, reads, d, rip)
        loc = dst.locate(cpu, mem, rip, _WRITE)
        dst.put(cpu, mem, loc, 1 if flags.condition(cc, cpu.rflags) else 0)
        return next_rip

    return plan


def _condition(d: Decoded) -> int:
    if d.condition is None:
        raise _Shape("no condition code")
    return d.condition


def _xchg(d: Decoded) -> Plan:
    """XCHG swaps (a memory operand is a read-modify-write access)."""
    a, b = _operands(d, 2)
    first = _gp_slot(a)
    second = _gp_slot(b)

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        la = first.locate(cpu, mem, rip, _WRITE)
        lb = second.locate(cpu, mem, rip, _WRITE)
        va = first.get(cpu, mem, la)
        vb = second.get(cpu, mem, lb)
        first.put(cpu, mem, la, vb)
        second.put(cpu, mem, lb, va)
        return next_rip

    return plan


# ---- arithmetic and logic --------------------------------------------------------------------

_Arith = Callable[[int, int, int, int], tuple[int, int]]


def _and(a: int, b: int, c: int, bits: int) -> tuple[int, int]:
    return a & b, flags.logic(a & b, bits)


def _or(a: int, b: int, c: int, bits: int) -> tuple[int, int]:
    return a | b, flags.logic(a | b, bits)


def _xor(a: int, b: int, c: int, bits: int) -> tuple[int, int]:
    return a ^ b, flags.logic(a ^ b, bits)


#: mnemonic -> (operation, writes the destination, reads CF, flags left undefined).
_ALU: Final[dict[str, tuple[_Arith, bool, bool, int]]] = {
    "ADD": (flags.add, True, False, 0),
    "ADC": (flags.add, True, True, 0),
    "SUB": (flags.sub, True, False, 0),
    "SBB": (flags.sub, True, True, 0),
    "CMP": (flags.sub, False, False, 0),
    "AND": (_and, True, False, flags.UNDEFINED_AFTER_LOGIC),
    "OR": (_or, True, False, flags.UNDEFINED_AFTER_LOGIC),
    "XOR": (_xor, True, False, flags.UNDEFINED_AFTER_LOGIC),
    "TEST": (_and, False, False, flags.UNDEFINED_AFTER_LOGIC),
}


def _alu(d: Decoded) -> Plan:
    """Two-operand arithmetic/logic; CMP and TEST only read. ADC/SBB read CF; AND/OR/XOR/TEST
    clear CF and OF and leave AF undefined."""
    operation, writes, reads_cf, undefined = _ALU[d.mnemonic]
    a, b = _operands(d, 2)
    dst = _gp_slot(a)
    src = _gp_slot(b, dst.size)
    bits = dst.bits
    kind = _WRITE if writes else _READ

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        carry = 0
        if reads_cf:
            _require_defined(cpu, RFLAGS_CF, d, rip)
            carry = cpu.rflags & RFLAGS_CF
        loc = dst.locate(cpu, mem, rip, kind)
        left = dst.get(cpu, mem, loc)
        right = src.get(cpu, mem, src.locate(cpu, mem, rip, _READ))
        result, status = operation(left, right, carry, bits)
        if writes:
            dst.put(cpu, mem, loc, result)
        _set_status(cpu, status, RFLAGS_STATUS, undefined)
        return next_rip

    return plan


def _unary(d: Decoded) -> Plan:
    """INC/DEC (CF unaffected), NEG (CF = source != 0, as 0 - source), NOT (no flags)."""
    (a,) = _operands(d, 1)
    dst = _gp_slot(a)
    bits = dst.bits
    name = d.mnemonic

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        loc = dst.locate(cpu, mem, rip, _WRITE)
        value = dst.get(cpu, mem, loc)
        if name == "NOT":
            dst.put(cpu, mem, loc, ~value & dst.mask)
            return next_rip
        if name == "INC":
            result, status = flags.add(value, 1, 0, bits)
            written = RFLAGS_STATUS & ~RFLAGS_CF
        elif name == "DEC":
            result, status = flags.sub(value, 1, 0, bits)
            written = RFLAGS_STATUS & ~RFLAGS_CF
        else:
            result, status = flags.sub(0, value, 0, bits)
            written = RFLAGS_STATUS
        dst.put(cpu, mem, loc, result)
        _set_status(cpu, status, written)
        return next_rip

    return plan


def _xadd(d: Decoded) -> Plan:
    """TEMP = SRC + DEST; SRC = DEST; DEST = TEMP; flags as ADD."""
    a, b = _operands(d, 2)
    dst = _gp_slot(a)
    src = _gp_slot(b)

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        loc = dst.locate(cpu, mem, rip, _WRITE)
        old = dst.get(cpu, mem, loc)
        result, status = flags.add(old, src.get(cpu, mem, None), 0, dst.bits)
        src.put(cpu, mem, None, old)
        dst.put(cpu, mem, loc, result)
        _set_status(cpu, status)
        return next_rip

    return plan


def _cmpxchg(d: Decoded) -> Plan:
    """Compare the accumulator with DEST (flags as CMP). Equal: DEST = SRC. Not equal:
    accumulator = DEST and DEST is written back with its own value (the SDM pseudocode; the
    memory form always writes)."""
    a, b = _operands(d, 2)
    dst = _gp_slot(a)
    src = _gp_slot(b)
    accumulator = RegSlot(Reg(_RAX, 0, dst.size))

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        loc = dst.locate(cpu, mem, rip, _WRITE)
        old = dst.get(cpu, mem, loc)
        expected = accumulator.get(cpu, mem, None)
        _, status = flags.sub(expected, old, 0, dst.bits)
        if expected == old:
            dst.put(cpu, mem, loc, src.get(cpu, mem, None))
        else:
            dst.put(cpu, mem, loc, old)
            accumulator.put(cpu, mem, None, old)
        _set_status(cpu, status)
        return next_rip

    return plan


def _cmpxchg_wide(d: Decoded) -> Plan:
    """CMPXCHG8B/16B: compare EDX:EAX (RDX:RAX) with m64 (m128); equal: store ECX:EBX
    (RCX:RBX), ZF = 1; else load it into EDX:EAX (RDX:RAX), ZF = 0. Only ZF is written.
    CMPXCHG16B needs a 16-byte aligned operand, else #GP(0)."""
    (m,) = _operands(d, 1)
    if not isinstance(m, Mem):
        raise _Shape("register operand")
    size = 16 if d.mnemonic == "CMPXCHG16B" else 8
    half_bits = size * 4
    half_mask = (1 << half_bits) - 1
    address = linear_address(m)
    stack = m.segment == "ss"

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        linear = address(cpu, rip)
        if size == 16 and linear & 15:
            raise general_protection(f"CMPXCHG16B operand {linear:#x} is not 16-byte aligned")
        loc = mem.locate(linear, size, _WRITE, stack=stack)
        old = mem.load(loc)
        gpr = cpu.gpr
        expected = (gpr[_RDX] & half_mask) << half_bits | (gpr[_RAX] & half_mask)
        if old == expected:
            mem.store(loc, (gpr[_RCX] & half_mask) << half_bits | (gpr[_RBX] & half_mask))
            status = RFLAGS_ZF
        else:
            mem.store(loc, old)
            write_register(cpu, _RAX, 0, size // 2, old & half_mask)
            write_register(cpu, _RDX, 0, size // 2, old >> half_bits)
            status = 0
        _set_status(cpu, status, RFLAGS_ZF)
        return next_rip

    return plan


def _bit_test(d: Decoded) -> Plan:
    """BT/BTS/BTR/BTC: CF = the selected bit; ZF unaffected; OF SF AF PF undefined. A register
    bit offset with a memory operand is signed and selects memory beyond the operand (bit-string
    addressing: EA + size * (offset DIV bits)); an immediate offset is taken modulo the size."""
    a, b = _operands(d, 2)
    dst = _gp_slot(a)
    if isinstance(b, Imm):
        offset_imm: int | None = b.value
        offset_reg = None
    elif isinstance(b, Reg):
        offset_imm = None
        offset_reg = RegSlot(b)
    else:
        raise _Shape("bit offset operand")
    name = d.mnemonic
    kind = _READ if name == "BT" else _WRITE
    bits = dst.bits
    shift = bits.bit_length() - 1
    written = RFLAGS_STATUS & ~RFLAGS_ZF
    bit_string = isinstance(a, Mem) and offset_reg is not None
    if isinstance(a, Mem):
        offset_of = effective_address(a)
        base_of = segment_base(a.segment)
        amask = (1 << a.address_bits) - 1
        stack = a.segment == "ss"
        compat = a.linear_bits == 32
        if compat and a.segment == "cs":
            raise _Shape("CS segment override in compatibility mode")
        segment_index = SEGMENT_INDEX[a.segment]

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        if offset_reg is not None:
            raw = offset_reg.get(cpu, mem, None)
        else:
            assert offset_imm is not None
            raw = offset_imm
        if bit_string:
            signed = sign_extend(raw, bits)
            ea = (offset_of(cpu, rip) + (signed >> shift) * dst.size) & amask
            linear = (ea + base_of(cpu)) & MASK64 if base_of is not None else ea
            if compat:
                check_usable(cpu, segment_index)
                linear &= MASK32
            string_loc = mem.locate(linear, dst.size, kind, stack=stack)
            value = mem.load(string_loc)
            loc: Location | None = string_loc
        else:
            loc = dst.locate(cpu, mem, rip, kind)
            value = dst.get(cpu, mem, loc)
        bit = raw & (bits - 1)
        status = RFLAGS_CF if value >> bit & 1 else 0
        if name == "BTS":
            value |= 1 << bit
        elif name == "BTR":
            value &= ~(1 << bit)
        elif name == "BTC":
            value ^= 1 << bit
        if kind is _WRITE:
            if loc is None:
                dst.put(cpu, mem, None, value)
            else:
                mem.store(loc, value)
        _set_status(cpu, status, written, flags.UNDEFINED_AFTER_BT)
        return next_rip

    return plan


# ---- stack -----------------------------------------------------------------------------------


def _push_op(d: Decoded) -> Plan:
    """PUSH r/m/imm: 8 or 2 bytes (66 prefix), 4 in 32-bit code; PUSH RSP pushes the value
    before the push. PUSH Sreg may write 2 bytes or the whole slot (SDM PUSH: processor
    specific), so it is not modelled."""
    (a,) = _operands(d, 1)
    if isinstance(a, SegReg):
        raise _Shape("PUSH Sreg writes a model-specific number of bytes")
    size = -d.stack_increment
    src = _gp_slot(a, size)

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        value = src.get(cpu, mem, src.locate(cpu, mem, rip, _READ))
        cpu.gpr[RSP] = push(cpu, mem, cpu.gpr[RSP], value, size)
        return next_rip

    return plan


def _pop_op(d: Decoded) -> Plan:
    """POP r/m: 8 or 2 bytes. A memory destination with an RSP base uses the RSP value after
    the increment; POP RSP leaves the popped value in RSP."""
    (a,) = _operands(d, 1)
    if isinstance(a, SegReg):
        return system_instructions.pop_segment(d)
    size = d.stack_increment
    dst = _gp_slot(a, size)

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        value, rsp = pop(cpu, mem, size)
        old = cpu.gpr[RSP]
        cpu.gpr[RSP] = rsp
        try:
            loc = dst.locate(cpu, mem, rip, _WRITE)
        except BaseException:
            cpu.gpr[RSP] = old
            raise
        dst.put(cpu, mem, loc, value)
        return next_rip

    return plan


def _pushf(d: Decoded) -> Plan:
    """PUSHFQ/PUSHF push RFLAGS (or FLAGS) with the VM and RF images cleared."""
    size = -d.stack_increment

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        _require_defined(cpu, RFLAGS_STATUS, d, rip)
        cpu.gpr[RSP] = push(cpu, mem, cpu.gpr[RSP], cpu.rflags & ~(RFLAGS_VM | RFLAGS_RF), size)
        return next_rip

    return plan


_POPF_ANY_CPL: Final = RFLAGS_STATUS | RFLAGS_TF | RFLAGS_DF | RFLAGS_NT | RFLAGS_AC | RFLAGS_ID


def _popf(d: Decoded) -> Plan:
    """POPFQ/POPF (64-bit mode): status flags, TF, DF, NT, AC and ID change at any CPL; IF only
    when CPL <= IOPL; IOPL only at CPL0; VM, VIF, VIP and reserved bits are unaffected; RF is
    cleared. A 16-bit POPF changes bits 15:0 only. Setting TF is not modelled."""
    size = d.stack_increment

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        value, rsp = pop(cpu, mem, size)
        changeable = _POPF_ANY_CPL
        if cpu.cpl <= (cpu.rflags & RFLAGS_IOPL) >> 12:
            changeable |= RFLAGS_IF
        if cpu.cpl == 0:
            changeable |= RFLAGS_IOPL
        if size == 2:
            changeable &= 0xFFFF
        rflags = ((cpu.rflags & ~changeable) | (value & changeable)) & ~RFLAGS_RF
        if rflags & RFLAGS_TF:
            raise Unsupported(f"{d.describe(rip)} sets RFLAGS.TF (single-step is not modelled)")
        cpu.gpr[RSP] = rsp
        cpu.rflags = rflags
        cpu.undefined &= ~changeable
        return next_rip

    return plan


def _enter(d: Decoded) -> Plan:
    """ENTER size, level (level mod 32): push RBP; FrameTemp = RSP; for i in 1..level-1 copy
    the quadword at RBP - 8i (an SS read) onto the stack; push FrameTemp if level > 0;
    RBP = FrameTemp; RSP -= size. The frame element is 8 bytes (4 in 32-bit code: EBP/ESP,
    wrapping at the stack-address size); with 66 (16-bit) only level 0 is modelled."""
    a, b = _operands(d, 2)
    if not isinstance(a, Imm) or not isinstance(b, Imm):
        raise _Shape("ENTER operands")
    allocation = a.value & 0xFFFF
    level = b.value & 0x1F
    size = _stack_size(d, d.code[5])
    if level and size == 2:
        raise _Shape(f"16-bit ENTER with nesting level {level}")

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        mask = cpu.stack_mask
        rsp = frame = push(cpu, mem, cpu.gpr[RSP], cpu.gpr[RBP], size)
        if level:
            rbp = cpu.gpr[RBP]
            for _ in range(1, level):
                rbp = (rbp - size) & mask
                rsp = push(cpu, mem, rsp, mem.read(rbp, size, stack=True), size)
            rsp = push(cpu, mem, rsp, frame, size)
        write_register(cpu, RBP, 0, size, frame)
        cpu.gpr[RSP] = (rsp - allocation) & mask
        return next_rip

    return plan


def _leave(d: Decoded) -> Plan:
    """LEAVE: RSP = RBP (ESP = EBP with a 32-bit stack), then pop RBP (EBP, BP) as an SS
    access."""
    size = _stack_size(d, d.code[5])

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        mask = cpu.stack_mask
        rbp = cpu.gpr[RBP] & mask
        value = mem.read(rbp, size, stack=True)
        cpu.gpr[RSP] = (rbp + size) & mask
        write_register(cpu, RBP, 0, size, value)
        return next_rip

    return plan


# ---- control transfer ------------------------------------------------------------------------


def _target(op: object, d: Decoded) -> Callable[[Cpu, LinearMemory, int], int]:
    """How a near branch finds its target: relative (RIP wraps at 64 bits, EIP at 32 in
    compatibility mode), or a register/memory operand of the mode's operand size (64 or 32
    bits; 16-bit forms are not modelled)."""
    width = 8 if d.bitness == 64 else 4
    if isinstance(op, Branch):
        offset = op.offset
        mask = (1 << (width * 8)) - 1
        return lambda cpu, mem, rip: (rip + offset) & mask
    src = _gp_slot(op, width)
    if src.size != width:
        raise _Shape(f"branch operand is not {width * 8}-bit")
    return lambda cpu, mem, rip: src.get(cpu, mem, src.locate(cpu, mem, rip, _READ))


def _jmp(d: Decoded) -> Plan:
    (a,) = _operands(d, 1)
    target = _target(a, d)

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        return _branch_target(cpu, target(cpu, mem, rip), d)

    return plan


def _jcc(d: Decoded) -> Plan:
    (a,) = _operands(d, 1)
    target = _target(a, d)
    cc = _condition(d)
    reads = flags.CONDITION_READS[cc]

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        _require_defined(cpu, reads, d, rip)
        if flags.condition(cc, cpu.rflags):
            return _branch_target(cpu, target(cpu, mem, rip), d)
        return next_rip

    return plan


def _call(d: Decoded) -> Plan:
    """Near CALL: target checked for canonicality before the push; the push of the return
    address (8 bytes, 4 in 32-bit code) is an SS access. A target in the wrong LASS half
    faults at the next fetch."""
    (a,) = _operands(d, 1)
    target = _target(a, d)
    size = -d.stack_increment

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        destination = _branch_target(cpu, target(cpu, mem, rip), d)
        cpu.gpr[RSP] = push(cpu, mem, cpu.gpr[RSP], next_rip, size)
        return destination

    return plan


def _ret(d: Decoded) -> Plan:
    """Near RET [imm16]: pop the target (SS access; 8 bytes, 4 in 32-bit code), check it,
    then release imm16 bytes."""
    release = d.operands[0].value & 0xFFFF if d.operands and isinstance(d.operands[0], Imm) else 0
    size = _stack_size(d, d.code[4])
    if size == 2:
        raise _Shape("16-bit RET")

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        value, rsp = pop(cpu, mem, size)
        destination = _branch_target(cpu, value, d)
        cpu.gpr[RSP] = (rsp + release) & cpu.stack_mask
        return destination

    return plan


# ---- string instructions ---------------------------------------------------------------------


def _string(d: Decoded) -> Plan:
    """MOVS/STOS/LODS/CMPS/SCAS, one element per plan run. With REP/REPE/REPNE a run is one
    iteration: RCX = 0 does nothing; otherwise the element, RSI/RDI +- size (DF), RCX - 1, and
    RIP stays on the instruction until RCX = 0 (or ZF ends REPE/REPNE CMPS/SCAS). A fault
    leaves the completed iterations' effects (SDM Vol. 2 "REP/REPE/REPZ/REPNE/REPNZ").
    With a 32-bit address size (0x67, or compatibility mode) ESI/EDI/ECX are used and written
    as 32-bit registers."""
    family = d.mnemonic[:4]
    strings = [op for op in d.operands if isinstance(op, StringMem)]
    if not strings or len(d.operands) != 2:
        raise _Shape("not the string form")
    size = strings[0].size
    amask = (1 << strings[0].address_bits) - 1
    source = next((op for op in strings if op.register == 6), None)
    source_stack = source is not None and source.segment == "ss"
    rsi, rdi = 6, 7
    src_linear = _string_linear(rsi, "ds" if source is None else source.segment, amask, d)
    dst_linear = _string_linear(rdi, "es", amask, d)
    compares = family in ("CMPS", "SCAS")
    if d.repne and not compares:
        raise _Shape("REPNE on a non-comparing string instruction")
    repeat = d.rep or d.repne
    bits = size * 8

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        gpr = cpu.gpr
        if repeat and gpr[_RCX] & amask == 0:
            return next_rip
        step = -size if cpu.rflags & RFLAGS_DF else size
        if family == "MOVS":
            value = mem.read(src_linear(cpu), size, stack=source_stack)
            mem.write(dst_linear(cpu), size, value, stack=False)
        elif family == "STOS":
            mem.write(dst_linear(cpu), size, gpr[_RAX] & ((1 << bits) - 1), stack=False)
        elif family == "LODS":
            value = mem.read(src_linear(cpu), size, stack=source_stack)
        elif family == "CMPS":
            left = mem.read(src_linear(cpu), size, stack=source_stack)
            right = mem.read(dst_linear(cpu), size, stack=False)
            _set_status(cpu, flags.sub(left, right, 0, bits)[1])
        else:
            right = mem.read(dst_linear(cpu), size, stack=False)
            _set_status(cpu, flags.sub(gpr[_RAX] & ((1 << bits) - 1), right, 0, bits)[1])
        if family == "LODS":
            write_register(cpu, _RAX, 0, size, value)
        if family != "STOS" and family != "SCAS":
            gpr[rsi] = (gpr[rsi] + step) & amask
        if family != "LODS":
            gpr[rdi] = (gpr[rdi] + step) & amask
        if not repeat:
            return next_rip
        gpr[_RCX] = (gpr[_RCX] - 1) & amask
        if gpr[_RCX] == 0:
            return next_rip
        if compares and bool(cpu.rflags & RFLAGS_ZF) == d.repne:
            return next_rip
        return rip

    return plan


def _string_linear(register: int, segment: str, amask: int, d: Decoded) -> Callable[[Cpu], int]:
    """Linear address of a string operand: segment base + RSI/RDI (ESI/EDI with a 32-bit
    address size); compatibility mode truncates it to 32 bits (operands.compat_linear)."""
    if d.bitness == 32:
        offset = compat_linear(segment, lambda cpu, rip: cpu.gpr[register] & amask)
        return lambda cpu: offset(cpu, 0)
    base = segment_base(segment)
    if base is None:
        return lambda cpu: cpu.gpr[register] & amask
    return lambda cpu: ((cpu.gpr[register] & amask) + base(cpu)) & MASK64


# ---- flags and system ------------------------------------------------------------------------


def _flag_op(d: Decoded) -> Plan:
    """CLD/STD write DF; STAC/CLAC write AC and raise #UD at CPL > 0."""
    name = d.mnemonic
    bit = RFLAGS_DF if name in ("CLD", "STD") else RFLAGS_AC
    value = bit if name in ("STD", "STAC") else 0
    privileged = bit == RFLAGS_AC

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        if privileged and cpu.cpl > 0:
            raise invalid_opcode(f"{name} at CPL {cpu.cpl}")
        cpu.rflags = (cpu.rflags & ~bit) | value
        return next_rip

    return plan


def _interrupt_flag(d: Decoded) -> Plan:
    """CLI/STI: write IF when CPL <= IOPL, else #GP(0) (CR4.PVI/VME are not supported). STI's
    one-instruction interrupt shadow is unobservable: the machine has no external interrupts."""
    value = RFLAGS_IF if d.mnemonic == "STI" else 0

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        if cpu.cpl > (cpu.rflags & RFLAGS_IOPL) >> 12:
            raise general_protection(f"{d.mnemonic} at CPL {cpu.cpl} > IOPL")
        cpu.rflags = (cpu.rflags & ~RFLAGS_IF) | value
        return next_rip

    return plan


def _nop(d: Decoded) -> Plan:
    """NOP forms and software prefetches: no access and no fault of any kind. A prefetch
    that LASS would block is dropped (LASS.md §5), one it allows is only a hint."""

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        return next_rip

    return plan


def _clflush(d: Decoded) -> Plan:
    """CLFLUSH/CLFLUSHOPT are checked like a 1-byte read (LASS.md §5) but read nothing."""
    (m,) = _operands(d, 1)
    if not isinstance(m, Mem):
        raise _Shape("register operand")
    target = MemSlot(m, 1)

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        target.locate(cpu, mem, rip, _READ)
        return next_rip

    return plan


def _invlpg(d: Decoded) -> Plan:
    """INVLPG: #GP(0) at CPL > 0; its address is not checked at all (LASS.md §5). Flushing
    every cached translation is a valid INVLPG (cases cannot observe the TLB)."""

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        if cpu.cpl > 0:
            raise general_protection(f"INVLPG at CPL {cpu.cpl}")
        mem.flush_tlb()
        return next_rip

    return plan


def _hlt(d: Decoded) -> Plan:
    """HLT: #GP(0) at CPL > 0; at CPL0 the case ends with RIP after the HLT."""

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        if cpu.cpl > 0:
            raise general_protection(f"HLT at CPL {cpu.cpl}")
        cpu.rip = next_rip
        raise Halted

    return plan


def _undefined(d: Decoded) -> Plan:
    """UD2, and a LOCK prefix on an instruction that cannot take one: #UD."""

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        raise invalid_opcode(f"{d.text} raises #UD")

    return plan


_CPUID_VENDOR: Final = (0x756E_6547, 0x6C65_746E, 0x4965_6E69)  # "Genu", "ntel", "ineI"


def _cpuid(d: Decoded) -> Plan:
    """docs/machine.md CPUID table; results are 32-bit, so RAX/RBX/RCX/RDX upper halves clear."""

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        leaf = cpu.gpr[_RAX] & 0xFFFF_FFFF
        subleaf = cpu.gpr[_RCX] & 0xFFFF_FFFF
        eax = ebx = ecx = edx = 0
        if leaf == 0:
            eax = 7
            ebx, ecx, edx = _CPUID_VENDOR
        elif leaf == 7 and subleaf == 0:
            eax, ebx = 1, (1 << 7) | (1 << 20) | (1 << 23)  # SMEP, SMAP, CLFLUSHOPT
        elif leaf == 7 and subleaf == 1:
            eax = 1 << 6 if cpu.lass_supported else 0  # LASS enumeration (LASS.md §1)
        cpu.gpr[_RAX], cpu.gpr[_RBX], cpu.gpr[_RCX], cpu.gpr[_RDX] = eax, ebx, ecx, edx
        return next_rip

    return plan


_CR0_DEFINED: Final = (
    CR0_PE | CR0_MP | CR0_EM | CR0_TS | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_NW | CR0_CD | CR0_PG
)
_CR4_SUPPORTED: Final = (
    CR4_PSE | CR4_PAE | CR4_PGE | CR4_OSFXSR | CR4_OSXMMEXCPT | CR4_LA57 | CR4_SMEP | CR4_SMAP
)


def cr4_allowed(lass_supported: bool) -> int:
    """CR4 bits the lassfuzz CPU accepts (docs/machine.md); LASS only when enumerated."""
    return _CR4_SUPPORTED | (CR4_LASS if lass_supported else 0)


def _mov_cr(d: Decoded, a: object, b: object) -> Plan:
    """MOV to/from CR0/CR3/CR4 (docs/machine.md "Control registers"): #GP(0) at CPL > 0;
    loads are checked before anything changes and flush the TLB."""
    to_cr = isinstance(a, ControlReg)
    cr = a if isinstance(a, ControlReg) else b
    gpr = b if to_cr else a
    if not isinstance(cr, ControlReg) or not isinstance(gpr, Reg):
        raise _Shape("MOV CR operands")
    number = cr.number
    index = gpr.index
    width = gpr.size

    def plan(cpu: Cpu, mem: LinearMemory, rip: int, next_rip: int) -> int:
        if cpu.cpl > 0:
            raise general_protection(f"MOV CR{number} at CPL {cpu.cpl}")
        if number not in (0, 3, 4):
            raise Unsupported(f"{d.describe(rip)}: CR{number} is not modelled")
        if not to_cr:
            # 32-bit code moves the low halves (SDM MOV-to/from-CR: 32-bit operands outside
            # 64-bit mode); a 32-bit register write zero-extends.
            write_register(cpu, index, 0, width, (cpu.cr0, 0, 0, cpu.cr3, cpu.cr4)[number])
            return next_rip
        value = cpu.gpr[index] & ((1 << (width * 8)) - 1)
        if number == 0:
            problem = cr0_problem(value)
            if problem is not None:
                faults, reason = problem
                if faults:
                    raise general_protection(f"MOV CR0: {reason}")
                raise Unsupported(f"{d.describe(rip)}: {reason}")
            cpu.cr0 = value
        elif number == 3:
            if value >> 52:
                raise general_protection(f"MOV CR3, {value:#x}: bits 63:52 set")
            cpu.cr3 = value
        else:
            bad = value & ~cr4_allowed(cpu.lass_supported)
            if bad:
                raise general_protection(f"MOV CR4, {value:#x}: reserved bit(s) {bad:#x}")
            if not value & CR4_PAE:
                raise general_protection("MOV CR4 clearing PAE in IA-32e mode")
            if (value ^ cpu.cr4) & CR4_LA57:
                # SDM Vol. 2 MOV CR: changing CR4.LA57 in IA-32e mode is #GP(0).
                raise general_protection("MOV CR4 changing LA57 in IA-32e mode")
            cpu.cr4 = value
        mem.flush_tlb()
        return next_rip

    return plan


def cr0_problem(value: int) -> tuple[bool, str] | None:
    """Why a CR0 value cannot be loaded: (True, reason) for #GP(0) (bits 63:32, PG or PE
    clear in IA-32e mode, NW without CD), (False, reason) for what is not modelled (AM,
    reserved bits 31:0, ET = 0); None if it can."""
    if value >> 32:
        return True, f"CR0 {value:#x}: bits 63:32 set"
    if not value & CR0_PG or not value & CR0_PE:
        return True, f"CR0 {value:#x}: PG or PE clear in IA-32e mode"
    if value & CR0_NW and not value & CR0_CD:
        return True, f"CR0 {value:#x}: NW = 1 with CD = 0"
    if value & CR0_AM:
        return False, f"CR0 {value:#x}: AM set (alignment checking is not modelled)"
    if value & ~_CR0_DEFINED or not value & CR0_ET:
        return False, f"CR0 {value:#x}: reserved bits set or ET clear"
    return None


# ---- dispatch --------------------------------------------------------------------------------

_BY_MNEMONIC: Final[dict[str, Callable[[Decoded], Plan]]] = {
    "MOV": _mov,
    "MOVZX": _extend,
    "MOVSX": _extend,
    "MOVSXD": _extend,
    "LEA": _lea,
    "XCHG": _xchg,
    **dict.fromkeys(_ALU, _alu),
    **dict.fromkeys(("INC", "DEC", "NEG", "NOT"), _unary),
    "XADD": _xadd,
    "CMPXCHG": _cmpxchg,
    "CMPXCHG8B": _cmpxchg_wide,
    "CMPXCHG16B": _cmpxchg_wide,
    **dict.fromkeys(("BT", "BTS", "BTR", "BTC"), _bit_test),
    "PUSH": _push_op,
    "POP": _pop_op,
    "PUSHF": _pushf,
    "PUSHFD": _pushf,
    "PUSHFQ": _pushf,
    "POPF": _popf,
    "POPFD": _popf,
    "POPFQ": _popf,
    "ENTER": _enter,
    "LEAVE": _leave,
    "CALL": _call,
    "RET": _ret,
    "JMP": _jmp,
    **dict.fromkeys(("CLD", "STD", "STAC", "CLAC"), _flag_op),
    **dict.fromkeys(("CLI", "STI"), _interrupt_flag),
    **dict.fromkeys(("PREFETCHT0", "PREFETCHT1", "PREFETCHT2", "PREFETCHNTA", "PREFETCHW"), _nop),
    "CLFLUSH": _clflush,
    "CLFLUSHOPT": _clflush,
    "INVLPG": _invlpg,
    "CPUID": _cpuid,
    "HLT": _hlt,
    "UD2": _undefined,
    "LOCK": _undefined,
    **system_instructions.BUILDERS,
}
_STRING_FAMILIES: Final = ("MOVS", "STOS", "LODS", "CMPS", "SCAS")
#: 0x90 (and 66/REX.W 90), 0F 1F /0 and PAUSE (F3 90, a spin-loop hint: SDM "PAUSE");
#: other 0F 1F / 0F 18 encodings are reserved NOPs, not modelled.
_NOP_CODES: Final = frozenset({"NOPD", "NOPW", "NOPQ", "NOP_RM16", "NOP_RM32", "NOP_RM64", "PAUSE"})
#: Far CALL/JMP through memory share the near forms' mnemonics (system_instructions).
_FAR_CODES: Final = frozenset(
    {"CALL_M1664", "CALL_M1632", "CALL_M1616", "JMP_M1664", "JMP_M1632", "JMP_M1616"}
)


def compile_plan(d: Decoded) -> Plan:
    """The Plan for ``d``; Unsupported (naming the reason) for anything outside the families."""
    if d.code in _NOP_CODES:
        return _nop(d)
    if d.code in _FAR_CODES:
        builder: Callable[[Decoded], Plan] | None = system_instructions.far_transfer
    elif d.mnemonic.startswith("J") and d.condition is not None:
        builder = _jcc
    elif d.mnemonic.startswith("CMOV"):
        builder = _cmov
    elif d.mnemonic.startswith("SET") and d.condition is not None:
        builder = _setcc
    elif d.mnemonic[:4] in _STRING_FAMILIES and any(isinstance(o, StringMem) for o in d.operands):
        builder = _string
    else:
        builder = _BY_MNEMONIC.get(d.mnemonic)
    if builder is None:
        raise Unsupported("instruction not modelled")
    try:
        return builder(d)
    except (_Shape, system_instructions.Shape) as shape:
        raise Unsupported(f"form not modelled ({shape})") from None
