"""Decoding a case's code into items and re-encoding it in place."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from iced_x86 import Code, Decoder, Encoder, Instruction, MemoryOperand, Register

from lassfuzz.campaign.program import END, OPERAND_STEPS, EncodeError, Program

KERNEL = 0xFFFF_FFFF_8000_0000


def decode_all(code: bytes, address: int = KERNEL) -> list[Instruction]:
    return list(Decoder(64, code, ip=address))


def variants(instruction: Instruction) -> list[str]:
    return [str(variant) for step in OPERAND_STEPS for variant in step(instruction)]


def instruction_at(program: Program, index: int) -> Instruction:
    instruction = program.items[index].instruction
    assert instruction is not None
    return instruction


def one(hex_bytes: str) -> Instruction:
    return Decoder(64, bytes.fromhex(hex_bytes), ip=KERNEL).decode()


@given(st.binary(max_size=48), st.sampled_from([KERNEL, 0x40_0000, 0xFFFF_FFFF_FFFF_FFF0]))
def test_unchanged_program_encodes_to_the_original_bytes(code: bytes, address: int) -> None:
    assert Program.decode(code, address).encode() == code


def test_undecodable_bytes_are_kept_as_raw_items() -> None:
    program = Program.decode(bytes.fromhex("90 06"), KERNEL)
    assert [item.instruction is None for item in program.items] == [False, True]
    assert program.without((0,)).encode() == bytes.fromhex("06")


def test_branch_follows_its_target_instruction_when_code_before_it_is_dropped() -> None:
    # jmp short +2 over two nops to "mov rax,[rbx]"
    code = bytes.fromhex("eb02 90 90 488b03")
    program = Program.decode(code, KERNEL)
    assert program.items[0].target == 3
    shrunk = decode_all(program.without((1,)).encode())
    assert shrunk[0].near_branch_target == shrunk[2].ip
    assert str(shrunk[2]) == "mov rax,[rbx]"


def test_branch_to_a_dropped_instruction_goes_to_code_end() -> None:
    code = bytes.fromhex("eb01 90 90 90")
    program = Program.decode(code, KERNEL)
    encoded = program.without((2,)).encode()
    assert decode_all(encoded)[0].near_branch_target == KERNEL + len(encoded)


def test_branch_to_code_end_stays_at_code_end() -> None:
    code = bytes.fromhex("eb02 90 90")
    program = Program.decode(code, KERNEL)
    assert program.items[0].target == END
    encoded = program.without((1,)).encode()
    assert decode_all(encoded)[0].near_branch_target == KERNEL + len(encoded)


def test_branch_outside_the_code_keeps_its_absolute_target() -> None:
    # From the last page a rel32 jump wraps into the user half: a deliberate cross-half jump.
    top = 0xFFFF_FFFF_FFFF_F000
    jump = Instruction.create_branch(Code.JMP_REL32_64, 0x40_0000)
    head = bytes.fromhex("90 90")
    encoded_jump = _encode_at(jump, top + len(head))
    program = Program.decode(head + encoded_jump, top)
    assert program.items[2].target is None
    shrunk = decode_all(program.without((0,)).encode(), top)
    assert shrunk[1].near_branch_target == 0x40_0000


def test_short_branch_is_widened_when_its_target_moves_out_of_reach() -> None:
    body = bytes.fromhex("66052a00") * 31 + bytes.fromhex("90") * 2  # 126 bytes
    code = bytes([0xEB, len(body)]) + body
    program = Program.decode(code, KERNEL)
    wider = OPERAND_STEPS[-1](instruction_at(program, 1))[0]
    assert str(wider) == "add rax,2Ah"
    encoded = program.with_instruction(1, wider).encode()
    decoded = decode_all(encoded)
    assert decoded[0].code == Code.JMP_REL32_64
    assert decoded[0].near_branch_target == KERNEL + len(encoded)


def test_unencodable_rewrite_raises_encode_error() -> None:
    program = Program.decode(bytes.fromhex("48d3e3"), KERNEL)  # shl rbx,cl
    rewritten = instruction_at(program, 0).copy()
    rewritten.set_op_register(1, Register.AL)
    try:
        program.with_instruction(0, rewritten).encode()
    except EncodeError:
        return
    raise AssertionError("shl rbx,al must not encode")


def test_operand_steps_simplify_immediates_registers_and_prefixes() -> None:
    assert variants(one("4881c334120000")) == [
        "add rbx,0",
        "add rbx,1",
        "add rax,1234h",
    ]
    assert variants(one("f0480fc10b")) == [
        "lock xadd [rbx],rax",
        "lock xadd [rax],rcx",
        "xadd [rbx],rcx",
    ]
    assert variants(one("f3aa")) == ["stosb"]


def test_operand_steps_simplify_memory_operands() -> None:
    mov = Instruction.create_reg_mem(
        Code.MOV_R64_RM64, Register.RAX, MemoryOperand(Register.RSP, Register.RDX, 4, 0x10, 1)
    )
    mov.segment_prefix = Register.FS
    assert variants(mov) == [
        "mov rax,fs:[rsp+10h]",
        "mov rax,fs:[rsp+rdx*4]",
        "mov rax,[rsp+rdx*4+10h]",
        "mov rax,fs:[rax+rdx*4+10h]",
    ]


def test_operand_size_goes_to_64_then_32_and_never_narrower() -> None:
    assert variants(one("66052a00"))[-2:] == ["add rax,2Ah", "add eax,2Ah"]
    assert variants(one("8b03"))[-1] == "mov rax,[rbx]"
    assert "mov eax,[rbx]" not in variants(one("488b03"))


def test_rip_relative_operand_keeps_its_absolute_address_when_moved() -> None:
    code = bytes.fromhex("90 488b0510000000")
    target = decode_all(code)[1].ip_rel_memory_address
    moved = decode_all(Program.decode(code, KERNEL).without((0,)).encode())
    assert moved[0].ip_rel_memory_address == target


def _encode_at(instruction: Instruction, ip: int) -> bytes:
    encoder = Encoder(64)
    encoder.encode(instruction, ip)
    return bytes(encoder.take_buffer())
