"""Far JMP/CALL/RET and call gates emulated by the shim (docs/machine.md, far transfers)."""

from __future__ import annotations

import struct

from lassfuzz import system as tables
from lassfuzz.arch import CR4_LASS, CR4_PAE, VEC_GP
from lassfuzz.case import Page, materialize
from lassfuzz.emulator.machine import UnicornMachine
from lassfuzz.outcome import Status
from tests.emulator.cases import gpr
from tests.emulator.system_cases import (
    HANDLER,
    KERNEL_STACK,
    RSP0,
    SUPERVISOR,
    USER_CODE,
    USER_STACK,
    system_case,
)

JMP_FAR64 = "48ff2c2500005000"  # jmp far [0x500000] (m16:64)
JMP_FAR32 = "ff2c2500005000"  # jmp far [0x500000] (m16:32)
CALL_FAR64 = "48ff1c2500005000"  # call far [0x500000] (m16:64)
# At USER_CODE + 0x100: inc rax (48 ff c0), or in 32-bit code dec eax; inc eax; inc eax;
# then int3.
TARGET = USER_CODE + 0x100
USER_TARGET = Page(
    USER_CODE, user=True, writable=False, data=bytes(0x100) + bytes.fromhex("48ffc0cc")
)


def _pointer(offset: int, selector: int, *, size: int = 8) -> Page:
    layout = "<QH" if size == 8 else "<IH"
    return Page(0x50_0000, user=True, data=struct.pack(layout, offset, selector))


def _gdt_with_call_gate(*, dpl: int) -> Page:
    """The standard GDT with a 64-bit call gate (to KERNEL_CS:HANDLER) in slots 0x60-0x6F."""
    table = bytearray(tables.standard_gdt(SUPERVISOR + 0x2000))
    table[0x60:0x70] = tables.gate(tables.TYPE_CALL_GATE, tables.KERNEL_CS, HANDLER, dpl=dpl)
    return Page(SUPERVISOR, user=False, data=bytes(table))


def test_far_jmp_into_compatibility_mode(machine: UnicornMachine) -> None:
    pages = (_pointer(TARGET, tables.USER_CS32 | 3, size=4), USER_TARGET)
    outcome = machine.run(system_case(JMP_FAR32, rax=5, extra_pages=pages))
    # 48 40 ... in 32-bit code: DEC EAX; then FF C0 is INC EAX: 5 - 1 + 1.
    assert [(event.name, event.rip) for event in outcome.events] == [("#BP", TARGET + 4)]
    assert gpr(outcome.registers, "rax") == 5
    frame = materialize(system_case("90")).page_frames[SUPERVISOR + 0x4000]
    cs = struct.unpack("<Q", outcome.memory[frame][0x1000 - 32 : 0x1000 - 24])[0]
    assert cs == tables.USER_CS32 | 3  # the #BP frame's CS: compatibility-mode code


def test_far_jmp_checks_privilege_after_the_descriptor_read(machine: UnicornMachine) -> None:
    pages = (_pointer(TARGET, tables.KERNEL_CS), USER_TARGET)
    outcome = machine.run(system_case(JMP_FAR64, extra_pages=pages))
    assert outcome.events[0].name == f"#GP({tables.KERNEL_CS})"


def test_far_jmp_to_noncanonical_offset_faults_at_the_jmp(machine: UnicornMachine) -> None:
    pages = (_pointer(1 << 63, tables.USER_CS | 3), USER_TARGET)
    outcome = machine.run(system_case(JMP_FAR64, extra_pages=pages))
    assert [(event.name, event.rip) for event in outcome.events] == [("#GP(0)", USER_CODE)]


def test_call_gate_from_cpl3_switches_to_rsp0(machine: UnicornMachine) -> None:
    case = system_case(CALL_FAR64, extra_pages=(_pointer(0, 0x63), _gdt_with_call_gate(dpl=3)))
    outcome = machine.run(case)
    assert outcome.status is Status.HALTED and not outcome.events
    registers = outcome.registers
    assert registers is not None and registers.system is not None and registers.cpl == 0
    assert registers.system.selectors[:2] == (tables.KERNEL_CS, 0)
    assert gpr(registers, "rsp") == RSP0 - 32
    frame = materialize(case).page_frames[SUPERVISOR + 0x4000]
    pushed = struct.unpack("<4Q", outcome.memory[frame][0x1000 - 32 :])
    assert pushed == (USER_CODE + 8, tables.USER_CS | 3, USER_STACK, tables.USER_DS | 3)


def test_call_gate_dpl_below_cpl_is_gp(machine: UnicornMachine) -> None:
    case = system_case(CALL_FAR64, extra_pages=(_pointer(0, 0x63), _gdt_with_call_gate(dpl=0)))
    assert machine.run(case).events[0].name == "#GP(96)"


def test_far_call_and_ret_at_cpl0(machine: UnicornMachine) -> None:
    callee = Page(SUPERVISOR + 0x6000, user=False, writable=False, data=bytes.fromhex("48ffc048cb"))
    pointer = _pointer(SUPERVISOR + 0x6000, tables.KERNEL_CS)
    case = system_case(
        CALL_FAR64 + "f4", cpl=0, cr4=CR4_PAE | CR4_LASS, extra_pages=(pointer, callee)
    )
    outcome = machine.run(case)
    assert outcome.status is Status.HALTED and not outcome.events
    assert gpr(outcome.registers, "rax") == 1
    assert gpr(outcome.registers, "rsp") == KERNEL_STACK


def test_ret_far_to_an_outer_level_releases_imm16_on_both_stacks(machine: UnicornMachine) -> None:
    stack = struct.pack(
        "<6Q", TARGET, tables.USER_CS | 3, 0, 0, USER_STACK - 0x20, tables.USER_DS | 3
    )
    page = Page(SUPERVISOR + 0x4000, user=False, data=bytes(0x1000 - 48) + stack)
    case = system_case("48ca1000", cpl=0, rsp=KERNEL_STACK - 48, extra_pages=(page, USER_TARGET))
    outcome = machine.run(case)
    assert [(event.vector, event.rip) for event in outcome.events] == [(3, TARGET + 4)]
    frame = materialize(case).page_frames[SUPERVISOR + 0x4000]
    # The #BP frame (to RSP0) saved RSP = popped RSP + imm16.
    saved_rsp = struct.unpack("<Q", outcome.memory[frame][0x1000 - 16 : 0x1000 - 8])[0]
    assert saved_rsp == USER_STACK - 0x20 + 0x10


def test_ret_far_to_an_inner_level_is_gp(machine: UnicornMachine) -> None:
    stack = Page(
        0x50_0000, user=True, data=bytes(0xFF0) + struct.pack("<2Q", HANDLER, tables.KERNEL_CS)
    )
    outcome = machine.run(system_case("48cb", rsp=0x50_0FF0, extra_pages=(stack,)))
    first = outcome.events[0]
    assert (first.vector, first.error_code) == (VEC_GP, tables.KERNEL_CS)


def test_direct_far_pointer_is_unsupported(machine: UnicornMachine) -> None:
    outcome = machine.run(system_case("ea00004000001b00", mode="compat"))  # jmp 0x1b:0x400000
    assert outcome.status is Status.UNSUPPORTED and "far transfer" in outcome.detail
