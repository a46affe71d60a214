"""The minimizer against synthetic predicates standing in for "the same divergence reproduces"."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from iced_x86 import (
    BlockEncoder,
    Code,
    Decoder,
    Instruction,
    MemoryOperand,
    Mnemonic,
    Register,
    Register_,
    RegisterExt,
)

from lassfuzz.arch import (
    CR4_LASS,
    CR4_PAE,
    CR4_SMAP,
    CR4_SMEP,
    RFLAGS_AC,
    RFLAGS_CF,
    RFLAGS_FIXED1,
    RFLAGS_ZF,
)
from lassfuzz.campaign.minimize import MinimizeStep, minimize, snap_candidates
from lassfuzz.campaign.program import is_near_branch
from lassfuzz.case import CaseFormatError, Page, State, TestCase, case_to_json
from lassfuzz.generator.generate import generate_case

KERNEL = 0xFFFF_FFFF_8000_0000
SUPERVISOR_HALF = 0xFFFF_8000_0000_0000
RBX = 3
Predicate = Callable[[TestCase], bool]
PASS_NAMES = ("drop-chunks", "drop-instructions", "simplify-operands", "simplify-state")


def assemble(instructions: list[Instruction], address: int = KERNEL) -> bytes:
    encoder = BlockEncoder(64)
    encoder.add_many(instructions)
    return bytes(encoder.encode(address))


def mem(
    base: Register_, index: Register_ = Register.NONE, scale: int = 1, displ: int = 0
) -> MemoryOperand:
    return MemoryOperand(base, index, scale, displ, 1 if displ else 0)


def is_target_load(instruction: Instruction) -> bool:
    """``mov rax, [rbx]`` exactly: the one instruction the synthetic divergence needs."""
    return (
        instruction.code == Code.MOV_R64_RM64
        and instruction.op0_register == Register.RAX
        and instruction.memory_base == Register.RBX
        and instruction.memory_index == Register.NONE
        and instruction.memory_displacement == 0
        and instruction.segment_prefix == Register.NONE
    )


def decode(case: TestCase) -> list[Instruction]:
    return list(Decoder(64, case.code, ip=case.code_address))


def loads_supervisor_half(case: TestCase) -> bool:
    return any(map(is_target_load, decode(case))) and case.state.gpr("rbx") >= SUPERVISOR_HALF


def jumps_to_load(case: TestCase) -> bool:
    """A near JMP lands on ``mov rax, [rbx]`` (a branch-then-access divergence)."""
    code = decode(case)
    by_ip = {instruction.ip: instruction for instruction in code}
    return any(
        instruction.mnemonic == Mnemonic.JMP
        and (landing := by_ip.get(instruction.near_branch_target)) is not None
        and is_target_load(landing)
        for instruction in code
    )


def filler() -> list[Instruction]:
    """Nineteen instructions of the kinds a generated case holds, none of them needed."""
    return [
        Instruction.create_reg_i32(Code.ADD_RM64_IMM32, Register.RCX, 0x1234),
        Instruction.create_reg_reg(Code.MOV_R64_RM64, Register.RDX, Register.RSI),
        Instruction.create_mem_reg(
            Code.MOV_RM64_R64, mem(Register.RCX, Register.RDX, 4, 0x10), Register.R8
        ),
        Instruction.create_reg(Code.PUSH_R64, Register.R9),
        Instruction.create_reg(Code.POP_R64, Register.R10),
        Instruction.create(Code.STAC),
        Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.EDI, 0xDEAD),
        Instruction.create_rep_stosb(64),
        Instruction.create_reg_reg(Code.XOR_R32_RM32, Register.R11D, Register.R11D),
        Instruction.create_reg_mem(Code.LEA_R64_M, Register.R12, mem(Register.RSP, displ=-8)),
        Instruction.create_reg_i32(Code.SHL_RM64_IMM8, Register.R13, 3),
        Instruction.create(Code.NOPD),
        Instruction.create_reg_reg(Code.CMP_R64_RM64, Register.R14, Register.R15),
        Instruction.create(Code.CLAC),
        Instruction.create_reg_i32(Code.SUB_RM32_IMM8, Register.EBP, 7),
        Instruction.create_mem_reg(Code.XCHG_RM64_R64, mem(Register.RSI, displ=0x40), Register.RAX),
        Instruction.create(Code.PUSHFQ),
        Instruction.create(Code.POPFQ),
        Instruction.create_reg_u64(Code.MOV_R64_IMM64, Register.RDX, 0x1122_3344_5566_7788),
    ]


def noisy_state() -> State:
    gprs = tuple(0x1111_0000 * (index + 1) for index in range(16))
    return State(
        gprs=(*gprs[:RBX], 0xFFFF_9234_5678_9ABC, *gprs[RBX + 1 :]),
        rflags=RFLAGS_FIXED1 | RFLAGS_AC | RFLAGS_CF | RFLAGS_ZF,
        cr4=CR4_PAE | CR4_SMEP | CR4_SMAP | CR4_LASS,
        fs_base=0x7000_1000,
        gs_base=0xFFFF_8880_0000_0123,
    )


def noisy_pages() -> tuple[Page, ...]:
    return (
        Page(0x7000_0000, user=True, writable=False, data=bytes(range(1, 200))),
        Page(0xFFFF_9234_5678_9000, user=True, nx=True, accessed=True, data=b"\xaa" * 4096),
        Page(KERNEL, user=False, dirty=True, data=b"\x55" * 64),  # overlaps the code
    )


def single_cause_case() -> TestCase:
    load = Instruction.create_reg_mem(Code.MOV_R64_RM64, Register.RAX, mem(Register.RBX))
    body = filler()
    return TestCase(
        state=noisy_state(),
        code=assemble([*body[:11], load, *body[11:]]),
        code_address=KERNEL,
        pages=noisy_pages(),
    )


def branch_case() -> TestCase:
    """``jmp`` over eight filler instructions to the load, with more filler around."""
    body = filler()
    skipped = body[3:11]
    for offset, instruction in enumerate(skipped):
        instruction.ip = 0x1000 + offset
    load = Instruction.create_reg_mem(Code.MOV_R64_RM64, Register.RAX, mem(Register.RBX))
    load.ip = 0x2000
    jump = Instruction.create_branch(Code.JMP_REL32_64, 0x2000)
    code = assemble([*body[:2], jump, *skipped, load, *body[11:]])
    return TestCase(state=noisy_state(), code=code, code_address=KERNEL, pages=noisy_pages())


class Recorder:
    """Wraps a predicate, remembering every candidate and answer in call order."""

    def __init__(self, predicate: Predicate) -> None:
        self.predicate = predicate
        self.calls: list[tuple[TestCase, bool]] = []

    def __call__(self, case: TestCase) -> bool:
        answer = self.predicate(case)
        self.calls.append((case, answer))
        return answer


def test_single_cause_shrinks_to_the_one_instruction_and_a_simple_state() -> None:
    case = single_cause_case()
    assert len(decode(case)) == 20 and loads_supervisor_half(case)

    result = minimize(case, loads_supervisor_half)

    assert [str(instruction) for instruction in decode(result)] == ["mov rax,[rbx]"]
    assert result.state.gprs == tuple(SUPERVISOR_HALF if i == RBX else 0 for i in range(16))
    assert result.state.rflags == RFLAGS_FIXED1
    assert result.state.cr4 == CR4_PAE
    assert (result.state.fs_base, result.state.gs_base) == (0, 0)
    assert result.pages == ()
    assert result.code_address == case.code_address


def test_branch_case_keeps_the_branch_retargeted_to_the_same_instruction() -> None:
    case = branch_case()
    assert len(decode(case)) == 20 and jumps_to_load(case)

    result = minimize(case, jumps_to_load)

    code = decode(result)
    assert len(code) == 2
    assert code[0].near_branch_target == code[1].ip and is_target_load(code[1])


def test_every_accepted_step_is_rechecked_on_the_very_case_kept() -> None:
    recorder = Recorder(loads_supervisor_half)
    result = minimize(single_cause_case(), recorder)

    calls = recorder.calls
    first_checks = [
        index
        for index, (case, answer) in enumerate(calls)
        if answer and (index == 0 or calls[index - 1][0] is not case)
    ]
    assert first_checks, "something must have been accepted"
    for index in first_checks:
        assert calls[index + 1][0] is calls[index][0]
    assert result is calls[first_checks[-1]][0]
    assert all(answer for case, answer in calls if case is result)


def test_candidate_that_does_not_reproduce_on_recheck_is_not_kept() -> None:
    seen: set[bytes] = set()

    def flaky(case: TestCase) -> bool:
        key = case_to_json(case).encode()
        first = key not in seen
        seen.add(key)
        return first

    case = single_cause_case()
    assert minimize(case, flaky) is case


def test_result_satisfies_the_predicate_and_is_deterministic() -> None:
    first = minimize(branch_case(), jumps_to_load)
    second = minimize(branch_case(), jumps_to_load)
    assert jumps_to_load(first)
    assert case_to_json(first) == case_to_json(second)


def test_progress_reports_each_pass_once_per_round_until_a_round_changes_nothing() -> None:
    steps: list[MinimizeStep] = []
    recorder = Recorder(loads_supervisor_half)
    result = minimize(single_cause_case(), recorder, progress=steps.append)

    assert len(steps) % len(PASS_NAMES) == 0 and len(steps) >= 2 * len(PASS_NAMES)
    assert tuple(step.pass_name for step in steps) == PASS_NAMES * (len(steps) // len(PASS_NAMES))
    assert sum(step.accepted for step in steps[-len(PASS_NAMES) :]) == 0
    assert sum(step.tried for step in steps) == len(recorder.calls)
    assert steps[-1].instructions == len(decode(result))


def test_predicate_that_never_fails_again_returns_the_original_case() -> None:
    case = single_cause_case()
    recorder = Recorder(lambda candidate: candidate is case)
    assert minimize(case, recorder) is case
    assert recorder.calls and not any(answer for _, answer in recorder.calls)


def test_invalid_candidates_are_rejected_without_exception() -> None:
    """Rewrites iced cannot encode and candidates the caller finds invalid are just rejected."""
    shift = Instruction.create_reg_reg(Code.SHL_RM64_CL, Register.RBX, Register.CL)
    load = Instruction.create_reg_mem(Code.MOV_R64_RM64, Register.RAX, mem(Register.RBX))
    case = TestCase(
        state=noisy_state(), code=assemble([shift, *filler()[:5], load]), code_address=KERNEL
    )

    def needs_three(candidate: TestCase) -> bool:
        if len(decode(candidate)) < 3:
            raise CaseFormatError("the engines refuse cases this short")
        return loads_supervisor_half(candidate)

    result = minimize(case, needs_three)
    assert len(decode(result)) == 3 and loads_supervisor_half(result)


def test_budget_bounds_the_predicate_calls() -> None:
    recorder = Recorder(loads_supervisor_half)
    case = single_cause_case()
    steps: list[MinimizeStep] = []
    result = minimize(case, recorder, progress=steps.append, max_tries=25)
    assert len(recorder.calls) <= 25
    assert sum(step.tried for step in steps) == len(recorder.calls)
    assert loads_supervisor_half(result)
    assert len(decode(result)) < len(decode(case))


def test_page_data_keeps_only_the_bytes_that_matter() -> None:
    page = Page(0x7000_0000, user=True, data=bytes(range(1, 256)) * 16)
    case = TestCase(
        state=State(),
        code=assemble([Instruction.create(Code.NOPD)]),
        code_address=KERNEL,
        pages=(page,),
    )

    def needs_byte_0x123(candidate: TestCase) -> bool:
        return any(p.data[0x123:0x124] == page.data[0x123:0x124] for p in candidate.pages)

    result = minimize(case, needs_byte_0x123)
    assert result.pages[0].data == bytes(0x123) + page.data[0x123:0x124]


def test_snap_candidates_prefer_the_page_start_then_the_nearest_boundary() -> None:
    assert snap_candidates(0xFFFF_9234_5678_9ABC)[:2] == [0xFFFF_9234_5678_9000, SUPERVISOR_HALF]
    assert snap_candidates(0xFFFF_FFFF_FFFF_FFFC)[0] == 0xFFFF_FFFF_FFFF_F000
    assert snap_candidates(SUPERVISOR_HALF) == []


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=1, max_size=40))
def test_arbitrary_code_shrinks_to_the_instruction_the_predicate_needs(code: bytes) -> None:
    """Random bytes: raw items, wild branches, prefixes. Minimizing must never raise."""
    case = TestCase(state=noisy_state(), code=code, code_address=KERNEL)
    valid = [instruction for instruction in decode(case) if not instruction.is_invalid]
    assume(valid)
    wanted = valid[-1].mnemonic

    def has_wanted(candidate: TestCase) -> bool:
        return any(i.mnemonic == wanted and not i.is_invalid for i in decode(candidate))

    result = minimize(case, has_wanted)
    assert has_wanted(result)
    assert len(decode(result)) <= len(decode(case))
    if not any(map(is_near_branch, valid)):
        assert len(decode(result)) == 1


def test_operands_of_the_needed_instruction_are_simplified() -> None:
    add = Instruction.create_mem_i32(
        Code.ADD_RM32_IMM32, mem(Register.RBX, Register.RCX, 8, 0x40), 0x1234
    )
    add.has_lock_prefix = True
    add.segment_prefix = Register.FS
    case = TestCase(state=noisy_state(), code=assemble([*filler()[:6], add]), code_address=KERNEL)

    def adds_to_memory_at_rbx(candidate: TestCase) -> bool:
        return any(
            i.mnemonic == Mnemonic.ADD and i.memory_base == Register.RBX for i in decode(candidate)
        )

    result = minimize(case, adds_to_memory_at_rbx)
    assert [str(instruction) for instruction in decode(result)] == ["add qword ptr [rbx],0"]


def test_needed_page_keeps_only_the_needed_flag() -> None:
    case = single_cause_case()

    def has_read_only_page(candidate: TestCase) -> bool:
        return any(page.address == 0x7000_0000 and not page.writable for page in candidate.pages)

    result = minimize(case, has_read_only_page)
    assert result.pages == (Page(0x7000_0000, user=True, writable=False),)
    assert result.code == b""


def same_access_in_same_half(mnemonic: int, base: Register_, half: int) -> Predicate:
    """A synthetic divergence: a ``mnemonic`` access through ``base``, pointing into ``half``."""
    number = RegisterExt.number(base)

    def predicate(candidate: TestCase) -> bool:
        return candidate.state.gprs[number] >> 63 == half and any(
            i.mnemonic == mnemonic and i.memory_base == base for i in decode(candidate)
        )

    return predicate


def test_generated_cases_shrink_to_the_instruction_a_synthetic_divergence_needs() -> None:
    shrunk = 0
    for index in range(12):
        case = generate_case(7, index)
        accesses = [i for i in decode(case) if RegisterExt.is_gpr64(i.memory_base)]
        if not accesses:
            continue
        base = accesses[-1].memory_base
        predicate = same_access_in_same_half(
            accesses[-1].mnemonic, base, case.state.gprs[RegisterExt.number(base)] >> 63
        )

        result = minimize(case, predicate)
        assert predicate(result)
        assert len(decode(result)) <= 2
        assert case_to_json(minimize(case, predicate)) == case_to_json(result)
        shrunk += 1
    assert shrunk >= 3
