"""Descriptor tables and segment registers of cases with ``State.system`` (docs/machine.md,
"System level"), emulated by the shim.

QEMU would read descriptors itself (``helper_load_seg`` and friends read the GDT through the
TLB), but its TLB-fill hook cannot tell an implicit supervisor access from an access at the
current CPL, and ``reg_write`` of FS/GS performs a real descriptor load (measured). So the shim
keeps the segment state (selectors and hidden descriptors, GDTR, IDTR, LDTR, TR) itself and
emulates, in code hooks, every instruction that reads or changes it: MOV/POP to a segment
register, MOV/PUSH from one, LAR/LSL/VERR/VERW, LGDT/LIDT/LLDT/LTR and SGDT/SIDT/SLDT/STR.
Descriptor reads and A/busy-bit writes are implicit supervisor accesses; operands are explicit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import iced_x86 as iced
from iced_x86 import Mnemonic, OpAccess, OpKind, Register, RegisterExt
from unicorn.x86_const import UC_X86_REG_EFLAGS, UC_X86_REG_FS_BASE, UC_X86_REG_GS_BASE

from lassfuzz.arch import MASK64, RFLAGS_ZF, VEC_NP, VEC_SS, VEC_UD
from lassfuzz.case import SELECTOR_NAMES, System
from lassfuzz.emulator.decode import memory_accesses
from lassfuzz.emulator.descriptors import (
    TYPE_ACCESSED,
    TYPE_BUSY,
    TYPE_CALL_GATE,
    TYPE_LDT,
    TYPE_TSS_AVAILABLE,
    TYPE_TSS_BUSY,
    Descriptor,
)
from lassfuzz.emulator.memory import Memory, SystemFault, SystemUnsupported, gp
from lassfuzz.emulator.shim import GPR_IDS, is_canonical
from lassfuzz.outcome import Fault, SystemRegisters

if TYPE_CHECKING:
    from lassfuzz.emulator.shim import CaseRun

SEGMENTS: Final = {
    Register.ES: "es",
    Register.CS: "cs",
    Register.SS: "ss",
    Register.DS: "ds",
    Register.FS: "fs",
    Register.GS: "gs",
}
_INFO: Final = iced.InstructionInfoFactory()
_NULL_CHECKED: Final = frozenset({"ds", "es", "fs", "gs"})
_BASE_REGISTERS: Final = {"fs": UC_X86_REG_FS_BASE, "gs": UC_X86_REG_GS_BASE}
#: System-descriptor types LAR accepts in IA-32e mode (LDT, 64-bit TSS, 64-bit call gate); LSL
#: accepts the same without the gate (SDM LAR, LSL).
_LAR_SYSTEM_TYPES: Final = frozenset({TYPE_LDT, TYPE_TSS_AVAILABLE, TYPE_TSS_BUSY, TYPE_CALL_GATE})
_LSL_SYSTEM_TYPES: Final = frozenset({TYPE_LDT, TYPE_TSS_AVAILABLE, TYPE_TSS_BUSY})


def is_null(selector: int) -> bool:
    """Index 0 in the GDT (any RPL)."""
    return selector & 0xFFFC == 0


def selector_fault(vector: int, selector: int, rip: int, detail: str) -> SystemFault:
    return SystemFault(Fault(vector, selector & 0xFFFC, rip), detail)


class SystemState:
    """The shim's segment and descriptor-table state for one run (``State.system``).

    Created from the initial image as a trusted boot (no check, no A bit, no trace); raises
    :class:`SystemUnsupported` for initial states outside the machine.
    """

    def __init__(self, run: CaseRun, system: System) -> None:
        self.run = run
        self.memory = Memory(run)
        self.selectors = dict(zip(SELECTOR_NAMES, system.selectors, strict=True))
        self.gdtr = (system.gdt_base, system.gdt_limit)
        self.idtr = (system.idt_base, system.idt_limit)
        self.star, self.lstar, self.sfmask = system.star, system.lstar, system.sfmask
        self.hidden: dict[str, Descriptor | None] = {}
        self.ldt: tuple[int, int] | None = None  # (base, limit)
        self.tss: tuple[int, int] | None = None
        self._boot()

    # ----------------------------------------------------------------------------- boot

    def _boot(self) -> None:
        state = self.run.case.state
        for name in ("gdt_base", "idt_base"):
            if not is_canonical(getattr(state.system, name), self.run.bits):
                raise SystemUnsupported(f"state.system.{name} is not canonical")
        if not is_null(self.selectors["ldtr"]):
            ldt = self._boot_descriptor(self.selectors["ldtr"], "ldtr", system=True)
            if ldt.s or ldt.type != TYPE_LDT or not ldt.present:
                raise SystemUnsupported("state.system.ldtr does not select a present LDT")
            self.ldt = (ldt.base, ldt.limit)
        if not is_null(self.selectors["tr"]):
            tss = self._boot_descriptor(self.selectors["tr"], "tr", system=True)
            if tss.s or tss.type not in (TYPE_TSS_AVAILABLE, TYPE_TSS_BUSY) or not tss.present:
                raise SystemUnsupported("state.system.tr does not select a present 64-bit TSS")
            self.tss = (tss.base, tss.limit)
        compat = state.mode == "compat"
        for name in ("cs", "ss", "ds", "es", "fs", "gs"):
            selector = self.selectors[name]
            descriptor = None if is_null(selector) else self._boot_descriptor(selector, name)
            self.hidden[name] = descriptor
            if name != "cs" and not self._loadable(name, selector, descriptor, state.cpl, compat):
                raise SystemUnsupported(
                    f"state.system.{name} {selector:#x} is not loadable at CPL {state.cpl} "
                    f"in {state.mode} mode"
                )
        cs = self.hidden["cs"]
        if (
            cs is None
            or not cs.code
            or not cs.present
            or cs.dpl != state.cpl
            or cs.long == compat
            or (compat and not (cs.default32 and cs.flat))
        ):
            raise SystemUnsupported(
                f"state.system.cs {self.selectors['cs']:#x} is not a present {state.mode}-mode "
                f"code segment with DPL {state.cpl}"
            )

    @staticmethod
    def _loadable(
        name: str, selector: int, descriptor: Descriptor | None, cpl: int, compat: bool
    ) -> bool:
        """Whether the initial SS/DS/ES/FS/GS is a state the machine starts from
        (docs/machine.md, "Start")."""
        if descriptor is None:
            if name == "ss":
                return not compat and cpl < 3 and selector & 3 == cpl
            return not (compat and name in ("ds", "es"))
        if not descriptor.present:
            return False
        if compat and not (descriptor.writable and descriptor.flat):
            return False
        if name == "ss":
            return (
                descriptor.writable
                and descriptor.dpl == cpl
                and selector & 3 == cpl
                and (descriptor.default32 or not compat)
            )
        privileged = not descriptor.conforming and descriptor.dpl < max(cpl, selector & 3)
        return descriptor.readable and not privileged

    def _boot_descriptor(self, selector: int, name: str, *, system: bool = False) -> Descriptor:
        base, limit = self._table(selector) or (None, 0)
        index = selector & ~7
        size = 16 if system else 8
        if base is None or index + size - 1 > limit:
            raise SystemUnsupported(f"state.system.{name} {selector:#x} is beyond its table")
        low = self.memory.trusted_read(base + index, 8)
        high = self.memory.trusted_read(base + index + 8, 8) if system else 0
        if low is None or high is None:
            raise SystemUnsupported(f"state.system.{name}: descriptor not mapped")
        return Descriptor(low, high)

    def _table(self, selector: int) -> tuple[int, int] | None:
        """(base, limit) of the table ``selector`` indexes (None: a null LDTR)."""
        return self.ldt if selector & 4 else self.gdtr

    # ----------------------------------------------------------------------------- reporting

    def registers(self) -> SystemRegisters:
        return SystemRegisters(
            selectors=tuple(self.selectors[name] for name in SELECTOR_NAMES),
            gdt_base=self.gdtr[0],
            gdt_limit=self.gdtr[1],
            idt_base=self.idtr[0],
            idt_limit=self.idtr[1],
        )

    # ----------------------------------------------------------------------------- descriptors

    def read_descriptor(
        self, selector: int, rip: int, *, system: bool = False, probe: bool = False
    ) -> tuple[Descriptor, int] | None:
        """Read the (low 8 bytes of the) descriptor ``selector`` indexes, an implicit
        supervisor read; returns it with its linear address. An index beyond the table (16
        bytes must fit when ``system``), or a null LDTR, is #GP(selector), or None when
        ``probe`` (LAR/LSL/VERR/VERW)."""
        table = self._table(selector)
        index = selector & ~7
        size = 16 if system else 8
        if table is None or index + size - 1 > table[1]:
            if probe:
                return None
            raise selector_fault(13, selector, rip, f"selector {selector:#x} beyond its table")
        address = (table[0] + index) & MASK64
        return Descriptor(self.memory.read(address, 8, rip, implicit=True)), address

    def read_upper(self, descriptor: Descriptor, address: int, rip: int) -> Descriptor:
        """A 16-byte system descriptor: read bytes 8-15 (a second implicit 8-byte read)."""
        high = self.memory.read((address + 8) & MASK64, 8, rip, implicit=True)
        return Descriptor(descriptor.low, high)

    def set_type_bit(self, descriptor: Descriptor, address: int, bit: int, rip: int) -> None:
        """Set the A or busy bit: an implicit 1-byte write of the type byte, only if clear."""
        if descriptor.type & bit:
            return
        access_byte = (descriptor.low >> 40) & 0xFF
        self.memory.write((address + 5) & MASK64, access_byte | bit, 1, rip, implicit=True)

    def load_segment(self, name: str, selector: int, rip: int) -> None:
        """MOV/POP to DS, ES, FS, GS or SS (SDM MOV, "Operation"; 64-bit and compat mode)."""
        run = self.run
        cpl = run.cpl
        if is_null(selector):
            if name == "ss" and not (run.cs_l and cpl < 3 and selector & 3 == cpl):
                raise gp(0, rip, f"null selector {selector:#x} into SS")
            self._commit(name, selector, None)
            return
        # The descriptor is read before the RPL/type/DPL checks (SDM MOV: one check of all).
        found = self.read_descriptor(selector, rip)
        assert found is not None
        descriptor, address = found
        rpl = selector & 3
        if name == "ss":
            if rpl != cpl or not descriptor.writable or descriptor.dpl != cpl:
                raise selector_fault(13, selector, rip, f"SS {selector:#x}: not writable at CPL")
            if not descriptor.present:
                raise selector_fault(VEC_SS, selector, rip, f"SS {selector:#x} not present")
        else:
            if not descriptor.readable:
                raise selector_fault(13, selector, rip, f"{name} {selector:#x}: not readable")
            if not descriptor.conforming and (rpl > descriptor.dpl or cpl > descriptor.dpl):
                raise selector_fault(13, selector, rip, f"{name} {selector:#x}: DPL check")
            if not descriptor.present:
                raise selector_fault(VEC_NP, selector, rip, f"{name} {selector:#x} not present")
        if not run.cs_l and not descriptor.flat:
            raise SystemUnsupported(f"non-flat segment {selector:#x} in compatibility mode")
        self.set_type_bit(descriptor, address, TYPE_ACCESSED, rip)
        self._commit(name, selector, descriptor)

    def load_null(self, name: str) -> None:
        """A null selector in a data-segment register (IRETQ to an outer level)."""
        self._commit(name, 0, None)

    def _commit(self, name: str, selector: int, descriptor: Descriptor | None) -> None:
        self.selectors[name] = selector
        self.hidden[name] = descriptor
        if name in _BASE_REGISTERS:
            # 64-bit mode: the hidden base is the descriptor's, zero-extended; a null selector
            # clears it (Intel; AMD keeps it).
            base = 0 if descriptor is None else descriptor.base
            self.run.uc.reg_write(_BASE_REGISTERS[name], base)

    # ----------------------------------------------------------------------------- instructions

    def uses_null_segment(self, instruction: iced.Instruction) -> bool:
        """Whether some memory access of ``instruction`` goes through a DS/ES/FS/GS that is
        null now."""
        return any(
            used.access != OpAccess.NO_MEM_ACCESS
            and (name := SEGMENTS.get(used.segment)) in _NULL_CHECKED
            and is_null(self.selectors[name])
            for used in _INFO.info(instruction).used_memory()
        )

    def check_null_segments(self, instruction: iced.Instruction) -> None:
        """Compatibility mode: a memory access through a null DS/ES/FS/GS is #GP(0) (SDM Vol.
        3A 3.4.2; QEMU does not check). 64-bit mode has no null-segment check. A REP string
        instruction with a zero count makes no access."""
        repeated = instruction.has_rep_prefix or instruction.has_repne_prefix
        # ECX counts with 32-bit addressing.
        if (
            repeated
            and instruction.is_string_instruction
            and not self.run.register(Register.RCX) & 0xFFFF_FFFF
        ):
            return
        if not self.uses_null_segment(instruction):
            return
        source = SEGMENTS.get(instruction.memory_segment)
        two_segments = instruction.mnemonic in (Mnemonic.MOVSB, Mnemonic.MOVSW, Mnemonic.MOVSD)
        two_segments |= instruction.mnemonic in (Mnemonic.CMPSB, Mnemonic.CMPSW, Mnemonic.CMPSD)
        if two_segments and source in _NULL_CHECKED and not is_null(self.selectors[source]):
            # MOVS/CMPS read [source:ESI] before touching ES:[EDI]: a fault there comes first.
            size = iced.MemorySizeExt.size(instruction.memory_size)
            esi = self.run.register(Register.RSI)
            address = (self.run.segment_base(instruction.memory_segment) + esi) & 0xFFFF_FFFF
            if self.memory.would_fault(address, size, "read"):
                return
        raise gp(0, instruction.ip, "memory access through a null segment register")

    def emulates(self, instruction: iced.Instruction) -> bool:
        return self._handler(instruction) is not None

    def execute(self, instruction: iced.Instruction) -> None:
        """Perform ``instruction`` (Unicorn stopped in its code hook) up to, not including,
        the RIP update; raises :class:`SystemFault` or :class:`SystemUnsupported`."""
        handler = self._handler(instruction)
        assert handler is not None
        handler(instruction)

    def _handler(self, instruction: iced.Instruction) -> Callable[[iced.Instruction], None] | None:
        mnemonic = instruction.mnemonic
        if mnemonic == Mnemonic.MOV:
            if instruction.op0_kind == OpKind.REGISTER and instruction.op0_register in SEGMENTS:
                return self._mov_to_segment
            if instruction.op1_kind == OpKind.REGISTER and instruction.op1_register in SEGMENTS:
                return self._mov_from_segment
            return None
        if mnemonic == Mnemonic.POP and instruction.op0_register in SEGMENTS:
            return self._pop_segment
        if mnemonic == Mnemonic.PUSH and instruction.op0_register in SEGMENTS:
            return self._push_segment
        return {
            Mnemonic.LAR: self._lar_lsl,
            Mnemonic.LSL: self._lar_lsl,
            Mnemonic.VERR: self._verr_verw,
            Mnemonic.VERW: self._verr_verw,
            Mnemonic.SGDT: self._store_table_register,
            Mnemonic.SIDT: self._store_table_register,
            Mnemonic.SLDT: self._store_selector,
            Mnemonic.STR: self._store_selector,
            Mnemonic.LGDT: self._load_table_register,
            Mnemonic.LIDT: self._load_table_register,
            Mnemonic.LLDT: self._lldt,
            Mnemonic.LTR: self._ltr,
        }.get(mnemonic)

    def _operand(self, instruction: iced.Instruction, kind: str) -> tuple[int, int]:
        """(linear address, size) of ``instruction``'s one memory access of ``kind``."""
        (access,) = (
            access
            for access in memory_accesses(instruction, self.run.register, self.run.segment_base)
            if access.kind == kind
        )
        return access.address, access.size

    def _read_source16(self, instruction: iced.Instruction) -> int:
        """The r/m16 selector operand: the last operand (MOV, LAR, LSL) or the only one."""
        position = instruction.op_count - 1
        if instruction.op_kind(position) == OpKind.REGISTER:
            return (
                self.run.register(RegisterExt.full_register(instruction.op_register(position)))
                & 0xFFFF
            )
        address, _ = self._operand(instruction, "read")
        stack = instruction.memory_segment == Register.SS
        return self.memory.read(address, 2, instruction.ip, implicit=False, stack=stack)

    def _write_destination(self, instruction: iced.Instruction, value: int, size: int) -> None:
        """Write ``value`` to operand 0: a register (16-bit merge, 32/64-bit zero-extend) or
        ``size`` bytes of memory (explicit)."""
        if instruction.op0_kind == OpKind.REGISTER:
            register = instruction.op0_register
            full = GPR_IDS[RegisterExt.full_register(register)]
            if RegisterExt.size(register) == 2:
                value = (self.run.uc.reg_read(full) & ~0xFFFF) | (value & 0xFFFF)
            self.run.uc.reg_write(full, value)
            return
        address, _ = self._operand(instruction, "write")
        stack = instruction.memory_segment == Register.SS
        self.memory.write(address, value, size, instruction.ip, implicit=False, stack=stack)

    def _set_zf(self, value: bool) -> None:
        rflags = self.run.uc.reg_read(UC_X86_REG_EFLAGS)
        rflags = rflags | RFLAGS_ZF if value else rflags & ~RFLAGS_ZF
        self.run.uc.reg_write(UC_X86_REG_EFLAGS, rflags)

    def _require_cpl0(self, instruction: iced.Instruction) -> None:
        if self.run.cpl:
            raise gp(0, instruction.ip, f"{instruction.mnemonic} at CPL {self.run.cpl}")

    # MOV Sreg / POP Sreg / MOV from Sreg / PUSH Sreg -------------------------------------------

    def _mov_to_segment(self, instruction: iced.Instruction) -> None:
        name = SEGMENTS[instruction.op0_register]
        if name == "cs":
            raise SystemFault(Fault(VEC_UD, None, instruction.ip), "MOV CS")
        self.load_segment(name, self._read_source16(instruction), instruction.ip)

    def _pop_segment(self, instruction: iced.Instruction) -> None:
        name = SEGMENTS[instruction.op0_register]
        address, size = self._operand(instruction, "read")
        value = self.memory.read(address, size, instruction.ip, implicit=False, stack=True)
        self.load_segment(name, value & 0xFFFF, instruction.ip)
        self._adjust_rsp(size)

    def _adjust_rsp(self, delta: int) -> None:
        rsp_id = GPR_IDS[Register.RSP]
        rsp = self.run.uc.reg_read(rsp_id) + delta
        self.run.uc.reg_write(rsp_id, rsp & (MASK64 if self.run.cs_l else 0xFFFF_FFFF))

    def _mov_from_segment(self, instruction: iced.Instruction) -> None:
        self._write_destination(instruction, self.selectors[SEGMENTS[instruction.op1_register]], 2)

    def _push_segment(self, instruction: iced.Instruction) -> None:
        raise SystemUnsupported(
            f"{instruction} at {instruction.ip:#x} (whether it writes 2 bytes or the full slot "
            "is processor-specific)"
        )

    # LAR / LSL / VERR / VERW ----------------------------------------------------------------

    def _probe(self, selector: int, rip: int) -> Descriptor | None:
        """The descriptor for LAR/LSL/VERR/VERW, or None where they just clear ZF."""
        if is_null(selector):
            return None
        found = self.read_descriptor(selector, rip, probe=True)
        if found is None:
            return None
        descriptor, address = found
        if descriptor.s:
            return descriptor
        # A system descriptor is 16 bytes in IA-32e mode: read its upper half as well.
        table = self._table(selector)
        assert table is not None
        if (selector & ~7) + 15 > table[1]:
            return None
        return self.read_upper(descriptor, address, rip)

    def _privilege_ok(self, descriptor: Descriptor, selector: int) -> bool:
        if descriptor.conforming:
            return True
        return descriptor.dpl >= self.run.cpl and descriptor.dpl >= selector & 3

    def _lar_lsl(self, instruction: iced.Instruction) -> None:
        selector = self._read_source16(instruction)
        descriptor = self._probe(selector, instruction.ip)
        lar = instruction.mnemonic == Mnemonic.LAR
        types = _LAR_SYSTEM_TYPES if lar else _LSL_SYSTEM_TYPES
        valid = (
            descriptor is not None
            and (descriptor.s or (descriptor.type in types and descriptor.upper_type_ok()))
            and self._privilege_ok(descriptor, selector)
        )
        self._set_zf(valid)
        if not valid:
            return
        assert descriptor is not None
        value = (descriptor.low >> 32) & 0x00F0_FF00 if lar else descriptor.limit & 0xFFFF_FFFF
        self._write_destination(instruction, value, 0)

    def _verr_verw(self, instruction: iced.Instruction) -> None:
        selector = self._read_source16(instruction)
        descriptor = self._probe(selector, instruction.ip)
        if descriptor is None or not descriptor.s:
            self._set_zf(False)
            return
        wanted = (
            descriptor.readable if instruction.mnemonic == Mnemonic.VERR else descriptor.writable
        )
        self._set_zf(wanted and self._privilege_ok(descriptor, selector))

    # SGDT / SIDT / SLDT / STR and LGDT / LIDT / LLDT / LTR -----------------------------------

    def _table_operand_size(self) -> int:
        return 10 if self.run.cs_l else 6

    def _store_table_register(self, instruction: iced.Instruction) -> None:
        base, limit = self.gdtr if instruction.mnemonic == Mnemonic.SGDT else self.idtr
        if not self.run.cs_l:
            base &= 0xFFFF_FFFF
        size = self._table_operand_size()
        self._write_destination(instruction, limit | base << 16, size)

    def _store_selector(self, instruction: iced.Instruction) -> None:
        name = "ldtr" if instruction.mnemonic == Mnemonic.SLDT else "tr"
        self._write_destination(instruction, self.selectors[name], 2)

    def _load_table_register(self, instruction: iced.Instruction) -> None:
        self._require_cpl0(instruction)
        address, _ = self._operand(instruction, "read")
        size = self._table_operand_size()
        stack = instruction.memory_segment == Register.SS
        value = self.memory.read(address, size, instruction.ip, implicit=False, stack=stack)
        limit, base = value & 0xFFFF, value >> 16
        if not is_canonical(base, self.run.bits):
            raise gp(0, instruction.ip, f"{instruction.mnemonic}: non-canonical base {base:#x}")
        if instruction.mnemonic == Mnemonic.LGDT:
            self.gdtr = (base, limit)
        else:
            self.idtr = (base, limit)

    def _system_segment(
        self, instruction: iced.Instruction, kinds: tuple[int, ...]
    ) -> tuple[int, Descriptor | None, int]:
        """Checks common to LLDT and LTR (SDM): selector in the GDT, a present 16-byte system
        descriptor of one of ``kinds`` with a canonical base. No descriptor for a null one."""
        self._require_cpl0(instruction)
        rip = instruction.ip
        selector = self._read_source16(instruction)
        if is_null(selector):
            return selector, None, 0
        if selector & 4:
            raise selector_fault(13, selector, rip, f"{instruction.mnemonic}: selector in the LDT")
        found = self.read_descriptor(selector, rip, system=True)
        assert found is not None
        descriptor, address = found
        if descriptor.s or descriptor.type not in kinds:
            raise selector_fault(13, selector, rip, f"{instruction.mnemonic}: wrong type")
        descriptor = self.read_upper(descriptor, address, rip)
        if not descriptor.upper_type_ok():
            raise selector_fault(13, selector, rip, f"{instruction.mnemonic}: bad upper half")
        if not descriptor.present:
            raise selector_fault(VEC_NP, selector, rip, f"{instruction.mnemonic}: not present")
        if not is_canonical(descriptor.base, self.run.bits):
            raise selector_fault(13, selector, rip, f"{instruction.mnemonic}: non-canonical base")
        return selector, descriptor, address

    def _lldt(self, instruction: iced.Instruction) -> None:
        selector, descriptor, _ = self._system_segment(instruction, (TYPE_LDT,))
        self.selectors["ldtr"] = selector
        self.ldt = None if descriptor is None else (descriptor.base, descriptor.limit)

    def _ltr(self, instruction: iced.Instruction) -> None:
        selector, descriptor, address = self._system_segment(instruction, (TYPE_TSS_AVAILABLE,))
        if descriptor is None:
            raise gp(0, instruction.ip, "LTR with a null selector")
        self.set_type_bit(descriptor, address, TYPE_BUSY, instruction.ip)
        self.selectors["tr"], self.tss = selector, (descriptor.base, descriptor.limit)
