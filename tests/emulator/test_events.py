"""Event delivery and privilege transitions done by the shim (docs/machine.md, Event delivery)."""

from __future__ import annotations

import struct

import pytest

from lassfuzz import system as tables
from lassfuzz.arch import (
    CR4_LASS,
    CR4_PAE,
    MASK64,
    RFLAGS_FIXED1,
    RFLAGS_IF,
    VEC_BP,
    VEC_DF,
    VEC_SS,
)
from lassfuzz.case import Page, materialize
from lassfuzz.emulator.machine import UnicornMachine
from lassfuzz.outcome import Access, Status
from tests.emulator.cases import gpr
from tests.emulator.system_cases import (
    HANDLER,
    KERNEL_STACK,
    LASS_SMAP,
    RSP0,
    SUPERVISOR,
    USER_CODE,
    USER_STACK,
    idt_page,
    iret_frame,
    system_case,
)


def _names(events: tuple[object, ...]) -> list[str]:
    return [event.name for event in events]  # type: ignore[attr-defined]


def test_int80_from_cpl3_with_user_half_idt_and_smap_shuts_down(machine: UnicornMachine) -> None:
    """Known answer: every IDT read violates LASS, so delivery ends in a triple fault."""
    outcome = machine.run(system_case("cd80", idt="user"))
    assert outcome.status is Status.SHUTDOWN
    assert _names(outcome.events) == ["vector 0x80", "#GP(0)", "#DF(0)"]
    assert [event.rip for event in outcome.events] == [USER_CODE + 2, USER_CODE, USER_CODE]
    assert outcome.registers is not None
    assert (outcome.registers.rip, outcome.registers.cpl) == (USER_CODE, 3)
    assert outcome.fault is None


def test_int80_from_cpl3_with_user_half_tss_shuts_down(machine: UnicornMachine) -> None:
    """Known answer: the IDT is readable, but every delivery from CPL3 reads TSS.RSP0."""
    outcome = machine.run(system_case("cd80", tss="user"))
    assert outcome.status is Status.SHUTDOWN
    assert outcome.events[1].name == "#GP(0)"


def test_int80_from_cpl0_without_ist_does_not_read_the_tss(machine: UnicornMachine) -> None:
    """Known answer: same tables at CPL0: no stack switch, the handler runs."""
    outcome = machine.run(system_case("cd80", cpl=0, tss="user"))
    assert outcome.status is Status.HALTED
    assert outcome.registers is not None and outcome.registers.rip == HANDLER + 1


def test_delivery_from_cpl3_switches_stack_and_pushes_the_frame(machine: UnicornMachine) -> None:
    case = system_case("90 cd80", rflags=RFLAGS_FIXED1 | RFLAGS_IF)
    outcome = machine.run(case, trace=True)
    assert outcome.status is Status.HALTED and outcome.summary == "vector 0x80"
    assert outcome.events[0].rip == USER_CODE + 3
    registers = outcome.registers
    assert registers is not None and registers.system is not None
    assert registers.cpl == 0 and not registers.rflags & RFLAGS_IF
    assert gpr(registers, "rsp") == RSP0 - 40
    assert registers.system.selectors[:2] == (tables.KERNEL_CS, 0)  # SS null, RPL 0
    frame = materialize(case).page_frames[SUPERVISOR + 0x4000]
    words = struct.unpack("<5Q", outcome.memory[frame][0x1000 - 40 :])
    assert words == (
        USER_CODE + 3,
        tables.USER_CS | 3,
        RFLAGS_FIXED1 | RFLAGS_IF,
        USER_STACK,
        tables.USER_DS | 3,
    )
    assert outcome.trace is not None
    assert [access.implicit for access in outcome.trace] == [True] * 3 + [False] * 5
    assert outcome.trace[2] == Access("read", SUPERVISOR + 0x2004, 8, RSP0, implicit=True)
    assert outcome.trace[3].address == RSP0 - 8  # pushes: highest address first


def test_gate_dpl_below_cpl_is_gp_for_int_n(machine: UnicornMachine) -> None:
    outcome = machine.run(
        system_case("cd80", extra_pages=(idt_page((0x80, HANDLER, 0, 0), (13, HANDLER, 0, 0)),))
    )
    assert _names(outcome.events) == ["vector 0x80", f"#GP({0x80 * 8 + 2})"]
    assert outcome.status is Status.HALTED


def test_ist_stack_is_used(machine: UnicornMachine) -> None:
    ist1 = SUPERVISOR + 0x4800
    tss = Page(
        SUPERVISOR + 0x2000, user=False, data=tables.tss(rsp=(RSP0, 0, 0), ist=(ist1,) + (0,) * 6)
    )
    case = system_case("cc", cpl=0, extra_pages=(tss, idt_page((VEC_BP, HANDLER, 0, 1))))
    outcome = machine.run(case)
    assert outcome.status is Status.HALTED and outcome.events[0].vector == VEC_BP
    assert gpr(outcome.registers, "rsp") == ist1 - 40


def test_fault_in_user_code_is_delivered_and_double_fault_chain(machine: UnicornMachine) -> None:
    # #GP from MOV from CR4 at CPL3 goes to a handler; with an IDT lacking the #GP gate the
    # delivery fails (#GP(13*8+2+1)), which after a contributory event makes #DF, whose
    # missing gate ends in a triple fault (not an event itself).
    delivered = machine.run(system_case("0f20e0"))
    assert delivered.status is Status.HALTED and _names(delivered.events) == ["#GP(0)"]
    missing = machine.run(system_case("0f20e0", extra_pages=(idt_page((0x80, HANDLER, 3, 0)),)))
    assert missing.status is Status.SHUTDOWN
    assert _names(missing.events) == ["#GP(0)", "#DF(0)"]


def test_push_fault_during_delivery_is_ss_with_ext(machine: UnicornMachine) -> None:
    # CPL0 with a user-half RSP and SMAP: the frame pushes violate LASS (#SS(EXT)).
    outcome = machine.run(system_case("cd80", cpl=0, rsp=USER_STACK))
    # INT n is not contributory: its #SS(0) (EXT = 0) is delivered next, and fails with
    # #SS(1), which makes #DF.
    assert [(event.vector, event.error_code) for event in outcome.events] == [
        (0x80, None),
        (VEC_SS, 0),
        (VEC_DF, 0),
    ]
    assert outcome.status is Status.SHUTDOWN


def test_iretq_to_cpl3_then_int3(machine: UnicornMachine) -> None:
    target = USER_CODE + 0x100
    code = Page(USER_CODE, user=True, writable=False, data=bytes(0x100) + bytes.fromhex("48ffc0cc"))
    frame = iret_frame(target, tables.USER_CS | 3, RFLAGS_FIXED1, USER_STACK, tables.USER_DS | 3)
    case = system_case("48cf", cpl=0, rsp=KERNEL_STACK - 40, extra_pages=(code, frame))
    outcome = machine.run(case)
    assert outcome.status is Status.HALTED
    assert [(event.vector, event.rip) for event in outcome.events] == [(VEC_BP, target + 4)]
    assert gpr(outcome.registers, "rax") == 1


def test_iretq_into_compatibility_mode(machine: UnicornMachine) -> None:
    target = USER_CODE + 0x100
    # dec eax; inc eax; inc eax (0x48/0x40 are not REX in 32-bit code); int3
    code = Page(USER_CODE, user=True, writable=False, data=bytes(0x100) + bytes.fromhex("484040cc"))
    frame = iret_frame(target, tables.USER_CS32 | 3, RFLAGS_FIXED1, USER_STACK, tables.USER_DS | 3)
    case = system_case("48cf", cpl=0, rsp=KERNEL_STACK - 40, extra_pages=(code, frame))
    outcome = machine.run(case)
    assert outcome.status is Status.HALTED
    assert gpr(outcome.registers, "rax") == 1
    assert outcome.events[0].rip == target + 4


@pytest.mark.parametrize("lass", [True, False], ids=["lass", "no-lass"])
def test_iretq_into_compatibility_mode_at_cpl2_fetches_with_bit_63_clear(
    machine: UnicornMachine, lass: bool
) -> None:
    """Compatibility mode makes every CPL 0-2 fetch a LASS violation (LASS.md §1): IRETQ
    commits CPL 2 and compatibility mode, then the first fetch is #GP(0) at the target, and
    the frame pushed on TSS.RSP0 holds the 32-bit CS. Without LASS the 32-bit code runs."""
    target = USER_CODE + 0x100
    code = Page(USER_CODE, user=False, writable=False, data=bytes(0x100) + bytes.fromhex("40cc"))
    frame = iret_frame(
        target, tables.RING2_CS32 | 2, RFLAGS_FIXED1, USER_STACK, tables.RING2_DS | 2
    )
    cr4 = LASS_SMAP if lass else LASS_SMAP & ~CR4_LASS
    case = system_case("48cf", cpl=0, cr4=cr4, rsp=KERNEL_STACK - 40, extra_pages=(code, frame))
    outcome = machine.run(case)
    assert outcome.status is Status.HALTED, outcome.detail
    if not lass:
        assert [(event.name, event.rip) for event in outcome.events] == [("#BP", target + 2)]
        assert gpr(outcome.registers, "rax") == 1  # 0x40 ran as INC EAX
        return
    assert [(event.name, event.rip) for event in outcome.events] == [("#GP(0)", target)]
    stack = outcome.memory[materialize(case).page_frames[SUPERVISOR + 0x4000]]
    assert struct.unpack_from("<2Q", stack, 0x1000 - 40) == (target, tables.RING2_CS32 | 2)


def test_iretq_frame_wrapping_past_2_64_keeps_byte_order(machine: UnicornMachine) -> None:
    """CPL0 to CPL0 with the 40-byte frame at 2**64 - 24: RIP, CS, RFLAGS on the top page,
    RSP and SS on page 0 (the frame is paged from page 0 first, but read in byte order)."""
    top = MASK64 & ~0xFFF
    frame = struct.pack(
        "<5Q", HANDLER, tables.KERNEL_CS, RFLAGS_FIXED1, KERNEL_STACK, tables.KERNEL_DS
    )
    pages = (
        Page(top, user=False, data=bytes(0x1000 - 24) + frame[:24]),
        Page(0, user=False, data=frame[24:]),
    )
    case = system_case("48cf", cpl=0, cr4=CR4_PAE, rsp=MASK64 - 23, extra_pages=pages)
    outcome = machine.run(case)
    assert outcome.status is Status.HALTED and not outcome.events, outcome.events
    registers = outcome.registers
    assert registers is not None and registers.system is not None
    assert (registers.rip, gpr(registers, "rsp")) == (HANDLER + 1, KERNEL_STACK)
    assert registers.system.selectors[:2] == (tables.KERNEL_CS, tables.KERNEL_DS)


def test_iretq_to_an_inner_level_is_gp(machine: UnicornMachine) -> None:
    frame = iret_frame(HANDLER, tables.KERNEL_CS, RFLAGS_FIXED1, KERNEL_STACK, tables.KERNEL_DS)
    case = system_case("48cf", cpl=2, rsp=KERNEL_STACK - 40, extra_pages=(frame,))
    outcome = machine.run(case)
    assert outcome.events[0].name == f"#GP({tables.KERNEL_CS})"


def test_syscall_enters_cpl0_at_lstar(machine: UnicornMachine) -> None:
    case = system_case("0f05", syscall=True)
    assert case.state.system is not None
    from dataclasses import replace

    case = replace(
        case, state=replace(case.state, system=replace(case.state.system, lstar=HANDLER))
    )
    outcome = machine.run(case)
    assert outcome.status is Status.HALTED and not outcome.events
    registers = outcome.registers
    assert registers is not None and registers.system is not None and registers.cpl == 0
    assert (gpr(registers, "rcx"), gpr(registers, "r11")) == (USER_CODE + 2, RFLAGS_FIXED1)
    assert registers.system.selectors[:2] == (tables.KERNEL_CS, tables.KERNEL_DS)


def test_syscall_without_sce_is_ud(machine: UnicornMachine) -> None:
    outcome = machine.run(system_case("0f05"))
    assert outcome.events[0].name == "#UD"


def test_sysret_to_supervisor_rip_commits_cpl3_then_gp_at_target(machine: UnicornMachine) -> None:
    """Known answer: SYSRET to a supervisor-half RIP: CPL3 committed, #GP(0) with RIP =
    target (here the handler's address, so the delivered #GP then halts there at CPL0)."""
    case = system_case("480f07", cpl=0, syscall=True, rcx=HANDLER, r11=0x202)
    outcome = machine.run(case)
    assert [(event.name, event.rip) for event in outcome.events] == [("#GP(0)", HANDLER)]
    frame = materialize(case).page_frames[SUPERVISOR + 0x4000]
    error, rip, cs, rflags, _, ss = struct.unpack("<6Q", outcome.memory[frame][0x1000 - 48 :])
    assert (error, rip, cs, rflags, ss) == (
        0,
        HANDLER,
        tables.USER_CS | 3,
        0x1_0202,  # the fault's RFLAGS image has RF = 1
        tables.USER_DS | 3,
    )


def test_compat_cpl0_fetch_with_lass_is_delivered_gp(machine: UnicornMachine) -> None:
    """Known answer: a compatibility-mode CPL0 fetch with LASS on is #GP(0), delivered to the
    64-bit handler."""
    outcome = machine.run(system_case("90", cpl=0, mode="compat"))
    assert [(event.name, event.rip) for event in outcome.events] == [("#GP(0)", USER_CODE)]
    assert outcome.status is Status.HALTED


def test_int_n_is_never_combined_into_double_fault(machine: UnicornMachine) -> None:
    # INT 0x0E at CPL0 with a read-only stack: the push #PF is delivered serially (INT n is
    # no #PF, whatever its vector); that delivery's #PF after #PF makes #DF.
    stack = Page(SUPERVISOR + 0x4000, user=False, writable=False)
    outcome = machine.run(system_case("cd0e", cpl=0, extra_pages=(stack,)))
    assert [(event.vector, event.error_code) for event in outcome.events] == [
        (14, None),
        (14, 3),
        (VEC_DF, 0),
    ]
    assert outcome.status is Status.SHUTDOWN
