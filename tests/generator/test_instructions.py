"""Code assembly and the invariants the instruction builder keeps by construction."""

from __future__ import annotations

import itertools

from iced_x86 import Code, Decoder, FlowControl, Instruction, Register

from lassfuzz.case import TestCase
from lassfuzz.generator.generate import GeneratorConfig, generate_case
from lassfuzz.generator.instructions import Branch, CodeAddress, Fixed, assemble, landing_pad


def bits(case: TestCase) -> int:
    return 32 if case.state.mode == "compat" else 64


def test_assemble_picks_short_branches_only_when_they_reach() -> None:
    nop = Fixed(Instruction.create(Code.NOPD))
    filler = [Fixed(Instruction.create_reg_u64(Code.MOV_R64_IMM64, Register.RAX, 1))] * 13
    groups = [
        [Branch(Code.JE_REL8_64, Code.JE_REL32_64, 2)],  # skips one NOP: short
        [nop],
        [Branch(Code.JMP_REL8_64, Code.JMP_REL32_64, 4)],  # skips 130 bytes: near
        filler,
        [CodeAddress(Register.RCX, 9)],  # past the last group: the code end
    ]
    code = assemble(groups, 0x1000)
    decoded = list(Decoder(64, code, ip=0x1000))
    assert decoded[0].code == Code.JE_REL8_64 and decoded[0].near_branch_target == 0x1003
    jump = decoded[2]
    assert jump.code == Code.JMP_REL32_64
    assert jump.near_branch_target == decoded[-1].ip
    assert decoded[-1].immediate64 == 0x1000 + len(code)


def test_landing_pad_jumps_to_the_code_end() -> None:
    pad = list(Decoder(64, landing_pad(0xFFFF_FFFF_8000_0123)))
    assert pad[0].immediate64 == 0xFFFF_FFFF_8000_0123
    assert pad[1].flow_control == FlowControl.INDIRECT_BRANCH
    pad32 = list(Decoder(32, landing_pad(0x0040_0123, 32)))
    assert pad32[0].code == Code.MOV_R32_IMM32 and pad32[0].immediate32 == 0x0040_0123
    assert pad32[1].code == Code.JMP_RM32 and pad32[1].op0_register == Register.EAX


def test_assemble_32_bit_code() -> None:
    groups = [
        [Branch(Code.JMP_REL8_32, Code.JMP_REL32_32, 2)],
        [Fixed(Instruction.create(Code.NOPD))],
        [CodeAddress(Register.ECX, 3)],
    ]
    code = assemble(groups, 0x40_0000, 32)
    decoded = list(Decoder(32, code, ip=0x40_0000))
    assert decoded[0].code == Code.JMP_REL8_32 and decoded[0].near_branch_target == decoded[2].ip
    assert decoded[2].code == Code.MOV_R32_IMM32 and decoded[2].immediate32 == 0x40_0000 + len(code)


def test_direct_branches_go_forward_to_instruction_boundaries() -> None:
    for index in range(300):
        case = generate_case(31, index)
        instructions = list(Decoder(bits(case), case.code, ip=case.code_address))
        boundaries = {i.ip for i in instructions} | {case.code_end}
        for instruction in instructions:
            if (
                instruction.is_jmp_short_or_near
                or instruction.is_jcc_short_or_near
                or instruction.is_call_near
            ):
                target = instruction.near_branch_target
                assert target > instruction.ip and target in boundaries


def test_rep_strings_always_get_a_small_count_first() -> None:
    config = GeneratorConfig(groups=(("string", 1), ("jcc", 1)))
    for index in range(100):
        case = generate_case(5, index, config)
        instructions = list(Decoder(bits(case), case.code, ip=case.code_address))
        for previous, instruction in itertools.pairwise(instructions):
            if instruction.has_rep_prefix or instruction.has_repne_prefix:
                assert previous.code == Code.MOV_R32_IMM32 and previous.op0_register == Register.ECX
                assert previous.immediate32 <= 8
