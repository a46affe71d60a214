"""The run loop of system cases (lassfuzz.emulator.sysrun): QEMU quirks it repairs."""

from __future__ import annotations

import struct

from lassfuzz.arch import CR4_LASS, CR4_PAE, VEC_DE, VEC_DF
from lassfuzz.case import Page, materialize
from lassfuzz.emulator.machine import UnicornMachine
from lassfuzz.outcome import Status
from tests.emulator.system_cases import HANDLER, SUPERVISOR, USER_CODE, idt_page, system_case


def test_flag_reading_instruction_keeps_exact_flags(machine: UnicornMachine) -> None:
    """cmp; pushfq; pop r8; ud2: the #UD (no hook: QEMU cannot decode it) pushes the exact
    flags, AF included, although code hooks disturb QEMU's lazy flags around it."""
    case = system_case("4883f95e 9c 4158 0f0b", rcx=0x17)
    outcome = machine.run(case)
    assert outcome.events[0].name == "#UD"
    frame = materialize(case).page_frames[SUPERVISOR + 0x4000]
    rflags = struct.unpack("<Q", outcome.memory[frame][0x1000 - 24 : 0x1000 - 16])[0]
    assert rflags == 0x1_0093  # CF, PF, AF, SF of 0x17 - 0x5e, and RF for a fault


def test_two_exceptions_raised_by_qemu_stay_themselves(machine: UnicornMachine) -> None:
    """QEMU remembers the exception it raised and would make the next one #DF: the loop
    restores a fresh context after each."""
    handler = Page(SUPERVISOR + 0x6000, user=False, writable=False, data=bytes.fromhex("f7f1"))
    idt = idt_page((VEC_DE, SUPERVISOR + 0x6000, 0, 0), (VEC_DF, HANDLER, 0, 0))
    outcome = UnicornMachine(max_instructions=20).run(
        system_case("31c9 f7f1", cpl=0, extra_pages=(handler, idt))
    )
    assert VEC_DF not in [event.vector for event in outcome.events]
    assert [event.vector for event in outcome.events[:3]] == [VEC_DE] * 3


def test_noncanonical_branch_faults_at_the_branch(machine: UnicornMachine) -> None:
    case = system_case("ffd0", rax=0x8000_0000_0000_0000)  # call rax
    outcome = machine.run(case)
    assert [(event.name, event.rip) for event in outcome.events] == [("#GP(0)", USER_CODE)]
    frame = materialize(case).page_frames[0x50_0000]
    assert not any(outcome.memory[frame])  # the CALL's push was undone


def test_sysret_to_code_end_completes(machine: UnicornMachine) -> None:
    """The end is checked before the fetch, although CPL3 could not fetch the kernel page."""
    case = system_case("480f07", cpl=0, syscall=True, rcx=0xFFFF_FFFF_8000_0003, r11=2)
    outcome = machine.run(case)
    assert outcome.status is Status.COMPLETED and not outcome.events
    assert outcome.registers is not None and outcome.registers.cpl == 3


def test_end_address_lookup_after_a_stop_sets_no_accessed_bit(machine: UnicornMachine) -> None:
    """A case starting at CPL3 on a kernel code page faults on its first fetch; the handler
    halts at CPL0, after which Unicorn looks up the block at the end address (now fetchable):
    that look-up is no access, so the code page's paging entries stay as they were."""
    case = system_case("90", code_address=0xFFFF_FFFF_8000_0000)
    outcome = machine.run(case)
    assert outcome.status is Status.HALTED and outcome.events[0].rip == case.code_address
    image = materialize(case)
    for frame in image.table_frames:
        before, after = image.frames[frame], outcome.memory[frame]
        changed = [
            offset
            for offset in range(0, 0x1000, 8)
            if before[offset : offset + 8] != after[offset : offset + 8]
        ]
        for offset in changed:
            entry = int.from_bytes(after[offset : offset + 8], "little")
            assert entry & 0xF_FFFF_FFFF_F000 != image.page_frames[case.code_address], offset


def test_setting_cr4_lass_while_running_user_half_code_at_cpl0(machine: UnicornMachine) -> None:
    """The fetch after MOV CR4 is checked with LASS on: #GP(0) at the next instruction."""
    case = system_case(
        "0f22e0 90", cpl=0, cr4=CR4_PAE, code_address=USER_CODE, rax=CR4_PAE | CR4_LASS
    )
    outcome = machine.run(case)
    assert [(event.name, event.rip) for event in outcome.events] == [("#GP(0)", USER_CODE + 3)]
    assert outcome.registers is not None and outcome.registers.cr4 == CR4_PAE | CR4_LASS


def test_cmpxchg16b_after_cmp_keeps_exact_flags(machine: UnicornMachine) -> None:
    """Unicorn 2.1.4 computed CMPXCHG16B's flags from a stale lazy-flags state, which after
    CMP decoded to garbage (measured 0xffffffd3, TF included); the shim restarts the block at
    CMPXCHG16B (CaseRun._start_block_at), so the flags are the CMP's with ZF replaced."""
    # cmp rbx, -0x2f; cmpxchg16b [0x850] (equal: ZF = 1); mov ds, r8 (emulated: ends the segment)
    code = "4883fbd1 480fc70c2550080000 418ed8"
    case = system_case(code, rbx=0x11A1_9CA8_823D, r8=0x23, extra_pages=(Page(0, user=True),))
    outcome = machine.run(case)
    assert outcome.status is Status.COMPLETED, outcome.detail
    assert outcome.registers is not None and outcome.registers.rflags == 0x47  # ZF PF CF
