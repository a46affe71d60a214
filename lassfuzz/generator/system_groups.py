"""Instruction groups for cases with descriptor tables (``State.system``; issue 6).

They make the processor's *implicit* supervisor accesses (LASS.md section 8 item 5): segment
loads and descriptor queries read the GDT, LTR reads (and may write) the TSS descriptor, INT n
reads the IDT, the GDT and the TSS, IRETQ reads descriptors and, like SYSRET, commits a privilege
change before the next fetch (item 3). Selectors are mostly ones that load (so cases run on) and
sometimes ones that fault: null, beyond the GDT limit, the wrong type or privilege. Far
transfers (RET far, JMP/CALL far through an m16:64 pointer) read the code descriptor too.

The layout invariants of :mod:`lassfuzz.generator.instructions` are kept: after SYSCALL or SYSRET
(which write R11) no memory operand uses the index register, and after loading FS or GS (whose
base then changes) no operand uses that override.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Final, cast

from iced_x86 import Code, Instruction, MemoryOperand, Register

if TYPE_CHECKING:  # iced's stubs type codes and registers as enums; at run time they are ints
    from iced_x86._iced_x86_py import Code as CodeValue
    from iced_x86._iced_x86_py import Register as RegisterValue

from lassfuzz.arch import (
    PAGE_SIZE,
    RFLAGS_AC,
    RFLAGS_FIXED1,
    RFLAGS_IF,
    RFLAGS_STATUS,
    RFLAGS_ZF,
)
from lassfuzz.generator.choices import Weighted
from lassfuzz.generator.instructions import (
    CodeAddress,
    CodeBuilder,
    Fixed,
    GroupBuilder,
    Op,
    load_immediate,
    push_immediate,
    sized,
    target_load,
)
from lassfuzz.generator.layout import COMPAT_STACK_TOP
from lassfuzz.system import (
    CODE_SELECTOR,
    EXTRA_SEL,
    GDT_LIMIT,
    KERNEL_CS,
    KERNEL_DS,
    NULL,
    STACK_SELECTOR,
    TSS_SEL,
    USER_CS,
    USER_CS32,
    USER_DS,
)

_SEGMENTS: Final = (Register.DS, Register.ES, Register.SS, Register.FS, Register.GS)
#: POP Sreg forms: only FS and GS exist in 64-bit code.
_POP_SEGMENT: Final = {
    64: {Register.FS: Code.POPQ_FS, Register.GS: Code.POPQ_GS},
    32: {
        Register.DS: Code.POPD_DS,
        Register.ES: Code.POPD_ES,
        Register.SS: Code.POPD_SS,
        Register.FS: Code.POPD_FS,
        Register.GS: Code.POPD_GS,
    },
}
#: Selectors that fault somewhere: RPL above a DPL 0 descriptor, code segments (not writable:
#: #GP for SS), the TSS (a system descriptor), an LDT selector (LDTR is null), beyond the limit.
_ODD_SELECTORS: Final = (
    NULL,
    KERNEL_DS | 3,
    USER_DS,
    KERNEL_CS,
    USER_CS | 3,
    USER_CS32 | 3,
    TSS_SEL,
    0x4,
    GDT_LIMIT + 1,
)
_VECTORS: Final = (0x80, 3, 0x0D, 0x0E, 0x20, 0xFF)
#: RFLAGS values popped by IRETQ or loaded by SYSRET: AC set or clear, IF set or clear.
_RFLAGS_VALUES: Final = tuple(
    RFLAGS_FIXED1 | extra for extra in (0, RFLAGS_AC, RFLAGS_IF, RFLAGS_AC | RFLAGS_IF)
)


@functools.cache  # looking an iced Code up by name is slow (~0.5 us)
def _code(name: str) -> CodeValue:
    return cast("CodeValue", getattr(Code, name))


#: Per CPL: mostly the data selector of that CPL (it loads), else the other data selectors or
#: one that faults.
_SELECTORS: Final = {
    cpl: Weighted.of(
        [
            (STACK_SELECTOR[cpl], 6),
            *((STACK_SELECTOR[level], 1) for level in range(4) if level != cpl),
            *((selector, 1) for selector in _ODD_SELECTORS),
        ]
    )
    for cpl in range(4)
}


def _selector(b: CodeBuilder) -> int:
    return b.chooser.weighted(_SELECTORS[b.setup.control.cpl])


def _selector_source(b: CodeBuilder, room: int) -> tuple[list[Op], RegisterValue | None]:
    """A register loaded with a selector (one instruction), or None: use a memory operand."""
    if room < 2 or b.chooser.boolean(0.2):
        return [], None
    register = b.scratch(32)
    load = Instruction.create_reg_u32(Code.MOV_R32_IMM32, register, _selector(b))
    return [Fixed(load)], register


def _sreg(b: CodeBuilder, room: int) -> list[Op] | None:
    """MOV Sreg, r/m16 or PUSH r; POP Sreg: a descriptor read, and an A-bit write if clear."""
    segment = b.chooser.choice(_SEGMENTS)
    ops, register = _selector_source(b, room)
    pop = _POP_SEGMENT[b.bits].get(segment)
    if register is not None and pop is not None and room >= 3 and b.chooser.boolean(0.3):
        push = Instruction.create_reg(_code(f"PUSH_R{b.bits}"), sized(register, b.bits))
        ops += [Fixed(push), Fixed(Instruction.create_reg(pop, segment))]
    else:
        move = _code(f"MOV_SREG_R{b.bits}M16")
        if register is None:
            ops.append(Fixed(Instruction.create_reg_mem(move, segment, b.memory(2))))
        else:
            ops.append(Fixed(Instruction.create_reg_reg(move, segment, sized(register, b.bits))))
    if segment in (Register.FS, Register.GS):  # the base is now the descriptor's (zero)
        b.overrides = tuple(override for override in b.overrides if override != segment)
    return ops


def _lar(b: CodeBuilder, room: int) -> list[Op] | None:
    """LAR, LSL, VERR, VERW: descriptor reads at any CPL; only ZF changes."""
    name = b.chooser.choice(("LAR", "LSL", "VERR", "VERW"))
    ops, register = _selector_source(b, room)
    if name in ("LAR", "LSL"):
        code = _code(f"{name}_R32_R32M16")
        destination = b.scratch(32)
        if register is None:
            instruction = Instruction.create_reg_mem(code, destination, b.memory(2))
        else:
            instruction = Instruction.create_reg_reg(code, destination, register)
    else:
        code = _code(f"{name}_R32M16")
        if register is None:
            instruction = Instruction.create_mem(code, b.memory(2))
        else:
            instruction = Instruction.create_reg(code, register)
    b.flags(RFLAGS_ZF)
    return [*ops, Fixed(instruction)]


def _sdt(b: CodeBuilder, room: int) -> list[Op]:
    """SGDT, SIDT (explicit stores of limit and base), SLDT, STR (register or 2-byte store)."""
    name = b.chooser.choice(("SGDT", "SIDT", "SLDT", "STR"))
    if name in ("SGDT", "SIDT"):
        form, size = ("M1664", 10) if b.bits == 64 else ("M1632", 6)
        return [Fixed(Instruction.create_mem(_code(f"{name}_{form}"), b.memory(size)))]
    code = _code(f"{name}_R32M16")
    if b.chooser.boolean(0.5):
        return [Fixed(Instruction.create_reg(code, b.scratch(32)))]
    return [Fixed(Instruction.create_mem(code, b.memory(2)))]


def _ldt(b: CodeBuilder, room: int) -> list[Op] | None:
    """LGDT/LIDT of what SGDT/SIDT just stored (64-bit code: a 32-bit base could not hold a
    supervisor-half table), LTR (the TSS descriptor: busy is #GP, available is set busy), LLDT."""
    if room < 2:
        return None
    if b.bits == 64 and b.chooser.boolean(0.4):
        table = b.chooser.choice(("GDT", "IDT"))
        memory = b.memory(10)
        store = Instruction.create_mem(_code(f"S{table}_M1664"), memory)
        return [Fixed(store), Fixed(Instruction.create_mem(_code(f"L{table}_M1664"), memory))]
    name = b.chooser.choice(("LTR", "LLDT"))
    selector = b.chooser.choice((TSS_SEL, NULL, KERNEL_DS, GDT_LIMIT + 1))
    register = b.scratch(32)
    load = Instruction.create_reg_u32(Code.MOV_R32_IMM32, register, selector)
    return [Fixed(load), Fixed(Instruction.create_reg(_code(f"{name}_R32M16"), register))]


def _int(b: CodeBuilder, room: int) -> list[Op]:
    """INT3 or INT n: delivery reads the IDT gate, the GDT and (to a lower CPL, or with an
    IST) the TSS, and pushes the frame."""
    if b.chooser.boolean(0.25):
        return [Fixed(Instruction.create(Code.INT3))]
    return [Fixed(Instruction.create_i32(Code.INT_IMM8, b.chooser.choice(_VECTORS)))]


def _iret(b: CodeBuilder, room: int) -> list[Op] | None:
    """A prepared 5-word frame, then IRETQ: to the same CPL or an outer one, at a later group
    (whose fetch may now violate LASS), a far target or, in compatibility mode, the 32-bit
    entry page. 64-bit code only (IRETD is not supported)."""
    if b.bits != 64 or room < 8:
        return None
    cpl = b.setup.control.cpl
    target_cpl = cpl if b.chooser.boolean(0.4) else b.chooser.integer(cpl, 3)
    saved = b.scratch(64)
    address = b.chooser.choice([r for r in b.scratch_registers if r != saved])
    selector, target, stack = _code_target(b, target_cpl, address, new_stack=True)
    ops: list[Op] = [
        Fixed(Instruction.create_reg_reg(Code.MOV_RM64_R64, saved, Register.RSP)),
        Fixed(Instruction.create_i32(push_immediate(b, 32), STACK_SELECTOR[target_cpl])),
        _push_stack_pointer(b, saved, stack),
        Fixed(Instruction.create_i32(push_immediate(b, 32), b.chooser.choice(_RFLAGS_VALUES))),
        Fixed(Instruction.create_i32(push_immediate(b, 32), selector)),
        target,
        Fixed(Instruction.create_reg(Code.PUSH_R64, address)),
        Fixed(Instruction.create(Code.IRETQ)),
    ]
    b.flags(RFLAGS_STATUS)  # RFLAGS comes from the frame
    return ops


def _code_target(
    b: CodeBuilder, cpl: int, register: RegisterValue, *, new_stack: bool
) -> tuple[int, Op, int | None]:
    """The code selector for a return or far transfer to ``cpl``, the load of its RIP into
    ``register``, and the RSP to load with it: mostly 64-bit code (a later group or a far
    target, RSP kept: None), sometimes the 32-bit entry page in compatibility mode with the
    stack below 4 GiB (LASS.md section 8 item 6). Only transfers that load a ``new_stack``
    (IRETQ, RET far to an outer level) enter compatibility mode."""
    entry = b.setup.compat_entry
    if new_stack and entry is not None and b.chooser.boolean(_P_COMPAT_TARGET):
        load = Fixed(load_immediate(register, entry, b.bits))
        return CODE_SELECTOR[("compat", cpl)], load, COMPAT_STACK_TOP
    return CODE_SELECTOR[("64", cpl)], target_load(b, register), None


def _push_stack_pointer(b: CodeBuilder, saved: RegisterValue, stack: int | None) -> Op:
    """Push the RSP of a return frame: the RSP saved before the frame, or ``stack``."""
    if stack is None:
        return Fixed(Instruction.create_reg(Code.PUSH_R64, saved))
    return Fixed(Instruction.create_i32(push_immediate(b, 32), stack))


_P_COMPAT_TARGET: Final = 0.25


def _far(b: CodeBuilder, room: int) -> list[Op] | None:
    """RET far to a prepared CS:RIP (and SS:RSP, to an outer CPL), or JMP/CALL far through an
    m16:64 pointer stored just before in a data page the CPL may write; the target is a later
    group, a far target or (RET far to an outer level) the 32-bit entry page, see
    :func:`_code_target`; the pointer's selector is mostly the case's own 64-bit code selector.
    64-bit code only."""
    if b.bits != 64 or room < 4:
        return None
    cpl = b.setup.control.cpl
    address = b.scratch(64)
    if b.chooser.boolean(0.5):
        target_cpl = cpl if room < 7 or b.chooser.boolean(0.5) else b.chooser.integer(cpl, 3)
        outer = target_cpl != cpl  # RET far to an outer level pops SS:RSP too
        selector, target, stack = _code_target(b, target_cpl, address, new_stack=outer)
        ops: list[Op] = []
        if outer:
            saved = b.chooser.choice([r for r in b.scratch_registers if r != address])
            ops += [
                Fixed(Instruction.create_reg_reg(Code.MOV_RM64_R64, saved, Register.RSP)),
                Fixed(Instruction.create_i32(push_immediate(b, 32), STACK_SELECTOR[target_cpl])),
                _push_stack_pointer(b, saved, stack),
            ]
        return [
            *ops,
            Fixed(Instruction.create_i32(push_immediate(b, 32), selector)),
            target,
            Fixed(Instruction.create_reg(Code.PUSH_R64, address)),
            Fixed(Instruction.create(Code.RETFQ)),
        ]
    pointer = _far_pointer(b)
    if pointer is None:
        return None
    offset, selector_field = pointer
    selector, target, _ = _code_target(b, cpl, address, new_stack=False)
    system = b.setup.system
    if system is not None and system.gdt_limit >= EXTRA_SEL + 15 and b.chooser.boolean(0.3):
        # The call gate: CALL goes to the handler at CPL0 (from CPL > 0 on TSS.RSP0, an
        # implicit read); JMP to a more privileged level through it is #GP(selector).
        selector = EXTRA_SEL | 3
    elif b.chooser.boolean(0.2):
        selector = b.chooser.choice(_ODD_FAR_SELECTORS[cpl])
    far = Code.JMP_M1664 if b.chooser.boolean(0.5) else Code.CALL_M1664
    return [
        target,
        Fixed(Instruction.create_mem_reg(Code.MOV_RM64_R64, offset, address)),
        Fixed(Instruction.create_mem_i32(Code.MOV_RM16_IMM16, selector_field, selector)),
        Fixed(Instruction.create_mem(far, offset)),
    ]


def _far_pointer(b: CodeBuilder) -> tuple[MemoryOperand, MemoryOperand] | None:
    """Operands for the offset and the selector of an m16:64 pointer, 16-byte aligned in a page
    the CPL can write without any fault, or None if there is none in reach."""
    if not b.layout.safe_targets:
        return None
    page = b.chooser.choice(b.layout.safe_targets)
    address = page + b.chooser.integer(0, PAGE_SIZE // 16 - 1) * 16
    offset, selector = b.operand_at(address), b.operand_at(address + 8)
    return None if offset is None or selector is None else (offset, selector)


#: Far pointer selectors per CPL that a JMP/CALL far rejects: another level's code segment
#: (nonconforming: #GP(selector)), the null selector, a data segment.
_ODD_FAR_SELECTORS: Final = {
    cpl: (
        *(CODE_SELECTOR[("64", level)] for level in range(4) if level != cpl),
        NULL,
        STACK_SELECTOR[cpl],
    )
    for cpl in range(4)
}


def _syscall(b: CodeBuilder, room: int) -> list[Op] | None:
    """SYSCALL (to LSTAR at CPL0, RFLAGS masked by SFMASK) or SYSRET (to CPL3 at RCX: a later
    group, whose fetch then violates LASS in the supervisor half, or a far target). Both write
    RCX and R11. 64-bit code only (SYSCALL is #UD in compatibility mode)."""
    if b.bits != 64:
        return None
    b.index_trusted = False  # R11 is written
    if room < 3 or b.chooser.boolean(0.4):
        return [Fixed(Instruction.create(Code.SYSCALL))]
    target: Op = CodeAddress(Register.RCX, b.forward())
    if b.chooser.boolean(0.5):
        target = Fixed(load_immediate(Register.RCX, b.chooser.choice(b.layout.far_targets), b.bits))
    flags = b.chooser.choice(_RFLAGS_VALUES)
    b.flags(RFLAGS_STATUS)  # RFLAGS comes from R11
    return [
        target,
        Fixed(Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.R11D, flags)),
        Fixed(Instruction.create(Code.SYSRETQ)),
    ]


def _with_tables(builder: GroupBuilder) -> GroupBuilder:
    """``builder``, returning None (a plain MOV instead) for a case without descriptor tables,
    where the engines could not run these instructions."""

    def build(b: CodeBuilder, room: int) -> list[Op] | None:
        return None if b.setup.system is None else builder(b, room)

    return build


SYSTEM_BUILDERS: Final[dict[str, GroupBuilder]] = {
    name: _with_tables(builder)
    for name, builder in (
        ("sreg", _sreg),
        ("lar", _lar),
        ("sdt", _sdt),
        ("ldt", _ldt),
        ("int", _int),
        ("iret", _iret),
        ("syscall", _syscall),
        ("far", _far),
    )
}
#: Groups that only exist in 64-bit code (the builders return None in 32-bit code).
LONG_MODE_GROUPS: Final = frozenset({"iret", "syscall", "far"})
