"""MOV/POP Sreg, LAR/LSL/VERR/VERW, descriptor-table registers, IRETQ and SYSCALL/SYSRET
(docs/machine.md "Descriptor tables", "Event delivery")."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest

from lassfuzz.arch import CR4_LASS, EFER_SCE, RFLAGS_AC, RFLAGS_FIXED1, RFLAGS_IF, RFLAGS_ZF
from lassfuzz.case import DEFAULT_CODE_ADDRESS, Page, TestCase, materialize
from lassfuzz.outcome import Outcome, Status
from lassfuzz.system import (
    GDT_LIMIT,
    KERNEL_CS,
    KERNEL_DS,
    RING1_DS,
    RING2_CS32,
    RING2_DS,
    TSS_SEL,
    TYPE_CALL_GATE,
    USER_CS,
    USER_CS32,
    USER_DS,
    gate,
    segment_descriptor,
)
from tests.model.builders import make_case, reg, run
from tests.model.system_builders import (
    HANDLER,
    KERNEL_STACK,
    RSP0,
    SUPERVISOR,
    USER_STACK,
    patched,
    system_case,
)

GDT = SUPERVISOR["gdt"]
USER_RSP = USER_STACK + 0x800
KERNEL_RSP = KERNEL_STACK + 0x800
DATA = 0x0000_0000_0060_0000


def selectors(outcome: Outcome) -> dict[str, int]:
    assert outcome.registers is not None and outcome.registers.system is not None
    return outcome.registers.system.as_dict()


def first_event(outcome: Outcome) -> str:
    return outcome.events[0].name if outcome.events else "none"


def implicit_trace(outcome: Outcome) -> list[tuple[str, int, int]]:
    return [(a.kind, a.address, a.size) for a in outcome.trace or () if a.implicit]


# ---- MOV / POP Sreg -----------------------------------------------------------------------------


def test_mov_fs_at_cpl3_reads_the_descriptor_implicitly_and_sets_the_base() -> None:
    outcome = run(system_case("8ee0", cpl=3, regs={"rax": USER_DS | 3}))
    assert outcome.status is Status.COMPLETED, outcome.detail
    assert selectors(outcome)["fs"] == USER_DS | 3
    assert reg(outcome, "fs_base") == 0
    assert implicit_trace(outcome) == [("read", GDT + USER_DS, 8)]


def test_loading_a_segment_sets_its_accessed_bit_by_an_implicit_write() -> None:
    descriptor = segment_descriptor(code=False, dpl=0, accessed=False)
    case = patched(system_case("8ed8", regs={"rax": KERNEL_DS}), GDT + KERNEL_DS,
                   struct.pack("<Q", descriptor))  # fmt: skip
    outcome = run(case)
    assert outcome.status is Status.COMPLETED, outcome.detail
    assert implicit_trace(outcome) == [("read", GDT + KERNEL_DS, 8), ("write", GDT + 0x15, 1)]
    frame = materialize(case).page_frames[GDT]
    assert outcome.memory[frame][KERNEL_DS + 5] == (descriptor >> 40) & 0xFF | 1


@pytest.mark.parametrize(
    ("code", "cpl", "selector", "event"),
    [
        ("8ed8", 3, KERNEL_DS, f"#GP({KERNEL_DS})"),  # DPL 0 < CPL 3
        ("8ed8", 0, 0x78, "#GP(120)"),  # beyond the GDT limit
        ("8ed0", 0, USER_DS | 3, f"#GP({USER_DS})"),  # SS: RPL != CPL
        ("8ed0", 3, 0, "#GP(0)"),  # null SS at CPL3
        ("8ed8", 0, TSS_SEL, f"#GP({TSS_SEL})"),  # a system descriptor
    ],
)
def test_segment_load_checks(code: str, cpl: int, selector: int, event: str) -> None:
    rsp = USER_RSP if cpl == 3 else KERNEL_RSP
    outcome = run(system_case(code, cpl=cpl, regs={"rax": selector, "rsp": rsp}))
    assert first_event(outcome) == event


@pytest.mark.parametrize("user_gdt", [False, True])
def test_compat_mode_descriptor_reads_keep_bit_63(user_gdt: bool) -> None:
    # Descriptor-table addresses are 64-bit even in compatibility mode: a supervisor-half GDT
    # is allowed under SMAP, a user-half one violates (rule 7), whatever AC.
    tables = ["gdt"] if user_gdt else []
    case = system_case("8ed8", cpl=3, mode="compat", user_tables=tables,
                       regs={"rax": USER_DS | 3, "rsp": 0x70_0800},
                       rflags=RFLAGS_FIXED1 | RFLAGS_AC)  # fmt: skip
    outcome = run(case)
    if user_gdt:
        assert first_event(outcome) == "#GP(0)" and "rule 7" in outcome.detail
    else:
        assert outcome.status is Status.COMPLETED, outcome.detail
        assert implicit_trace(outcome) == [("read", GDT + USER_DS, 8)]


def test_not_present_data_segment_is_np() -> None:
    absent = segment_descriptor(code=False, dpl=1, present=False)
    case = patched(system_case("8ed8", regs={"rax": RING1_DS, "rsp": KERNEL_RSP}),
                   GDT + RING1_DS, struct.pack("<Q", absent))  # fmt: skip
    assert first_event(run(case)) == f"#NP({RING1_DS})"


@pytest.mark.parametrize("code", ["8ed8", "8ed0"], ids=["ds", "ss"])
def test_null_selector_loads_in_64_bit_mode_at_cpl0(code: str) -> None:
    outcome = run(system_case(code, regs={"rax": 0}))
    assert outcome.status is Status.COMPLETED, outcome.detail
    assert selectors(outcome)["ds" if code == "8ed8" else "ss"] == 0
    assert implicit_trace(outcome) == []


def test_pop_gs_pops_8_bytes_and_loads_the_low_16_bits() -> None:
    case = system_case(
        "0fa9", cpl=3, regs={"rsp": USER_RSP},
        pages=[Page(USER_STACK, user=True, data=bytes(0x800) + struct.pack("<Q", USER_DS | 3))],
    )  # fmt: skip
    outcome = run(case)
    assert outcome.status is Status.COMPLETED, outcome.detail
    assert selectors(outcome)["gs"] == USER_DS | 3
    assert reg(outcome, "rsp") == USER_RSP + 8


def test_mov_from_sreg_is_a_register_move() -> None:
    outcome = run(system_case("8cd8", cpl=3, regs={"rax": 0xFFFF_FFFF_FFFF_FFFF}))  # mov eax, ds
    assert reg(outcome, "rax") == USER_DS | 3
    assert outcome.trace == ()


def test_push_sreg_is_unsupported() -> None:
    outcome = run(system_case("0fa0", regs={"rsp": KERNEL_RSP}))  # push fs
    assert outcome.status is Status.UNSUPPORTED
    assert "PUSH Sreg" in outcome.detail


def test_segment_instructions_need_descriptor_tables() -> None:
    outcome = run(make_case("8ed8"))
    assert outcome.status is Status.UNSUPPORTED
    assert "State.system" in outcome.detail


# ---- LAR, LSL, VERR, VERW -------------------------------------------------------------------


def test_lar_reports_access_rights_and_sets_zf() -> None:
    outcome = run(system_case("0f02c1", cpl=3, regs={"rcx": USER_CS | 3}))  # lar eax, ecx
    expected = (segment_descriptor(code=True, dpl=3, long=True) >> 32) & 0x00F0_FF00
    assert reg(outcome, "rax") == expected
    assert reg(outcome, "rflags") & RFLAGS_ZF
    assert implicit_trace(outcome) == [("read", GDT + USER_CS, 8)]


@pytest.mark.parametrize(
    ("selector", "reads"),
    [(KERNEL_CS, [("read", GDT + KERNEL_CS, 8)]), (0x78, []), (0, [])],
    ids=["dpl", "limit", "null"],
)
def test_lar_fails_quietly(selector: int, reads: list[tuple[str, int, int]]) -> None:
    outcome = run(system_case("0f02c1", cpl=3, regs={"rcx": selector, "rax": 7}))
    assert outcome.status is Status.COMPLETED
    assert reg(outcome, "rax") == 7
    assert not reg(outcome, "rflags") & RFLAGS_ZF
    assert implicit_trace(outcome) == reads


def test_lar_of_a_tss_reads_16_bytes() -> None:
    outcome = run(system_case("0f02c1", regs={"rcx": TSS_SEL}))
    assert reg(outcome, "rflags") & RFLAGS_ZF
    assert implicit_trace(outcome) == [("read", GDT + TSS_SEL, 8), ("read", GDT + TSS_SEL + 8, 8)]


def test_lsl_reports_the_scaled_limit() -> None:
    outcome = run(system_case("0f03c1", cpl=3, regs={"rcx": USER_DS | 3}))  # lsl eax, ecx
    assert reg(outcome, "rax") == 0xFFFF_FFFF
    assert reg(outcome, "rflags") & RFLAGS_ZF


@pytest.mark.parametrize(
    ("code", "cpl", "selector", "zf"),
    [
        ("0f00e0", 0, KERNEL_CS, True),  # verr: readable code
        ("0f00e8", 0, KERNEL_CS, False),  # verw: code is not writable
        ("0f00e8", 3, USER_DS | 3, True),
        ("0f00e0", 3, KERNEL_DS, False),  # DPL 0 < CPL 3
        ("0f00e0", 0, TSS_SEL, False),  # system descriptor
    ],
)
def test_verr_verw(code: str, cpl: int, selector: int, zf: bool) -> None:
    outcome = run(system_case(code, cpl=cpl, regs={"rax": selector}))
    assert outcome.status is Status.COMPLETED
    assert bool(reg(outcome, "rflags") & RFLAGS_ZF) is zf


def test_lar_with_a_user_half_gdt_and_ac_still_violates() -> None:
    case = system_case("0f02c1", cpl=3, user_tables=["gdt"], regs={"rcx": USER_CS | 3},
                       rflags=RFLAGS_FIXED1 | RFLAGS_AC)  # fmt: skip
    outcome = run(case)
    assert first_event(outcome) == "#GP(0)"
    assert "rule 7" in outcome.detail


# ---- descriptor-table registers ---------------------------------------------------------------


def test_sgdt_at_cpl3_is_an_explicit_write() -> None:
    case = system_case("0f0103", cpl=3, regs={"rbx": DATA},
                       pages=[Page(DATA, user=True)])  # fmt: skip  # sgdt [rbx]
    outcome = run(case)
    assert outcome.status is Status.COMPLETED, outcome.detail
    assert [(a.kind, a.address, a.size, a.implicit) for a in outcome.trace or ()] == [
        ("write", DATA, 10, False)
    ]
    assert outcome.trace is not None
    assert outcome.trace[0].value == GDT_LIMIT | GDT << 16


def test_lidt_loads_the_idtr_at_cpl0_and_faults_at_cpl3() -> None:
    table = struct.pack("<HQ", 0xFF, 0xFFFF_8880_0000_0000)
    page = Page(DATA, user=True, data=table)
    loaded = run(system_case("0f011b", regs={"rbx": DATA}, pages=[page],  # lidt [rbx]
                             cr4=1 << 5))  # fmt: skip
    assert selectors(loaded)["idt_base"] == 0xFFFF_8880_0000_0000
    assert selectors(loaded)["idt_limit"] == 0xFF
    denied = run(system_case("0f011b", cpl=3, regs={"rbx": DATA, "rsp": USER_RSP}, pages=[page]))
    assert first_event(denied) == "#GP(0)"


def test_str_and_sldt() -> None:
    outcome = run(system_case("0f00c8 0f00c1", cpl=3, regs={"rax": -1 & (2**64 - 1)}))
    assert reg(outcome, "rax") == TSS_SEL  # str eax: zero-extended
    assert reg(outcome, "rcx") == 0  # sldt ecx


def available_tss_case(code: str) -> TestCase:
    case = system_case(code, regs={"rax": TSS_SEL, "rsp": KERNEL_RSP})
    case = patched(case, GDT + TSS_SEL + 5, b"\x89")  # available, not busy
    assert case.state.system is not None
    return replace(case, state=replace(case.state, system=replace(case.state.system, tr=0)))


def test_ltr_marks_the_tss_busy() -> None:
    case = available_tss_case("0f00d8")  # ltr ax
    outcome = run(case)
    assert outcome.status is Status.COMPLETED, outcome.detail
    assert selectors(outcome)["tr"] == TSS_SEL
    assert implicit_trace(outcome) == [
        ("read", GDT + TSS_SEL, 8), ("read", GDT + TSS_SEL + 8, 8), ("write", GDT + TSS_SEL + 5, 1)
    ]  # fmt: skip
    busy = run(system_case("0f00d8", regs={"rax": TSS_SEL, "rsp": KERNEL_RSP}))
    assert first_event(busy) == f"#GP({TSS_SEL})"


def test_lldt() -> None:
    null = run(system_case("0f00d0", regs={"rax": 0}))
    assert null.status is Status.COMPLETED and selectors(null)["ldtr"] == 0
    wrong = run(system_case("0f00d0", regs={"rax": TSS_SEL, "rsp": KERNEL_RSP}))
    assert first_event(wrong) == f"#GP({TSS_SEL})"


# ---- IRETQ -------------------------------------------------------------------------------------


def iret_case(
    frame: tuple[int, ...], *, cpl: int = 0, code: str = "48cf", pages: tuple[Page, ...] = ()
) -> TestCase:
    """``code`` (IRETQ by default) at ``cpl`` with ``frame`` (quadwords) at RSP."""
    rsp = KERNEL_RSP if cpl < 3 else USER_RSP
    stack = KERNEL_STACK if cpl < 3 else USER_STACK
    data = bytes(0x800) + struct.pack(f"<{len(frame)}Q", *frame)
    stack_page = Page(stack, user=not stack >> 63, data=data)
    return system_case(code, cpl=cpl, regs={"rsp": rsp}, pages=[stack_page, *pages])


def test_iretq_to_cpl3_commits_and_nulls_kernel_data_segments() -> None:
    case = iret_case((0, USER_CS | 3, RFLAGS_FIXED1 | RFLAGS_IF, USER_RSP, USER_DS | 3))
    case = iret_case((case.code_end, USER_CS | 3, RFLAGS_FIXED1 | RFLAGS_IF, USER_RSP,
                      USER_DS | 3))  # fmt: skip
    outcome = run(case)
    # The target is the code end (supervisor half): the case completes before fetching.
    assert outcome.status is Status.COMPLETED, outcome.detail
    assert reg(outcome, "cpl") == 3
    assert reg(outcome, "rsp") == USER_RSP
    assert reg(outcome, "rflags") == RFLAGS_FIXED1 | RFLAGS_IF
    system = selectors(outcome)
    assert (system["cs"], system["ss"], system["ds"], system["es"]) == (
        USER_CS | 3, USER_DS | 3, 0, 0
    )  # fmt: skip
    assert implicit_trace(outcome) == [("read", GDT + USER_CS, 8), ("read", GDT + USER_DS, 8)]


def test_iretq_into_compatibility_mode_decodes_32_bit_code() -> None:
    target = 0x0000_0000_0040_0000
    code_page = Page(target, user=True, writable=False, data=bytes.fromhex("4040"))
    case = iret_case((target, USER_CS32 | 3, RFLAGS_FIXED1, USER_RSP, USER_DS | 3),
                     pages=(code_page,))  # fmt: skip
    outcome = run(case)
    # inc eax twice, then zero bytes: add [eax], al through DS, which the return to CPL3
    # nulled (DPL 0): #GP(0) in compatibility mode, delivered to the 64-bit handler.
    assert outcome.status is Status.HALTED, outcome.detail
    assert reg(outcome, "rax") == 2
    assert first_event(outcome) == "#GP(0)"
    assert outcome.events[0].rip == target + 2


@pytest.mark.parametrize("lass", [True, False], ids=["lass", "no-lass"])
def test_iretq_into_compatibility_mode_at_cpl2_fetches_with_bit_63_clear(lass: bool) -> None:
    """Compatibility mode makes every CPL 0-2 fetch a LASS violation (LASS.md §1): IRETQ
    commits CPL 2 and compatibility mode, then the first fetch is #GP(0) at the target, and
    the frame pushed on TSS.RSP0 holds the 32-bit CS. Without LASS the 32-bit code runs."""
    target = 0x0000_0000_0040_0000
    code_page = Page(target, user=False, writable=False, data=bytes.fromhex("40cc"))
    case = iret_case((target, RING2_CS32 | 2, RFLAGS_FIXED1, USER_RSP, RING2_DS | 2),
                     pages=(code_page,))  # fmt: skip
    if not lass:
        case = replace(case, state=replace(case.state, cr4=case.state.cr4 & ~CR4_LASS))
    outcome = run(case)
    assert outcome.status is Status.HALTED, outcome.detail
    if not lass:
        assert (first_event(outcome), outcome.events[0].rip) == ("#BP", target + 2)
        assert reg(outcome, "rax") == 1  # 0x40 ran as INC EAX
        return
    assert (first_event(outcome), outcome.events[0].rip) == ("#GP(0)", target)
    frame = materialize(case).page_frames[KERNEL_STACK]
    rip, cs = struct.unpack_from("<2Q", outcome.memory[frame], 0x1000 - 40)
    assert (rip, cs) == (target, RING2_CS32 | 2)


def test_iretq_to_an_inner_level_is_gp() -> None:
    case = iret_case((0, KERNEL_CS, RFLAGS_FIXED1, KERNEL_RSP, KERNEL_DS), cpl=3)
    assert first_event(run(case)) == f"#GP({KERNEL_CS})"


# ---- SYSCALL / SYSRET --------------------------------------------------------------------------


def test_syscall_enters_cpl0_at_lstar() -> None:
    case = system_case("0f05", cpl=3, regs={"rsp": USER_RSP}, lstar=HANDLER,
                       rflags=RFLAGS_FIXED1 | RFLAGS_AC)  # fmt: skip
    outcome = run(case)
    assert outcome.status is Status.HALTED, outcome.detail
    assert reg(outcome, "rcx") == case.code_end
    assert reg(outcome, "r11") == RFLAGS_FIXED1 | RFLAGS_AC
    assert reg(outcome, "cpl") == 0
    system = selectors(outcome)
    assert (system["cs"], system["ss"]) == (KERNEL_CS, KERNEL_DS)
    assert outcome.trace == ()


def test_syscall_without_sce_is_ud() -> None:
    case = system_case("0f05", cpl=3, regs={"rsp": USER_RSP})
    case = replace(case, state=replace(case.state, efer=case.state.efer & ~EFER_SCE))
    assert first_event(run(case)) == "#UD"


@pytest.mark.parametrize(
    ("cpl", "rcx"), [(3, 0x40_0000), (0, 0x0000_8000_0000_0000)], ids=["cpl3", "non-canonical"]
)
def test_sysret_faults_before_changing_anything(cpl: int, rcx: int) -> None:
    rsp = USER_RSP if cpl == 3 else KERNEL_RSP
    outcome = run(system_case("480f07", cpl=cpl, regs={"rcx": rcx, "rsp": rsp}))
    assert first_event(outcome) == "#GP(0)"
    assert outcome.events[0].rip == DEFAULT_CODE_ADDRESS[cpl]  # the SYSRET itself


def test_sysret_without_rex_w_returns_to_compatibility_mode() -> None:
    target = 0x0000_0000_0040_0000
    case = system_case("0f07", regs={"rcx": 0xFFFF_FFFF_0000_0000 | target, "r11": 2},
                       pages=[Page(target, user=True, data=bytes.fromhex("40"))])  # fmt: skip
    outcome = run(case)
    assert reg(outcome, "rax") == 1  # 0x40 ran as INC EAX
    # Then add [eax], al through the DS that SYSRET keeps (segment rights are checked at
    # load time only): a CPL3 write to unmapped page 0, #PF(U | W).
    assert first_event(outcome) == "#PF(0x6)"
    assert outcome.events[0].rip == target + 1


# ---- far JMP/CALL/RET and call gates ----------------------------------------------------------

GATE_SEL = 0x80
POINTER = 0x0000_0000_0060_0000
KERNEL_POINTER = 0xFFFF_8880_0000_0000


def far_case(
    code: str,
    selector: int,
    offset: int,
    *,
    cpl: int = 0,
    pages: tuple[Page, ...] = (),
    user_tables: tuple[str, ...] = (),
) -> TestCase:
    """``code`` with RBX -> a page of the CPL's half holding the m16:64 pointer
    selector:offset, and a DPL 3 64-bit call gate to the handler at GATE_SEL (the GDT limit
    grown to hold it)."""
    address = POINTER if cpl == 3 else KERNEL_POINTER
    pointer = Page(address, user=cpl == 3, data=struct.pack("<QH", offset, selector))
    rsp = USER_RSP if cpl == 3 else KERNEL_RSP
    case = system_case(code, cpl=cpl, regs={"rbx": address, "rsp": rsp},
                       pages=[pointer, *pages], user_tables=user_tables)  # fmt: skip
    case = patched(case, GDT + GATE_SEL, gate(TYPE_CALL_GATE, KERNEL_CS, HANDLER, dpl=3))
    assert case.state.system is not None
    system = replace(case.state.system, gdt_limit=GATE_SEL + 15)
    return replace(case, state=replace(case.state, system=system))


def test_far_jmp_to_a_code_segment_reads_the_pointer_explicitly() -> None:
    case = far_case("48ff2b", KERNEL_CS, 0)  # jmp far [rbx] (m16:64)
    case = far_case("48ff2b", KERNEL_CS, case.code_end)
    outcome = run(case)
    assert outcome.status is Status.COMPLETED, outcome.detail
    assert [(a.kind, a.address, a.size, a.implicit) for a in outcome.trace or ()] == [
        ("read", KERNEL_POINTER, 10, False), ("read", GDT + KERNEL_CS, 8, True)
    ]  # fmt: skip


def test_far_jmp_into_compatibility_mode() -> None:
    target = 0x0000_0000_0090_0000
    code = Page(target, user=True, writable=False, data=bytes.fromhex("40"))
    outcome = run(far_case("48ff2b", USER_CS32 | 3, target, cpl=3, pages=(code,)))
    assert reg(outcome, "rax") == 1  # INC EAX
    assert outcome.events[0].rip == target + 1


def test_far_jmp_to_a_more_privileged_code_segment_is_gp() -> None:
    outcome = run(far_case("48ff2b", KERNEL_CS, 0, cpl=3))
    assert first_event(outcome) == f"#GP({KERNEL_CS})"


def test_far_call_pushes_cs_and_the_return_rip() -> None:
    case = far_case("48ff1b", KERNEL_CS, 0)
    case = far_case("48ff1b", KERNEL_CS, case.code_end)  # call far [rbx]
    outcome = run(case)
    assert outcome.status is Status.COMPLETED, outcome.detail
    assert reg(outcome, "rsp") == KERNEL_RSP - 16
    writes = [a for a in outcome.trace or () if a.kind == "write"]
    assert [(a.address, a.value, a.implicit) for a in writes] == [
        (KERNEL_RSP - 8, KERNEL_CS, False), (KERNEL_RSP - 16, case.code_end, False)
    ]  # fmt: skip


def test_call_gate_from_cpl3_switches_to_rsp0() -> None:
    case = far_case("48ff1b", GATE_SEL | 3, 0, cpl=3)
    outcome = run(case)
    assert outcome.status is Status.HALTED, outcome.detail
    assert reg(outcome, "cpl") == 0
    assert reg(outcome, "rsp") == RSP0 - 32
    implicit = implicit_trace(outcome)
    assert implicit == [
        ("read", GDT + GATE_SEL, 8), ("read", GDT + GATE_SEL + 8, 8),
        ("read", GDT + KERNEL_CS, 8), ("read", SUPERVISOR["tss"] + 4, 8),
    ]  # fmt: skip
    pushed = [a.value for a in outcome.trace or () if a.kind == "write"]
    assert pushed == [USER_DS | 3, USER_RSP, USER_CS | 3, case.code_end]
    assert selectors(outcome)["ss"] == 0


def test_call_gate_with_a_user_half_tss_violates_on_the_rsp0_read() -> None:
    outcome = run(far_case("48ff1b", GATE_SEL | 3, 0, cpl=3, user_tables=("tss",)))
    assert first_event(outcome) == "#GP(0)"
    assert outcome.status is Status.SHUTDOWN  # every delivery needs TSS.RSP0 too
    assert "rule 7" in outcome.detail


def test_far_ret_to_an_outer_level() -> None:
    case = iret_case((0, USER_CS | 3, USER_RSP, USER_DS | 3), code="48cb")
    case = iret_case((case.code_end, USER_CS | 3, USER_RSP, USER_DS | 3), code="48cb")
    outcome = run(case)
    assert outcome.status is Status.COMPLETED, outcome.detail
    assert reg(outcome, "cpl") == 3 and reg(outcome, "rsp") == USER_RSP
    assert (selectors(outcome)["ds"], selectors(outcome)["ss"]) == (0, USER_DS | 3)


def test_syscall_keeps_the_rpl_bits_of_star_in_ss() -> None:
    case = system_case("0f05", cpl=3, regs={"rsp": USER_RSP}, lstar=HANDLER)
    assert case.state.system is not None
    star = case.state.system.star | 3 << 32  # STAR[47:32] = KERNEL_CS | 3
    case = replace(case, state=replace(case.state, system=replace(case.state.system, star=star)))
    system = selectors(run(case))
    assert (system["cs"], system["ss"]) == (KERNEL_CS, KERNEL_DS | 3)


def test_compat_mode_reference_through_a_null_fs_is_gp() -> None:
    # mov eax, fs:[ebx] with FS = 0 (the standard tables' default) in 32-bit code.
    case = system_case("648b03", cpl=3, mode="compat", regs={"rbx": DATA, "rsp": USER_RSP},
                       pages=[Page(DATA, user=True)])  # fmt: skip
    outcome = run(case)
    assert first_event(outcome) == "#GP(0)"
    assert "null segment" in outcome.detail
    ds = run(system_case("8b03", cpl=3, mode="compat", regs={"rbx": DATA},
                         pages=[Page(DATA, user=True)]))  # fmt: skip
    assert ds.status is Status.COMPLETED, ds.detail


def test_sgdt_and_lidt_in_compatibility_mode_use_a_32_bit_base() -> None:
    # sgdt [ebx] at CPL3: 6 bytes (limit, low 32 bits of the base).
    stored = run(system_case("0f0103", cpl=3, mode="compat", regs={"rbx": DATA},
                             pages=[Page(DATA, user=True)]))  # fmt: skip
    assert [(a.size, a.value) for a in stored.trace or ()] == [
        (6, GDT_LIMIT | (GDT & 0xFFFF_FFFF) << 16)
    ]
    # lidt [ebx] at CPL0 (LASS off so that 32-bit CPL0 code runs): the base is zero-extended.
    table = Page(DATA, user=False, data=struct.pack("<HI", 0x7F, 0x8000_1000))
    loaded = run(system_case("0f011b", mode="compat", regs={"rbx": DATA}, pages=[table],
                             cr4=1 << 5))  # fmt: skip
    assert (selectors(loaded)["idt_base"], selectors(loaded)["idt_limit"]) == (0x8000_1000, 0x7F)
