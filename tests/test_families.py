"""Instruction families of decoded instructions."""

from __future__ import annotations

import pytest
from iced_x86 import Code, Decoder, Encoder, Instruction, MemoryOperand, Register

from lassfuzz.families import FAMILIES, family_at, family_of


def encode(instruction: Instruction) -> bytes:
    encoder = Encoder(64)
    encoder.encode(instruction, 0)
    return encoder.take_buffer()


@pytest.mark.parametrize(
    ("code", "family"),
    [
        ("0f20e0", "cr"),  # mov rax, cr4
        ("0f22d8", "cr"),  # mov cr3, rax
        ("4889c3", "mov"),  # mov rbx, rax
        ("480fb603", "movx"),  # movzx rax, byte [rbx]
        ("488d0424", "lea"),
        ("f0480103", "alu"),  # lock add [rbx], rax
        ("48f7d8", "unary"),  # neg rax
        ("480fc70b", "cmpxchg"),  # cmpxchg16b [rbx]
        ("0fc70b", "cmpxchg"),  # cmpxchg8b [rbx]
        ("480fba2b05", "bt"),  # bts qword [rbx], 5
        ("9c", "flags"),
        ("0f01cb", "flags"),  # stac
        ("fd", "flags"),  # std
        ("c8080000", "enter-leave"),
        ("c9", "enter-leave"),
        ("c3", "call-ret"),
        ("ffd0", "call-ret"),  # call rax
        ("ffe0", "jmp"),
        ("7400", "jcc"),
        ("0f44c3", "cmov"),
        ("0f94c0", "setcc"),
        ("f348ab", "string"),  # rep stosq
        ("f3a6", "string"),  # repe cmpsb
        ("0f1803", "prefetch"),  # prefetchnta? (0F 18 /0)
        ("0f0d0b", "prefetch"),  # prefetchw
        ("0fae3b", "clflush"),
        ("660fae3b", "clflush"),  # clflushopt
        ("0f013b", "invlpg"),
        ("0fa2", "cpuid"),
        ("90", "nop"),
        ("0f1f4000", "nop"),
        ("f4", "hlt"),
        ("0f0b", "ud2"),
        ("0f05", "syscall"),
        ("480f07", "syscall"),  # sysretq
        ("48cf", "iret"),  # iretq
        ("cc", "int"),  # int3
        ("cd80", "int"),  # int 0x80
        ("8ed8", "sreg"),  # mov ds, eax
        ("8cd8", "sreg"),  # mov eax, ds
        ("0fa1", "sreg"),  # pop fs
        ("0f02c8", "lar"),  # lar ecx, eax
        ("0f03c8", "lar"),  # lsl ecx, eax
        ("0f00e0", "lar"),  # verr ax
        ("0f00e8", "lar"),  # verw ax
        ("0f0103", "sdt"),  # sgdt [rbx]
        ("0f00c8", "sdt"),  # str eax
        ("0f0113", "ldt"),  # lgdt [rbx]
        ("0f00d8", "ldt"),  # ltr ax
        ("0f00d0", "ldt"),  # lldt ax
        ("48cb", "far"),  # retfq
        ("48ff6b08", "far"),  # jmp far [rbx + 8] (m16:64)
        ("48ff5b08", "far"),  # call far [rbx + 8]
        ("ffe3", "jmp"),  # jmp rbx: near
        ("0f01f8", "other"),  # swapgs
        ("ffff", "invalid"),
    ],
)
def test_family_at(code: str, family: str) -> None:
    assert family_at(bytes.fromhex(code), 0x1000) == family
    assert family in FAMILIES


@pytest.mark.parametrize(
    ("code", "family", "family64"),
    [
        ("1f", "sreg", "invalid"),  # pop ds (invalid in 64-bit code)
        ("48", "unary", "invalid"),  # dec eax (a lone REX prefix in 64-bit code)
        ("9d", "flags", "flags"),  # popfd / popfq
        ("8ed8", "sreg", "sreg"),  # mov ds, ax
    ],
)
def test_family_at_in_32_bit_code(code: str, family: str, family64: str) -> None:
    assert family_at(bytes.fromhex(code), 0x1000, 32) == family
    assert family_at(bytes.fromhex(code), 0x1000) == family64


def test_family_of_matches_family_at() -> None:
    instruction = Instruction.create_mem_reg(
        Code.XCHG_RM64_R64, MemoryOperand(Register.R12, displ=8, displ_size=1), Register.RAX
    )
    code = encode(instruction)
    assert family_of(Decoder(64, code).decode()) == "xchg" == family_at(code, 0)


def test_family_at_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="no code"):
        family_at(b"", 0)
    with pytest.raises(ValueError, match="u64"):
        family_at(b"\x90", -1)
    with pytest.raises(ValueError, match="32 or 64"):
        family_at(b"\x90", 0, 16)


def test_family_names_are_unique() -> None:
    assert len(set(FAMILIES)) == len(FAMILIES)
