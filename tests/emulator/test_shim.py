"""The LASS shim on the live Unicorn machine: faults, vectors, exemptions, ordering."""

from __future__ import annotations

import pytest

from lassfuzz.arch import (
    CR4_LASS,
    CR4_PAE,
    MASK64,
    PTE_A,
    PTE_ADDR,
    PTE_D,
    RFLAGS_AC,
    RFLAGS_DF,
    RFLAGS_FIXED1,
    VEC_GP,
    VEC_PF,
    VEC_SS,
)
from lassfuzz.case import Page, TestCase, materialize
from lassfuzz.emulator.machine import UnicornMachine
from lassfuzz.outcome import Outcome, Status
from tests.emulator.cases import (
    KERNEL_DATA,
    KERNEL_STACK,
    LASS,
    LASS_SMAP,
    USER_DATA,
    case,
    gpr,
    kernel_page,
    user_page,
)
from tests.emulator.system_cases import SUPERVISOR, system_case

TOP_PAGE = 0xFFFF_FFFF_FFFF_F000


def fault_of(outcome: Outcome) -> tuple[int, int | None, int]:
    assert outcome.status is Status.FAULT, outcome
    assert outcome.fault is not None
    return outcome.fault.vector, outcome.fault.error_code, outcome.fault.rip


def leaf_entry(test_case: TestCase, outcome: Outcome, address: int) -> int:
    """The final leaf PTE for ``address``, walked in the outcome's memory."""
    table = materialize(test_case).cr3
    for shift in (39, 30, 21, 12):
        slot = (address >> shift) & 0x1FF
        entry = int.from_bytes(outcome.memory[table][slot * 8 : slot * 8 + 8], "little")
        table = entry & PTE_ADDR
    return entry


@pytest.mark.parametrize(
    ("code", "registers", "vector"),
    [
        ("50", {"rsp": KERNEL_STACK}, VEC_SS),  # push rax
        ("58", {"rsp": KERNEL_STACK}, VEC_SS),  # pop rax
        ("488b4500", {"rbp": KERNEL_DATA}, VEC_SS),  # mov rax, [rbp]
        ("488b0424", {"rsp": KERNEL_DATA}, VEC_SS),  # mov rax, [rsp]
        ("36488b01", {"rcx": KERNEL_DATA}, VEC_SS),  # mov rax, ss:[rcx]
        ("64488b0424", {"rsp": KERNEL_DATA}, VEC_GP),  # mov rax, fs:[rsp]
        ("65488b4500", {"rbp": KERNEL_DATA}, VEC_GP),  # mov rax, gs:[rbp]
        ("488b03", {"rbx": KERNEL_DATA}, VEC_GP),  # mov rax, [rbx]
        ("48ff03", {"rbx": KERNEL_DATA}, VEC_GP),  # inc qword [rbx]
    ],
)
def test_user_access_to_supervisor_half_picks_ss_or_gp(
    machine: UnicornMachine, code: str, registers: dict[str, int], vector: int
) -> None:
    pages = (kernel_page(), kernel_page(KERNEL_STACK - 0x1000))
    outcome = machine.run(case(code, pages=pages, gprs={"rax": 0x77, **registers}))
    assert fault_of(outcome) == (vector, 0, 0x40_0000)
    assert outcome.fault is not None and outcome.fault.cr2 is None
    assert gpr(outcome.registers, "rax") == 0x77  # no effect


def test_user_access_allowed_without_lass(machine: UnicornMachine) -> None:
    outcome = machine.run(
        case("488b03", cr4=CR4_PAE, pages=(user_page(KERNEL_DATA),), rbx=KERNEL_DATA)
    )
    assert outcome.status is Status.COMPLETED


@pytest.mark.parametrize(
    ("rflags", "cr4", "violates"),
    [
        (RFLAGS_FIXED1, LASS_SMAP, True),
        (RFLAGS_FIXED1 | RFLAGS_AC, LASS_SMAP, False),
        (RFLAGS_FIXED1, LASS, False),
    ],
)
def test_supervisor_data_to_user_half_follows_smap_and_ac(
    machine: UnicornMachine, rflags: int, cr4: int, violates: bool
) -> None:
    outcome = machine.run(
        case(
            "488b03", cpl=0, cr4=cr4, rflags=rflags, pages=(kernel_page(USER_DATA),), rbx=USER_DATA
        )
    )
    assert (outcome.status is Status.FAULT) is violates
    if violates:
        assert fault_of(outcome)[:2] == (VEC_GP, 0)


def test_stac_lifts_and_clac_restores_the_check(machine: UnicornMachine) -> None:
    # stac; mov rax,[rbx]; clac; mov rax,[rbx]
    code = "0f01cb 488b03 0f01ca 488b03".replace(" ", "")
    outcome = machine.run(
        case(code, cpl=0, cr4=LASS_SMAP, pages=(kernel_page(USER_DATA),), rbx=USER_DATA)
    )
    assert fault_of(outcome) == (VEC_GP, 0, 0xFFFF_FFFF_8000_0009)


def test_page_crossing_store_across_the_wrap_is_not_torn(machine: UnicornMachine) -> None:
    # mov [rbx], rax with rbx = 2^64 - 4: supervisor bytes first, then user bytes 0..3.
    pages = (kernel_page(TOP_PAGE), kernel_page(0))
    test_case = case("488903", cpl=0, cr4=LASS_SMAP, pages=pages, rbx=MASK64 - 3, rax=MASK64)
    outcome = machine.run(test_case)
    assert fault_of(outcome) == (VEC_GP, 0, 0xFFFF_FFFF_8000_0000)
    image = materialize(test_case)
    assert not any(outcome.memory[image.page_frames[TOP_PAGE]])
    assert not any(outcome.memory[image.page_frames[0]])


def test_rep_stos_stops_at_the_violating_iteration(machine: UnicornMachine) -> None:
    # rep stosb at CPL0, SMAP: 4 bytes at the top of the supervisor half, then user byte 0.
    pages = (kernel_page(TOP_PAGE), kernel_page(0))
    test_case = case("f3aa", cpl=0, cr4=LASS_SMAP, pages=pages, rdi=MASK64 - 3, rcx=8, rax=0x5A)
    outcome = machine.run(test_case)
    assert fault_of(outcome) == (VEC_GP, 0, 0xFFFF_FFFF_8000_0000)
    assert (gpr(outcome.registers, "rcx"), gpr(outcome.registers, "rdi")) == (4, 0)
    top = outcome.memory[materialize(test_case).page_frames[TOP_PAGE]]
    assert top[-4:] == b"\x5a" * 4


def test_rep_stos_downwards_stops_at_the_violating_iteration(machine: UnicornMachine) -> None:
    # std-equivalent: DF=1, CPL3, from byte 3 of the user half down into 2^64 - 1.
    pages = (user_page(0), user_page(TOP_PAGE))
    rflags = RFLAGS_FIXED1 | RFLAGS_DF
    outcome = machine.run(case("f3aa", rflags=rflags, pages=pages, rdi=3, rcx=8, rax=0x5A))
    assert fault_of(outcome) == (VEC_GP, 0, 0x40_0000)
    assert (gpr(outcome.registers, "rcx"), gpr(outcome.registers, "rdi")) == (4, MASK64)


@pytest.mark.parametrize(
    ("code", "pushed"),
    [("ffe0", False), ("ffd0", True)],  # jmp rax, call rax
)
def test_branch_into_the_wrong_half_faults_at_the_target(
    machine: UnicornMachine, code: str, pushed: bool
) -> None:
    stack = kernel_page(KERNEL_STACK - 0x1000)
    outcome = machine.run(
        case(code, cpl=0, pages=(kernel_page(USER_DATA), stack), rax=USER_DATA, rsp=KERNEL_STACK)
    )
    assert fault_of(outcome) == (VEC_GP, 0, USER_DATA)
    assert gpr(outcome.registers, "rsp") == KERNEL_STACK - (8 if pushed else 0)


def test_ret_into_the_wrong_half_faults_at_the_target(machine: UnicornMachine) -> None:
    # push rax; ret (at CPL3, to a supervisor-half target)
    outcome = machine.run(
        case("50c3", pages=(user_page(0x60_0000),), rax=KERNEL_DATA, rsp=0x60_1000)
    )
    assert fault_of(outcome) == (VEC_GP, 0, KERNEL_DATA)
    assert gpr(outcome.registers, "rsp") == 0x60_1000


@pytest.mark.parametrize("code", ["90ffe0", "90ffd0"])  # nop; jmp/call rax
def test_non_canonical_branch_faults_at_the_branch(machine: UnicornMachine, code: str) -> None:
    outcome = machine.run(case(code, pages=(user_page(0x60_0000),), rax=1 << 63, rsp=0x60_1000))
    assert fault_of(outcome) == (VEC_GP, 0, 0x40_0001)
    assert gpr(outcome.registers, "rsp") == 0x60_1000  # no push


@pytest.mark.parametrize("code", ["0f1800", "0f1808", "0f1810", "0f1818", "0f0d08"])
def test_violating_prefetch_is_dropped(machine: UnicornMachine, code: str) -> None:
    assert machine.run(case(code, rax=KERNEL_DATA)).status is Status.COMPLETED


@pytest.mark.parametrize(
    ("code", "registers", "vector"),
    [
        ("0fae38", {"rax": KERNEL_DATA}, VEC_GP),  # clflush [rax]
        ("660fae38", {"rax": KERNEL_DATA}, VEC_GP),  # clflushopt [rax]
        ("0fae3c24", {"rsp": KERNEL_DATA}, VEC_SS),  # clflush [rsp]
    ],
)
def test_cache_flush_is_checked(
    machine: UnicornMachine, code: str, registers: dict[str, int], vector: int
) -> None:
    assert fault_of(machine.run(case(code, gprs=registers))) == (vector, 0, 0x40_0000)


def test_cache_flush_of_an_unmapped_allowed_page_is_a_page_fault(machine: UnicornMachine) -> None:
    outcome = machine.run(case("0fae38", rax=USER_DATA + 5))
    assert fault_of(outcome)[0] == VEC_PF
    assert outcome.fault is not None and outcome.fault.cr2 == USER_DATA + 5


def test_invlpg_of_the_other_half_is_exempt(machine: UnicornMachine) -> None:
    assert machine.run(case("0f0138", cpl=0, cr4=LASS_SMAP, rax=USER_DATA)).status is (
        Status.COMPLETED
    )


def test_violation_sets_no_accessed_bit_and_precedes_paging(machine: UnicornMachine) -> None:
    mapped = case("488b03", pages=(user_page(KERNEL_DATA),), rbx=KERNEL_DATA)
    blocked = machine.run(mapped)
    assert fault_of(blocked) == (VEC_GP, 0, 0x40_0000)
    assert not leaf_entry(mapped, blocked, KERNEL_DATA) & PTE_A
    allowed = machine.run(case("488b03", cr4=CR4_PAE, pages=mapped.pages, rbx=KERNEL_DATA))
    assert leaf_entry(mapped, allowed, KERNEL_DATA) & PTE_A
    unmapped = machine.run(case("488b03", rbx=KERNEL_DATA))
    assert fault_of(unmapped) == (VEC_GP, 0, 0x40_0000)


def test_page_fault_reports_the_first_faulting_byte(machine: UnicornMachine) -> None:
    # mov [rbx], rax crossing from a writable page into a read-only one at CPL3
    pages = (user_page(USER_DATA), user_page(USER_DATA + 0x1000, writable=False))
    outcome = machine.run(case("488903", pages=pages, rbx=USER_DATA + 0xFFC))
    assert fault_of(outcome) == (VEC_PF, 0x7, 0x40_0000)
    assert outcome.fault is not None and outcome.fault.cr2 == USER_DATA + 0x1000


def test_mov_cr4_lass_without_cpuid_support_is_gp(machine: UnicornMachine) -> None:
    outcome = machine.run(
        case("0f22e0", cpl=0, cr4=CR4_PAE, lass_supported=False, rax=CR4_PAE | CR4_LASS)
    )
    assert fault_of(outcome) == (VEC_GP, 0, 0xFFFF_FFFF_8000_0000)
    assert outcome.registers is not None and outcome.registers.cr4 == CR4_PAE


def test_mov_cr4_enabling_lass_takes_effect_at_once(machine: UnicornMachine) -> None:
    # mov rax,[rbx] (allowed, TLB filled); mov cr4, rcx; mov rax,[rbx] (now a violation)
    code = "488b03 0f22e1 488b03".replace(" ", "")
    outcome = machine.run(
        case(
            code, cpl=0, cr4=CR4_PAE, pages=(kernel_page(USER_DATA),), rbx=USER_DATA, rcx=LASS_SMAP
        )
    )
    assert fault_of(outcome) == (VEC_GP, 0, 0xFFFF_FFFF_8000_0006)
    assert outcome.registers is not None and outcome.registers.cr4 == LASS_SMAP


def test_mov_cr4_reads_back_the_lass_bit(machine: UnicornMachine) -> None:
    outcome = machine.run(case("0f22e0 0f20e3".replace(" ", ""), cpl=0, cr4=CR4_PAE, rax=LASS))
    assert outcome.status is Status.COMPLETED
    assert gpr(outcome.registers, "rbx") == LASS


@pytest.mark.parametrize(("supported", "eax"), [(True, 1 << 6), (False, 0)])
def test_cpuid_advertises_lass_per_case(machine: UnicornMachine, supported: bool, eax: int) -> None:
    outcome = machine.run(
        case("0fa2", cr4=CR4_PAE, lass_supported=supported, rax=7, rcx=1, rbx=MASK64)
    )
    assert outcome.status is Status.COMPLETED
    assert [gpr(outcome.registers, name) for name in ("rax", "rbx", "rcx", "rdx")] == [eax, 0, 0, 0]


def test_cpuid_leaf_seven_reports_smep_smap_and_clflushopt(machine: UnicornMachine) -> None:
    outcome = machine.run(case("0fa2", rax=7, rcx=0))
    assert gpr(outcome.registers, "rbx") == (1 << 7) | (1 << 20) | (1 << 23)


def test_policy_none_enforces_nothing_but_sdm_does() -> None:
    from lassfuzz.policies import none

    test_case = case("488b03", pages=(user_page(KERNEL_DATA),), rbx=KERNEL_DATA)
    assert UnicornMachine(policy=none).run(test_case).status is Status.COMPLETED
    assert UnicornMachine().run(test_case).status is Status.FAULT


def test_raising_policy_is_an_error_outcome() -> None:
    def broken(access: object) -> bool:
        raise ZeroDivisionError("boom")

    machine = UnicornMachine(policy=broken, policy_name="tests:broken")
    outcome = machine.run(case("488b03", pages=(user_page(),), rbx=USER_DATA))
    assert outcome.status is Status.ERROR
    assert "policy tests:broken raised" in outcome.detail and "boom" in outcome.detail


def test_rmw_page_fault_is_a_write_and_sets_no_accessed_bit(machine: UnicornMachine) -> None:
    # inc qword [rbx] on a supervisor-only page at CPL3: QEMU reads first, paging says write.
    test_case = case("48ff03", pages=(kernel_page(USER_DATA),), rbx=USER_DATA)
    outcome = machine.run(test_case)
    assert fault_of(outcome) == (VEC_PF, 0x7, 0x40_0000)
    assert outcome.fault is not None and outcome.fault.access == "write"
    assert not leaf_entry(test_case, outcome, USER_DATA) & PTE_A


def test_rmw_crossing_into_a_missing_page_dirties_the_first(machine: UnicornMachine) -> None:
    # inc dword [rbx] across USER_DATA+0x1000 (not present): first page gets A and D.
    test_case = case("ff03", pages=(user_page(),), rbx=USER_DATA + 0xFFE)
    outcome = machine.run(test_case)
    assert fault_of(outcome) == (VEC_PF, 0x6, 0x40_0000)
    assert outcome.fault is not None and outcome.fault.cr2 == USER_DATA + 0x1000
    assert leaf_entry(test_case, outcome, USER_DATA) & (PTE_A | PTE_D) == PTE_A | PTE_D


def test_cmps_checks_the_source_before_the_destination(machine: UnicornMachine) -> None:
    # cmpsb at CPL0 with SMAP: RSI in the user half (LASS), RDI unmapped. QEMU reads RDI
    # first (a #PF); architecturally RSI's LASS violation comes first.
    outcome = machine.run(case("a6", cpl=0, cr4=LASS_SMAP, rsi=USER_DATA, rdi=KERNEL_DATA))
    assert fault_of(outcome) == (VEC_GP, 0, 0xFFFF_FFFF_8000_0000)
    assert outcome.fault is not None and outcome.fault.address == USER_DATA


def test_earlier_access_keeps_its_accessed_bit(machine: UnicornMachine) -> None:
    # cmpsb at CPL0 with SMAP: RSI readable (supervisor page), RDI in the user half.
    test_case = case(
        "a6", cpl=0, cr4=LASS_SMAP, pages=(kernel_page(),), rsi=KERNEL_DATA, rdi=USER_DATA
    )
    outcome = machine.run(test_case)
    assert fault_of(outcome) == (VEC_GP, 0, 0xFFFF_FFFF_8000_0000)
    assert leaf_entry(test_case, outcome, KERNEL_DATA) & PTE_A


def test_crossing_violation_sets_no_accessed_bit_on_the_first_page(
    machine: UnicornMachine,
) -> None:
    # mov rax, [rbx] at CPL3 from the last canonical user page into non-canonical space.
    last = 0x7FFF_FFFF_F000
    test_case = case("488b03", pages=(user_page(last),), rbx=last + 0xFFC)
    outcome = machine.run(test_case)
    assert fault_of(outcome) == (VEC_GP, 0, 0x40_0000)
    assert not leaf_entry(test_case, outcome, last) & PTE_A


def test_wrapping_access_is_paged_from_page_zero(machine: UnicornMachine) -> None:
    # mov rax, [rbx] at CPL0 without LASS, rbx = 2^64 - 4: both pages missing, page 0 first.
    outcome = machine.run(case("488b03", cpl=0, cr4=CR4_PAE, rbx=MASK64 - 3))
    assert fault_of(outcome) == (VEC_PF, 0, 0xFFFF_FFFF_8000_0000)
    assert outcome.fault is not None and outcome.fault.cr2 == 0


def test_call_to_non_canonical_target_beats_the_push_fault(machine: UnicornMachine) -> None:
    # call rax with a supervisor-half stack at CPL3: the push would be #SS, the target is #GP.
    outcome = machine.run(case("ffd0", rax=1 << 63, rsp=KERNEL_STACK))
    assert fault_of(outcome) == (VEC_GP, 0, 0x40_0000)
    assert gpr(outcome.registers, "rsp") == KERNEL_STACK


def test_bit_test_with_register_offset_faults_where_it_accesses(
    machine: UnicornMachine,
) -> None:
    # bt [rbx], rax with rax = 64 * 512: the qword accessed is 4 KiB past rbx.
    outcome = machine.run(case("480fa303", pages=(user_page(),), rbx=USER_DATA, rax=64 * 512))
    assert fault_of(outcome)[0] == VEC_PF
    assert outcome.fault is not None and outcome.fault.cr2 == USER_DATA + 0x1000


def test_rflags_are_exact_after_a_fault_in_a_block(machine: UnicornMachine) -> None:
    # cmp rax, 0x63bed50b (0 - x: CF, PF, AF, SF); mov rcx, [rbx] (#PF). Without the shim's
    # re-run, QEMU's unsynced lazy flags make RFLAGS read 0x86 here (measured).
    outcome = machine.run(case("4881f80bd5be63 488b0b".replace(" ", ""), rbx=USER_DATA))
    assert fault_of(outcome)[0] == VEC_PF
    assert outcome.registers is not None and outcome.registers.rflags == 0x97


def test_clflushopt_runs_on_an_allowed_line(machine: UnicornMachine) -> None:
    outcome = machine.run(case("660fae3b", pages=(user_page(),), rbx=USER_DATA))
    assert outcome.status is Status.COMPLETED


@pytest.mark.parametrize("code", ["0f20d0", "440f20c0", "0f22d0"])  # CR2 / CR8 reads, CR2 write
def test_cr2_and_cr8_are_unsupported_at_cpl0_and_gp_at_cpl3(
    machine: UnicornMachine, code: str
) -> None:
    outcome = machine.run(case(code, cpl=0))
    assert outcome.status is Status.UNSUPPORTED and "CR2 and CR8" in outcome.detail
    assert machine.run(case(code)).summary == "#GP(0)"


def test_mov_cr0_clearing_et_is_unsupported(machine: UnicornMachine) -> None:
    outcome = machine.run(case("0f22c0", cpl=0, cr4=CR4_PAE, rax=0x8001_0023))  # ET clear
    assert outcome.status is Status.UNSUPPORTED and "ET" in outcome.detail


def test_rmw_crossing_after_a_tlb_hit_still_dirties_the_first_page(
    machine: UnicornMachine,
) -> None:
    # mov rax, [rbx] caches the page for reads; inc dword [rbx+0xffe] then crosses into a
    # missing page: QEMU reads the first piece from the TLB, paging still owes it D.
    test_case = case("488b03 ff83fe0f0000".replace(" ", ""), pages=(user_page(),), rbx=USER_DATA)
    outcome = machine.run(test_case)
    assert fault_of(outcome) == (VEC_PF, 0x6, 0x40_0003)
    assert leaf_entry(test_case, outcome, USER_DATA) & PTE_D


def test_wrapping_rmw_is_a_write_on_page_zero_first(machine: UnicornMachine) -> None:
    # inc dword [rbx], rbx = 2^64 - 1, CPL0 without LASS: page 0 read-only (CR0.WP) decides.
    pages = (kernel_page(TOP_PAGE), Page(0, user=False, writable=False))
    outcome = machine.run(case("ff03", cpl=0, cr4=CR4_PAE, pages=pages, rbx=MASK64))
    assert fault_of(outcome) == (VEC_PF, 0x3, 0xFFFF_FFFF_8000_0000)
    assert outcome.fault is not None and outcome.fault.cr2 == 0


@pytest.mark.parametrize(
    ("code", "registers"),
    [
        ("9c 59", {}),  # pushfq; pop rcx
        ("f3a4", {"rcx": 3, "rsi": SUPERVISOR + 0x4000, "rdi": SUPERVISOR + 0x4800}),
    ],
    ids=["pushfq", "rep-movsb"],
)
def test_flags_survive_a_fill_inside_a_hooked_instruction(
    machine: UnicornMachine, code: str, registers: dict[str, int]
) -> None:
    # System cases hook every instruction; PUSHF and REP string instructions store QEMU's
    # CC_OP before their access, which Unicorn's restore before the fill used to undo
    # (cmp rax, -0x4f sets CF, and CF was lost). _repair_restored_flags puts it back.
    test_case = system_case("4883f8b1" + code.replace(" ", ""), cpl=0, **registers)
    outcome = machine.run(test_case)
    assert outcome.status is Status.COMPLETED, outcome.detail
    assert outcome.registers is not None and outcome.registers.rflags == 0x13
    if code.startswith("9c"):
        assert outcome.registers.gprs[1] == 0x13
