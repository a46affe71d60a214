"""The model's caches change nothing observable: each cached answer equals the uncached one."""

from __future__ import annotations

import iced_x86 as iced
import pytest

from lassfuzz.arch import (
    CR4_PAE,
    CR4_SMAP,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    PTE_A,
    PTE_D,
    RFLAGS_AC,
    RFLAGS_FIXED1,
    VEC_GP,
    VEC_PF,
)
from lassfuzz.case import Page, materialize
from lassfuzz.model.decode import InstructionDecoder
from lassfuzz.model.descriptors import Descriptor
from lassfuzz.model.engine import ReferenceModel
from lassfuzz.model.paging import Tlb, walk
from lassfuzz.model.physical import PhysicalMemory
from lassfuzz.outcome import Status
from tests.model.builders import KERNEL_DATA, LASS_CR4, USER_DATA, leaf_entry, make_case, run

LOAD = "488b03"  # mov rax, [rbx]
STORE = "488903"  # mov [rbx], rax
STAC, CLAC = "0f01cb", "0f01ca"
SET_SMAP = "0f20e1 4881c900002000 0f22e1"  # mov rcx, cr4; or rcx, SMAP; mov cr4, rcx


def test_windows_starting_with_the_same_instruction_share_its_plan() -> None:
    model = ReferenceModel()
    first = model._lookup(bytes.fromhex("4801d8 90 90 90"), 64)  # add rax, rbx; nop...
    second = model._lookup(bytes.fromhex("4801d8 cc"), 64)
    assert first is second
    assert not isinstance(first, str)
    assert first[0] == InstructionDecoder().decode(bytes.fromhex("4801d8"))


def test_decoded_text_is_the_formatted_instruction() -> None:
    decoder = InstructionDecoder()
    for code in ("4c8b44cb10", "ebfe", "f3a4", "0f22e0"):
        raw = bytes.fromhex(code)
        formatted = iced.Formatter(iced.FormatterSyntax.INTEL).format(
            iced.Decoder(64, raw, ip=0).decode()
        )
        assert decoder.decode(raw + b"\x90").text == formatted
    assert decoder.decode(bytes.fromhex("f090")).text == "lock lock nop"  # LOCK NOP: #UD


@pytest.mark.parametrize(("cr4", "vector"), [(CR4_PAE | CR4_SMAP, VEC_PF), (LASS_CR4, VEC_GP)])
def test_an_allowed_access_is_checked_again_after_clac(cr4: int, vector: int) -> None:
    """The cached check of a page keys on RFLAGS.AC (SMAP and LASS rule 5 read it)."""
    page = Page(USER_DATA, user=True)
    code = STAC + LOAD + CLAC + LOAD
    outcome = run(make_case(code, regs={"rbx": USER_DATA}, pages=[page], cr4=cr4))
    assert outcome.status is Status.FAULT and outcome.fault is not None
    assert outcome.fault.vector == vector
    alone = run(make_case(CLAC + LOAD, regs={"rbx": USER_DATA}, pages=[page], cr4=cr4))
    assert alone.fault is not None
    assert (outcome.fault.vector, outcome.fault.error_code, outcome.detail) == (
        alone.fault.vector,
        alone.fault.error_code,
        alone.detail,
    )


def test_mov_cr4_drops_the_cached_checks() -> None:
    page = Page(USER_DATA, user=True)
    code = LOAD + SET_SMAP + LOAD
    outcome = run(make_case(code, regs={"rbx": USER_DATA}, pages=[page], cr4=CR4_PAE))
    assert outcome.fault is not None
    assert (outcome.fault.vector, outcome.fault.error_code) == (VEC_PF, 0x1)


def test_a_write_after_a_read_of_the_same_page_sets_dirty() -> None:
    case = make_case(LOAD + STORE, regs={"rbx": KERNEL_DATA}, pages=[Page(KERNEL_DATA, user=False)])
    outcome = run(case)
    assert outcome.status is Status.COMPLETED
    assert leaf_entry(case, outcome.memory, KERNEL_DATA) & (PTE_A | PTE_D) == PTE_A | PTE_D
    assert outcome.trace is not None and len(outcome.trace) == 2


def test_a_repeated_access_is_reported_to_the_observer_each_time() -> None:
    seen: list[int] = []

    class Recorder:
        def instruction(self, decoded: object) -> None:
            pass

        def access(self, cpu: object, address: int, size: int, kind: object, **flags: bool) -> None:
            seen.append(address)

    case = make_case(LOAD * 3, regs={"rbx": KERNEL_DATA}, pages=[Page(KERNEL_DATA, user=False)])
    ReferenceModel(observer=Recorder()).run(case)
    assert seen.count(KERNEL_DATA) == 3


def test_a_walk_from_the_paging_structure_cache_equals_a_full_walk() -> None:
    """Pages of one 2 MiB region share their PDE: walks after the first start from the cache,
    with the same result, the same fault and the same memory as walks from CR3."""
    present = Page(KERNEL_DATA, user=False, nx=True)
    absent = Page(KERNEL_DATA + 0x1000, user=True, present=False)
    case = make_case("90", pages=[present, absent])
    image = materialize(case)
    efer = EFER_LME | EFER_LMA | EFER_NXE
    cached, fresh = PhysicalMemory(image.frames), PhysicalMemory(image.frames)
    tlb = Tlb()
    assert walk(cached, image.cr3, KERNEL_DATA, efer, tables=tlb.tables) == walk(
        fresh, image.cr3, KERNEL_DATA, efer
    )
    assert tlb.tables
    for memory, tables in ((cached, tlb.tables), (fresh, None)):
        with pytest.raises(Exception, match="PTE not present"):
            walk(memory, image.cr3, KERNEL_DATA + 0x1000, efer, tables=tables)
    assert cached.snapshot() == fresh.snapshot()


def test_physical_memory_copies_a_frame_only_when_used() -> None:
    case = make_case("90", pages=[Page(KERNEL_DATA, user=False, data=b"\x01" * 8)])
    image = materialize(case)
    phys = PhysicalMemory(image.frames)
    frame = image.page_frames[KERNEL_DATA]
    assert phys.read_u64(frame) == 0x0101_0101_0101_0101
    assert all(phys.snapshot()[address] is data for address, data in image.frames.items())
    assert phys.frame(frame + 8) is phys.frame(frame)
    phys.write_u64(frame, 2)
    assert phys.read_u64(frame) == 2 and image.frames[frame][:8] == b"\x01" * 8
    assert phys.snapshot()[frame][:8] == (2).to_bytes(8, "little")
    assert list(phys.snapshot()) == sorted(image.frames)


def test_descriptor_flags_follow_the_s_and_type_bits() -> None:
    """SDM Vol. 3A 3.4.5.1: code = S and type bit 3; C, R and W are type bits 2 and 1."""
    for access in range(256):
        d = Descriptor(access << 40)
        segment, executable = bool(access & 0x10), bool(access & 8)
        assert d.code == (segment and executable)
        assert d.data == (segment and not executable)
        assert d.conforming == (d.code and bool(access & 4))
        assert d.readable == (d.data or (d.code and bool(access & 2)))
        assert d.writable == (d.data and bool(access & 2))


def test_outcomes_do_not_depend_on_what_the_model_ran_before() -> None:
    """The caches shared between cases (decoded instructions) leave each outcome as a fresh
    model would give it."""
    cases = [
        make_case(STAC + LOAD, regs={"rbx": USER_DATA}, pages=[Page(USER_DATA, user=True)]),
        make_case(LOAD + STORE, regs={"rbx": KERNEL_DATA}, pages=[Page(KERNEL_DATA, user=False)]),
        make_case(LOAD, cpl=3, regs={"rbx": KERNEL_DATA}, rflags=RFLAGS_FIXED1 | RFLAGS_AC),
    ]
    shared = ReferenceModel()
    for case in cases * 2:
        assert shared.run(case, trace=True) == ReferenceModel().run(case, trace=True)
