"""The Unicorn machine's case semantics (docs/machine.md): endings, reuse, trace, plain mode."""

from __future__ import annotations

from dataclasses import replace
from typing import Final

import pytest

from lassfuzz.arch import CR4_PAE, CR4_SMAP, CR4_SMEP, RFLAGS_ZF, VEC_GP, VEC_UD
from lassfuzz.case import Page, TestCase, materialize
from lassfuzz.emulator.machine import UnicornMachine
from lassfuzz.outcome import Access, Status
from tests.emulator.cases import KERNEL_DATA, USER_DATA, case, gpr, kernel_page, user_page


def test_completed_case_reports_registers_and_memory(machine: UnicornMachine) -> None:
    # mov [rbx], rax; inc rax
    test_case = case("488903 48ffc0".replace(" ", ""), pages=(user_page(),), rbx=USER_DATA, rax=41)
    outcome = machine.run(test_case)
    assert outcome.status is Status.COMPLETED
    assert outcome.registers is not None
    assert outcome.registers.rip == test_case.code_end
    assert (gpr(outcome.registers, "rax"), outcome.registers.cpl) == (42, 3)
    frame = materialize(test_case).page_frames[USER_DATA]
    assert outcome.memory[frame][:8] == (41).to_bytes(8, "little")
    assert set(outcome.memory) == set(materialize(test_case).frames)


def test_hlt_at_cpl0_halts_after_the_instruction(machine: UnicornMachine) -> None:
    outcome = machine.run(case("90f490", cpl=0))
    assert outcome.status is Status.HALTED
    assert outcome.registers is not None and outcome.registers.rip == 0xFFFF_FFFF_8000_0002


def test_hlt_at_cpl3_is_gp(machine: UnicornMachine) -> None:
    outcome = machine.run(case("90f4"))
    assert outcome.fault is not None
    assert (outcome.fault.vector, outcome.fault.error_code, outcome.fault.rip) == (
        VEC_GP,
        0,
        0x40_0001,
    )


def test_privileged_instruction_at_cpl3_is_gp(machine: UnicornMachine) -> None:
    outcome = machine.run(case("0f20e0"))  # mov rax, cr4
    assert outcome.summary == "#GP(0)"


def test_budget_exhaustion_is_a_hang() -> None:
    outcome = UnicornMachine(max_instructions=50).run(case("ebfe"))  # jmp $
    assert outcome.status is Status.HANG
    assert "budget" in outcome.detail


def test_invalid_opcode_is_ud(machine: UnicornMachine) -> None:
    outcome = machine.run(case("0f0b"))
    assert outcome.fault is not None and (outcome.fault.vector, outcome.fault.rip) == (
        VEC_UD,
        0x40_0000,
    )


@pytest.mark.parametrize(
    ("code", "named"),
    [
        ("c5f858c2", "vaddps"),  # VEX.128: Unicorn computes the wrong result
        ("48cf", "IRETQ"),
        ("0f05", "SYSCALL"),
        ("8ed8", "segment load"),
        ("0f31", "RDTSC"),
    ],
)
def test_instructions_outside_the_machine_are_unsupported(
    machine: UnicornMachine, code: str, named: str
) -> None:
    outcome = machine.run(case(code, cpl=0))
    assert outcome.status is Status.UNSUPPORTED
    assert named in outcome.detail


def test_self_modifying_code_is_unsupported(machine: UnicornMachine) -> None:
    code_page = user_page(0x40_0000, writable=True)
    outcome = machine.run(case("880500000000 90".replace(" ", ""), pages=(code_page,)))
    assert outcome.status is Status.UNSUPPORTED
    assert "self-modifying" in outcome.detail


def test_code_outside_the_scanned_range_runs(machine: UnicornMachine) -> None:
    # jmp rax into a user data page holding "inc rbx; jmp rcx" back to the end of the code.
    data = Page(USER_DATA, user=True, data=bytes.fromhex("48ffc3ffe1"))
    test_case = case("ffe0", pages=(data,), rax=USER_DATA, rcx=0x40_0002)
    outcome = machine.run(test_case)
    assert outcome.status is Status.COMPLETED
    assert gpr(outcome.registers, "rbx") == 1
    assert outcome.instructions == 3


#: The end of "ffe0" (jmp rax) at the CPL0 code address: where foreign code jumps back to.
DEFAULT_END: Final = 0xFFFF_FFFF_8000_0002


def test_foreign_code_in_an_executable_unreadable_page_is_decoded(
    machine: UnicornMachine,
) -> None:
    # At CPL0 with SMAP (no SMEP) a user page can be executed but not read.
    data = Page(USER_DATA, user=True, data=bytes.fromhex("48ffc3ffe1"))
    test_case = case(
        "ffe0", cpl=0, cr4=CR4_PAE | CR4_SMAP, pages=(data,), rax=USER_DATA, rcx=DEFAULT_END
    )
    outcome = machine.run(test_case)
    assert (outcome.status, outcome.instructions) == (Status.COMPLETED, 3)


@pytest.mark.parametrize("cr4", [CR4_PAE, CR4_PAE | CR4_SMAP], ids=["readable", "smap"])
def test_foreign_code_needing_an_intercept_is_unsupported(
    machine: UnicornMachine, cr4: int
) -> None:
    data = Page(USER_DATA, user=True, data=bytes.fromhex("48cf"))  # iretq
    outcome = machine.run(case("ffe0", cpl=0, cr4=cr4, pages=(data,), rax=USER_DATA))
    assert outcome.status is Status.UNSUPPORTED
    assert "outside the pre-scanned code" in outcome.detail


def test_unsupported_initial_state_is_named(machine: UnicornMachine) -> None:
    outcome = machine.run(case("90", cr4=CR4_PAE | (1 << 22)))  # PKE
    assert outcome.status is Status.UNSUPPORTED and "CR4" in outcome.detail


def test_context_reuse_across_many_cases(machine: UnicornMachine) -> None:
    """A #GP case must not poison the next one (QEMU's stale old_exception → #DF)."""
    faulting = case("488b03", rbx=KERNEL_DATA, pages=(kernel_page(),))
    normal = case("48ffc0", rax=1)
    for _ in range(30):
        assert machine.run(faulting).summary == "#GP(0)"
        outcome = machine.run(normal)
        assert outcome.status is Status.COMPLETED and gpr(outcome.registers, "rax") == 2


def test_new_code_at_the_same_address_is_retranslated(machine: UnicornMachine) -> None:
    assert gpr(machine.run(case("48ffc0")).registers, "rax") == 1  # inc rax
    assert gpr(machine.run(case("48ffc8")).registers, "rax") == 2**64 - 1  # dec rax


def test_trace_lists_linear_accesses_and_drops_the_faulting_instruction(
    machine: UnicornMachine,
) -> None:
    # mov [rbx], rax; mov rcx, [rbx]; inc qword [rdx] (LASS violation)
    code = "488903 488b0b 48ff02".replace(" ", "")
    test_case = case(code, pages=(user_page(),), rbx=USER_DATA + 8, rax=0x1234, rdx=KERNEL_DATA)
    outcome = machine.run(test_case, trace=True)
    assert outcome.summary == "#GP(0)"
    assert outcome.trace == (
        Access("write", USER_DATA + 8, 8, 0x1234),
        Access("read", USER_DATA + 8, 8, 0x1234),
    )
    assert machine.run(test_case).trace is None


def test_plain_unicorn_runs_the_same_cases() -> None:
    plain = UnicornMachine(shim=False)
    violating = case("488b03", pages=(user_page(KERNEL_DATA),), rbx=KERNEL_DATA)
    assert plain.run(violating).status is Status.COMPLETED  # no LASS without the shim
    assert plain.run(case("0f20e0")).summary == "#GP(0)"
    assert plain.run(case("48ffc0", rax=4)).registers is not None


def test_policy_name_defaults_to_the_builtin_name() -> None:
    from lassfuzz.policies import bochs

    assert UnicornMachine(policy=bochs).policy_name == "bochs"
    assert UnicornMachine(policy=bochs, policy_name="custom").policy_name == "custom"


def test_case_with_code_only_runs(machine: UnicornMachine) -> None:
    test_case = TestCase(case("90").state, b"\x90" * 5000, 0x40_0000)  # two code pages
    assert machine.run(test_case).status is Status.COMPLETED


#: add rax, rax with RAX = 2**63 leaves CF, PF, ZF and OF set (QEMU keeps them lazily).
_ADD_OVERFLOW: Final = "4801c0"
_FLAGS_AFTER_ADD: Final = 0x847


@pytest.mark.parametrize("trace", [False, True], ids=["plain", "trace"])
@pytest.mark.parametrize(
    ("code", "summary"),
    [
        ("488b0b", "#PF(0x4)"),  # mov rcx, [rbx]: a fill the shim refuses
        ("90 488b0b", "#PF(0x4)"),
        ("0f9003", "#PF(0x6)"),  # seto [rbx]: QEMU materialises the flags, then faults
        ("48f7f1", "#DE"),  # div rcx: an exception QEMU raises in a helper
        ("9d", "#PF(0x4)"),  # popf: an intercepted instruction whose own read faults
        ("0f20e0", "#GP(0)"),  # mov rax, cr4 at CPL3: intercepted, QEMU raises #GP
    ],
)
def test_rflags_are_exact_at_a_fault_after_lazy_flags(
    machine: UnicornMachine, code: str, summary: str, trace: bool
) -> None:
    # Under a code hook (trace mode, intercepts, Unicorn's own instruction counter) QEMU
    # restores stale lazy flags when the hooked instruction faults (measured 0x57 here).
    test_case = case(_ADD_OVERFLOW + code.replace(" ", ""), rax=2**63, rbx=USER_DATA, rsp=USER_DATA)
    outcome = machine.run(test_case, trace=trace)
    assert outcome.summary == summary
    assert outcome.registers is not None and outcome.registers.rflags == _FLAGS_AFTER_ADD


@pytest.mark.parametrize("trace", [False, True], ids=["plain", "trace"])
def test_rflags_are_exact_at_a_fault_in_a_later_rep_iteration(
    machine: UnicornMachine, trace: bool
) -> None:
    # add rax, rax; rep movsb from the page's last 2 bytes: iteration 3 faults. Each
    # iteration is a block of its own, entered with the lazy flags of the ADD.
    test_case = case(
        _ADD_OVERFLOW + "f3a4",
        pages=(user_page(),),
        rax=2**63,
        rcx=5,
        rsi=USER_DATA + 0xFFE,
        rdi=USER_DATA,
    )
    outcome = machine.run(test_case, trace=trace)
    assert outcome.summary == "#PF(0x4)"
    assert outcome.registers is not None and outcome.registers.rflags == _FLAGS_AFTER_ADD
    if trace:  # the completed iterations' accesses stay, the faulting one's go
        assert [access.kind for access in outcome.trace or ()] == ["read", "write"] * 2


@pytest.mark.parametrize(
    ("code", "memory", "flags"),
    [
        ("0fc70b", 0, _FLAGS_AFTER_ADD),  # cmpxchg8b [rbx], equal: ZF = 1, the rest kept
        ("0fc70b", 1, _FLAGS_AFTER_ADD & ~RFLAGS_ZF),  # unequal: ZF = 0
        ("480fc70b", 0, _FLAGS_AFTER_ADD),  # cmpxchg16b [rbx]
        ("f00fc70b 488b0e", 0, _FLAGS_AFTER_ADD),  # lock cmpxchg8b, then a faulting load
        ("eb00 0fc70b", 0, _FLAGS_AFTER_ADD),  # jmp $+2: cmpxchg8b starts its block
    ],
)
@pytest.mark.parametrize("trace", [False, True], ids=["plain", "trace"])
def test_cmpxchg8b_and_16b_change_zf_only(
    machine: UnicornMachine, code: str, memory: int, flags: int, trace: bool
) -> None:
    """QEMU computes CMPXCHG8B/16B's RFLAGS from a lazy-flags state it did not write back
    (measured: the flags of the case's start, with ZF set or cleared); the SDM changes ZF
    only. The shim hooks them, which writes the state back."""
    page = Page(USER_DATA, user=True, data=memory.to_bytes(8, "little"))
    test_case = case(
        _ADD_OVERFLOW + code.replace(" ", ""),
        pages=(page,),
        rax=2**63,
        rbx=USER_DATA,
        rsi=KERNEL_DATA,  # the load faults with #GP (LASS) where the code has one
    )
    outcome = machine.run(test_case, trace=trace)
    assert outcome.registers is not None and outcome.registers.rflags == flags


@pytest.mark.parametrize("trace", [False, True], ids=["plain", "trace"])
def test_pushfq_after_an_intercept_pushes_exact_flags(machine: UnicornMachine, trace: bool) -> None:
    # add rax, rax; clflush [rdx] (intercepted, skipped by the shim); pushfq; pop rcx
    test_case = case(
        _ADD_OVERFLOW + "0fae3a 9c 59".replace(" ", ""),
        pages=(user_page(),),
        rax=2**63,
        rdx=USER_DATA,
        rsp=USER_DATA + 0x100,
    )
    outcome = machine.run(test_case, trace=trace)
    assert outcome.status is Status.COMPLETED
    assert gpr(outcome.registers, "rcx") == _FLAGS_AFTER_ADD


@pytest.mark.parametrize(
    ("code", "registers", "count"),
    [
        ("90 90 90", {}, 3),
        ("488b0b", {"rbx": 0x60_0000}, 0),  # a faulting instruction does not count
        ("90 f3a4", {"rcx": 3}, 4),  # rep movsb: one per iteration
        ("f3a4 90", {"rcx": 0}, 2),  # rep movsb with RCX = 0 counts once
        ("90 f3a4 90", {"rcx": 2}, 4),
        ("67f3a4", {"rcx": 0x1_0000_0000}, 1),  # ECX counts with an 0x67 prefix
        ("f3a4", {"rcx": 3, "rsi": 0x60_0000}, 0),  # the first iteration faults
    ],
)
def test_outcome_counts_executed_instructions(
    machine: UnicornMachine, code: str, registers: dict[str, int], count: int
) -> None:
    defaults = {"rsi": USER_DATA, "rdi": USER_DATA + 0x800}
    test_case = case(code.replace(" ", ""), pages=(user_page(),), gprs={**defaults, **registers})
    assert machine.run(test_case).instructions == count


def test_rep_iterations_count_until_the_faulting_one(machine: UnicornMachine) -> None:
    # rep movsb from the last 2 bytes of a page into an unmapped one: iterations 1-2 complete.
    test_case = case("f3a4", pages=(user_page(),), rcx=5, rsi=USER_DATA + 0xFFE, rdi=USER_DATA)
    outcome = machine.run(test_case)
    assert outcome.summary == "#PF(0x4)"
    assert (outcome.instructions, gpr(outcome.registers, "rcx")) == (2, 3)


@pytest.mark.parametrize(
    ("budget", "status"),
    [(3, Status.COMPLETED), (2, Status.HANG)],
)
def test_budget_ends_within_a_block(budget: int, status: Status) -> None:
    outcome = UnicornMachine(max_instructions=budget).run(case("90 90 90".replace(" ", "")))
    assert outcome.status is status


@pytest.mark.parametrize(("budget", "status"), [(3, Status.FAULT), (2, Status.HANG)])
def test_a_fault_needs_budget_left_for_its_instruction(budget: int, status: Status) -> None:
    # nop; nop; mov rcx, [rbx] (#PF): the model checks the budget before the third instruction.
    test_case = case("9090488b0b", rbx=0x60_0000)
    assert UnicornMachine(max_instructions=budget).run(test_case).status is status


def test_trace_keeps_the_accesses_of_a_branch_whose_target_faults(
    machine: UnicornMachine,
) -> None:
    # ret to an unmapped user address: the return address read stays in the trace.
    stack = user_page()
    target = 0x60_0000
    test_case = case(
        "c3", pages=(replace(stack, data=target.to_bytes(8, "little")),), rsp=USER_DATA
    )
    outcome = machine.run(test_case, trace=True)
    assert outcome.fault is not None and outcome.fault.rip == target
    assert outcome.trace == (Access("read", USER_DATA, 8, target),)


def test_trace_value_of_a_page_crossing_read(machine: UnicornMachine) -> None:
    # mov rax, [2**64 - 3]: the read wraps from the top page to page 0, whose frames are not
    # adjacent; Unicorn hooks it once, so the value must be gathered from both frames.
    top = Page(2**64 - 0x1000, user=False, data=bytes(0xFFD) + bytes.fromhex("112233"))
    bottom = Page(0, user=False, data=bytes.fromhex("4455667788"))
    test_case = case("48a1fdffffffffffffff", cpl=0, cr4=CR4_PAE, pages=(top, bottom))
    outcome = machine.run(test_case, trace=True)
    assert outcome.status is Status.COMPLETED
    assert outcome.trace == (Access("read", 2**64 - 3, 8, 0x8877665544332211),)


def test_case_ends_without_fetching_its_end(machine: UnicornMachine) -> None:
    # mov rcx, cr4; xor rcx, SMEP; mov cr4, rcx, running at CPL0 from a user page: the end
    # is reached, not fetched (QEMU fetches it before noticing, and SMEP refused that fetch).
    code = "0f20e1 4881f100001000 0f22e1".replace(" ", "")
    test_case = case(code, cpl=0, cr4=CR4_PAE | CR4_SMAP, pages=(user_page(0xFFFF_FFFF_8000_0000),))
    outcome = machine.run(test_case)
    assert outcome.status is Status.COMPLETED, outcome.summary
    assert outcome.registers is not None and outcome.registers.cr4 & CR4_SMEP


def test_branch_to_a_noncanonical_target_faults_at_its_last_execution(
    machine: UnicornMachine,
) -> None:
    # 0x400000: jmp rax (to 0x400002, then to 2**63); mov rax, 2**63; jmp 0x400000
    code = "ffe0 48b80000000000000080 ebf2".replace(" ", "")
    outcome = machine.run(case(code, rax=0x40_0002))
    assert outcome.fault is not None
    assert (outcome.fault.vector, outcome.fault.rip) == (VEC_GP, 0x40_0000)
    assert outcome.registers is not None and outcome.registers.rip == 0x40_0000
    assert gpr(outcome.registers, "rax") == 2**63
    assert outcome.instructions == 3


def test_call_to_a_noncanonical_target_pushes_nothing(machine: UnicornMachine) -> None:
    # call rax with a non-canonical RAX: #GP at the call, RSP and the stack untouched.
    test_case = case("ffd0", pages=(user_page(),), rax=2**63, rsp=USER_DATA + 0x100)
    outcome = machine.run(test_case)
    assert outcome.fault is not None and outcome.fault.rip == 0x40_0000
    assert gpr(outcome.registers, "rsp") == USER_DATA + 0x100
    assert not any(outcome.memory[materialize(test_case).page_frames[USER_DATA]])
