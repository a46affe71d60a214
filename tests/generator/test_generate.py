"""generate_case: determinism, validity, distribution of what the generator produces."""

from __future__ import annotations

import collections
from collections.abc import Iterator

import pytest
from iced_x86 import Decoder, EncodingKind, Instruction, OpKind, Register

from lassfuzz.arch import (
    CR0_AM,
    CR0_WP,
    CR4_LASS,
    CR4_SMAP,
    CR4_SMEP,
    EFER_SCE,
    GPR_NAMES,
    MASK64,
    PAGE_SIZE,
    RFLAGS_AC,
    RFLAGS_TF,
)
from lassfuzz.case import DEFAULT_CR0, DEFAULT_EFER, TestCase, case_from_json, case_to_json
from lassfuzz.families import family_of
from lassfuzz.generator.config import GROUPS
from lassfuzz.generator.generate import GENERATOR_VERSION, GeneratorConfig, generate_case
from lassfuzz.generator.layout import (
    BOUNDARY_PAGES,
    CODE_REGIONS,
    PAD_REGIONS,
    SUPERVISOR_BOTTOM_PAGE,
    USER_TOP_PAGE,
)
from lassfuzz.outcome import Status

SAMPLE = 400


@pytest.fixture(scope="module")
def sample() -> list[TestCase]:
    return [generate_case(2024, index) for index in range(SAMPLE)]


def bits(case: TestCase) -> int:
    return 32 if case.state.mode == "compat" else 64


def decode(case: TestCase) -> Iterator[Instruction]:
    yield from Decoder(bits(case), case.code, ip=case.code_address)


def test_same_seed_and_index_give_the_same_case() -> None:
    for index in (0, 1, 77):
        assert case_to_json(generate_case(5, index)) == case_to_json(generate_case(5, index))


def test_cases_do_not_depend_on_generation_order() -> None:
    forward = [case_to_json(generate_case(9, index)) for index in range(20)]
    backward = [case_to_json(generate_case(9, index)) for index in reversed(range(20))]
    assert forward == backward[::-1]


def test_different_index_or_seed_gives_different_cases() -> None:
    documents = {case_to_json(generate_case(3, index)) for index in range(50)}
    assert len(documents) == 50
    assert case_to_json(generate_case(3, 0)) != case_to_json(generate_case(4, 0))


def test_meta_records_provenance() -> None:
    case = generate_case(11, 4)
    assert dict(case.meta) == {"seed": 11, "index": 4, "generator": GENERATOR_VERSION}
    changed = generate_case(11, 4, GeneratorConfig(max_instructions=5))
    assert changed.meta["config"] == {"max_instructions": 5}


def test_negative_seed_or_index_is_rejected() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        generate_case(-1, 0)
    with pytest.raises(ValueError, match="non-negative"):
        generate_case(0, -3)


def test_cases_round_trip_through_json(sample: list[TestCase]) -> None:
    for case in sample[:100]:
        assert case_from_json(case_to_json(case)) == case


def test_code_is_legacy_and_of_known_families(sample: list[TestCase]) -> None:
    config = GeneratorConfig()
    for case in sample:
        instructions = list(decode(case))
        assert config.min_instructions <= len(instructions) <= config.max_instructions
        assert sum(i.len for i in instructions) == len(case.code)
        for instruction in instructions:
            assert instruction.encoding == EncodingKind.LEGACY
            assert family_of(instruction) in GROUPS, instruction


def test_every_family_appears(sample: list[TestCase]) -> None:
    seen = {family_of(i) for case in sample for i in decode(case)}
    assert seen == set(GROUPS)


def test_states_stay_within_the_supported_machine(sample: list[TestCase]) -> None:
    for case in sample:
        state = case.state
        assert state.cr0 | CR0_WP == DEFAULT_CR0 and not state.cr0 & CR0_AM
        assert state.efer == DEFAULT_EFER | (EFER_SCE if state.system else 0)
        assert not state.rflags & RFLAGS_TF
        if not state.lass_supported:
            assert not state.cr4 & CR4_LASS


def test_state_distribution(sample: list[TestCase]) -> None:
    def values(key: object) -> set[object]:
        return {key(case.state) for case in sample}  # type: ignore[operator]

    assert values(lambda s: s.cpl) == {0, 1, 2, 3}
    assert values(lambda s: s.mode) == {"64", "compat"}
    assert values(lambda s: s.la57) == {False, True}
    assert values(lambda s: s.system is None) == {False, True}
    assert values(lambda s: bool(s.system and s.system.sfmask & RFLAGS_AC)) == {False, True}
    assert values(lambda s: bool(s.cr4 & CR4_LASS)) == {False, True}
    assert values(lambda s: bool(s.cr4 & CR4_SMAP)) == {False, True}
    assert values(lambda s: bool(s.cr4 & CR4_SMEP)) == {False, True}
    assert values(lambda s: bool(s.rflags & RFLAGS_AC)) == {False, True}
    assert values(lambda s: s.lass_supported) == {False, True}
    assert values(lambda s: bool(s.cr0 & CR0_WP)) == {False, True}


def test_boundary_pages_and_user_bits_vary(sample: list[TestCase]) -> None:
    listed = collections.Counter(
        (page.address, page.user) for case in sample for page in case.pages
    )
    for address in BOUNDARY_PAGES:
        assert listed[(address, True)] and listed[(address, False)], hex(address)


def effective_addresses(case: TestCase) -> set[int]:
    """Effective addresses of the explicit memory operands whose registers the case fixes."""
    state = case.state
    names = _GPR if bits(case) == 64 else _GPR32
    values = {names[name]: value for name, value in zip(GPR_NAMES, state.gprs, strict=True)}
    values[Register.NONE] = 0
    segment_bases = {Register.FS: state.fs_base, Register.GS: state.gs_base}
    addresses = set()
    for instruction in decode(case):
        if not any(
            instruction.op_kind(n) == OpKind.MEMORY for n in range(instruction.op_count)
        ) or instruction.memory_base in (Register.RSP, Register.RBP, Register.RIP, *_STACK32):
            continue
        address = values[instruction.memory_base] + instruction.memory_displacement
        address += values[instruction.memory_index] * instruction.memory_index_scale
        address += segment_bases.get(instruction.segment_prefix, 0)
        addresses.add(address & (MASK64 if bits(case) == 64 else 0xFFFF_FFFF))
    return addresses


_GPR = {name: getattr(Register, name.upper()) for name in GPR_NAMES}
_GPR32 = {name: getattr(Register, f"E{name[1:].upper()}") for name in GPR_NAMES[:8]} | {
    name: getattr(Register, f"{name.upper()}D") for name in GPR_NAMES[8:]
}
_STACK32 = (Register.ESP, Register.EBP)


def test_memory_operands_hit_boundaries_and_the_wrap(sample: list[TestCase]) -> None:
    addresses = set().union(*(effective_addresses(case) for case in sample))
    assert any(a >= MASK64 - 7 for a in addresses), "no access in the last 8 bytes before 2^64"
    assert any(0 <= a < 0x10 for a in addresses), "no access at the start of the user half"
    assert any(a >> 12 == USER_TOP_PAGE >> 12 for a in addresses), "no access at the user top"
    assert any(a >> 12 == SUPERVISOR_BOTTOM_PAGE >> 12 for a in addresses)
    assert any(a % PAGE_SIZE > PAGE_SIZE - 8 for a in addresses), "no page-crossing candidates"


def test_stores_never_reach_code(sample: list[TestCase]) -> None:
    """No memory operand (with fixed registers) comes within 1 MiB of code or landing pads."""
    regions = (*CODE_REGIONS, *PAD_REGIONS)
    for case in sample:
        for address in effective_addresses(case):
            assert not any(r - 0x10_0000 <= address < r + 0x20_0000 for r in regions), hex(address)


def test_code_lies_in_pages_no_data_page_overlaps(sample: list[TestCase]) -> None:
    for case in sample:
        code_pages = {
            (case.code_address + offset) & ~(PAGE_SIZE - 1) for offset in range(len(case.code))
        }
        for page in case.pages:
            if page.address in code_pages:
                assert not page.writable


def test_instruction_count_follows_config() -> None:
    config = GeneratorConfig(min_instructions=5, max_instructions=5)
    for index in range(30):
        assert len(list(decode(generate_case(1, index, config)))) == 5


def test_group_restriction_limits_the_families() -> None:
    config = GeneratorConfig(groups=(("string", 1),))
    families = {family_of(i) for n in range(30) for i in decode(generate_case(1, n, config))}
    # REP strings set RCX with a MOV first.
    assert families <= {"string", "mov"} and "string" in families


@pytest.mark.slow
def test_most_cases_run_on_the_reference_model() -> None:
    """Generated cases stay within what the model executes (not UNSUPPORTED, never ERROR)."""
    engine = pytest.importorskip("lassfuzz.model.engine").ReferenceModel()
    outcomes = [engine.run(generate_case(77, index)) for index in range(300)]
    rejected = [o.detail for o in outcomes if o.status is Status.UNSUPPORTED]
    assert not [o.detail for o in outcomes if o.status is Status.ERROR]
    assert len(rejected) <= 6, rejected
    statuses = {o.status for o in outcomes}
    assert {Status.COMPLETED, Status.FAULT} <= statuses
