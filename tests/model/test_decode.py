"""Decoding into operand descriptions (iced-x86 says what the bytes are, not what they do)."""

from __future__ import annotations

import pytest

from lassfuzz.model.decode import (
    Branch,
    ControlReg,
    Imm,
    InstructionDecoder,
    Mem,
    NeedMoreBytes,
    Reg,
    StringMem,
)
from lassfuzz.model.faults import Unsupported


@pytest.fixture
def decoder() -> InstructionDecoder:
    return InstructionDecoder()


def test_register_and_memory_operands(decoder: InstructionDecoder) -> None:
    d = decoder.decode(bytes.fromhex("4c8b44cb10") + b"\x90" * 10)  # mov r8, [rbx+rcx*8+16]
    assert d.length == 5 and d.mnemonic == "MOV"
    assert d.operands == (
        Reg(8, 0, 8),
        Mem(
            "ds",
            base=3,
            rip_relative=False,
            index=1,
            scale=8,
            displacement=16,
            address_bits=64,
            size=8,
        ),
    )


@pytest.mark.parametrize(
    ("code", "segment"),
    [
        ("8b0424", "ss"),
        ("8b4500", "ss"),
        ("368b03", "ss"),
        ("648b0424", "fs"),
        ("8b03", "ds"),
        ("658b03", "gs"),
    ],
)
def test_effective_segment(decoder: InstructionDecoder, code: str, segment: str) -> None:
    operand = decoder.decode(bytes.fromhex(code)).operands[1]
    assert isinstance(operand, Mem) and operand.segment == segment


def test_rip_relative_is_relative_to_the_instruction_start(decoder: InstructionDecoder) -> None:
    operand = decoder.decode(bytes.fromhex("8b05f0ffffff")).operands[1]  # mov eax, [rip-16]
    assert isinstance(operand, Mem) and operand.rip_relative
    assert operand.displacement == (6 - 16) & (2**64 - 1)


def test_branch_offset_and_immediates(decoder: InstructionDecoder) -> None:
    assert decoder.decode(bytes.fromhex("ebfe")).operands == (Branch(0),)  # jmp $
    push = decoder.decode(bytes.fromhex("6a80"))
    assert push.operands == (Imm(2**64 - 0x80),) and push.stack_increment == -8
    assert decoder.decode(bytes.fromhex("7400")).condition == 4  # je: tttn 0100


def test_high_byte_registers_and_control_registers(decoder: InstructionDecoder) -> None:
    assert decoder.decode(bytes.fromhex("88e0")).operands == (
        Reg(0, 0, 1),
        Reg(0, 8, 1),
    )  # mov al, ah
    assert decoder.decode(bytes.fromhex("0f22e0")).operands[0] == ControlReg(4)


def test_string_operands(decoder: InstructionDecoder) -> None:
    d = decoder.decode(bytes.fromhex("f3 36 a5"))  # rep movsd with an ss: source
    assert d.rep and d.operands == (StringMem(7, "es", 4), StringMem(6, "ss", 4))


def test_truncated_and_rejected_bytes(decoder: InstructionDecoder) -> None:
    with pytest.raises(NeedMoreBytes):
        decoder.decode(bytes.fromhex("48b8 0000"))
    with pytest.raises(Unsupported, match="VEX"):
        decoder.decode(bytes.fromhex("c5f858c1"))
    with pytest.raises(Unsupported, match="undecodable"):
        decoder.decode(bytes.fromhex("0f04") + bytes(13))
    with pytest.raises(Unsupported, match="16-bit addresses"):
        decoder.decode(bytes.fromhex("67a4"), 32)
    with pytest.raises(Unsupported, match="16-bit addressing"):
        decoder.decode(bytes.fromhex("67 8b07"), 32)
    assert decoder.decode(bytes.fromhex("f001c0")).code == "INVALID_LOCK"
