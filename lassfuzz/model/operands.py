"""Compiled operands: how an instruction reads and writes a register, memory or immediate.

A destination is used in three steps, ``locate`` (all checks, may fault), ``get`` and ``put``,
so that every fault of an instruction happens before its first register write (precise faults).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from lassfuzz.arch import MASK64, RSP
from lassfuzz.model.decode import Imm, Mem, Operand, Reg
from lassfuzz.model.faults import Unsupported, general_protection
from lassfuzz.model.lass import Kind
from lassfuzz.model.memory import LinearMemory, Location
from lassfuzz.model.state import CS, MASK32, SEGMENT_INDEX, SS, Cpu

#: (cpu, rip of the instruction) -> address.
AddressFunction = Callable[[Cpu, int], int]


def sign_extend(value: int, bits: int) -> int:
    """Two's-complement value of the low ``bits`` of ``value`` (a Python int, may be < 0)."""
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def effective_address(m: Mem) -> AddressFunction:
    """The offset base + index * scale + displacement modulo the address size (SDM Vol. 1
    3.7.5); RIP-relative offsets count from the instruction's first byte (see decode.py)."""
    disp = m.displacement
    amask = (1 << m.address_bits) - 1
    base, index, scale = m.base, m.index, m.scale
    if m.rip_relative:
        return lambda cpu, rip: (rip + disp) & amask
    if base is not None and index is not None:
        return lambda cpu, rip: (cpu.gpr[base] + cpu.gpr[index] * scale + disp) & amask
    if base is not None:
        return lambda cpu, rip: (cpu.gpr[base] + disp) & amask
    if index is not None:
        return lambda cpu, rip: (cpu.gpr[index] * scale + disp) & amask
    constant = disp & amask
    return lambda cpu, rip: constant


def segment_base(segment: str) -> Callable[[Cpu], int] | None:
    """The segment base in 64-bit mode: FS.base and GS.base for FS/GS, None (0) for CS, DS,
    ES and SS (SDM Vol. 3A 3.4.4)."""
    if segment == "fs":
        return lambda cpu: cpu.fs_base
    if segment == "gs":
        return lambda cpu: cpu.gs_base
    return None


def linear_address(m: Mem) -> AddressFunction:
    """Effective address plus segment base, wrapping modulo 2^64; in compatibility mode
    modulo 2^32, through a usable segment (docs/machine.md "Modes")."""
    offset = effective_address(m)
    base = segment_base(m.segment)
    if m.linear_bits == 32:
        return compat_linear(m.segment, offset)
    if base is None:
        return offset
    return lambda cpu, rip: (offset(cpu, rip) + base(cpu)) & MASK64


def compat_linear(segment: str, offset: AddressFunction) -> AddressFunction:
    """Compatibility-mode linear address: (base + offset) mod 2^32, where every segment is
    flat except that FS/GS use ``fs_base``/``gs_base`` (docs/machine.md). A reference through
    a null DS/ES/FS/GS is #GP(0) (SDM Vol. 3A 3.4.2); code segments are not writable, so the
    CS: override (which the flat model cannot check for reads and writes alike) is not
    modelled."""
    if segment == "cs":
        raise Unsupported("CS segment override in compatibility mode")
    index = SEGMENT_INDEX[segment]
    base = segment_base(segment)

    def address(cpu: Cpu, rip: int) -> int:
        check_usable(cpu, index)
        linear = offset(cpu, rip)
        return (linear + base(cpu)) & MASK32 if base is not None else linear & MASK32

    return address


def check_usable(cpu: Cpu, index: int) -> None:
    """#GP(0) for a memory reference through a null data-segment selector outside 64-bit
    mode (SDM Vol. 3A 3.4.2: "null segment checking"); without descriptor tables every
    segment is flat and usable."""
    system = cpu.system
    if system is not None and index not in (CS, SS) and not system.selectors[index] & 0xFFFC:
        raise general_protection("memory reference through a null segment selector")


def push(cpu: Cpu, mem: LinearMemory, rsp: int, value: int, size: int) -> int:
    """Store ``value`` below ``rsp`` as an SS access; the new RSP (the caller writes it).
    The stack pointer wraps at the stack-address size (64 bits, or 32 with SS.B = 1 in
    compatibility mode: SDM Vol. 1 6.2.3)."""
    rsp = (rsp - size) & cpu.stack_mask
    mem.store(mem.locate(rsp, size, Kind.WRITE, stack=True), value & ((1 << (size * 8)) - 1))
    return rsp


def pop(cpu: Cpu, mem: LinearMemory, size: int) -> tuple[int, int]:
    """Read ``size`` bytes at RSP as an SS access: (value, new RSP not yet written)."""
    mask = cpu.stack_mask
    rsp = cpu.gpr[RSP] & mask
    return mem.read(rsp, size, stack=True), (rsp + size) & mask


class Slot(Protocol):
    """A compiled operand of ``size`` bytes."""

    size: int
    bits: int
    mask: int

    def locate(self, cpu: Cpu, mem: LinearMemory, rip: int, kind: Kind) -> Location | None: ...

    def get(self, cpu: Cpu, mem: LinearMemory, loc: Location | None) -> int: ...

    def put(self, cpu: Cpu, mem: LinearMemory, loc: Location | None, value: int) -> None: ...


class RegSlot:
    """A general-purpose register; 32-bit writes zero-extend, 8/16-bit writes merge (SDM
    Vol. 1 3.4.1.1)."""

    __slots__ = ("bits", "index", "mask", "shift", "size")

    def __init__(self, reg: Reg) -> None:
        self.index = reg.index
        self.shift = reg.shift
        self.size = reg.size
        self.bits = reg.size * 8
        self.mask = (1 << self.bits) - 1

    def locate(self, cpu: Cpu, mem: LinearMemory, rip: int, kind: Kind) -> Location | None:
        return None

    def get(self, cpu: Cpu, mem: LinearMemory, loc: Location | None) -> int:
        return (cpu.gpr[self.index] >> self.shift) & self.mask

    def put(self, cpu: Cpu, mem: LinearMemory, loc: Location | None, value: int) -> None:
        write_register(cpu, self.index, self.shift, self.size, value)


def write_register(cpu: Cpu, index: int, shift: int, size: int, value: int) -> None:
    """Write ``size`` bytes of GPR ``index`` at bit ``shift`` (SDM Vol. 1 3.4.1.1)."""
    if size == 8:
        cpu.gpr[index] = value & MASK64
    elif size == 4:
        cpu.gpr[index] = value & 0xFFFF_FFFF
    else:
        mask = ((1 << (size * 8)) - 1) << shift
        cpu.gpr[index] = (cpu.gpr[index] & ~mask) | ((value << shift) & mask)


class MemSlot:
    """A memory operand; ``stack`` when its segment is SS (LASS.md §4: #SS instead of #GP)."""

    __slots__ = ("address", "bits", "mask", "size", "stack")

    def __init__(self, m: Mem, size: int) -> None:
        self.address = linear_address(m)
        self.stack = m.segment == "ss"
        self.size = size
        self.bits = size * 8
        self.mask = (1 << self.bits) - 1

    def locate(self, cpu: Cpu, mem: LinearMemory, rip: int, kind: Kind) -> Location:
        return mem.locate(self.address(cpu, rip), self.size, kind, stack=self.stack)

    def get(self, cpu: Cpu, mem: LinearMemory, loc: Location | None) -> int:
        assert loc is not None
        return mem.load(loc)

    def put(self, cpu: Cpu, mem: LinearMemory, loc: Location | None, value: int) -> None:
        assert loc is not None
        mem.store(loc, value & self.mask)


class ImmSlot:
    """An immediate, truncated to the operand size (it arrives sign-extended to 64 bits)."""

    __slots__ = ("bits", "mask", "size", "value")

    def __init__(self, imm: Imm, size: int) -> None:
        self.size = size
        self.bits = size * 8
        self.mask = (1 << self.bits) - 1
        self.value = imm.value & self.mask

    def locate(self, cpu: Cpu, mem: LinearMemory, rip: int, kind: Kind) -> Location | None:
        return None

    def get(self, cpu: Cpu, mem: LinearMemory, loc: Location | None) -> int:
        return self.value

    def put(self, cpu: Cpu, mem: LinearMemory, loc: Location | None, value: int) -> None:
        raise Unsupported("write to an immediate operand")


def slot(op: Operand, size: int | None = None) -> Slot:
    """Compile ``op``; ``size`` overrides the memory/immediate size (e.g. the other operand's)."""
    if isinstance(op, Reg):
        return RegSlot(op)
    if isinstance(op, Mem):
        return MemSlot(op, size or op.size)
    if isinstance(op, Imm):
        if size is None:
            raise Unsupported("immediate operand without an operand size")
        return ImmSlot(op, size)
    raise Unsupported(f"operand {op} cannot be used here")
