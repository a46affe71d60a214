"""Instruction groups: the code of a case, built from choices and encoded with iced-x86.

A *group* is one or more instructions kept together (a branch never lands inside one), e.g.
``mov ecx, 3; rep stosq`` so that RCX is always small, or ``pushfq; or qword [rsp], AC; popfq``.
Branches only go forward to group starts or to the code end, so cases cannot loop.

Two invariants are kept by construction rather than checked afterwards:

- *No store reaches code*: memory operands are formed from registers whose values the layout
  fixes (see :mod:`lassfuzz.generator.layout`) and aim at data pages only.
- *No undefined flag is read*: the builder tracks which status flags may be undefined on some
  path (BT*, logic ops, MOV CR leave some undefined) and puts a ``cmp`` before any reader.

Compatibility-mode cases get 32-bit code from the same builders: :class:`CodeBuilder` knows its
bitness, and the builders ask it for operand sizes, registers and the 32- or 64-bit form of stack
and branch instructions (``b.bits``), so one builder serves both modes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, cast

from iced_x86 import Code, Encoder, Instruction, MemoryOperand, Register, RepPrefixKind

if TYPE_CHECKING:  # iced's stubs type codes and registers as enums; at run time they are ints
    from iced_x86._iced_x86_py import Code as CodeValue
    from iced_x86._iced_x86_py import Register as RegisterValue

from lassfuzz.arch import (
    CR0_WP,
    CR4_LA57,
    CR4_LASS,
    CR4_PAE,
    CR4_SMAP,
    CR4_SMEP,
    MASK64,
    PAGE_SIZE,
    RFLAGS_AC,
    RFLAGS_AF,
    RFLAGS_CF,
    RFLAGS_DF,
    RFLAGS_FIXED1,
    RFLAGS_OF,
    RFLAGS_PF,
    RFLAGS_SF,
    RFLAGS_STATUS,
    RFLAGS_ZF,
)
from lassfuzz.generator.choices import Chooser, Weighted
from lassfuzz.generator.config import GeneratorConfig
from lassfuzz.generator.layout import (
    HOME_REGISTERS,
    INDEX_REGISTER,
    SCRATCH_REGISTERS,
    STRING_REGISTERS,
    Setup,
)

# ------------------------------------------------------------------------------------------------
# Intermediate form: position-independent instructions, and the few that need final addresses.
# ------------------------------------------------------------------------------------------------

#: A branch target: a later group index (at or past the last group means the code end).
GroupIndex = int


@dataclass(frozen=True, eq=False, slots=True)
class Fixed:
    """An instruction whose encoding does not depend on where it is placed."""

    instruction: Instruction


@dataclass(frozen=True, slots=True)
class Branch:
    """A relative branch to a later group; the short form is used when it surely reaches."""

    short: CodeValue | None
    near: CodeValue
    target: GroupIndex


@dataclass(frozen=True, slots=True)
class CodeAddress:
    """``mov register, imm64`` loading the address of a later group (for indirect branches)."""

    register: RegisterValue
    target: GroupIndex


Op = Fixed | Branch | CodeAddress

_NEAR_SIZES: Final[dict[CodeValue, int]] = {
    Code.JMP_REL32_64: 5,
    Code.CALL_REL32_64: 5,
    Code.JMP_REL32_32: 5,
    Code.CALL_REL32_32: 5,
}
#: ``mov r64, imm64`` / ``mov r32, imm32`` by bitness.
_MOV_IMM_SIZE: Final = {64: 10, 32: 5}


def _branch_size(code: CodeValue) -> int:
    return _NEAR_SIZES.get(code, 6)  # Jcc rel32 is 0F 8x + rel32


def load_immediate(register: RegisterValue, value: int, bits: int) -> Instruction:
    """``mov register, value`` at full width: imm64 in 64-bit code, imm32 in 32-bit code."""
    if bits == 32:
        return Instruction.create_reg_u32(Code.MOV_R32_IMM32, sized(register, 32), value)
    return Instruction.create_reg_u64(Code.MOV_R64_IMM64, register, value)


def assemble(groups: Sequence[Sequence[Op]], address: int, bits: int = 64) -> bytes:
    """Encode ``groups`` at ``address`` for ``bits``-bit code: two passes, so branch forms and
    targets are exact."""
    encoder = Encoder(bits)
    encode = encoder.encode
    # Pass 1: every Fixed op is encoded once, into one buffer (at IP 0: its encoding does not
    # depend on it); the others are sized at a bound no encoding of theirs exceeds. Offsets
    # here are such bounds: where everything would be if every op took its largest size.
    starts: list[int] = []  # the bound offset of each group (and of the end)
    placed: list[tuple[int, int, int, Branch | CodeAddress]] = []  # (bound, fixed, size, op)
    bound = variable = 0  # variable: the bound size of the ops that are not Fixed
    for group in groups:
        starts.append(bound)
        for op in group:
            if isinstance(op, Fixed):
                bound += encode(op.instruction, 0)
            else:
                size = _branch_size(op.near) if isinstance(op, Branch) else _MOV_IMM_SIZE[bits]
                placed.append((bound, bound - variable, size, op))
                bound += size
                variable += size
    fixed = encoder.take_buffer()
    if not placed:
        return fixed
    starts.append(bound)
    end = len(groups)
    # A branch is short when it reaches even at the bounds; each short one saves bytes for
    # everything after it (every op has a size, so bounds order ops as positions do).
    savings: list[tuple[int, int]] = []  # (bound of a short branch, bytes saved)
    for bound, _, size, op in placed:
        if (
            isinstance(op, Branch)
            and op.short is not None
            and starts[min(op.target, end)] - (bound + size) <= 127
        ):
            savings.append((bound, size - 2))

    def final(bound: int) -> int:
        """The address of what is at ``bound``, with short branches in place."""
        return (address + bound - sum(saved for at, saved in savings if at < bound)) & MASK64

    # Pass 2: the Fixed bytes, with the other ops encoded at their final addresses in between.
    shorts = {at for at, _ in savings}
    out = bytearray()
    copied = 0
    for bound, fixed_before, _, op in placed:
        out += fixed[copied:fixed_before]
        copied = fixed_before
        target = final(starts[min(op.target, end)])
        if isinstance(op, Branch):
            code = op.short if bound in shorts and op.short is not None else op.near
            instruction = Instruction.create_branch(code, target)
        else:
            instruction = load_immediate(op.register, target, bits)
        encode(instruction, final(bound))
        out += encoder.take_buffer()
    out += fixed[copied:]
    return bytes(out)


def landing_pad(code_end: int, bits: int = 64) -> bytes:
    """Code for a landing page: ``mov rax, code_end; jmp rax`` ends the case normally (the
    32-bit form for compatibility-mode cases)."""
    encoder = Encoder(bits)
    encoder.encode(load_immediate(Register.RAX, code_end, bits), 0)
    encoder.encode(Instruction.create_reg(_code(f"JMP_RM{bits}"), sized(Register.RAX, bits)), 0)
    return encoder.take_buffer()


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------

SIZES: Final = (8, 16, 32, 64)
_SIZED_NAMES: Final = {
    Register.RAX: ("AL", "AX", "EAX", "RAX"),
    Register.RCX: ("CL", "CX", "ECX", "RCX"),
    Register.RDX: ("DL", "DX", "EDX", "RDX"),
    Register.RBX: ("BL", "BX", "EBX", "RBX"),
    Register.RSP: ("SPL", "SP", "ESP", "RSP"),
    Register.RBP: ("BPL", "BP", "EBP", "RBP"),
    Register.RSI: ("SIL", "SI", "ESI", "RSI"),
    Register.RDI: ("DIL", "DI", "EDI", "RDI"),
    **{getattr(Register, f"R{n}"): (f"R{n}L", f"R{n}W", f"R{n}D", f"R{n}") for n in range(8, 16)},
}
_SIZED: Final[dict[tuple[RegisterValue, int], RegisterValue]] = {
    (register, size): getattr(Register, names[SIZES.index(size)])
    for register, names in _SIZED_NAMES.items()
    for size in SIZES
}
#: Registers that may be read as data (anything but RSP, which would make pushes odd).
READABLE: Final = (*SCRATCH_REGISTERS, *HOME_REGISTERS, *STRING_REGISTERS, INDEX_REGISTER)
#: 32-bit code has no R8-R15: scratch and readable registers among the legacy eight.
SCRATCH_32: Final = (Register.RAX, Register.RCX, Register.RDX, Register.RBX)
READABLE_32: Final = (*SCRATCH_32, *STRING_REGISTERS)
_FRAME_POINTERS: Final = (Register.RBP, Register.EBP)


#: Any view of a GPR -> its 64-bit register.
_FULL: Final[dict[RegisterValue, RegisterValue]] = {
    view: register for (register, _), view in _SIZED.items()
}


def sized(register: RegisterValue, size: int) -> RegisterValue:
    """The ``size``-bit view of a GPR (given in any width)."""
    return _SIZED[(_FULL[register], size)]


#: Address base registers and their views by bitness (32-bit code has no R12-R15).
_BASES: Final = {
    bits: tuple(
        (register, sized(register, bits))
        for register in (*homes, *STRING_REGISTERS, Register.RBP, Register.RSP)
    )
    for bits, homes in ((64, HOME_REGISTERS), (32, ()))
}


def _views(registers: Sequence[RegisterValue]) -> dict[int, tuple[RegisterValue, ...]]:
    """``registers`` as views of each operand size."""
    return {size: tuple(sized(register, size) for register in registers) for size in SIZES}


#: Scratch and readable registers by bitness, as views of each size.
_SCRATCH_VIEWS: Final = {64: _views(SCRATCH_REGISTERS), 32: _views(SCRATCH_32)}
_READABLE_VIEWS: Final = {
    64: _views(READABLE),
    # 32-bit code has no SIL/DIL: its readable byte registers are the scratch ones.
    32: {**_views(READABLE_32), 8: _SCRATCH_VIEWS[32][8]},
}


@functools.cache  # looking an iced Code up by name is slow (~0.5 us); builders do it often
def _code(name: str) -> CodeValue:
    return cast("CodeValue", getattr(Code, name))


#: Condition codes, simplest first, with the status flags each reads.
CONDITIONS: Final = (
    ("E", RFLAGS_ZF),
    ("NE", RFLAGS_ZF),
    ("B", RFLAGS_CF),
    ("AE", RFLAGS_CF),
    ("BE", RFLAGS_CF | RFLAGS_ZF),
    ("A", RFLAGS_CF | RFLAGS_ZF),
    ("S", RFLAGS_SF),
    ("NS", RFLAGS_SF),
    ("O", RFLAGS_OF),
    ("NO", RFLAGS_OF),
    ("P", RFLAGS_PF),
    ("NP", RFLAGS_PF),
    ("L", RFLAGS_SF | RFLAGS_OF),
    ("GE", RFLAGS_SF | RFLAGS_OF),
    ("LE", RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF),
    ("G", RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF),
)

#: ALU operations: (mnemonic, flags read, flags left undefined, writes its destination).
_ALU: Final = (
    ("ADD", 0, 0, True),
    ("SUB", 0, 0, True),
    ("CMP", 0, 0, False),
    ("AND", 0, RFLAGS_AF, True),
    ("OR", 0, RFLAGS_AF, True),
    ("XOR", 0, RFLAGS_AF, True),
    ("TEST", 0, RFLAGS_AF, False),
    ("ADC", RFLAGS_CF, 0, True),
    ("SBB", RFLAGS_CF, 0, True),
)
#: Unary operations: (mnemonic, flags defined).
_UNARY: Final = (
    ("INC", RFLAGS_STATUS & ~RFLAGS_CF),
    ("DEC", RFLAGS_STATUS & ~RFLAGS_CF),
    ("NOT", 0),
    ("NEG", RFLAGS_STATUS),
)
_BT_UNDEFINED: Final = RFLAGS_OF | RFLAGS_SF | RFLAGS_AF | RFLAGS_PF

#: Offsets inside a target page, simplest first; "cross" straddles the page's end.
_OFFSET_KINDS: Final = Weighted.of(
    [("start", 2), ("aligned", 4), ("last", 2), ("cross", 3), ("any", 2), ("wrap-end", 1)]
)
_SEGMENT_OVERRIDES: Final = (Register.SS, Register.FS, Register.GS)
_RFLAGS_TOGGLES: Final = (RFLAGS_AC, RFLAGS_DF, RFLAGS_CF, RFLAGS_ZF, RFLAGS_AC | RFLAGS_DF)
_CR4_TOGGLES: Final = Weighted.of(
    [
        (CR4_LASS, 8),
        (CR4_SMAP, 3),
        (CR4_SMEP, 2),
        (CR4_LASS | CR4_SMAP, 2),
        (CR4_LA57, 1),  # unsupported: #GP(0)
        (CR4_PAE, 1),  # clearing PAE in long mode: #GP(0)
    ]
)
_CPUID_LEAVES: Final = ((7, 1), (7, 0), (0, 0))
_STRING_WIDTHS: Final = ("B", "W", "D", "Q")
_STRING_SIZES: Final = {"B": 1, "W": 2, "D": 4, "Q": 8}


# ------------------------------------------------------------------------------------------------
# The builder
# ------------------------------------------------------------------------------------------------


class CodeBuilder:
    """Draws the instruction groups of one case (a fresh builder per case)."""

    # Slots: the builders read these attributes hundreds of times per case.
    __slots__ = (
        "bases",
        "bits",
        "chooser",
        "config",
        "groups",
        "incoming",
        "index_trusted",
        "index_value",
        "layout",
        "mask",
        "overrides",
        "rbp_trusted",
        "scratch_registers",
        "segment_bases",
        "setup",
        "sizes",
        "undefined",
    )

    def __init__(self, chooser: Chooser, config: GeneratorConfig, setup: Setup) -> None:
        self.chooser = chooser
        self.config = config
        self.setup = setup
        self.layout = setup.layout
        #: 32 for compatibility-mode code: also the stack and branch operand size.
        self.bits = 32 if setup.control.mode == "compat" else 64
        self.sizes = SIZES if self.bits == 64 else SIZES[:3]
        self.scratch_registers = SCRATCH_REGISTERS if self.bits == 64 else SCRATCH_32
        #: Linear addresses wrap at 2^64, or at 2^32 in compatibility mode.
        self.mask = MASK64 if self.bits == 64 else 0xFFFF_FFFF
        self.groups: list[list[Op]] = []
        #: Status flags that may be undefined here on some path.
        self.undefined = 0
        #: Undefined-flag masks arriving at later groups through branches.
        self.incoming: dict[GroupIndex, int] = {}
        #: After LEAVE, RBP holds whatever was on the stack: never an address base again.
        self.rbp_trusted = True
        #: SYSCALL and SYSRET write R11: no index register afterwards.
        self.index_trusted = self.bits == 64
        #: Segment overrides still at their initial base (loading FS or GS changes the base).
        self.overrides: tuple[RegisterValue, ...] = _SEGMENT_OVERRIDES
        #: Address bases and their (fixed) values; Register.NONE is an absolute disp32. RBP
        #: leaves them when it is no longer trusted (:meth:`distrust_rbp`).
        values = dict(self.layout.registers)
        self.bases: tuple[tuple[RegisterValue, int], ...] = (
            (Register.NONE, 0),
            *[(view, values.get(register, 0)) for register, view in _BASES[self.bits]],
        )
        self.index_value = values.get(INDEX_REGISTER, 0)
        self.segment_bases = {
            Register.NONE: 0,
            Register.SS: 0,
            Register.FS: self.layout.fs_base,
            Register.GS: self.layout.gs_base,
        }

    # -- driving ---------------------------------------------------------------------------------

    def build(
        self,
        count: int,
        body: Weighted[str],
        last: Weighted[str],
        builders: Mapping[str, GroupBuilder] | None = None,
    ) -> list[list[Op]]:
        """Emit groups totalling exactly ``count`` instructions; ``last`` picks the final one.
        ``builders`` maps group names to builders (default :data:`BUILDERS`)."""
        table = BUILDERS if builders is None else builders
        groups, incoming, weighted = self.groups, self.incoming, self.chooser.weighted
        system = self.setup.system is not None
        emitted = 0
        while emitted < count:
            room = count - emitted
            self.undefined |= incoming.pop(len(groups), 0)
            if system and self.undefined and room >= 2:
                # With an IDT every fault pushes RFLAGS (and SYSCALL saves it in R11): define
                # the status flags again at once, or the reference model cannot run the case.
                group = self.define_flags(RFLAGS_STATUS, room) or self._fallback()
            else:
                group = table[weighted(last if room == 1 else body)](self, room) or self._fallback()
            groups.append(group)
            emitted += len(group)
        return groups

    def _fallback(self) -> list[Op]:
        """The simplest instruction: used when a group does not fit the remaining room."""
        register = self.scratch(32)
        return [Fixed(Instruction.create_reg_i32(Code.MOV_R32_IMM32, register, 0))]

    # -- registers, immediates, flags ------------------------------------------------------------

    def scratch(self, size: int) -> RegisterValue:
        return self.chooser.choice(_SCRATCH_VIEWS[self.bits][size])

    def readable(self, size: int) -> RegisterValue:
        return self.chooser.choice(_READABLE_VIEWS[self.bits][size])

    def immediate(self, size: int) -> int:
        """A signed immediate that fits ``size`` bits (at most 32: imm32 is sign-extended)."""
        bits = min(size, 32)
        kind = self.chooser.integer(0, 2)
        if kind == 0:
            return self.chooser.integer(0, 0x7F)
        value = self.chooser.integer(0, (1 << bits) - 1)
        return value - (1 << bits) if value >> (bits - 1) else value

    def flags(self, defined: int, undefined: int = 0) -> None:
        """Record an instruction's effect on the status flags."""
        self.undefined = (self.undefined & ~(defined | undefined)) | undefined

    def define_flags(self, needed: int, room: int) -> list[Op] | None:
        """A ``cmp`` making ``needed`` flags defined, [] if they are, None if it doesn't fit."""
        if not self.undefined & needed:
            return []
        if room < 2:
            return None
        register = self.readable(self.bits)
        cmp = Instruction.create_reg_i32(
            _code(f"CMP_RM{self.bits}_IMM8"), register, self.immediate(8)
        )
        self.flags(RFLAGS_STATUS)
        return [Fixed(cmp)]

    def distrust_rbp(self) -> None:
        """After LEAVE: RBP comes from memory, so it is no address base from now on."""
        self.rbp_trusted = False
        self.bases = tuple(base for base in self.bases if base[0] not in _FRAME_POINTERS)

    def forward(self) -> GroupIndex:
        """A later group (possibly the code end), recording the flags that flow there."""
        target = len(self.groups) + self.chooser.integer(1, 6)
        self.incoming[target] = self.incoming.get(target, 0) | self.undefined
        return target

    # -- memory operands -------------------------------------------------------------------------

    def address(self, size: int, *, aligned: bool = False) -> int:
        """A linear address near a target page, biased to page ends and the 2^64 wrap;
        ``aligned`` rounds it down to a multiple of ``size``."""
        chooser = self.chooser
        if size > 1 and not aligned and chooser.boolean(self.config.p_wrap_access):
            # Straddle 2^64: an absolute disp32 reaches it (sign-extended) from any segment base 0.
            return (-chooser.integer(1, size - 1)) & MASK64
        safe = self.layout.safe_targets
        if safe and chooser.boolean(self.config.p_safe_access):
            return chooser.choice(safe) + chooser.integer(0, PAGE_SIZE // size - 1) * size
        page = chooser.choice(self.layout.targets)
        kind = chooser.weighted(_OFFSET_KINDS)
        if kind == "start":
            offset = 0
        elif kind == "aligned":
            offset = chooser.integer(0, PAGE_SIZE // size - 1) * size
        elif kind == "last":
            offset = PAGE_SIZE - size
        elif kind == "cross" and size > 1:
            offset = PAGE_SIZE - size + chooser.integer(1, size - 1)
        elif kind == "wrap-end":  # the last bytes of the page, whatever the size
            offset = PAGE_SIZE - chooser.integer(1, 8)
        else:
            offset = chooser.integer(0, PAGE_SIZE - 1)
        if aligned:
            offset -= offset % size
        return (page + offset) & MASK64

    def operand_at(self, address: int) -> MemoryOperand | None:
        """A memory operand (no segment override, no index) whose effective address is exactly
        ``address``, or None when no base register reaches it."""
        return self._operand(address, Register.NONE, 0)

    def memory(self, size: int, *, aligned: bool = False) -> MemoryOperand:
        """A memory operand whose effective address is an :meth:`address`, by construction."""
        target = self.address(size, aligned=aligned)
        chooser, config = self.chooser, self.config
        segment = Register.NONE
        if chooser.boolean(config.p_segment_override) and self.overrides:
            segment = chooser.choice(self.overrides)
        scale = 0
        if chooser.boolean(config.p_index) and self.index_trusted:
            scale = chooser.choice((1, 2, 4, 8))
        operand = self._operand(target, segment, scale)
        if operand is None:  # no base reaches it with that segment/index: drop them
            operand = self._operand(target, Register.NONE, 0)
        if operand is None:  # the target is out of reach: aim at the stack instead
            stack = sized(Register.RSP, self.bits)
            operand = MemoryOperand(stack, displ=8 * self.chooser.integer(0, 8), displ_size=1)
        return operand

    def _operand(self, target: int, segment: RegisterValue, scale: int) -> MemoryOperand | None:
        if self.bits == 32:
            return self._operand32(target, segment)
        origin = self.segment_bases[segment] + (self.index_value * scale if scale else 0)
        # Offset by 2^31 so that "fits in a signed 32-bit displacement" is one range check.
        offset_target = target - origin + _DISP_OFFSET
        mask, span = MASK64, _DISP_SPAN
        reachable: list[tuple[RegisterValue, int]] = []
        for register, value in self.bases:
            distance = (offset_target - value) & mask
            if distance < span:
                reachable.append((register, distance - _DISP_OFFSET))
        if not reachable:
            return None
        base, displacement = self.chooser.choice(reachable)
        index = INDEX_REGISTER if scale else Register.NONE
        return MemoryOperand(
            base,
            index,
            scale or 1,
            displacement,
            0 if displacement == 0 and base != Register.NONE else 1,
            False,
            segment,
        )

    def _operand32(self, target: int, segment: RegisterValue) -> MemoryOperand:
        """32-bit addressing: every base reaches every target, modulo 2^32."""
        base, value = self.chooser.choice(self.bases)
        displacement = (target - self.segment_bases[segment] - value) & 0xFFFF_FFFF
        if displacement >= 1 << 31:
            displacement -= 1 << 32
        size = 0 if displacement == 0 and base != Register.NONE else 1
        if base == Register.NONE or not -128 <= displacement < 128:
            size = 4
        return MemoryOperand(base, Register.NONE, 1, displacement, size, False, segment)


_DISP_OFFSET: Final = 1 << 31
_DISP_SPAN: Final = 1 << 32


# ------------------------------------------------------------------------------------------------
# Group builders: (builder, room) -> instructions, or None when nothing fits in ``room``.
# ------------------------------------------------------------------------------------------------

GroupBuilder = Callable[[CodeBuilder, int], "list[Op] | None"]


def _nop(b: CodeBuilder, room: int) -> list[Op]:
    if b.chooser.boolean(0.5):  # multi-byte NOP: a ModRM memory operand that is never accessed
        return [Fixed(Instruction.create_mem(Code.NOP_RM32, b.memory(4)))]
    return [Fixed(Instruction.create(Code.NOPD))]


def _mov(b: CodeBuilder, room: int) -> list[Op]:
    size = b.chooser.choice(b.sizes)
    form = b.chooser.integer(0, 4)
    if form == 0:
        return [Fixed(_reg_reg(f"MOV_R{size}_RM{size}", b.scratch(size), b.readable(size)))]
    if form == 1:
        if size == 64 and b.chooser.boolean(0.5):
            value = b.chooser.integer(0, MASK64)
            return [Fixed(Instruction.create_reg_u64(Code.MOV_R64_IMM64, b.scratch(64), value))]
        imm = b.immediate(size)
        immediate = _code(f"MOV_RM{size}_IMM{min(size, 32)}")
        return [Fixed(Instruction.create_reg_i32(immediate, b.scratch(size), imm))]
    if form == 2:
        load = _code(f"MOV_R{size}_RM{size}")
        return [Fixed(Instruction.create_reg_mem(load, b.scratch(size), b.memory(size // 8)))]
    if form == 3:
        store = _code(f"MOV_RM{size}_R{size}")
        return [Fixed(Instruction.create_mem_reg(store, b.memory(size // 8), b.readable(size)))]
    code = _code(f"MOV_RM{size}_IMM{min(size, 32)}")
    return [Fixed(Instruction.create_mem_i32(code, b.memory(size // 8), b.immediate(size)))]


def _reg_reg(name: str, destination: RegisterValue, source: RegisterValue) -> Instruction:
    return Instruction.create_reg_reg(_code(name), destination, source)


def _movx(b: CodeBuilder, room: int) -> list[Op]:
    kind = b.chooser.choice(("MOVZX", "MOVSX", "MOVSXD") if b.bits == 64 else ("MOVZX", "MOVSX"))
    if kind == "MOVSXD":
        source_size, size = 32, 64
    else:
        source_size = b.chooser.choice((8, 16))
        sizes = (16, *b.sizes[2:]) if source_size == 8 else b.sizes[2:]
        size = b.chooser.choice(sizes)
    code = _code(f"{kind}_R{size}_RM{source_size}")
    destination = b.scratch(size)
    if b.chooser.boolean(0.3):
        return [Fixed(Instruction.create_reg_reg(code, destination, b.readable(source_size)))]
    memory = b.memory(source_size // 8)
    return [Fixed(Instruction.create_reg_mem(code, destination, memory))]


def _lea(b: CodeBuilder, room: int) -> list[Op]:
    size = b.chooser.choice((64, 32, 16) if b.bits == 64 else (32, 16))
    code = _code(f"LEA_R{size}_M")
    return [Fixed(Instruction.create_reg_mem(code, b.scratch(size), b.memory(8)))]


def _alu(b: CodeBuilder, room: int) -> list[Op] | None:
    name, reads, undefined, writes = b.chooser.choice(_ALU)
    prefix = b.define_flags(reads, room)
    if prefix is None:
        return None
    size = b.chooser.choice(b.sizes)
    form = b.chooser.integer(0, 3)
    imm_name = f"{name}_RM{size}_IMM{min(size, 32)}"
    if form == 0:  # register destination, register source
        instruction = _reg_reg(f"{name}_RM{size}_R{size}", b.scratch(size), b.readable(size))
    elif form == 1:  # register destination, immediate
        instruction = Instruction.create_reg_i32(
            _code(imm_name), b.scratch(size), b.immediate(size)
        )
    elif form == 2 and name != "TEST":  # register destination, memory source
        code = _code(f"{name}_R{size}_RM{size}")
        instruction = Instruction.create_reg_mem(code, b.scratch(size), b.memory(size // 8))
    elif b.chooser.boolean(0.5):  # memory destination, register source
        code = _code(f"{name}_RM{size}_R{size}")
        instruction = Instruction.create_mem_reg(code, b.memory(size // 8), b.readable(size))
        _maybe_lock(b, instruction, writes)
    else:  # memory destination, immediate
        memory = b.memory(size // 8)
        instruction = Instruction.create_mem_i32(_code(imm_name), memory, b.immediate(size))
        _maybe_lock(b, instruction, writes)
    b.flags(RFLAGS_STATUS & ~undefined, undefined)
    return [*prefix, Fixed(instruction)]


def _maybe_lock(b: CodeBuilder, instruction: Instruction, allowed: bool = True) -> None:
    if allowed and b.chooser.boolean(b.config.p_lock):
        instruction.has_lock_prefix = True


def _unary(b: CodeBuilder, room: int) -> list[Op]:
    name, defined = b.chooser.choice(_UNARY)
    size = b.chooser.choice(b.sizes)
    code = _code(f"{name}_RM{size}")
    if b.chooser.boolean(0.3):
        instruction = Instruction.create_reg(code, b.scratch(size))
    else:
        instruction = Instruction.create_mem(code, b.memory(size // 8))
        _maybe_lock(b, instruction)
    b.flags(defined)
    return [Fixed(instruction)]


def _xchg(b: CodeBuilder, room: int) -> list[Op]:
    name = b.chooser.choice(("XCHG", "XADD"))
    size = b.chooser.choice(b.sizes)
    code = _code(f"{name}_RM{size}_R{size}")
    if b.chooser.boolean(0.2):
        instruction = _reg_reg(f"{name}_RM{size}_R{size}", b.scratch(size), b.scratch(size))
    else:
        instruction = Instruction.create_mem_reg(code, b.memory(size // 8), b.scratch(size))
        _maybe_lock(b, instruction, name == "XADD")  # XCHG with memory locks implicitly
    if name == "XADD":
        b.flags(RFLAGS_STATUS)
    return [Fixed(instruction)]


def _cmpxchg(b: CodeBuilder, room: int) -> list[Op]:
    kind = b.chooser.integer(0, 2 if b.bits == 64 else 1)  # no CMPXCHG16B in 32-bit code
    if kind == 0:
        size = b.chooser.choice(b.sizes)
        code = _code(f"CMPXCHG_RM{size}_R{size}")
        instruction = Instruction.create_mem_reg(code, b.memory(size // 8), b.readable(size))
        b.flags(RFLAGS_STATUS)
    else:
        width = 8 if kind == 1 else 16
        # CMPXCHG16B needs a 16-byte aligned operand (#GP otherwise): mostly keep it aligned.
        memory = b.memory(width, aligned=width == 16 and not b.chooser.boolean(0.1))
        code = Code.CMPXCHG8B_M64 if width == 8 else Code.CMPXCHG16B_M128
        instruction = Instruction.create_mem(code, memory)
        b.flags(RFLAGS_ZF)
    _maybe_lock(b, instruction)
    return [Fixed(instruction)]


def _bt(b: CodeBuilder, room: int) -> list[Op]:
    name = b.chooser.choice(("BT", "BTS", "BTR", "BTC"))
    size = b.chooser.choice(b.sizes[1:])
    memory = b.memory(size // 8)
    if b.chooser.boolean(0.3) and b.index_trusted:  # R11's bit offset (small) moves the access
        code = _code(f"{name}_RM{size}_R{size}")
        instruction = Instruction.create_mem_reg(code, memory, sized(INDEX_REGISTER, size))
    else:
        code = _code(f"{name}_RM{size}_IMM8")
        instruction = Instruction.create_mem_i32(code, memory, b.chooser.integer(0, 0xFF))
    _maybe_lock(b, instruction, name != "BT")
    b.flags(RFLAGS_CF, _BT_UNDEFINED)
    return [Fixed(instruction)]


def _condition(b: CodeBuilder, room: int) -> tuple[str, list[Op]] | None:
    suffix, reads = b.chooser.choice(CONDITIONS)
    prefix = b.define_flags(reads, room)
    return None if prefix is None else (suffix, prefix)


def _cmov(b: CodeBuilder, room: int) -> list[Op] | None:
    picked = _condition(b, room)
    if picked is None:
        return None
    suffix, prefix = picked
    size = b.chooser.choice(b.sizes[1:])
    code = _code(f"CMOV{suffix}_R{size}_RM{size}")
    if b.chooser.boolean(0.3):
        instruction = Instruction.create_reg_reg(code, b.scratch(size), b.readable(size))
    else:  # the source is read (and can fault) whatever the condition
        instruction = Instruction.create_reg_mem(code, b.scratch(size), b.memory(size // 8))
    return [*prefix, Fixed(instruction)]


def _setcc(b: CodeBuilder, room: int) -> list[Op] | None:
    picked = _condition(b, room)
    if picked is None:
        return None
    suffix, prefix = picked
    code = _code(f"SET{suffix}_RM8")
    if b.chooser.boolean(0.3):
        instruction = Instruction.create_reg(code, b.scratch(8))
    else:
        instruction = Instruction.create_mem(code, b.memory(1))
    return [*prefix, Fixed(instruction)]


def _push_pop(b: CodeBuilder, room: int) -> list[Op]:
    form = b.chooser.integer(0, 4)
    word = b.bits
    if form == 0:
        instruction = Instruction.create_reg(_code(f"PUSH_R{word}"), b.readable(word))
    elif form == 1:
        instruction = Instruction.create_reg(_code(f"POP_R{word}"), b.scratch(word))
    elif form == 2:
        size = 8 if b.chooser.boolean(0.5) else 32
        instruction = Instruction.create_i32(push_immediate(b, size), b.immediate(size))
    elif form == 3:
        instruction = Instruction.create_mem(_code(f"PUSH_RM{word}"), b.memory(word // 8))
    else:  # the operand's address is computed after RSP is incremented
        instruction = Instruction.create_mem(_code(f"POP_RM{word}"), b.memory(word // 8))
    return [Fixed(instruction)]


def push_immediate(b: CodeBuilder, size: int) -> CodeValue:
    """PUSH imm8/imm32 at the stack width (PUSHQ in 64-bit code, PUSHD in 32-bit code)."""
    return _code(f"PUSH{'Q' if b.bits == 64 else 'D'}_IMM{size}")


def _stack_width(b: CodeBuilder) -> str:
    """The suffix of the stack-width form of PUSHF/POPF/ENTER/LEAVE/RET: Q or D."""
    return "Q" if b.bits == 64 else "D"


def _flags(b: CodeBuilder, room: int) -> list[Op] | None:
    kind = b.chooser.integer(0, 4)
    if kind == 0:
        return [Fixed(Instruction.create(b.chooser.choice((Code.STAC, Code.CLAC))))]
    if kind == 1:
        return [Fixed(Instruction.create(b.chooser.choice((Code.CLD, Code.STD))))]
    if kind == 2 and room >= 2:  # POPFQ of a known value (never TF: single-step is unmodelled)
        value = RFLAGS_FIXED1 | b.chooser.choice(_RFLAGS_TOGGLES)
        b.flags(RFLAGS_STATUS)
        return [
            Fixed(Instruction.create_i32(push_immediate(b, 32), value)),
            Fixed(Instruction.create(_code(f"POPF{_stack_width(b)}"))),
        ]
    if kind == 3 and room >= 2:  # read the flags into a register
        prefix = b.define_flags(RFLAGS_STATUS, room - 1)
        if prefix is None:
            return None
        pop = Instruction.create_reg(_code(f"POP_R{b.bits}"), b.scratch(b.bits))
        pushf = Instruction.create(_code(f"PUSHF{_stack_width(b)}"))
        return [*prefix, Fixed(pushf), Fixed(pop)]
    if room < 3:
        return None
    # pushfq; or/and qword [rsp], bit; popfq: AC (or DF) toggled through memory.
    prefix = b.define_flags(RFLAGS_STATUS, room - 2)
    if prefix is None:
        return None
    bit = b.chooser.choice(_RFLAGS_TOGGLES)
    stack = MemoryOperand(sized(Register.RSP, b.bits))
    operation = "OR" if b.chooser.boolean(0.5) else "AND"
    change = Instruction.create_mem_i32(
        _code(f"{operation}_RM{b.bits}_IMM32"), stack, bit if operation == "OR" else ~bit
    )
    b.flags(RFLAGS_STATUS)
    width = _stack_width(b)
    return [
        *prefix,
        Fixed(Instruction.create(_code(f"PUSHF{width}"))),
        Fixed(change),
        Fixed(Instruction.create(_code(f"POPF{width}"))),
    ]


def _enter_leave(b: CodeBuilder, room: int) -> list[Op]:
    if b.rbp_trusted and b.chooser.boolean(0.4):
        b.distrust_rbp()
        return [Fixed(Instruction.create(_code(f"LEAVE{_stack_width(b)}")))]
    size = b.chooser.choice((0, 8, 0x20, 0x100))
    # Nesting level 0 only: the reference model does not model the frame-pointer copies.
    enter = _code(f"ENTER{_stack_width(b)}_IMM16_IMM8")
    return [Fixed(Instruction.create_u32_u32(enter, size, 0))]


def _string(b: CodeBuilder, room: int) -> list[Op]:
    op = b.chooser.choice(("STOS", "LODS", "MOVS", "SCAS", "CMPS"))
    width = b.chooser.choice(_STRING_WIDTHS if b.bits == 64 else _STRING_WIDTHS[:3])
    repeated = room >= 2 and b.chooser.boolean(0.6)
    ops: list[Op] = []
    if repeated:
        count = b.chooser.choice((1, 0, 2, 3, 8))
        ops.append(Fixed(Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.ECX, count)))
    rep = RepPrefixKind.NONE
    if repeated:
        rep = RepPrefixKind.REPE  # F3: REP for MOVS/STOS/LODS
        if op in ("SCAS", "CMPS"):
            rep = b.chooser.choice((RepPrefixKind.REPE, RepPrefixKind.REPNE))
    segment = Register.NONE
    if (
        op in ("LODS", "MOVS", "CMPS")
        and b.chooser.boolean(b.config.p_segment_override)
        and b.overrides
    ):
        segment = b.chooser.choice(b.overrides)
    create = getattr(Instruction, f"create_{op.lower()}{width.lower()}")
    # STOS and SCAS only access ES:RDI, which cannot be overridden.
    instruction = create(b.bits, rep) if op in ("STOS", "SCAS") else create(b.bits, segment, rep)
    if op in ("SCAS", "CMPS") and not repeated:
        b.flags(RFLAGS_STATUS)  # a REP form may run zero times and leave the flags alone
    ops.append(Fixed(instruction))
    return ops


def _jcc(b: CodeBuilder, room: int) -> list[Op] | None:
    picked = _condition(b, room)
    if picked is None:
        return None
    suffix, prefix = picked
    short, near = _code(f"J{suffix}_REL8_{b.bits}"), _code(f"J{suffix}_REL32_{b.bits}")
    return [*prefix, Branch(short, near, b.forward())]


def _indirect(
    b: CodeBuilder, room: int, code_register: CodeValue, code_memory: CodeValue
) -> list[Op] | None:
    """``mov reg, target; jmp/call reg`` or through memory, to a later group or a far target."""
    word = b.bits
    register = b.scratch(word)
    load = target_load(b, register)
    if room >= 3 and b.chooser.boolean(0.4):
        memory = b.memory(word // 8)
        store = Instruction.create_mem_reg(_code(f"MOV_RM{word}_R{word}"), memory, register)
        return [load, Fixed(store), Fixed(Instruction.create_mem(code_memory, memory))]
    return [load, Fixed(Instruction.create_reg(code_register, register))]


def target_load(b: CodeBuilder, register: RegisterValue) -> Op:
    """``mov register, target``: a later group, or a far target outside the code."""
    if b.chooser.boolean(0.5):
        return CodeAddress(register, b.forward())
    return Fixed(load_immediate(register, b.chooser.choice(b.layout.far_targets), b.bits))


def _jmp(b: CodeBuilder, room: int) -> list[Op] | None:
    near = _code(f"JMP_RM{b.bits}")
    if room >= 2 and b.chooser.boolean(0.5):
        return _indirect(b, room, near, near)
    return [Branch(_code(f"JMP_REL8_{b.bits}"), _code(f"JMP_REL32_{b.bits}"), b.forward())]


def _call_ret(b: CodeBuilder, room: int) -> list[Op] | None:
    kind = b.chooser.integer(0, 2) if room >= 2 else 0
    call = _code(f"CALL_RM{b.bits}")
    if kind == 0:
        return [Branch(None, _code(f"CALL_REL32_{b.bits}"), b.forward())]
    if kind == 1:
        return _indirect(b, room, call, call)
    # Return to an address pushed just before, so a RET never goes backwards.
    register = b.scratch(b.bits)
    load = target_load(b, register)
    if room >= 3:
        width = _stack_width(b)
        if b.chooser.boolean(0.3):
            ret = Instruction.create_i32(
                _code(f"RETN{width}_IMM16"), b.chooser.choice((8, 0x10, 0x100))
            )
        else:
            ret = Instruction.create(_code(f"RETN{width}"))
        push = Instruction.create_reg(_code(f"PUSH_R{b.bits}"), register)
        return [load, Fixed(push), Fixed(ret)]
    return [load, Fixed(Instruction.create_reg(call, register))]


def _prefetch(b: CodeBuilder, room: int) -> list[Op]:
    name = b.chooser.choice(("PREFETCHT0", "PREFETCHT1", "PREFETCHT2", "PREFETCHNTA", "PREFETCHW"))
    return [Fixed(Instruction.create_mem(_code(f"{name}_M8"), b.memory(1)))]


def _clflush(b: CodeBuilder, room: int) -> list[Op]:
    code = b.chooser.choice((Code.CLFLUSH_M8, Code.CLFLUSHOPT_M8))
    return [Fixed(Instruction.create_mem(code, b.memory(1)))]


def _invlpg(b: CodeBuilder, room: int) -> list[Op]:
    return [Fixed(Instruction.create_mem(Code.INVLPG_M, b.memory(1)))]


def _cr(b: CodeBuilder, room: int) -> list[Op]:
    bits = b.bits
    register = b.scratch(bits)
    read_cr, write_cr = _code(f"MOV_R{bits}_CR"), _code(f"MOV_CR_R{bits}")
    kind = b.chooser.integer(0, 3) if room >= 2 else 0
    b.flags(0, RFLAGS_STATUS)  # MOV to/from CR leaves the status flags undefined
    if kind == 0:
        control = b.chooser.choice((Register.CR4, Register.CR0, Register.CR3))
        return [Fixed(Instruction.create_reg_reg(read_cr, register, control))]
    if kind == 1 or room < 3:
        read = Instruction.create_reg_reg(read_cr, register, Register.CR3)
        write = Instruction.create_reg_reg(write_cr, Register.CR3, register)
        return [Fixed(read), Fixed(write)]
    control, mask = (
        (Register.CR0, CR0_WP) if kind == 2 else (Register.CR4, b.chooser.weighted(_CR4_TOGGLES))
    )
    return [
        Fixed(Instruction.create_reg_reg(read_cr, register, control)),
        Fixed(Instruction.create_reg_i32(_code(f"XOR_RM{bits}_IMM32"), register, mask)),
        Fixed(Instruction.create_reg_reg(write_cr, control, register)),
    ]


def _cpuid(b: CodeBuilder, room: int) -> list[Op]:
    cpuid = Fixed(Instruction.create(Code.CPUID))
    if room < 3:
        return [cpuid]
    leaf, subleaf = b.chooser.choice(_CPUID_LEAVES)
    return [
        Fixed(Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.EAX, leaf)),
        Fixed(Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.ECX, subleaf)),
        cpuid,
    ]


def _hlt(b: CodeBuilder, room: int) -> list[Op]:
    return [Fixed(Instruction.create(Code.HLT))]


def _ud2(b: CodeBuilder, room: int) -> list[Op]:
    return [Fixed(Instruction.create(Code.UD2))]


BUILDERS: Final[dict[str, GroupBuilder]] = {
    "nop": _nop,
    "mov": _mov,
    "movx": _movx,
    "lea": _lea,
    "alu": _alu,
    "unary": _unary,
    "xchg": _xchg,
    "cmpxchg": _cmpxchg,
    "bt": _bt,
    "cmov": _cmov,
    "setcc": _setcc,
    "push-pop": _push_pop,
    "flags": _flags,
    "enter-leave": _enter_leave,
    "string": _string,
    "jcc": _jcc,
    "jmp": _jmp,
    "call-ret": _call_ret,
    "prefetch": _prefetch,
    "clflush": _clflush,
    "invlpg": _invlpg,
    "cr": _cr,
    "cpuid": _cpuid,
    "hlt": _hlt,
    "ud2": _ud2,
}
#: Groups that end a case whatever happens next: only ever the last group.
TERMINAL_GROUPS: Final = frozenset({"hlt", "ud2"})
#: Groups that fault at CPL > 0 (MOV CR, INVLPG, LGDT...): rarer in such cases.
PRIVILEGED_GROUPS: Final = frozenset({"cr", "invlpg", "ldt"})
