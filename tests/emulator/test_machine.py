"""The Unicorn machine's case semantics (docs/machine.md): endings, reuse, trace, plain mode."""

from __future__ import annotations

import pytest

from lassfuzz.arch import CR4_PAE, VEC_GP, VEC_UD
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


def test_foreign_code_needing_an_intercept_is_unsupported(machine: UnicornMachine) -> None:
    data = Page(USER_DATA, user=True, data=bytes.fromhex("48cf"))  # iretq
    outcome = machine.run(case("ffe0", cpl=0, cr4=CR4_PAE, pages=(data,), rax=USER_DATA))
    assert outcome.status is Status.UNSUPPORTED
    assert "outside the pre-scanned code" in outcome.detail


def test_unsupported_initial_state_is_named(machine: UnicornMachine) -> None:
    outcome = machine.run(case("90", cr4=CR4_PAE | (1 << 12)))  # LA57
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


def test_exact_flags_can_be_traded_for_speed() -> None:
    # cmp rax, 0x63bed50b; mov rcx, [rbx] (#PF): QEMU's own RFLAGS lose bits (measured).
    test_case = case("4881f80bd5be63 488b0b".replace(" ", ""), rbx=USER_DATA)
    exact = UnicornMachine().run(test_case)
    fast = UnicornMachine(exact_flags=False).run(test_case)
    assert exact.registers is not None and fast.registers is not None
    assert exact.registers.rflags == 0x97
    assert fast.registers.rflags != 0x97
