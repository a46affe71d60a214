"""Per-family semantics with hand-computed expectations (SDM Vol. 2 instruction pages)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from iced_x86 import Code, Instruction, Register

from lassfuzz.arch import (
    CR4_LASS,
    CR4_PAE,
    CR4_SMAP,
    RFLAGS_AC,
    RFLAGS_AF,
    RFLAGS_CF,
    RFLAGS_DF,
    RFLAGS_FIXED1,
    RFLAGS_IF,
    RFLAGS_IOPL,
    RFLAGS_OF,
    RFLAGS_PF,
    RFLAGS_SF,
    RFLAGS_STATUS,
    RFLAGS_ZF,
    VEC_UD,
)
from lassfuzz.case import Page, TestCase
from lassfuzz.outcome import Outcome, Status
from tests.model.builders import KERNEL_DATA, KERNEL_STACK, linear_bytes, make_case, reg, run

STACK_TOP = KERNEL_STACK + 0x800
F = RFLAGS_FIXED1


def execute(
    code: str,
    *,
    cpl: int = 0,
    rflags: int = F,
    data: bytes = b"",
    fs_base: int = 0,
    **regs: int,
) -> tuple[TestCase, Outcome]:
    """Run ``code`` with a kernel data page at RBX and a kernel stack at RSP (LASS off)."""
    values = {"rsp": STACK_TOP, "rbx": KERNEL_DATA, **regs}
    pages = [Page(KERNEL_DATA, user=False, data=data), Page(KERNEL_STACK, user=False)]
    case = make_case(
        code, cpl=cpl, regs=values, pages=pages, rflags=rflags, cr4=CR4_PAE, fs_base=fs_base
    )
    outcome = run(case)
    assert outcome.status in (Status.COMPLETED, Status.FAULT), outcome.detail
    return case, outcome


def status(outcome: Outcome) -> int:
    return reg(outcome, "rflags") & RFLAGS_STATUS


# ---- data movement ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "rax"),
    [
        ("b8ffffffff", 0xFFFF_FFFF),  # mov eax, -1: a 32-bit write zero-extends
        ("66b8ffff", 0x1111_1111_1111_FFFF),  # mov ax, -1: merges
        ("b4ff", 0x1111_1111_1111_FF11),  # mov ah, -1
        ("48c7c0ffffffff", 0xFFFF_FFFF_FFFF_FFFF),  # mov rax, imm32 sign-extended
        ("488b4308", 0x8807_0605_0403_0201),  # mov rax, [rbx+8]
        ("8a4309", 0x1111_1111_1111_1102),  # mov al, [rbx+9]
        ("0fb64309", 0x02),  # movzx eax, byte [rbx+9]
        ("480fbe430f", 0xFFFF_FFFF_FFFF_FF88),  # movsx rax, byte [rbx+15]
        ("4863430c", 0xFFFF_FFFF_8807_0605),  # movsxd rax, [rbx+12]
        ("488d4c0b10", 0x1111_1111_1111_1111),  # lea rcx, [rbx+rcx+16] leaves rax
        ("67488d0418", 0x1111_1111),  # lea rax, [eax+ebx]: a 32-bit address, zero-extended
        ("64488d4310", KERNEL_DATA + 0x10),  # lea with fs: ignores the segment base
    ],
)
def test_moves(code: str, rax: int) -> None:
    data = bytes(8) + bytes([1, 2, 3, 4, 5, 6, 7, 0x88])
    _, outcome = execute(code, data=data, rax=0x1111_1111_1111_1111, fs_base=0x1000)
    assert reg(outcome, "rax") == rax


def test_store_forms_and_segments() -> None:
    # mov [rbx+rcx*4+8], eax; mov fs:[0x10], ax; mov [moffs64], al
    moffs = (KERNEL_DATA + 0x20).to_bytes(8, "little").hex()
    code = "89448b08" + "646689042510000000" + "48a2" + moffs
    case, outcome = execute(code, rax=0xAABBCCDD, rcx=1, fs_base=KERNEL_DATA)
    assert linear_bytes(case, outcome, KERNEL_DATA + 12, 4) == bytes.fromhex("ddccbbaa")
    assert linear_bytes(case, outcome, KERNEL_DATA + 0x10, 2) == bytes.fromhex("ddcc")
    assert linear_bytes(case, outcome, KERNEL_DATA + 0x20, 1) == b"\xdd"


def test_rip_relative_load() -> None:
    case = make_case(
        "488b05f90f0000",  # mov rax, [rip + 0xff9]: the byte 0x1000 after the instruction start
        pages=[Page(0xFFFF_FFFF_8000_1000, user=False, data=b"\x2a")],
        cr4=CR4_PAE,
    )
    assert reg(run(case), "rax") == 0x2A


@pytest.mark.parametrize(("rflags", "rax"), [(F | RFLAGS_ZF, 0x7), (F, 0x0000_0000_5555_5555)])
def test_cmov_32_bit_zero_extends_even_when_false(rflags: int, rax: int) -> None:
    # cmove eax, [rbx]
    _, outcome = execute("0f4403", rflags=rflags, rax=0xFFFF_FFFF_5555_5555, data=b"\x07")
    assert reg(outcome, "rax") == rax


def test_cmov_reads_its_source_even_when_false() -> None:
    _, outcome = execute("480f4401", rcx=0x1000)  # cmove rax, [rcx]: unmapped
    assert outcome.fault is not None and outcome.fault.vector == 14


def test_setcc() -> None:
    case, outcome = execute("0f9403 0f95c1", rflags=F | RFLAGS_ZF, rcx=0xFF)  # sete [rbx]; setne cl
    assert linear_bytes(case, outcome, KERNEL_DATA, 1) == b"\x01"
    assert reg(outcome, "rcx") == 0


def test_xchg_xadd() -> None:
    case, outcome = execute("48870b 480fc1c2", rcx=5, data=b"\x09", rax=3, rdx=4)
    assert reg(outcome, "rcx") == 9 and linear_bytes(case, outcome, KERNEL_DATA, 1) == b"\x05"
    # xadd rdx, rax: rdx = 4 + 3, rax = the old rdx
    assert (reg(outcome, "rdx"), reg(outcome, "rax")) == (7, 4)


def test_xchg_eax_eax_zero_extends_but_nop_does_not() -> None:
    _, outcome = execute("87c0", rax=0xFFFF_FFFF_0000_0001)
    assert reg(outcome, "rax") == 1
    _, outcome = execute("90 6690 0f1f00 0f1f440000 f390", rax=0xFFFF_FFFF_0000_0001)
    assert reg(outcome, "rax") == 0xFFFF_FFFF_0000_0001


@pytest.mark.parametrize(("rax", "equal"), [(0x42, True), (0x41, False)])
def test_cmpxchg(rax: int, equal: bool) -> None:
    case, outcome = execute("f00fb10b", rax=rax, rcx=0x99, data=b"\x42")  # lock cmpxchg [rbx], ecx
    assert bool(reg(outcome, "rflags") & RFLAGS_ZF) == equal
    assert linear_bytes(case, outcome, KERNEL_DATA, 1) == (b"\x99" if equal else b"\x42")
    assert reg(outcome, "rax") == (rax if equal else 0x42)
    assert [a.kind for a in outcome.trace or ()] == ["read", "write"]


@pytest.mark.parametrize("equal", [True, False])
def test_cmpxchg8b_and_16b(equal: bool) -> None:
    memory = bytes(range(16))
    low = int.from_bytes(memory[:8], "little")
    high = int.from_bytes(memory[8:], "little")
    regs = {"rax": low if equal else 0, "rdx": high if equal else 0, "rbx": 0xB, "rcx": 0xC}
    values = {"rsi": KERNEL_DATA}
    case = make_case(
        "480fc70e",  # cmpxchg16b [rsi]
        regs={**regs, **values},
        pages=[Page(KERNEL_DATA, user=False, data=memory)],
        cr4=CR4_PAE,
    )
    outcome = run(case)
    assert bool(reg(outcome, "rflags") & RFLAGS_ZF) == equal
    if equal:
        stored = (0xB | 0xC << 64).to_bytes(16, "little")
        assert linear_bytes(case, outcome, KERNEL_DATA, 16) == stored
    else:
        assert (reg(outcome, "rax"), reg(outcome, "rdx")) == (low, high)
    pages = [Page(KERNEL_DATA, user=False, data=memory)]
    regs = {"rsi": KERNEL_DATA, "rax": 0xFFFF_FFFF_0000_0000}
    eight = run(make_case("0fc70e", regs=regs, pages=pages, cr4=CR4_PAE))  # cmpxchg8b [rsi]
    assert (reg(eight, "rax"), reg(eight, "rdx")) == (0x0302_0100, 0x0706_0504)  # zero-extended


def test_cmpxchg16b_needs_16_byte_alignment() -> None:
    case = make_case(
        "480fc74e08", regs={"rsi": KERNEL_DATA}, pages=[Page(KERNEL_DATA, user=False)], cr4=CR4_PAE
    )
    outcome = run(case)
    assert outcome.fault is not None and outcome.fault.name == "#GP(0)"


# ---- arithmetic ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "rflags", "rax", "flags"),
    [
        ("0401", F, 0x80, RFLAGS_SF | RFLAGS_OF | RFLAGS_AF),  # add al, 1 with al = 0x7f
        ("1401", F | RFLAGS_CF, 0x81, RFLAGS_SF | RFLAGS_OF | RFLAGS_AF | RFLAGS_PF),  # adc
        ("2c80", F, 0xFF, RFLAGS_SF | RFLAGS_OF | RFLAGS_PF | RFLAGS_CF),  # sub al, 0x80
        ("1c7f", F | RFLAGS_CF, 0xFF, RFLAGS_SF | RFLAGS_CF | RFLAGS_AF | RFLAGS_PF),  # sbb al, 7f
        ("3c7f", F, 0x7F, RFLAGS_ZF | RFLAGS_PF),  # cmp al, 0x7f
        ("240f", F | RFLAGS_CF | RFLAGS_OF, 0x0F, RFLAGS_PF),  # and clears CF and OF
        ("0c80", F, 0xFF, RFLAGS_SF | RFLAGS_PF),  # or al, 0x80
        ("347f", F, 0x00, RFLAGS_ZF | RFLAGS_PF),  # xor al, 0x7f
        ("a880", F, 0x7F, RFLAGS_ZF | RFLAGS_PF),  # test al, 0x80
        ("fec0", F | RFLAGS_CF, 0x80, RFLAGS_SF | RFLAGS_OF | RFLAGS_AF | RFLAGS_CF),  # inc al
        ("fec8", F, 0x7E, RFLAGS_PF),  # dec al: 0x7e has six bits set
        ("f6d8", F, 0x81, RFLAGS_SF | RFLAGS_CF | RFLAGS_AF | RFLAGS_PF),  # neg al
        ("f6d0", F | RFLAGS_CF, 0x80, RFLAGS_CF),  # not al: no flags
    ],
)
def test_arithmetic_flags(code: str, rflags: int, rax: int, flags: int) -> None:
    _, outcome = execute(code, rflags=rflags, rax=0x7F)
    assert reg(outcome, "rax") == rax
    assert status(outcome) & ~outcome.undefined_flags == flags & ~outcome.undefined_flags


def test_logic_leaves_af_undefined_and_add_defines_it() -> None:
    _, outcome = execute("21c0")
    assert outcome.undefined_flags == RFLAGS_AF
    _, outcome = execute("21c0 01c0")
    assert outcome.undefined_flags == 0


def test_lock_add_to_memory() -> None:
    case, outcome = execute("f0480103", rax=1, data=b"\xff" * 8)  # lock add [rbx], rax
    assert linear_bytes(case, outcome, KERNEL_DATA, 8) == bytes(8)
    assert status(outcome) == RFLAGS_CF | RFLAGS_ZF | RFLAGS_PF | RFLAGS_AF


def test_lock_on_a_register_destination_is_ud() -> None:
    _, outcome = execute("f001c0")
    assert outcome.fault is not None and outcome.fault.vector == VEC_UD


ADD_CODES = {
    8: (Code.ADD_RM8_R8, Register.AL, Register.CL),
    16: (Code.ADD_RM16_R16, Register.AX, Register.CX),
    32: (Code.ADD_RM32_R32, Register.EAX, Register.ECX),
    64: (Code.ADD_RM64_R64, Register.RAX, Register.RCX),
}


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(ADD_CODES)), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
def test_add_executes_like_big_int_arithmetic(bits: int, a: int, b: int) -> None:
    code, destination, source = ADD_CODES[bits]
    case = make_case(
        [Instruction.create_reg_reg(code, destination, source)],
        regs={"rax": a, "rcx": b},
        cr4=CR4_PAE,
    )
    outcome = run(case)
    mask = (1 << bits) - 1
    total = (a & mask) + (b & mask)
    result = reg(outcome, "rax")
    kept = 0 if bits == 32 else a & ~mask
    assert result == kept | (total & mask)
    assert bool(status(outcome) & RFLAGS_CF) == (total > mask)
    sa, sb, sr = ((v >> (bits - 1)) & 1 for v in (a, b, total))
    assert bool(status(outcome) & RFLAGS_OF) == (sa == sb != sr)


# ---- bit tests -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "rcx", "cf", "byte_offset", "byte"),
    [
        ("0fa30b", 3, True, 0, 0x08),  # bt [rbx], ecx: bit 3 of byte 0
        ("0fab0b", 4, False, 0, 0x18),  # bts [rbx], ecx
        ("0fb30b", 3, True, 0, 0x00),  # btr [rbx], ecx
        ("0fbb0b", 35, False, 4, 0x08),  # btc [rbx], ecx: bit-string, dword at +4
        ("480fab0b", 64 + 7, False, 8, 0x80),  # bts [rbx], rcx: qword at +8
        ("0fab4b40", 0xFFFF_FFFF, False, 0x3F, 0x80),  # bts [rbx+0x40], ecx = -1: byte +0x3f
        ("0fba2b21", 0, False, 0, 0x0A),  # bts dword [rbx], 33: imm taken mod 32 -> bit 1
    ],
)
def test_bit_string_addressing(code: str, rcx: int, cf: bool, byte_offset: int, byte: int) -> None:
    case, outcome = execute(code, rcx=rcx, data=b"\x08")
    assert bool(reg(outcome, "rflags") & RFLAGS_CF) == cf
    assert linear_bytes(case, outcome, KERNEL_DATA + byte_offset, 1) == bytes([byte])
    assert outcome.undefined_flags == RFLAGS_OF | RFLAGS_SF | RFLAGS_AF | RFLAGS_PF


def test_bt_leaves_zf_alone() -> None:
    _, outcome = execute("0fa3c8", rflags=F | RFLAGS_ZF, rax=1, rcx=0)  # bt eax, ecx
    assert reg(outcome, "rflags") & (RFLAGS_ZF | RFLAGS_CF) == RFLAGS_ZF | RFLAGS_CF


# ---- stack and branches ----------------------------------------------------------------------


def test_push_pop_sizes() -> None:
    _, outcome = execute("50 6a80 6650 665a 5a 59", rax=0x1122_3344_5566_7788)
    assert reg(outcome, "rdx") == 0xFFFF_FFFF_FFFF_FF80  # push imm8 sign-extended to 64 bits
    assert reg(outcome, "rcx") == 0x1122_3344_5566_7788
    assert reg(outcome, "rsp") == STACK_TOP


def test_push_rsp_pushes_the_old_value_and_pop_rsp_loads() -> None:
    _, outcome = execute("54 5b 54 5c")  # push rsp; pop rbx; push rsp; pop rsp
    assert reg(outcome, "rbx") == STACK_TOP
    assert reg(outcome, "rsp") == STACK_TOP


def test_pop_to_rsp_based_memory_uses_the_incremented_rsp() -> None:
    case, outcome = execute("6a2a 8f0424", rax=0)  # push 42; pop [rsp]
    assert reg(outcome, "rsp") == STACK_TOP
    assert linear_bytes(case, outcome, STACK_TOP, 1) == b"\x2a"


def test_pushfq_popfq() -> None:
    flags = F | RFLAGS_CF | RFLAGS_AC
    _, outcome = execute("9c 58", rflags=flags)
    assert reg(outcome, "rax") == flags
    # CPL3 POPFQ keeps IF and IOPL, changes AC, DF and the status flags.
    start = F | RFLAGS_IF
    user_pages = [Page(0x70_0000, user=True)]
    popped = (RFLAGS_AC | RFLAGS_CF | RFLAGS_IOPL | RFLAGS_DF).to_bytes(4, "little").hex()
    code = "68" + popped + "9d"  # push imm32; popfq
    regs = {"rsp": 0x70_0800}
    case = make_case(code, cpl=3, regs=regs, pages=user_pages, rflags=start, cr4=CR4_PAE)
    outcome = run(case)
    assert reg(outcome, "rflags") == F | RFLAGS_IF | RFLAGS_AC | RFLAGS_CF | RFLAGS_DF


def test_popfq_setting_tf_is_unsupported() -> None:
    pages = [Page(KERNEL_STACK, user=False)]
    case = make_case("6800010000 9d", regs={"rsp": STACK_TOP}, pages=pages, cr4=CR4_PAE)
    outcome = run(case)  # push 0x100 (TF); popfq
    assert outcome.status is Status.UNSUPPORTED and "TF" in outcome.detail


@pytest.mark.parametrize("level", [0, 1, 3])
def test_enter_leave(level: int) -> None:
    code = "c81000" + f"{level:02x}" + "c9"
    rbp = STACK_TOP + 0x100
    case, outcome = execute(code[:-2], rbp=rbp)
    frame = STACK_TOP - 8
    assert reg(outcome, "rbp") == frame
    assert reg(outcome, "rsp") == frame - 8 * level - 0x10
    assert linear_bytes(case, outcome, frame, 8) == rbp.to_bytes(8, "little")
    if level:
        assert linear_bytes(case, outcome, frame - 8 * level, 8) == frame.to_bytes(8, "little")
    _, left = execute(code, rbp=rbp)
    assert (reg(left, "rsp"), reg(left, "rbp")) == (STACK_TOP, rbp)


def test_call_ret_jmp() -> None:
    # call +2 ; jmp +3 ; ret 8 ... : call skips the jmp, ret 8 returns to it and releases 8.
    case, outcome = execute("e802000000 eb03 c20800 90")
    assert reg(outcome, "rsp") == STACK_TOP + 8
    assert reg(outcome, "rip") == case.code_end


def test_indirect_call_through_memory() -> None:
    target = 0xFFFF_FFFF_8000_0000 + 5  # the last NOP
    _, outcome = execute("ff13 90 90 90 90", data=target.to_bytes(8, "little"))  # call [rbx]
    assert reg(outcome, "rsp") == STACK_TOP - 8
    assert outcome.instructions == 2


@pytest.mark.parametrize("code", ["ffe0", "ffd0", "c3"])
def test_non_canonical_branch_target_faults_at_the_branch(code: str) -> None:
    target = 0x0000_8000_0000_0000
    pushed = target.to_bytes(8, "little")
    pages = [Page(KERNEL_STACK, user=False, data=bytes(0x800) + pushed)]
    case = make_case(code, regs={"rax": target, "rsp": STACK_TOP}, pages=pages, cr4=CR4_PAE)
    outcome = run(case)
    assert outcome.fault is not None and outcome.fault.name == "#GP(0)"
    assert outcome.fault.rip == case.code_address
    assert reg(outcome, "rsp") == STACK_TOP


@pytest.mark.parametrize(("rflags", "taken"), [(F | RFLAGS_ZF, True), (F, False)])
def test_jcc(rflags: int, taken: bool) -> None:
    _, outcome = execute("7402 b001 90", rflags=rflags, rax=0)  # je +2; mov al, 1
    assert reg(outcome, "rax") == (0 if taken else 1)


def test_jcc_reading_undefined_flag_is_unsupported() -> None:
    outcome = run(make_case("21c0 0f9ac0", cr4=CR4_PAE))  # and; setp al (PF is defined)
    assert outcome.status is Status.COMPLETED
    outcome = run(make_case("0fa3c0 7000", cr4=CR4_PAE))  # bt eax, eax; jo
    assert outcome.status is Status.UNSUPPORTED and "OF" in outcome.detail


# ---- strings ---------------------------------------------------------------------------------


def test_rep_with_rcx_zero_does_nothing() -> None:
    _, outcome = execute("f3aa", rcx=0, rdi=0x1000, rax=0x55)  # rep stosb to unmapped
    assert outcome.status is Status.COMPLETED
    assert reg(outcome, "rdi") == 0x1000


@pytest.mark.parametrize(("df", "step"), [(0, 4), (RFLAGS_DF, -4)])
def test_stos_lods_direction(df: int, step: int) -> None:
    start = KERNEL_DATA + 0x100
    case, outcome = execute("f3ab", rflags=F | df, rcx=3, rdi=start, rax=0x1234_5678_9ABC_DEF0)
    assert reg(outcome, "rdi") == start + 3 * step
    assert linear_bytes(case, outcome, start, 4) == bytes.fromhex("f0debc9a")
    assert outcome.instructions == 3
    _, loaded = execute("48ad", rflags=F | df, rsi=KERNEL_DATA, data=bytes(range(8)))
    assert reg(loaded, "rax") == 0x0706_0504_0302_0100
    assert reg(loaded, "rsi") == KERNEL_DATA + 2 * step


@pytest.mark.parametrize(("prefix", "zf"), [("f3", False), ("f2", True)])
def test_repe_repne_cmps(prefix: str, zf: bool) -> None:
    data = b"abcdabxd" + b"abcdabcd"
    _, outcome = execute(prefix + "a6", rcx=8, rsi=KERNEL_DATA, rdi=KERNEL_DATA + 8, data=data)
    # REPE stops after the mismatch at index 6; REPNE stops after the first match at 0.
    assert reg(outcome, "rcx") == (1 if prefix == "f3" else 7)
    assert bool(reg(outcome, "rflags") & RFLAGS_ZF) == zf


def test_repne_scasb_finds_a_byte() -> None:
    _, outcome = execute("f2ae", rcx=16, rdi=KERNEL_DATA, rax=ord("x"), data=b"hello x")
    assert reg(outcome, "rdi") == KERNEL_DATA + 7
    assert reg(outcome, "rcx") == 16 - 7


# ---- flags and system ------------------------------------------------------------------------


def test_cld_std_stac_clac() -> None:
    _, outcome = execute("fd 0f01cb")
    assert reg(outcome, "rflags") & (RFLAGS_DF | RFLAGS_AC) == RFLAGS_DF | RFLAGS_AC
    _, outcome = execute("fc 0f01ca", rflags=F | RFLAGS_DF | RFLAGS_AC)
    assert reg(outcome, "rflags") & (RFLAGS_DF | RFLAGS_AC) == 0


@pytest.mark.parametrize(
    ("rax", "rcx", "expected"),
    [
        (0, 0, (7, 0x756E_6547, 0x6C65_746E, 0x4965_6E69)),
        (7, 0, (1, 1 << 7 | 1 << 20 | 1 << 23, 0, 0)),
        (7, 1, (1 << 6, 0, 0, 0)),
        (0xFFFF_FFFF_0000_0007, 1, (1 << 6, 0, 0, 0)),
        (1, 0, (0, 0, 0, 0)),
    ],
)
def test_cpuid(rax: int, rcx: int, expected: tuple[int, int, int, int]) -> None:
    _, outcome = execute("0fa2", rax=rax, rcx=rcx, rdx=-1 & (2**64 - 1))
    got = tuple(reg(outcome, name) for name in ("rax", "rbx", "rcx", "rdx"))
    assert got == expected


@pytest.mark.parametrize(
    ("code", "value", "fault"),
    [
        ("0f22c0", 0x8001_0033, None),  # mov cr0, rax: the same value
        ("0f22c0", 0x1_8001_0033, "#GP(0)"),  # bits 63:32
        ("0f22c0", 0x0001_0033, "#GP(0)"),  # PG = 0
        ("0f22c0", 0xA001_0033, "#GP(0)"),  # NW = 1, CD = 0
        ("0f22d8", 0x2000, None),  # mov cr3, rax
        ("0f22d8", 1 << 52, "#GP(0)"),
        ("0f22e0", CR4_PAE | CR4_SMAP, None),  # mov cr4, rax
        ("0f22e0", CR4_SMAP, "#GP(0)"),  # clearing PAE
        ("0f22e0", CR4_PAE | 1 << 11, "#GP(0)"),  # UMIP is not a lassfuzz CPU bit
    ],
)
def test_mov_to_control_registers(code: str, value: int, fault: str | None) -> None:
    _, outcome = execute(code, rax=value)
    if fault is None:
        assert outcome.status is Status.COMPLETED
        name = {"c0": "cr0", "d8": "cr3", "e0": "cr4"}[code[-2:]]
        assert reg(outcome, name) == value
    else:
        assert outcome.fault is not None and outcome.fault.name == fault


def test_mov_from_cr_and_privilege() -> None:
    _, outcome = execute("0f20e0", rax=0)
    assert reg(outcome, "rax") == CR4_PAE
    _, outcome = execute("0f20e0", cpl=3)
    assert outcome.fault is not None and outcome.fault.name == "#GP(0)"


def test_cr0_am_is_unsupported() -> None:
    outcome = run(make_case("0f22c0", regs={"rax": 0x8005_0033}, cr4=CR4_PAE))
    assert outcome.status is Status.UNSUPPORTED and "AM" in outcome.detail


def test_ud2() -> None:
    _, outcome = execute("0f0b")
    assert outcome.fault is not None and (outcome.fault.vector, outcome.fault.error_code) == (
        VEC_UD,
        None,
    )


def test_toggling_lass_changes_the_next_fetch() -> None:
    # CPL0 code in the user half: fine with LASS off; setting CR4.LASS blocks the next fetch.
    regs = {"rax": CR4_PAE | CR4_SMAP | CR4_LASS}
    case = make_case(
        "0f22e0 90", regs=regs, code_address=0x40_0000, cr4=CR4_PAE | CR4_SMAP, rflags=F | RFLAGS_AC
    )
    outcome = run(case)
    assert outcome.fault is not None and outcome.fault.name == "#GP(0)"
    assert outcome.fault.rip == 0x40_0003
    assert "rule 3" in outcome.detail


def test_enter_nested_reads_see_its_own_pushes() -> None:
    """With RBP = RSP, ENTER's first frame-pointer copy reads the RBP it has just pushed."""
    case, outcome = execute("c8000002", rbp=STACK_TOP)  # enter 0, 2
    assert linear_bytes(case, outcome, STACK_TOP - 16, 8) == STACK_TOP.to_bytes(8, "little")
    assert linear_bytes(case, outcome, STACK_TOP - 24, 8) == (STACK_TOP - 8).to_bytes(8, "little")
    assert [a.kind for a in outcome.trace or ()] == ["write", "read", "write", "write"]


@pytest.mark.parametrize(
    ("code", "cpl", "iopl", "if_after"),
    [("fa", 0, 0, 0), ("fb", 0, 0, 1), ("fb", 3, 3, 1), ("fa", 3, 0, None), ("fb", 1, 0, None)],
)
def test_cli_sti_need_cpl_at_most_iopl(
    code: str, cpl: int, iopl: int, if_after: int | None
) -> None:
    rflags = RFLAGS_FIXED1 | RFLAGS_IF | iopl << 12
    if code == "fb":
        rflags &= ~RFLAGS_IF
    outcome = run(make_case(code, cpl=cpl, rflags=rflags))
    if if_after is None:
        assert outcome.fault is not None and outcome.fault.name == "#GP(0)"
    else:
        assert outcome.status is Status.COMPLETED
        assert bool(reg(outcome, "rflags") & RFLAGS_IF) == bool(if_after)
