"""The run loop, bad input and the LASS known answers (LASS.md, docs/machine.md)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lassfuzz.arch import (
    CR0_AM,
    CR4_LA57,
    CR4_LASS,
    CR4_PAE,
    CR4_SMAP,
    MASK64,
    RFLAGS_AC,
    RFLAGS_DF,
    RFLAGS_FIXED1,
    RFLAGS_TF,
    VEC_GP,
    VEC_SS,
    VEC_UD,
)
from lassfuzz.case import DEFAULT_CR0, Page, materialize
from lassfuzz.model.engine import ReferenceModel
from lassfuzz.outcome import Status
from tests.model.builders import (
    KERNEL_DATA,
    KERNEL_STACK,
    LASS_CR4,
    USER_DATA,
    USER_STACK,
    leaf_entry,
    linear_bytes,
    make_case,
    reg,
    run,
)

SUPERVISOR_LOW = 0xFFFF_8000_0000_0000
TOP_PAGE = 0xFFFF_FFFF_FFFF_F000


def user_page(address: int = USER_DATA, data: bytes = b"") -> Page:
    return Page(address, user=True, data=data)


def kernel_page(address: int = KERNEL_DATA, data: bytes = b"") -> Page:
    return Page(address, user=False, data=data)


# ---- the run loop ------------------------------------------------------------------------------


def test_completes_at_code_end() -> None:
    case = make_case("4801d8", regs={"rax": 5, "rbx": 7})  # add rax, rbx
    outcome = run(case)
    assert outcome.status is Status.COMPLETED
    assert reg(outcome, "rax") == 12
    assert reg(outcome, "rip") == case.code_end
    assert outcome.instructions == 1
    assert outcome.engine == "model"


def test_hlt_halts_at_cpl0_with_rip_after_it() -> None:
    case = make_case("f4 90")
    outcome = run(case)
    assert outcome.status is Status.HALTED
    assert reg(outcome, "rip") == case.code_address + 1


def test_hlt_at_cpl3_is_gp() -> None:
    outcome = run(make_case("f4", cpl=3))
    assert outcome.fault is not None and outcome.fault.name == "#GP(0)"


def test_budget_gives_hang() -> None:
    outcome = run(make_case("ebfe"), max_instructions=50)  # jmp $
    assert outcome.status is Status.HANG
    assert outcome.instructions == 50


def test_memory_covers_every_frame_of_the_image() -> None:
    case = make_case("90", pages=[kernel_page()])
    assert set(run(case).memory) == set(materialize(case).frames)


@pytest.mark.parametrize(
    ("code", "name"),
    [("c5f858c1", "vaddps"), ("0f31", "rdtsc"), ("0f1f08", "nop"), ("ff18", "call")],
)
def test_unsupported_instruction_is_named(code: str, name: str) -> None:
    case = make_case("90" + code)
    outcome = run(case)
    assert outcome.status is Status.UNSUPPORTED
    assert name in outcome.detail
    assert bytes.fromhex(code).hex(" ") in outcome.detail
    assert f"{case.code_address + 1:#x}" in outcome.detail


@pytest.mark.parametrize(
    ("state", "words"),
    [
        ({"cr0": DEFAULT_CR0 | CR0_AM}, "AM"),
        ({"cr4": CR4_PAE | 1 << 11}, "CR4"),  # UMIP
        ({"cr4": CR4_PAE | CR4_LASS, "lass_supported": False}, "CR4"),
        ({"rflags": RFLAGS_FIXED1 | RFLAGS_TF}, "TF"),
        ({"rflags": 0}, "reserved"),
        ({"efer": 0}, "EFER"),
        ({"fs_base": 0x0000_8000_0000_0000}, "fs_base"),
    ],
)
def test_malformed_state_is_unsupported(state: dict[str, Any], words: str) -> None:
    case = make_case("90")
    outcome = run(replace(case, state=replace(case.state, **state)))
    assert outcome.status is Status.UNSUPPORTED
    assert words in outcome.detail
    assert outcome.registers is None


def test_reading_an_undefined_flag_is_unsupported() -> None:
    # and eax, eax leaves AF undefined; pushfq reads it.
    outcome = run(
        make_case("21c0 9c", regs={"rsp": KERNEL_STACK + 0x800}, pages=[kernel_page(KERNEL_STACK)])
    )
    assert outcome.status is Status.UNSUPPORTED
    assert "undefined flag(s) AF" in outcome.detail


def test_undefined_flags_are_reported() -> None:
    outcome = run(make_case("21c0 74 00"))  # and eax, eax; jz (reads ZF only)
    assert outcome.status is Status.COMPLETED
    assert outcome.undefined_flags == 0x10  # AF


def test_a_faulting_instruction_has_no_effect() -> None:
    # mov [rbx], rax (ok); add [rbx+0x1000], rax (unmapped): precise #PF.
    case = make_case(
        "488903 48018300100000", regs={"rax": 0x55, "rbx": KERNEL_DATA}, pages=[kernel_page()]
    )
    outcome = run(case)
    assert outcome.fault is not None and outcome.fault.vector == 14
    assert reg(outcome, "rip") == case.code_address + 3
    assert [(a.kind, a.address) for a in outcome.trace or ()] == [("write", KERNEL_DATA)]
    assert linear_bytes(case, outcome, KERNEL_DATA, 1) == b"\x55"
    assert outcome.instructions == 1


def test_plans_are_reused_across_cases_at_other_addresses() -> None:
    """Decode results are cached by bytes; RIP-relative operands must still follow RIP."""
    model = ReferenceModel()
    code = "488b05f90f0000"  # mov rax, [rip + 0xff9]  -> the page after the code
    for address in (0xFFFF_FFFF_8000_0000, 0xFFFF_FFFF_8123_4000):
        case = make_case(
            code,
            code_address=address,
            pages=[kernel_page(address + 0x1000, data=address.to_bytes(8, "little"))],
        )
        assert reg(model.run(case), "rax") == address


# ---- LASS known answers ----------------------------------------------------------------------


@pytest.mark.parametrize("code", ["488b00", "488900"])  # mov rax, [rax] / mov [rax], rax
def test_kselftest_user_access_to_kernel_half(code: str) -> None:
    case = make_case(code, cpl=3, regs={"rax": SUPERVISOR_LOW}, pages=[kernel_page(SUPERVISOR_LOW)])
    outcome = run(case)
    assert outcome.fault is not None
    assert (outcome.fault.vector, outcome.fault.error_code, outcome.fault.rip) == (
        VEC_GP,
        0,
        case.code_address,
    )
    assert outcome.fault.cr2 is None
    assert "rule 1" in outcome.detail
    assert outcome.trace == ()


def test_user_call_into_kernel_half_faults_at_the_target_after_the_push() -> None:
    case = make_case(
        "ffd0",
        cpl=3,
        regs={"rax": SUPERVISOR_LOW, "rsp": USER_STACK + 0x800},
        pages=[user_page(USER_STACK)],
    )
    outcome = run(case)
    assert outcome.fault is not None and outcome.fault.name == "#GP(0)"
    assert outcome.fault.rip == SUPERVISOR_LOW == reg(outcome, "rip")
    assert outcome.fault.access == "fetch"
    assert reg(outcome, "rsp") == USER_STACK + 0x7F8
    return_address = (case.code_address + 2).to_bytes(8, "little")
    assert linear_bytes(case, outcome, USER_STACK + 0x7F8, 8) == return_address
    assert "rule 2" in outcome.detail


@pytest.mark.parametrize("address", range(0xFFFF_FFFF_FFFF_FFF9, 1 << 64))
def test_supervisor_read_wrapping_into_page_zero(address: int) -> None:
    pages = [kernel_page(TOP_PAGE, data=b"\x11" * 4096), user_page(0, data=b"\x22" * 8)]
    case = make_case("488b00", regs={"rax": address}, pages=pages)
    outcome = run(case)
    assert outcome.fault is not None and outcome.fault.name == "#GP(0)"
    assert outcome.fault.address == 0  # the first user-half byte
    assert "rule 4" in outcome.detail
    # AC = 1 lifts it: the read wraps and combines both pages.
    lifted = run(
        make_case("488b00", regs={"rax": address}, pages=pages, rflags=RFLAGS_FIXED1 | RFLAGS_AC)
    )
    high = (1 << 64) - address
    assert reg(lifted, "rax") == int.from_bytes(b"\x11" * high + b"\x22" * (8 - high), "little")


def test_rep_movsb_up_into_the_user_half_at_cpl0() -> None:
    pages = [kernel_page(TOP_PAGE), user_page(0), kernel_page(data=b"abcdef")]
    regs = {"rsi": KERNEL_DATA, "rdi": MASK64 - 2, "rcx": 6}
    case = make_case("f3a4", regs=regs, pages=pages)
    outcome = run(case)
    assert outcome.fault is not None and outcome.fault.name == "#GP(0)"
    assert (reg(outcome, "rcx"), reg(outcome, "rsi"), reg(outcome, "rdi")) == (
        3,
        KERNEL_DATA + 3,
        0,
    )
    assert linear_bytes(case, outcome, MASK64 - 2, 3) == b"abc"
    assert outcome.instructions == 3
    assert [a.kind for a in outcome.trace or ()] == ["read", "write"] * 3


def test_rep_movsb_down_into_the_kernel_half_at_cpl3() -> None:
    pages = [user_page(0), kernel_page(TOP_PAGE), user_page(data=b"abcdef")]
    regs = {"rsi": USER_DATA + 5, "rdi": 2, "rcx": 5}
    case = make_case("f3a4", cpl=3, regs=regs, pages=pages, rflags=RFLAGS_FIXED1 | RFLAGS_DF)
    outcome = run(case)
    assert outcome.fault is not None and outcome.fault.name == "#GP(0)"
    assert (reg(outcome, "rcx"), reg(outcome, "rsi"), reg(outcome, "rdi")) == (
        2,
        USER_DATA + 2,
        MASK64,
    )
    assert linear_bytes(case, outcome, 0, 3) == b"def"  # f to 2, e to 1, d to 0


@pytest.mark.parametrize(
    ("code", "vector"),
    [
        ("488b0424", VEC_SS),  # mov rax, [rsp]
        ("488b4508", VEC_SS),  # mov rax, [rbp+8]
        ("36488b03", VEC_SS),  # mov rax, ss:[rbx]
        ("64488b0424", VEC_GP),  # mov rax, fs:[rsp]
        ("65488b4508", VEC_GP),  # mov rax, gs:[rbp+8]
        ("488b03", VEC_GP),  # mov rax, [rbx]
        ("50", VEC_SS),  # push rax
        ("c3", VEC_SS),  # ret
        ("c9", VEC_SS),  # leave
        ("0fae3c24", VEC_SS),  # clflush [rsp]
        ("36a4", VEC_SS),  # movsb with an ss: source
        ("a4", VEC_GP),  # movsb (es:rdi destination)
    ],
)
def test_ss_versus_gp(code: str, vector: int) -> None:
    kernel = KERNEL_DATA + 0x800
    regs = dict.fromkeys(("rsp", "rbp", "rbx", "rsi", "rdi"), kernel)
    outcome = run(make_case(code, cpl=3, regs=regs, pages=[kernel_page()]))
    assert outcome.fault is not None
    assert (outcome.fault.vector, outcome.fault.error_code) == (vector, 0)


@pytest.mark.parametrize("code", ["0f1800", "0f1808", "0f0d08"])  # prefetchnta/t0/w [rax]
@pytest.mark.parametrize("address", [SUPERVISOR_LOW, 0x0000_8000_0000_0000, USER_DATA])
def test_prefetch_never_faults(code: str, address: int) -> None:
    outcome = run(make_case(code, cpl=3, regs={"rax": address}))
    assert outcome.status is Status.COMPLETED
    assert outcome.trace == ()


def test_clflush_is_checked_like_a_read_and_not_traced() -> None:
    blocked = run(make_case("0fae38", cpl=3, regs={"rax": KERNEL_DATA}, pages=[kernel_page()]))
    assert blocked.fault is not None and blocked.fault.name == "#GP(0)"
    unmapped = run(make_case("0fae38", cpl=3, regs={"rax": USER_DATA}))
    assert unmapped.fault is not None and unmapped.fault.name == "#PF(0x4)"
    fine = run(make_case("660fae38", cpl=3, regs={"rax": USER_DATA}, pages=[user_page()]))
    assert fine.status is Status.COMPLETED and fine.trace == ()


def test_invlpg_address_is_exempt() -> None:
    outcome = run(make_case("0f0138", regs={"rax": USER_DATA}))  # SMAP=1, AC=0, unmapped
    assert outcome.status is Status.COMPLETED
    user = run(make_case("0f0138", cpl=3, regs={"rax": USER_DATA}))
    assert user.fault is not None and user.fault.name == "#GP(0)"


def test_lass_violation_on_unmapped_page_is_gp_and_walks_nothing() -> None:
    case = make_case("488b00", cpl=3, regs={"rax": KERNEL_DATA + 0x1000}, pages=[kernel_page()])
    outcome = run(case)
    assert outcome.fault is not None and outcome.fault.name == "#GP(0)"
    image = materialize(case)
    code_page = case.code_address
    for frame, data in outcome.memory.items():
        if frame in image.table_frames:
            # Only the fetch walk of the code page may have set Accessed bits.
            before = image.frames[frame]
            changed = [i for i in range(0, 4096, 8) if data[i : i + 8] != before[i : i + 8]]
            for offset in changed:
                assert int.from_bytes(
                    data[offset : offset + 8], "little"
                ) & ~0x20 == int.from_bytes(before[offset : offset + 8], "little")
    assert leaf_entry(case, outcome.memory, KERNEL_DATA) & 0x60 == 0
    assert leaf_entry(case, outcome.memory, code_page) & 0x20


@pytest.mark.parametrize("supported", [False, True])
def test_mov_cr4_lass_bit_needs_enumeration(supported: bool) -> None:
    regs = {"rax": CR4_PAE | CR4_SMAP | CR4_LASS}
    outcome = run(make_case("0f22e0", regs=regs, cr4=CR4_PAE | CR4_SMAP, lass_supported=supported))
    if supported:
        assert outcome.status is Status.COMPLETED
        assert reg(outcome, "cr4") == CR4_PAE | CR4_SMAP | CR4_LASS
    else:
        assert outcome.fault is not None and outcome.fault.name == "#GP(0)"
        assert reg(outcome, "cr4") == CR4_PAE | CR4_SMAP


def test_fetch_wrapping_past_2_64_tolerates_both_rips() -> None:
    address = MASK64 - 1  # a 3-byte instruction: two bytes at the top, one at 0
    case = make_case("4889c0", code_address=address)
    outcome = run(case)
    assert outcome.fault is not None and outcome.fault.name == "#GP(0)"
    assert outcome.fault.rip == address
    assert [alt.fault.rip for alt in outcome.alternatives if alt.fault] == [0]
    without_lass = run(make_case("4889c0", code_address=address, cr4=CR4_PAE))
    assert without_lass.status is Status.COMPLETED and without_lass.alternatives == ()


def test_stac_lifts_smap_and_lass_for_explicit_accesses() -> None:
    pages = [user_page(data=b"\x2a")]
    blocked = run(make_case("8a00", regs={"rax": USER_DATA}, pages=pages))
    assert blocked.fault is not None and blocked.fault.name == "#GP(0)"
    allowed = run(make_case("0f01cb 8a00 0f01ca", regs={"rax": USER_DATA}, pages=pages))
    assert allowed.status is Status.COMPLETED
    assert reg(allowed, "rax") & 0xFF == 0x2A
    assert not reg(allowed, "rflags") & RFLAGS_AC
    user = run(make_case("0f01cb", cpl=3))
    assert user.fault is not None and user.fault.vector == VEC_UD


# ---- CPL 1 and 2, LA57 (docs/machine.md "Modes, CPLs, LA57") --------------------------------


@pytest.mark.parametrize("cpl", [1, 2])
def test_cpl1_and_cpl2_are_supervisor_for_lass(cpl: int) -> None:
    read_user = make_case("8b03", cpl=cpl, regs={"rbx": USER_DATA}, pages=[user_page()])
    outcome = run(read_user)
    assert outcome.fault is not None and outcome.fault.name == "#GP(0)"
    assert "rule 4" in outcome.detail
    lifted = run(
        replace(read_user, state=replace(read_user.state, rflags=RFLAGS_FIXED1 | RFLAGS_AC))
    )
    assert lifted.status is Status.COMPLETED
    # Paging treats CPL 1/2 as supervisor too: a supervisor page is readable.
    kernel = run(make_case("8b03", cpl=cpl, regs={"rbx": KERNEL_DATA}, pages=[kernel_page()]))
    assert kernel.status is Status.COMPLETED


@pytest.mark.parametrize(
    ("code", "vector"),
    [("0f01cb", VEC_UD), ("0f01ca", VEC_UD), ("0f20e0", VEC_GP), ("f4", VEC_GP)],
    ids=["stac", "clac", "mov-from-cr4", "hlt"],
)
@pytest.mark.parametrize("cpl", [1, 2])
def test_privileged_instructions_at_cpl1_and_cpl2(code: str, vector: int, cpl: int) -> None:
    outcome = run(make_case(code, cpl=cpl))
    assert outcome.fault is not None and outcome.fault.vector == vector


@pytest.mark.parametrize("cpl", [1, 2])
def test_popf_at_cpl1_and_cpl2_keeps_iopl(cpl: int) -> None:
    stack = KERNEL_STACK + 0x800
    image = (RFLAGS_FIXED1 | 0x3000 | RFLAGS_AC).to_bytes(8, "little")  # IOPL 3, AC
    case = make_case(
        "9d", cpl=cpl, regs={"rsp": stack}, pages=[kernel_page(KERNEL_STACK, bytes(0x800) + image)]
    )
    outcome = run(case)
    assert reg(outcome, "rflags") == RFLAGS_FIXED1 | RFLAGS_AC


LA57_CR4 = CR4_PAE | CR4_LA57 | CR4_SMAP | CR4_LASS
#: Canonical only with 5-level paging.
HIGH57 = 0xFF00_0000_0000_0000
LOW57 = 0x0080_0000_0000_0000


def test_la57_runs_code_and_data_beyond_48_bits() -> None:
    case = make_case(
        "8b03", regs={"rbx": HIGH57}, cr4=LA57_CR4, code_address=HIGH57 + 0x1000,
        pages=[kernel_page(HIGH57, (0x1234).to_bytes(4, "little"))],
    )  # fmt: skip
    outcome = run(case)
    assert outcome.status is Status.COMPLETED, outcome.detail
    assert reg(outcome, "rax") == 0x1234


@pytest.mark.parametrize(("cr4", "name"), [(LASS_CR4, "#GP(0)"), (LA57_CR4, "#PF(0x0)")])
def test_canonical_boundary_moves_with_la57(cr4: int, name: str) -> None:
    # A CPL0 read of an unmapped 57-bit user-half address with SMAP off: non-canonical with
    # 4-level paging, a plain #PF with 5-level paging (LASS does not change: bit 63 = 0).
    outcome = run(make_case("8b03", regs={"rbx": LOW57}, cr4=cr4 & ~CR4_SMAP))
    assert outcome.fault is not None and outcome.fault.name == name


def test_la57_lass_still_splits_at_bit_63() -> None:
    outcome = run(make_case("8b03", cpl=3, regs={"rbx": HIGH57}, cr4=LA57_CR4))
    assert outcome.fault is not None and outcome.fault.name == "#GP(0)"
    assert "rule 1" in outcome.detail


@pytest.mark.parametrize("la57", [False, True])
def test_mov_cr4_changing_la57_is_gp(la57: bool) -> None:
    cr4 = LA57_CR4 if la57 else LASS_CR4
    case = make_case("0f22e0", regs={"rax": cr4 ^ CR4_LA57}, cr4=cr4)  # mov cr4, rax
    outcome = run(case)
    assert outcome.fault is not None and outcome.fault.name == "#GP(0)"
    assert reg(outcome, "cr4") == cr4


# ---- compatibility mode (docs/machine.md "Modes, CPLs, LA57") ---------------------------------

COMPAT_DATA = 0x0060_0000
COMPAT_STACK = 0x0070_0000


def test_compat_mode_decodes_32_bit_code_with_4_byte_stack() -> None:
    # inc eax (40); push eax; call +0; pop ecx; pop edx; push 0x11223344; ret (pops 4 bytes)
    code = "40 50 e800000000 59 5a 6844332211 c3"
    regs = {"rax": 0xFFFF_FFFF_0000_0001, "rsp": COMPAT_STACK + 0x100}
    case = make_case(code, cpl=3, mode="compat", regs=regs, pages=[user_page(COMPAT_STACK)])
    outcome = run(case)
    assert outcome.status is Status.FAULT  # ret to 0x11223344: unmapped
    assert outcome.fault is not None and outcome.fault.name == "#PF(0x14)"
    assert reg(outcome, "rip") == 0x11223344
    assert reg(outcome, "rax") == 2  # a 32-bit write zero-extends
    assert reg(outcome, "rcx") == case.code_address + 7  # the return address, 4 bytes
    assert reg(outcome, "rdx") == 2
    assert reg(outcome, "rsp") == COMPAT_STACK + 0x100
    assert [(a.kind, a.size) for a in outcome.trace or ()][:2] == [("write", 4), ("write", 4)]


def test_compat_mode_addresses_wrap_at_4_gib() -> None:
    # mov eax, [ebx + 0x10] with EBX = 0xFFFFFFF8: the offset wraps to 8.
    case = make_case(
        "8b4310", cpl=3, mode="compat", regs={"rbx": 0xFFFF_FFF8},
        pages=[user_page(0, bytes(8) + (0x55).to_bytes(4, "little"))],
    )  # fmt: skip
    outcome = run(case)
    assert outcome.status is Status.COMPLETED, outcome.detail
    assert reg(outcome, "rax") == 0x55


@pytest.mark.parametrize("cpl", [0, 1, 2])
def test_compat_mode_supervisor_fetch_faults_with_lass_on(cpl: int) -> None:
    case = make_case("90", cpl=cpl, mode="compat")
    outcome = run(case)
    assert outcome.status is Status.FAULT
    assert outcome.fault is not None and outcome.fault.name == "#GP(0)"
    assert outcome.fault.rip == case.code_address
    assert "rule 3" in outcome.detail
    lass_off = run(make_case("90", cpl=cpl, mode="compat", cr4=CR4_PAE | CR4_SMAP))
    assert lass_off.status is Status.COMPLETED


def test_turning_lass_on_while_running_user_half_code_at_cpl0_faults_the_next_fetch() -> None:
    # mov cr4, rax (LASS on) at CPL0 in the user half: the MOV completes, the next fetch is a
    # supervisor fetch from the user half (LASS.md §8 item 7).
    code_address = 0x0000_0000_0040_0000
    case = make_case(
        "0f22e0 90", regs={"rax": LASS_CR4}, cr4=LASS_CR4 & ~CR4_LASS, code_address=code_address,
        pages=[Page(code_address, user=False, writable=False)],
    )  # fmt: skip
    outcome = run(case)
    assert outcome.fault is not None and outcome.fault.name == "#GP(0)"
    assert outcome.fault.rip == code_address + 3
    assert reg(outcome, "cr4") == LASS_CR4
    assert "rule 3" in outcome.detail


def test_compat_mode_rep_movsd_uses_esi_edi_ecx() -> None:
    source = bytes(range(16))
    case = make_case(
        "f3a5", cpl=3, mode="compat",
        regs={"rsi": COMPAT_DATA, "rdi": COMPAT_DATA + 0x100, "rcx": 0xFFFF_FFFF_0000_0002},
        pages=[user_page(COMPAT_DATA, source)],
    )  # fmt: skip
    outcome = run(case)
    assert outcome.status is Status.COMPLETED, outcome.detail
    assert linear_bytes(case, outcome, COMPAT_DATA + 0x100, 8) == source[:8]
    assert (reg(outcome, "rcx"), reg(outcome, "rsi")) == (0, COMPAT_DATA + 8)


def test_address_size_prefix_in_64_bit_mode_uses_esi_and_edi() -> None:
    # 67 a4 (movsb with 32-bit addresses): RSI's upper half is ignored and cleared.
    case = make_case(
        "67a4", cpl=3, regs={"rsi": 0x1234_5678_0000_0000 | USER_DATA, "rdi": USER_DATA + 1},
        pages=[user_page(USER_DATA, b"\x5a")],
    )  # fmt: skip
    outcome = run(case)
    assert outcome.status is Status.COMPLETED, outcome.detail
    assert linear_bytes(case, outcome, USER_DATA + 1, 1) == b"\x5a"
    assert reg(outcome, "rsi") == USER_DATA + 1


def test_compat_mode_enter_and_leave_use_4_byte_frames() -> None:
    # enter 8, 1 ; leave
    case = make_case(
        "c8080001 c9", cpl=3, mode="compat", regs={"rsp": COMPAT_STACK + 0x100, "rbp": 0x1111},
        pages=[user_page(COMPAT_STACK)],
    )  # fmt: skip
    outcome = run(case)
    assert outcome.status is Status.COMPLETED, outcome.detail
    assert (reg(outcome, "rsp"), reg(outcome, "rbp")) == (COMPAT_STACK + 0x100, 0x1111)
    writes = [(a.address, a.size) for a in outcome.trace or () if a.kind == "write"]
    assert writes == [(COMPAT_STACK + 0xFC, 4), (COMPAT_STACK + 0xF8, 4)]


# ---- mode and CPL properties ------------------------------------------------------------------

ADDRESS_32 = st.integers(0, 0xFFFF_FFFF)


@settings(max_examples=40, deadline=None)
@given(
    mode=st.sampled_from(["64", "compat"]),
    cpl=st.integers(0, 3),
    address=st.one_of(ADDRESS_32, st.sampled_from([0xFFFF_8880_0000_0000, 0xFFFF_FFFF_FFFF_FFF8])),
    smap=st.booleans(),
    ac=st.booleans(),
    user_page=st.booleans(),
)
def test_lass_off_never_raises_a_lass_fault(
    mode: str, cpl: int, address: int, smap: bool, ac: bool, user_page: bool
) -> None:
    page = Page(address & ~0xFFF, user=user_page)
    case = make_case(
        "8b03", cpl=cpl, mode=mode, regs={"rbx": address}, cr4=CR4_PAE | (CR4_SMAP if smap else 0),
        rflags=RFLAGS_FIXED1 | (RFLAGS_AC if ac else 0),
        pages=[page] if address >> 12 != 0x400 else [],
    )  # fmt: skip
    outcome = run(case)
    assert "LASS.md §3" not in outcome.detail


@settings(max_examples=40, deadline=None)
@given(address=ADDRESS_32, write=st.booleans())
def test_compat_cpl3_explicit_accesses_never_violate(address: int, write: bool) -> None:
    # In compatibility mode bit 63 is 0: a CPL3 data access is in the user half wherever it
    # goes, so turning LASS on changes nothing.
    code = "8903" if write else "8b03"
    pages = [Page(address & ~0xFFF, user=True)] if address >> 12 != 0x400 else []
    outcomes = [
        run(make_case(code, cpl=3, mode="compat", regs={"rbx": address}, pages=pages, cr4=cr4))
        for cr4 in (CR4_PAE | CR4_SMAP, CR4_PAE | CR4_SMAP | CR4_LASS)
    ]
    first, second = outcomes
    assert first.status is second.status
    assert first.fault == second.fault
    assert first.registers is not None and second.registers is not None
    assert replace(first.registers, cr4=0) == replace(second.registers, cr4=0)
