"""Segment descriptors and descriptor tables: parsing, implicit table accesses and the selector
checks of segment loads (SDM Vol. 3A 3.4-3.5, 5.5-5.8; docs/machine.md "Descriptor tables").

Every read of the GDT, LDT or TSS made here is an *implicit supervisor* access (LASS.md §2,
§3 rules 7/8; for paging a supervisor access where SMAP ignores AC); setting a descriptor's
Accessed or busy bit is an implicit 1-byte write of its type byte, made only when the bit is
clear. Descriptors are parsed here from raw bytes: nothing is shared with lassfuzz.system, which
only builds cases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from lassfuzz.arch import MASK64, VEC_GP, VEC_NP, VEC_SS, VEC_TS
from lassfuzz.case import State
from lassfuzz.model.faults import CpuFault, Unsupported
from lassfuzz.model.lass import Kind
from lassfuzz.model.memory import LinearMemory, is_canonical
from lassfuzz.model.paging import peek
from lassfuzz.model.physical import PhysicalMemory
from lassfuzz.model.state import CS, DS, ES, FS, GS, LDTR, SS, TR, Cpu, SystemState

# System descriptor types in IA-32e mode (SDM Vol. 3A Table 3-2).
TYPE_LDT: Final = 0x2
TYPE_TSS_AVAILABLE: Final = 0x9
TYPE_TSS_BUSY: Final = 0xB
TYPE_CALL_GATE: Final = 0xC
TYPE_INTERRUPT_GATE: Final = 0xE
TYPE_TRAP_GATE: Final = 0xF
_FLAT_LIMIT: Final = 0xFFFF_FFFF
#: A table limit that no offset passes: a null LDTR or TR (SDM Vol. 3A 3.5.1).
NO_TABLE: Final = -1


@dataclass(frozen=True)
class Descriptor:
    """A segment or system descriptor: ``low`` is its first 8 bytes, ``high`` the second 8 of a
    16-byte IA-32e system descriptor or gate (0 for an 8-byte read). SDM Vol. 3A 3.4.5, 3.5."""

    low: int
    high: int = 0

    @property
    def type(self) -> int:
        return (self.low >> 40) & 0xF

    @property
    def system(self) -> bool:
        """S = 0: a system descriptor or gate."""
        return not (self.low >> 44) & 1

    @property
    def dpl(self) -> int:
        return (self.low >> 45) & 3

    @property
    def present(self) -> bool:
        return bool((self.low >> 47) & 1)

    @property
    def long(self) -> bool:
        """L: 64-bit code segment."""
        return bool((self.low >> 53) & 1)

    @property
    def default32(self) -> bool:
        """D/B: 32-bit default operand size (code) or 32-bit stack (data)."""
        return bool((self.low >> 54) & 1)

    # The access byte is bits 47:40: P, DPL, S, then the type (bit 43 executable, bit 42
    # conforming/expand-down, bit 41 readable/writable). The flags below test those bits
    # directly (each is "S = 1 and ...").

    @property
    def code(self) -> bool:
        """S = 1, executable."""
        return (self.low >> 43) & 0b11 == 0b11

    @property
    def data(self) -> bool:
        """S = 1, not executable."""
        return (self.low >> 43) & 0b11 == 0b10

    @property
    def conforming(self) -> bool:
        """A code segment with C = 1."""
        return (self.low >> 42) & 0b111 == 0b111

    @property
    def readable(self) -> bool:
        """Data segments are always readable; code segments when R = 1."""
        return self.data or (self.low >> 41) & 0b1101 == 0b1101

    @property
    def writable(self) -> bool:
        """A data segment with W = 1."""
        return (self.low >> 41) & 0b1101 == 0b1001

    @property
    def base(self) -> int:
        """Base address; system descriptors in IA-32e mode add bits 63:32 from ``high``."""
        low = self.low
        base = ((low >> 16) & 0xFF_FFFF) | ((low >> 56) & 0xFF) << 24
        return base | (self.high & 0xFFFF_FFFF) << 32 if self.system else base

    @property
    def limit(self) -> int:
        """The effective limit in bytes (G = 1 scales by 4 KiB, SDM Vol. 3A 3.4.5)."""
        raw = (self.low & 0xFFFF) | ((self.low >> 48) & 0xF) << 16
        return (raw << 12) | 0xFFF if (self.low >> 55) & 1 else raw

    @property
    def flat(self) -> bool:
        return self.base == 0 and self.limit == _FLAT_LIMIT

    @property
    def access_rights(self) -> int:
        """What LAR returns (32-bit operand size): bytes 5-6 of the descriptor, masked by
        0x00F0FF00 (SDM Vol. 2 LAR)."""
        return (self.low >> 32) & 0x00F0_FF00


def selector_error(selector: int, ext: int = 0) -> int:
    """The error code naming a selector: index and TI, with EXT in bit 0 (SDM Vol. 3A 6.13)."""
    return (selector & 0xFFFC) | ext


def is_null(selector: int) -> bool:
    """Index 0 in the GDT (any RPL) is the null selector (SDM Vol. 3A 3.4.2)."""
    return not selector & 0xFFFC


# ---- table accesses --------------------------------------------------------------------------


def descriptor_address(system: SystemState, selector: int, size: int) -> int | None:
    """Linear address of the ``size``-byte descriptor ``selector`` names, or None when it lies
    beyond the GDT or LDT limit (TI = 1 with a null LDTR has no table)."""
    offset = selector & 0xFFF8
    if selector & 4:
        base, limit = system.ldt_base, system.ldt_limit
    else:
        base, limit = system.gdt_base, system.gdt_limit
    if offset + size - 1 > limit:
        return None
    return (base + offset) & MASK64


def read_implicit(mem: LinearMemory, address: int, size: int) -> int:
    """An implicit supervisor read (descriptor table, IDT, TSS)."""
    return mem.load(mem.locate(address, size, Kind.READ, stack=False, implicit=True))


def read_descriptor(mem: LinearMemory, address: int) -> Descriptor:
    """Read the first 8 bytes of the descriptor at ``address``."""
    return Descriptor(read_implicit(mem, address, 8))


def read_upper(
    mem: LinearMemory, system: SystemState, selector: int, address: int, low: Descriptor
) -> Descriptor | None:
    """Complete a system descriptor the instruction accepts with its second 8 bytes (system
    descriptors and gates are 16 bytes in IA-32e mode; docs/machine.md "Descriptor tables"),
    or None when they lie beyond the table limit."""
    if descriptor_address(system, selector, 16) is None:
        return None
    return Descriptor(low.low, read_implicit(mem, (address + 8) & MASK64, 8))


def set_type_bit(mem: LinearMemory, address: int, descriptor: Descriptor, bit: int) -> None:
    """Set the Accessed (bit 0) or busy (bit 1) bit of the descriptor at ``address`` by an
    implicit 1-byte write of its type byte, only when the bit is clear (SDM Vol. 3A 3.4.5.1)."""
    if descriptor.type & bit:
        return
    location = mem.locate((address + 5) & MASK64, 1, Kind.WRITE, stack=False, implicit=True)
    mem.store(location, (descriptor.low >> 40) & 0xFF | bit)


def fetch_segment(
    mem: LinearMemory, system: SystemState, selector: int, ext: int = 0
) -> tuple[int, Descriptor]:
    """Read the 8-byte descriptor of a code/data selector, or #GP(selector) beyond the table
    limit (SDM Vol. 3A 5.5)."""
    address = descriptor_address(system, selector, 8)
    if address is None:
        raise CpuFault(
            VEC_GP, selector_error(selector, ext), f"selector {selector:#x} beyond limit"
        )
    return address, read_descriptor(mem, address)


def read_tss(cpu: Cpu, mem: LinearMemory, offset: int, ext: int) -> int:
    """An 8-byte TSS field (RSPn/ISTn): #TS(TR selector + EXT) beyond the TSS limit (SDM Vol. 3A
    6.14.4), else an implicit supervisor read."""
    system = cpu.system
    assert system is not None
    if offset + 7 > system.tr_limit:
        raise CpuFault(VEC_TS, selector_error(system.selectors[TR], ext),
                       f"TSS field at offset {offset:#x} beyond the TSS limit")  # fmt: skip
    return read_implicit(mem, (system.tr_base + offset) & MASK64, 8)


# ---- segment loads (SDM Vol. 2 MOV, POP; Vol. 3A 5.5-5.7) ---------------------------------------


def load_data_segment(cpu: Cpu, mem: LinearMemory, index: int, selector: int) -> None:
    """MOV/POP to DS, ES, FS or GS. A null selector loads the null segment (FS/GS base 0, as
    Intel processors do); otherwise the descriptor must be data or readable code, present,
    and (unless conforming code) DPL >= max(CPL, RPL). FS/GS bases become the descriptor base."""
    system = cpu.system
    assert system is not None
    if is_null(selector):
        system.selectors[index] = selector
        system.segment_dpl[index] = 3
        _set_base(cpu, index, 0)
        return
    address, descriptor = fetch_segment(mem, system, selector)
    if not descriptor.readable or (
        not descriptor.conforming and max(cpu.cpl, selector & 3) > descriptor.dpl
    ):
        raise CpuFault(VEC_GP, selector_error(selector), f"selector {selector:#x}: not loadable")
    if not descriptor.present:
        raise CpuFault(VEC_NP, selector_error(selector), f"segment {selector:#x} not present")
    if not cpu.cs_l:
        _require_flat_data(descriptor, selector)
    set_type_bit(mem, address, descriptor, 1)
    system.selectors[index] = selector
    system.segment_dpl[index] = 3 if descriptor.conforming else descriptor.dpl
    _set_base(cpu, index, descriptor.base)


def load_stack_segment(cpu: Cpu, mem: LinearMemory, selector: int) -> None:
    """MOV/POP SS: a null selector only in 64-bit mode at CPL < 3 with RPL = CPL (else
    #GP(0)); otherwise RPL = CPL, a writable data segment with DPL = CPL (#GP(selector)),
    present (#SS(selector))."""
    system = cpu.system
    assert system is not None
    if is_null(selector):
        if cpu.cs_l and cpu.cpl < 3 and selector & 3 == cpu.cpl:
            system.selectors[SS] = selector
            return
        raise CpuFault(VEC_GP, 0, "null selector loaded into SS")
    address, descriptor = fetch_segment(mem, system, selector)
    if selector & 3 != cpu.cpl or not descriptor.writable or descriptor.dpl != cpu.cpl:
        raise CpuFault(VEC_GP, selector_error(selector), f"selector {selector:#x}: not a stack")
    if not descriptor.present:
        raise CpuFault(VEC_SS, selector_error(selector), f"stack segment {selector:#x} absent")
    if not cpu.cs_l:
        _require_flat_data(descriptor, selector)
        if not descriptor.default32:
            raise Unsupported(f"stack segment {selector:#x} with B = 0 (16-bit stack)")
    set_type_bit(mem, address, descriptor, 1)
    system.selectors[SS] = selector


def _require_flat_data(descriptor: Descriptor, selector: int) -> None:
    """Compatibility mode: only flat writable data segments are modelled (docs/machine.md)."""
    if not (descriptor.writable and descriptor.flat):
        raise Unsupported(
            f"segment {selector:#x} in compatibility mode is not flat writable data "
            "(segment limits and rights are not modelled)"
        )


def _set_base(cpu: Cpu, index: int, base: int) -> None:
    if index == FS:
        cpu.fs_base = base
    elif index == GS:
        cpu.gs_base = base


# ---- the trusted boot ---------------------------------------------------------------------------


def boot(cpu: Cpu, phys: PhysicalMemory, state: State) -> str | None:
    """Load the hidden parts of LDTR, TR, CS, SS, DS, ES, FS and GS from the initial image,
    with no access check, trace entry or A-bit write (docs/machine.md "Descriptor tables",
    Start); returns why the state cannot be modelled, or None."""
    system = cpu.system
    assert system is not None

    frames: dict[int, int | None] = {}
    # Nothing is written during the boot, so a descriptor read twice (SS, DS, ES... often share
    # a selector) is the same both times.
    descriptors: dict[tuple[int, bool], Descriptor] = {}

    def read(selector: int, wide: bool) -> Descriptor | str:
        address = descriptor_address(system, selector, 16 if wide else 8)
        if address is None:
            return f"selector {selector:#x} beyond its table limit"
        descriptor = descriptors.get((address, wide))
        if descriptor is not None:
            return descriptor
        if not is_canonical(address, cpu.la57):
            return f"descriptor of selector {selector:#x} at non-canonical {address:#x}"
        raw = bytearray()
        for offset in range(0, 16 if wide else 8, 8):
            linear = (address + offset) & MASK64
            page = linear & ~0xFFF
            if page not in frames:  # the tables share a few pages: walk each once
                frames[page] = peek(phys, cpu.cr3, page, cpu.efer, la57=cpu.la57)
            frame = frames[page]
            if frame is None or (linear & 0xFFF) > 0xFF8:
                return f"descriptor of selector {selector:#x} is not in mapped memory"
            raw += phys.read(frame + (linear & 0xFFF), 8)
        descriptor = Descriptor(
            int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")
        )
        descriptors[address, wide] = descriptor
        return descriptor

    selectors = system.selectors
    for index, wanted in ((LDTR, TYPE_LDT), (TR, None)):
        selector = selectors[index]
        if is_null(selector):
            if index == LDTR:
                system.ldt_limit = NO_TABLE
            else:
                system.tr_limit = NO_TABLE
            continue
        if selector & 4:
            return f"{'LDTR' if index == LDTR else 'TR'} selector {selector:#x} points into the LDT"
        descriptor = read(selector, True)
        if isinstance(descriptor, str):
            return descriptor
        types = (wanted,) if wanted is not None else (TYPE_TSS_AVAILABLE, TYPE_TSS_BUSY)
        if not descriptor.system or descriptor.type not in types or not descriptor.present:
            return f"selector {selector:#x} is not a present {'LDT' if wanted else 'TSS'}"
        if index == LDTR:
            system.ldt_base, system.ldt_limit = descriptor.base, descriptor.limit
        else:
            system.tr_base, system.tr_limit = descriptor.base, descriptor.limit
    code = read(selectors[CS], False)
    if isinstance(code, str):
        return f"CS: {code}"
    if is_null(selectors[CS]) or not code.code or not code.present or code.conforming:
        return "CS is not a present non-conforming code segment"
    if code.dpl != cpu.cpl or selectors[CS] & 3 != cpu.cpl:
        return f"CS DPL {code.dpl} / RPL {selectors[CS] & 3} differ from CPL {cpu.cpl}"
    if state.mode == "64" and not (code.long and not code.default32):
        return "CS is not a 64-bit code segment (L = 1, D = 0) in 64-bit mode"
    if state.mode == "compat" and not (not code.long and code.default32 and code.flat):
        return "CS is not a flat 32-bit code segment (L = 0, D = 1) in compatibility mode"
    for index in (SS, DS, ES, FS, GS):
        selector = selectors[index]
        name = ("ss", "ds", "es", "fs", "gs")[index - SS]
        if is_null(selector):
            if index == SS and (state.mode != "64" or cpu.cpl == 3 or selector & 3 != cpu.cpl):
                return "SS is null outside 64-bit mode at CPL < 3 with RPL = CPL"
            system.segment_dpl[index] = 3
            continue
        descriptor = read(selector, False)
        if isinstance(descriptor, str):
            return f"{name.upper()}: {descriptor}"
        if index == SS:
            usable = descriptor.writable and descriptor.dpl == cpu.cpl == selector & 3
        else:
            usable = descriptor.readable and (
                descriptor.conforming or descriptor.dpl >= max(cpu.cpl, selector & 3)
            )
        if not usable or not descriptor.present:
            return f"{name.upper()} selector {selector:#x} could not be loaded at CPL {cpu.cpl}"
        if state.mode == "compat" and not (
            descriptor.writable and descriptor.flat and (index != SS or descriptor.default32)
        ):
            return f"{name.upper()} is not a flat writable 32-bit data segment in compat mode"
        system.segment_dpl[index] = 3 if descriptor.conforming else descriptor.dpl
    return None


def canonical_base(cpu: Cpu, descriptor: Descriptor, selector: int) -> None:
    """LTR/LLDT: a system descriptor's 64-bit base must be canonical, else #GP(selector)."""
    if not is_canonical(descriptor.base, cpu.la57):
        raise CpuFault(
            VEC_GP, selector_error(selector), f"selector {selector:#x}: base not canonical"
        )
