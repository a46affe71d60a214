"""Pre-scan and operand addresses (iced-x86) used to rebuild faults."""

from __future__ import annotations

from lassfuzz.emulator.decode import Intercept, OperandAccess, memory_accesses, prescan

BASE = 0x40_0000


def test_prescan_finds_intercepts_and_branches() -> None:
    # mov cr4,rax; clflush [rax]; prefetchnta [rax]; hlt; popfq; jmp rax; iretq; vaddps
    code = bytes.fromhex("0f22e00fae380f1800f49dffe048cfc5f858c2")
    scan = prescan(code, BASE)
    assert dict(scan.intercepts) == {
        BASE: Intercept.MOV_CR,
        BASE + 3: Intercept.CACHE_FLUSH,
        BASE + 9: Intercept.HLT,
        BASE + 10: Intercept.POPF,
        BASE + 13: Intercept.UNSUPPORTED,
        BASE + 15: Intercept.UNSUPPORTED,
    }
    assert scan.branches == {BASE + 11, BASE + 13}
    assert "IRETQ" in scan.unsupported_reason(BASE + 13)


def test_prescan_decodes_an_instruction_running_past_the_end() -> None:
    scan = prescan(bytes.fromhex("48b8"), BASE, bytes(8))  # mov rax, imm64 split by code_end
    assert scan.instructions[BASE].len == 10


def test_memory_accesses_of_push_and_segment_overrides() -> None:
    from iced_x86 import Decoder, Register

    regs: dict[int, int] = {Register.RSP: 0x1000, Register.RAX: 0x2000, Register.RBX: 0x10}
    push = Decoder(64, bytes.fromhex("50"), ip=BASE).decode()
    assert memory_accesses(push, regs.__getitem__, lambda _: 0) == (
        OperandAccess(0xFF8, 8, "write", stack=True),
    )
    fs_load = Decoder(64, bytes.fromhex("64488b0458"), ip=BASE).decode()  # mov rax, fs:[rax+rbx*2]
    assert memory_accesses(
        fs_load, regs.__getitem__, lambda seg: 0x100 if seg == Register.FS else 0
    ) == (OperandAccess(0x2120, 8, "read", stack=False),)
    rmw = Decoder(64, bytes.fromhex("48ff03"), ip=BASE).decode()  # inc qword [rbx]
    assert {a.kind for a in memory_accesses(rmw, regs.__getitem__, lambda _: 0)} == {
        "read",
        "write",
    }


def test_operand_page_coverage_wraps() -> None:
    top = OperandAccess(2**64 - 4, 8, "read", stack=False)
    assert top.covers(0, 0x1000) and top.covers(2**64 - 0x1000, 0x1000)
    assert top.first_byte_in(0, 0x1000) == 0
    assert top.first_byte_in(2**64 - 0x1000, 0x1000) == 2**64 - 4


def test_bit_test_register_offset_moves_the_access() -> None:
    from iced_x86 import Decoder, Register

    bt = Decoder(64, bytes.fromhex("480fa303"), ip=BASE).decode()  # bt [rbx], rax
    for offset, address in ((-1, 0xFF8), (63, 0x1000), (64, 0x1008)):
        regs: dict[int, int] = {Register.RBX: 0x1000, Register.RAX: offset & (2**64 - 1)}
        (access,) = memory_accesses(bt, regs.__getitem__, lambda _: 0)
        assert access.address == address
