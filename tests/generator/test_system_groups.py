"""The system instruction groups: where they appear, and the invariants they keep."""

from __future__ import annotations

import itertools

import pytest
from iced_x86 import Code, Decoder, Instruction, OpKind, Register

from lassfuzz.arch import GPR_NAMES, MASK64
from lassfuzz.case import TestCase
from lassfuzz.families import family_of
from lassfuzz.generator.generate import GeneratorConfig, generate_case
from lassfuzz.generator.layout import COMPAT_ENTRY, COMPAT_ENTRY_CODE, COMPAT_STACK_TOP
from lassfuzz.system import CODE_SELECTOR, EXTRA_SEL, STACK_SELECTOR

SYSTEM_FAMILIES = {"sreg", "lar", "sdt", "ldt", "int", "iret", "syscall", "far"}


def decode(case: TestCase) -> list[Instruction]:
    bits = 32 if case.state.mode == "compat" else 64
    return list(Decoder(bits, case.code, ip=case.code_address))


def test_system_groups_need_descriptor_tables() -> None:
    config = GeneratorConfig(p_system=0.0)
    families = {family_of(i) for n in range(150) for i in decode(generate_case(8, n, config))}
    assert not families & SYSTEM_FAMILIES


@pytest.mark.parametrize("family", sorted(SYSTEM_FAMILIES))
def test_each_system_group_is_generated(family: str) -> None:
    config = GeneratorConfig(p_system=1.0, p_compat=0.0, p_cpl3=0.0, groups=((family, 1),))
    families = {family_of(i) for n in range(20) for i in decode(generate_case(9, n, config))}
    assert family in families


def test_compat_code_gets_no_64_bit_only_groups() -> None:
    config = GeneratorConfig(
        p_system=1.0, p_compat=1.0, groups=(("iret", 1), ("far", 1), ("sreg", 1))
    )
    families = {family_of(i) for n in range(40) for i in decode(generate_case(10, n, config))}
    assert "sreg" in families and not families & {"iret", "syscall", "far"}


def test_iretq_pops_a_prepared_frame() -> None:
    config = GeneratorConfig(p_system=1.0, p_compat=0.0, groups=(("iret", 1),))
    frames, compat = 0, 0
    for n in range(60):
        case = generate_case(11, n, config)
        instructions = decode(case)
        for index, instruction in enumerate(instructions):
            if instruction.code != Code.IRETQ:
                continue
            frames += 1
            save, ss, rsp, rflags, cs, load, rip = instructions[index - 7 : index]
            assert save.op1_register == Register.RSP
            target_cpl = ss.immediate32 & 3
            assert target_cpl >= case.state.cpl
            assert ss.immediate32 == STACK_SELECTOR[target_cpl]
            assert rflags.immediate32 & 2 and not rflags.immediate32 & 0x100  # fixed bit, no TF
            assert rip.code == Code.PUSH_R64 and rip.op0_register == load.op0_register
            if cs.immediate32 == CODE_SELECTOR[("compat", target_cpl)]:
                # Compatibility mode is entered at the 32-bit entry page, on a stack below 4 GiB.
                assert load.immediate64 == COMPAT_ENTRY
                assert rsp.immediate32 == COMPAT_STACK_TOP
                compat += 1
            else:
                assert cs.immediate32 == CODE_SELECTOR[("64", target_cpl)]
                assert rsp.op0_register == save.op0_register
    assert frames > compat > 0


def _uses_index_r11(instruction: Instruction) -> bool:
    return (
        any(instruction.op_kind(n) == OpKind.MEMORY for n in range(instruction.op_count))
        and instruction.memory_index == Register.R11
    )


def test_no_r11_index_after_syscall_or_sysret_and_no_stale_fs_gs_override() -> None:
    config = GeneratorConfig(
        p_system=1.0, p_compat=0.0, p_index=0.9, p_segment_override=0.9, max_instructions=48
    )
    checked = 0
    for n in range(120):
        instructions = decode(generate_case(12, n, config))
        r11_written = False
        loaded: set[int] = set()
        for instruction in instructions:
            if r11_written and _uses_index_r11(instruction):
                pytest.fail(f"{instruction} uses R11 after SYSCALL/SYSRET")
            if instruction.segment_prefix in loaded:
                pytest.fail(f"{instruction} uses a segment override after loading it")
            if instruction.code in (Code.SYSCALL, Code.SYSRETQ):
                r11_written = True
                checked += 1
            if (
                family_of(instruction) == "sreg"
                and instruction.op0_kind == OpKind.REGISTER
                and instruction.op0_register in (Register.FS, Register.GS)
            ):
                loaded.add(instruction.op0_register)
                checked += 1
    assert checked


def test_segment_loads_use_pop_forms_valid_in_their_mode() -> None:
    config = GeneratorConfig(p_system=1.0, groups=(("sreg", 1),), max_instructions=12)
    pops = set()
    for n in range(80):
        case = generate_case(13, n, config)
        for first, second in itertools.pairwise(decode(case)):
            if family_of(second) == "sreg" and second.code in (
                Code.POPQ_FS,
                Code.POPQ_GS,
                Code.POPD_DS,
                Code.POPD_ES,
                Code.POPD_SS,
                Code.POPD_FS,
                Code.POPD_GS,
            ):
                pops.add((case.state.mode, second.op0_register))
                assert first.code in (Code.PUSH_R64, Code.PUSH_R32)
    assert ("64", Register.FS) in pops or ("64", Register.GS) in pops
    assert not {(mode, reg) for mode, reg in pops if mode == "64"} - {
        ("64", Register.FS),
        ("64", Register.GS),
    }


def effective_address(case: TestCase, instruction: Instruction) -> int:
    """The address of a base + displacement operand with the case's initial registers."""
    values = dict(zip(GPR_NAMES, case.state.gprs, strict=True))
    base = (
        0 if instruction.memory_base == Register.NONE else values[_NAMES[instruction.memory_base]]
    )
    return (base + instruction.memory_displacement) & MASK64


_NAMES = {getattr(Register, name.upper()): name for name in GPR_NAMES}


def test_far_pointers_are_stored_just_before_the_far_transfer() -> None:
    config = GeneratorConfig(p_system=1.0, p_compat=0.0, groups=(("far", 1),))
    pointers = gates = 0
    for n in range(40):
        case = generate_case(14, n, config)
        instructions = decode(case)
        for index, instruction in enumerate(instructions):
            if not (instruction.is_jmp_far_indirect or instruction.is_call_far_indirect):
                continue
            pointers += 1
            store_offset, store_selector = instructions[index - 2 : index]
            assert store_offset.code == Code.MOV_RM64_R64
            assert store_selector.code == Code.MOV_RM16_IMM16
            # The pointer's offset, and its selector 8 bytes on, in one 16-byte slot.
            pointer = effective_address(case, instruction)
            assert effective_address(case, store_offset) == pointer and pointer % 16 == 0
            assert effective_address(case, store_selector) == pointer + 8
            gates += store_selector.immediate16 == EXTRA_SEL | 3
    assert pointers > gates > 0


def test_the_compat_entry_page_holds_32_bit_code_ending_in_ud2() -> None:
    config = GeneratorConfig(p_system=1.0, p_compat=0.0)
    case = generate_case(15, 0, config)
    page = next(page for page in case.pages if page.address == COMPAT_ENTRY)
    assert page.user and not page.writable and page.data == COMPAT_ENTRY_CODE
    entry = list(Decoder(32, COMPAT_ENTRY_CODE))
    assert [i.code for i in entry] == [Code.NOPD, Code.UD2]
    compat_case = generate_case(15, 0, GeneratorConfig(p_system=1.0, p_compat=1.0))
    assert COMPAT_ENTRY not in {page.address for page in compat_case.pages}
