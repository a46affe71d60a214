"""Event delivery through the IDT, #DF and triple faults, and the issue-6 known answers
(docs/machine.md "Event delivery"; LASS.md §2, §5, §7)."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lassfuzz.arch import (
    CR4_LA57,
    CR4_PAE,
    CR4_SMAP,
    RFLAGS_AC,
    RFLAGS_FIXED1,
    RFLAGS_IF,
    RFLAGS_RF,
)
from lassfuzz.case import Page, materialize
from lassfuzz.compare.diff import first_divergence
from lassfuzz.outcome import Outcome, Status
from lassfuzz.system import KERNEL_CS, KERNEL_DS, RING1_CS, RING1_DS, USER_CS, USER_CS32, USER_DS
from tests.model.builders import reg, run
from tests.model.system_builders import (
    HANDLER,
    KERNEL_STACK,
    RSP0,
    SUPERVISOR,
    SYSTEM_CR4,
    USER,
    USER_STACK,
    patched,
    system_case,
)

USER_RSP = USER_STACK + 0x800


def frame(outcome: Outcome, case_pages: dict[int, int], rsp: int, words: int) -> list[int]:
    """``words`` quadwords of the final memory at linear ``rsp`` (one page)."""
    page = rsp & ~0xFFF
    data = outcome.memory[case_pages[page]][rsp & 0xFFF :][: 8 * words]
    return list(struct.unpack(f"<{words}Q", data))


def names(outcome: Outcome) -> list[str]:
    return [event.name for event in outcome.events]


def test_fault_at_cpl3_is_delivered_to_the_cpl0_handler_on_rsp0() -> None:
    case = system_case("0f0b", cpl=3, regs={"rsp": USER_RSP}, rflags=RFLAGS_FIXED1 | RFLAGS_IF)
    outcome = run(case)
    assert outcome.status is Status.HALTED, outcome.detail
    assert outcome.fault is None
    assert names(outcome) == ["#UD"]
    assert outcome.events[0].rip == case.code_address
    assert reg(outcome, "cpl") == 0
    assert reg(outcome, "rip") == HANDLER + 1
    assert reg(outcome, "rsp") == RSP0 - 40
    assert reg(outcome, "rflags") == RFLAGS_FIXED1  # IF cleared by the interrupt gate
    assert outcome.registers is not None and outcome.registers.system is not None
    assert outcome.registers.system.selectors[:2] == (KERNEL_CS, 0)  # SS = null, RPL 0
    pushed = frame(outcome, dict(materialize(case).page_frames), RSP0 - 40, 5)
    # RIP, CS, RFLAGS (RF = 1: a fault), RSP, SS; #UD has no error code.
    image = RFLAGS_FIXED1 | RFLAGS_IF | RFLAGS_RF
    assert pushed == [case.code_address, USER_CS | 3, image, USER_RSP, USER_DS | 3]
    # Trace: gate, code descriptor, TSS.RSP0 (implicit), then the pushes (explicit).
    trace = [(a.kind, a.address, a.size, a.implicit) for a in outcome.trace or ()]
    assert trace[:3] == [
        ("read", SUPERVISOR["idt"] + 6 * 16, 16, True),
        ("read", SUPERVISOR["gdt"] + KERNEL_CS, 8, True),
        ("read", SUPERVISOR["tss"] + 4, 8, True),
    ]
    assert [(kind, size, implicit) for kind, _, size, implicit in trace[3:]] == [
        ("write", 8, False)
    ] * 5


def test_error_code_is_pushed_and_rsp_aligned_at_the_same_cpl() -> None:
    # CPL0, RSP not 16-aligned: #GP(0) from a non-canonical read; no stack switch.
    rsp = KERNEL_STACK + 0x808
    case = system_case("8b03", regs={"rsp": rsp, "rbx": 0x0000_8000_0000_0000})
    outcome = run(case)
    assert outcome.status is Status.HALTED, outcome.detail
    assert names(outcome) == ["#GP(0)"]
    top = (rsp & ~0xF) - 48
    assert reg(outcome, "rsp") == top
    pushed = frame(outcome, dict(materialize(case).page_frames), top, 6)
    assert pushed[0] == 0  # the error code
    assert pushed[1:3] == [case.code_address, KERNEL_CS]
    assert pushed[4:] == [rsp, KERNEL_DS]


def test_int_n_saves_the_next_rip_and_checks_the_gate_dpl() -> None:
    case = system_case("cd80", cpl=3, regs={"rsp": USER_RSP})
    outcome = run(case)
    assert outcome.status is Status.HALTED
    assert [(e.vector, e.error_code, e.rip) for e in outcome.events] == [
        (0x80, None, case.code_address + 2)
    ]
    pushed = frame(outcome, dict(materialize(case).page_frames), RSP0 - 40, 3)
    assert pushed[2] == RFLAGS_FIXED1  # software interrupts push RF = 0


def test_int3_and_ist_stack() -> None:
    ist_top = KERNEL_STACK + 0x400
    case = system_case("cc", ist=(ist_top, 0, 0, 0, 0, 0, 0))
    case = patched(case, SUPERVISOR["idt"] + 3 * 16 + 4, b"\x01")  # gate 3: IST1
    outcome = run(case)
    assert outcome.status is Status.HALTED, outcome.detail
    assert reg(outcome, "rsp") == ist_top - 40
    assert ("read", SUPERVISOR["tss"] + 0x24, 8) in [
        (a.kind, a.address, a.size) for a in outcome.trace or ()
    ]


# ---- the issue-6 known answers -------------------------------------------------------------


def test_int80_from_cpl3_with_the_idt_in_the_user_half_is_a_triple_fault() -> None:
    case = system_case("cd80", cpl=3, user_tables=["idt"], regs={"rsp": USER_RSP})
    outcome = run(case)
    assert outcome.status is Status.SHUTDOWN
    assert names(outcome) == ["vector 0x80", "#GP(0)", "#DF(0)"]
    # Registers as left before the failed delivery: still at the INT, CPL3.
    assert reg(outcome, "rip") == case.code_address
    assert reg(outcome, "cpl") == 3
    assert outcome.trace == ()
    assert "rule 7" in outcome.detail


@pytest.mark.parametrize(("cpl", "status"), [(3, Status.SHUTDOWN), (0, Status.HALTED)])
def test_int80_with_the_tss_in_the_user_half(cpl: int, status: Status) -> None:
    # From CPL3 every delivery needs TSS.RSP0 (a violating implicit read); from CPL0 with no
    # IST the TSS is not read and the handler runs.
    rsp = USER_RSP if cpl == 3 else KERNEL_STACK + 0x800
    outcome = run(system_case("cd80", cpl=cpl, user_tables=["tss"], regs={"rsp": rsp}))
    assert outcome.status is status, outcome.detail
    if cpl == 3:
        assert names(outcome) == ["vector 0x80", "#GP(0)", "#DF(0)"]
    else:
        assert names(outcome) == ["vector 0x80"]
        assert all(a.address >> 63 for a in outcome.trace or ())


@pytest.mark.parametrize("ac", [0, RFLAGS_AC])
def test_cpl3_mov_ds_with_a_user_half_gdt_faults_whatever_ac(ac: int) -> None:
    # The descriptor read is implicit: AC does not exempt it (LASS.md §6 D2). The delivery of
    # the #GP reads the same GDT, so it ends in a triple fault.
    case = system_case("8ed8", cpl=3, user_tables=["gdt"], regs={"rax": USER_DS | 3},
                       rflags=RFLAGS_FIXED1 | ac)  # fmt: skip
    outcome = run(case)
    assert outcome.status is Status.SHUTDOWN
    assert outcome.events[0].name == "#GP(0)"
    assert outcome.events[0].rip == case.code_address
    assert "rule 7" in outcome.detail
    no_smap = case.state.cr4 & ~CR4_SMAP
    smap_off = run(system_case("8ed8", cpl=3, user_tables=["gdt"], regs={"rax": USER_DS | 3},
                               cr4=no_smap))  # fmt: skip
    assert smap_off.status is Status.COMPLETED, smap_off.detail


def test_sysret_to_a_supervisor_half_rip_commits_cpl3_then_faults_at_the_target() -> None:
    target = 0xFFFF_FFFF_8020_0000
    case = system_case("48 0f07", regs={"rcx": target, "r11": RFLAGS_FIXED1, "rsp": USER_RSP})
    outcome = run(case)
    assert outcome.status is Status.HALTED, outcome.detail
    assert names(outcome) == ["#GP(0)"]
    assert outcome.events[0].rip == target
    pushed = frame(outcome, dict(materialize(case).page_frames), RSP0 - 48, 6)
    # error code, RIP = target, CS = STAR[63:48] + 16 | 3, RFLAGS, RSP, SS = STAR[63:48] + 8 | 3
    assert pushed[:3] == [0, target, USER_CS | 3]
    assert pushed[4:] == [USER_RSP, USER_DS | 3]


def test_compat_mode_cpl0_fetch_with_lass_on_is_delivered_as_gp() -> None:
    case = system_case("90", mode="compat", regs={"rsp": KERNEL_STACK + 0x800})
    outcome = run(case)
    assert outcome.status is Status.HALTED, outcome.detail
    assert names(outcome) == ["#GP(0)"]
    assert outcome.events[0].rip == case.code_address
    assert "rule 3" in outcome.detail
    assert reg(outcome, "rip") == HANDLER + 1  # the handler runs in 64-bit mode


def test_double_fault_then_shutdown_on_unmapped_stack() -> None:
    # LASS off, so that the user-half stack faults in paging (not mapped).
    outcome = run(system_case("0f0b", regs={"rsp": 0x1000}, cr4=CR4_PAE))
    assert outcome.status is Status.SHUTDOWN
    assert names(outcome) == ["#UD", "#PF(0x2)", "#DF(0)"]


def test_benign_then_page_fault_is_delivered_serially() -> None:
    # INT 0x80 at CPL0 whose pushes #PF: the #PF is delivered instead (no #DF), and its
    # own pushes #PF again: #PF after #PF is a #DF, which shuts down.
    outcome = run(system_case("cd80", regs={"rsp": 0x1000}, cr4=CR4_PAE))
    assert names(outcome) == ["vector 0x80", "#PF(0x2)", "#DF(0)"]
    assert outcome.events[1].rip == outcome.events[0].rip - 2


def test_a_violating_push_during_int_n_is_ss_without_ext() -> None:
    # CPL0, SMAP = 1, AC = 0, user-half stack: rule 4 on the push, #SS(EXT = 0) for INT n,
    # then #SS(1) while delivering it, #DF.
    outcome = run(system_case("cd80", regs={"rsp": USER_RSP}))
    assert names(outcome) == ["vector 0x80", "#SS(0)", "#DF(0)"]


# ---- LASS.md §7 open point 1: delivery pushes -------------------------------------------------


def test_pushes_to_a_user_half_stack_with_ac_give_both_interpretations() -> None:
    # CPL0, SMAP = 1, AC = 1, RSP in the user half: as explicit writes the pushes are allowed
    # (rule 5) and the handler runs; as implicit ones they violate (rule 7): #SS(1), then
    # #DF, then shutdown. Both outcomes are accepted.
    case = system_case("0f0b", regs={"rsp": USER_RSP}, rflags=RFLAGS_FIXED1 | RFLAGS_AC)
    outcome = run(case)
    assert outcome.status is Status.HALTED, outcome.detail
    assert len(outcome.alternatives) == 1
    other = outcome.alternatives[0]
    assert other.status is Status.SHUTDOWN
    assert names(other) == ["#UD", "#SS(1)", "#DF(0)"]
    assert "open point" in other.detail
    # Both are accepted: an engine answering either one does not diverge.
    for answer in (replace(outcome, alternatives=()), other):
        assert first_divergence(case, outcome, replace(answer, engine="other")) is None
    stuck = replace(other, status=Status.HALTED, engine="other")
    assert first_divergence(case, outcome, stuck) is not None


@pytest.mark.parametrize(
    ("rflags", "cr4"),
    [(RFLAGS_FIXED1, None), (RFLAGS_FIXED1 | RFLAGS_AC, CR4_PAE)],
    ids=["ac-0", "smap-off"],
)
def test_pushes_give_one_outcome_when_the_interpretations_agree(
    rflags: int, cr4: int | None
) -> None:
    cr4 = SYSTEM_CR4 if cr4 is None else cr4
    outcome = run(system_case("0f0b", regs={"rsp": USER_RSP}, rflags=rflags, cr4=cr4))
    assert outcome.alternatives == ()


def test_user_tables_placement_constants_are_user_half() -> None:
    assert not any(address >> 63 for address in USER.values())


def test_int80_from_compat_mode_and_iretq_back() -> None:
    # INT 0x80 from 32-bit CPL3 code into the 64-bit handler, whose IRETQ returns to
    # compatibility mode: the INC EAX after the INT runs as 32-bit code.
    case = patched(system_case("cd80 40", cpl=3, mode="compat", regs={"rsp": USER_RSP}),
                   HANDLER, bytes.fromhex("48cf"))  # fmt: skip
    outcome = run(case)
    assert outcome.status is Status.COMPLETED, outcome.detail
    assert names(outcome) == ["vector 0x80"]
    assert (reg(outcome, "rax"), reg(outcome, "cpl"), reg(outcome, "rsp")) == (1, 3, USER_RSP)
    assert outcome.registers is not None and outcome.registers.system is not None
    assert outcome.registers.system.selectors[0] == USER_CS32 | 3


def test_syscall_and_sysret_round_trip() -> None:
    case = patched(
        system_case("0f05 48ffc0", cpl=3, regs={"rsp": USER_RSP}, lstar=HANDLER),
        HANDLER, bytes.fromhex("480f07"),
    )  # fmt: skip
    outcome = run(case)
    assert outcome.status is Status.COMPLETED, outcome.detail
    assert (reg(outcome, "rax"), reg(outcome, "cpl")) == (1, 3)
    assert outcome.events == ()


_SNIPPETS = ("8ed8", "0f02c1", "cd80", "0f0b", "0f05", "48cf", "0f00d8", "8b03", "90")


@settings(max_examples=40, deadline=None)
@given(
    code=st.lists(st.sampled_from(_SNIPPETS), min_size=1, max_size=3),
    cpl=st.integers(0, 3),
    mode=st.sampled_from(["64", "compat"]),
    tables=st.sets(st.sampled_from(["gdt", "idt", "tss"])),
    ac=st.booleans(),
    rsp=st.sampled_from([USER_RSP, KERNEL_STACK + 0x800]),
)
def test_lass_off_never_raises_a_lass_fault_in_system_cases(
    code: list[str], cpl: int, mode: str, tables: set[str], ac: bool, rsp: int
) -> None:
    case = system_case(
        "".join(code), cpl=cpl, mode=mode, user_tables=tables, cr4=CR4_PAE | CR4_SMAP,
        regs={"rsp": rsp, "rax": USER_DS | 3, "rcx": USER_CS | 3, "rbx": rsp},
        rflags=RFLAGS_FIXED1 | (RFLAGS_AC if ac else 0),
    )  # fmt: skip
    outcome = run(case)
    assert outcome.status is not Status.ERROR, outcome.detail
    assert "LASS.md §3" not in outcome.detail


def test_a_fetch_wrapping_past_2_64_is_unsupported_with_an_idt() -> None:
    top = 0xFFFF_FFFF_FFFF_F000
    # 48 b8 + imm64 starting 4 bytes before 2^64: the rest lies on (unmapped) page 0.
    case = system_case("48b8", code_address=top + 0xFFC, regs={"rsp": KERNEL_STACK + 0x800},
                       pages=[Page(top, user=False, data=bytes(0xFFC) + b"\x48\xb8")])  # fmt: skip
    outcome = run(case)
    assert outcome.status is Status.UNSUPPORTED
    assert "wrapping past 2^64" in outcome.detail


def test_int_8_is_not_a_double_fault() -> None:
    # INT 8 whose pushes violate (CPL0, SMAP, AC = 0, user-half stack): the #SS(0) is
    # delivered serially, as after any software interrupt, and only then comes the #DF.
    outcome = run(system_case("cd08", regs={"rsp": USER_RSP}))
    assert names(outcome) == ["#DF(0)", "#SS(0)", "#DF(0)"]
    assert outcome.events[0].error_code is None


def test_fault_at_cpl1_switches_to_rsp0_and_pushes_the_ring1_selectors() -> None:
    case = system_case("0f0b", cpl=1, regs={"rsp": KERNEL_STACK + 0x800})
    outcome = run(case)
    assert outcome.status is Status.HALTED, outcome.detail
    pushed = frame(outcome, dict(materialize(case).page_frames), RSP0 - 40, 5)
    assert pushed[1] == RING1_CS | 1 and pushed[4] == RING1_DS | 1
    assert reg(outcome, "cpl") == 0


def test_delivery_with_5_level_paging_and_tables_beyond_48_bits() -> None:
    high = 0xFF00_0000_0000_0000
    case = system_case("0f0b", cr4=SYSTEM_CR4 | CR4_LA57, regs={"rsp": KERNEL_STACK + 0x800})
    assert case.state.system is not None
    # Move the IDT to a 57-bit-only address (same content).
    idt_page = next(page for page in case.pages if page.address == SUPERVISOR["idt"])
    system = replace(case.state.system, idt_base=high)
    case = replace(case, state=replace(case.state, system=system),
                   pages=(*case.pages, replace(idt_page, address=high)))  # fmt: skip
    outcome = run(case)
    assert outcome.status is Status.HALTED, outcome.detail
    assert (outcome.trace or ())[0].address == high + 6 * 16
