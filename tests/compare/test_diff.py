"""First-divergence comparison: order, masking of undefined flags, tolerated outcomes."""

from __future__ import annotations

import dataclasses

from lassfuzz.arch import RFLAGS_AF, RFLAGS_FIXED1, VEC_GP, VEC_PF, VEC_SS
from lassfuzz.case import State, TestCase
from lassfuzz.compare.diff import Verdict, compare, first_divergence, normalize_trace
from lassfuzz.outcome import Access, Fault, Outcome, Registers, Status

CASE = TestCase(state=State(), code=b"\x90", code_address=0xFFFF_FFFF_8000_0000)


def registers(**changes: int) -> Registers:
    base = Registers(
        gprs=(0,) * 16,
        rip=0x1000,
        rflags=RFLAGS_FIXED1,
        cr0=0,
        cr3=0x1000,
        cr4=0x20,
        efer=0xD00,
        cpl=0,
        fs_base=0,
        gs_base=0,
    )
    return dataclasses.replace(base, **changes)


def outcome(engine: str = "model", **changes: object) -> Outcome:
    base = Outcome(
        engine=engine, status=Status.COMPLETED, registers=registers(), memory={0x1000: bytes(4096)}
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_identical_outcomes_agree() -> None:
    assert compare(CASE, outcome(), outcome("unicorn")).verdict is Verdict.AGREE


def test_fault_versus_completion_is_reported_first() -> None:
    fault = Fault(VEC_GP, 0, 0x1000)
    reference = outcome(
        status=Status.FAULT, fault=fault, registers=registers(gprs=(5,) + (0,) * 15)
    )
    found = first_divergence(CASE, reference, outcome("unicorn"))
    assert found is not None
    assert (found.kind, found.reference, found.emulator) == ("fault-vs-none", "#GP(0)", "ok")


def test_vector_then_error_code_then_rip_then_cr2() -> None:
    def faulted(fault: Fault) -> Outcome:
        return outcome(status=Status.FAULT, fault=fault)

    gp = faulted(Fault(VEC_GP, 0, 0x10))
    cases = [
        (faulted(Fault(VEC_SS, 0, 0x10)), "vector"),
        (faulted(Fault(VEC_GP, 8, 0x10)), "error-code"),
        (faulted(Fault(VEC_GP, 0, 0x20)), "fault-rip"),
    ]
    for emulator, kind in cases:
        found = first_divergence(CASE, gp, emulator)
        assert found is not None and found.kind == kind
    pf = faulted(Fault(VEC_PF, 5, 0x10, cr2=0x2000))
    found = first_divergence(CASE, pf, faulted(Fault(VEC_PF, 5, 0x10, cr2=0x2008)))
    assert found is not None and found.kind == "cr2"


def test_register_divergence_names_the_register() -> None:
    reference = outcome(registers=registers(gprs=(0, 0, 0, 7) + (0,) * 12))
    found = first_divergence(CASE, reference, outcome("unicorn"))
    assert found is not None
    assert (found.kind, found.field, found.reference, found.emulator) == (
        "register",
        "rbx",
        "0x7",
        "0x0",
    )


def test_undefined_flags_are_masked_but_defined_ones_are_not() -> None:
    reference = outcome(
        registers=registers(rflags=RFLAGS_FIXED1 | RFLAGS_AF), undefined_flags=RFLAGS_AF
    )
    assert first_divergence(CASE, reference, outcome("unicorn")) is None
    reference = outcome(registers=registers(rflags=RFLAGS_FIXED1 | RFLAGS_AF))
    found = first_divergence(CASE, reference, outcome("unicorn"))
    assert found is not None and found.field == "rflags"


def test_memory_divergence_gives_the_first_differing_physical_byte() -> None:
    page = bytearray(4096)
    page[0x123] = 0xAA
    found = first_divergence(CASE, outcome(memory={0x1000: bytes(page)}), outcome("unicorn"))
    assert found is not None
    assert (found.kind, found.field) == ("memory", "phys 0x1123")
    assert found.reference.startswith("aa")


def test_tolerated_alternative_is_not_a_divergence() -> None:
    alternative = outcome(status=Status.FAULT, fault=Fault(VEC_GP, 0, 0x1000))
    reference = outcome(alternatives=(alternative,))
    assert first_divergence(CASE, reference, alternative) is None
    other = outcome(status=Status.FAULT, fault=Fault(VEC_SS, 0, 0x1000))
    found = first_divergence(CASE, reference, other)
    assert found is not None and found.kind == "fault-vs-none"


def test_unsupported_is_skipped_and_error_is_an_error_not_a_pass() -> None:
    unsupported = outcome(status=Status.UNSUPPORTED, detail="vaddps")
    assert compare(CASE, unsupported, outcome("unicorn")).verdict is Verdict.SKIPPED
    error = outcome("unicorn", status=Status.ERROR, detail="policy raised")
    result = compare(CASE, outcome(), error)
    assert result.verdict is Verdict.ERROR and "policy raised" in result.reason


def test_hang_on_one_side_only_is_a_divergence() -> None:
    found = compare(CASE, outcome(), outcome("unicorn", status=Status.HANG))
    assert found.verdict is Verdict.DIVERGE
    assert found.divergence is not None and found.divergence.kind == "status"


def test_traces_compare_at_byte_granularity() -> None:
    whole = (Access("write", 0x1000, 4, 0x44332211),)
    split = (Access("write", 0x1000, 2, 0x2211), Access("write", 0x1002, 2, 0x4433))
    assert normalize_trace(whole) == normalize_trace(split)
    reference = outcome(trace=whole)
    assert first_divergence(CASE, reference, outcome("unicorn", trace=split)) is None
    wrong = (Access("write", 0x1000, 4, 0x44332299),)
    found = first_divergence(CASE, reference, outcome("unicorn", trace=wrong))
    assert found is not None and found.kind == "trace"


def test_reads_between_writes_may_come_in_any_order_but_writes_may_not() -> None:
    one = (Access("read", 0x2000, 2, 0x1), Access("read", 0x1000, 2, 0x2))
    other = (Access("read", 0x1000, 2, 0x2), Access("read", 0x2000, 2, 0x1))
    assert normalize_trace(one) == normalize_trace(other)
    first = (Access("write", 0x1000, 1, 1), Access("write", 0x1000, 1, 2))
    second = (Access("write", 0x1000, 1, 2), Access("write", 0x1000, 1, 1))
    assert normalize_trace(first) != normalize_trace(second)
    around = (Access("read", 0x1000, 1, 1), Access("write", 0x1000, 1, 2))
    swapped = (Access("write", 0x1000, 1, 2), Access("read", 0x1000, 1, 1))
    assert normalize_trace(around) != normalize_trace(swapped)
