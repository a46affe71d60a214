"""Comparing two outcomes of one case and finding the *first* divergence.

Fields are compared in a fixed order (status, fault, registers, memory, trace) so that the same
bug always yields the same first divergence, which is what makes signatures stable. Outcomes the
specification tolerates (``Outcome.alternatives``, LASS.md section 7) are never divergences.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from lassfuzz.arch import GPR_NAMES, RFLAGS_FIXED1
from lassfuzz.case import TestCase
from lassfuzz.outcome import Access, Fault, Outcome, Registers, Status


class Verdict(enum.Enum):
    """The result of comparing one case."""

    AGREE = "agree"
    DIVERGE = "diverge"
    SKIPPED = "skipped"  # not comparable: an engine cannot run the case (unsupported, hang)
    ERROR = "error"  # an engine failed (crash, raising policy): a tool problem, never a pass


@dataclass(frozen=True)
class Divergence:
    """Where two outcomes first differ. ``kind`` is one of :data:`DIVERGENCE_KINDS`."""

    kind: str
    field: str
    reference: str
    emulator: str

    def describe(self) -> str:
        return f"{self.kind} {self.field}: reference {self.reference}, emulator {self.emulator}"


DIVERGENCE_KINDS = (
    "status",
    "fault-vs-none",
    "event",
    "vector",
    "error-code",
    "fault-rip",
    "cr2",
    "register",
    "memory",
    "trace",
)


@dataclass(frozen=True)
class Comparison:
    verdict: Verdict
    divergence: Divergence | None = None
    reason: str = ""


def compare(case: TestCase, reference: Outcome, emulator: Outcome) -> Comparison:
    """Compare the reference model's outcome with an emulator's for ``case``."""
    for outcome in (reference, emulator):
        if outcome.status is Status.ERROR:
            return Comparison(Verdict.ERROR, reason=f"{outcome.engine}: {outcome.detail}")
    for outcome in (reference, emulator):
        if outcome.status is Status.UNSUPPORTED:
            return Comparison(Verdict.SKIPPED, reason=f"{outcome.engine}: {outcome.detail}")
    if reference.status is Status.HANG and emulator.status is Status.HANG:
        return Comparison(Verdict.SKIPPED, reason="both engines ran out of instruction budget")
    divergence = first_divergence(case, reference, emulator)
    if divergence is None:
        return Comparison(Verdict.AGREE)
    return Comparison(Verdict.DIVERGE, divergence)


def first_divergence(case: TestCase, reference: Outcome, emulator: Outcome) -> Divergence | None:
    """The first difference between ``emulator`` and ``reference`` running ``case``, or None.

    The reference's tolerated alternatives are tried too; if none matches, the difference from
    the primary reference outcome is reported.
    """
    primary = _diff(reference, emulator)
    if primary is None:
        return None
    for alternative in reference.alternatives:
        if _diff(alternative, emulator) is None:
            return None
    return primary


def _hex(value: int | None) -> str:
    return "none" if value is None else hex(value)


def _diff(reference: Outcome, emulator: Outcome) -> Divergence | None:
    if reference.status is not emulator.status:
        if Status.FAULT in (reference.status, emulator.status):
            return Divergence("fault-vs-none", "status", reference.summary, emulator.summary)
        return Divergence("status", "status", reference.status.value, emulator.status.value)
    found = _diff_events(reference.events, emulator.events)
    if found is not None:
        return found
    ref_fault, emu_fault = reference.fault, emulator.fault
    if ref_fault is not None and emu_fault is not None:
        found = _diff_fault(ref_fault, emu_fault, "fault")
        if found is not None:
            return found
    if reference.registers is not None and emulator.registers is not None:
        mask = ~(reference.undefined_flags | emulator.undefined_flags)
        found = _diff_registers(reference.registers, emulator.registers, mask)
        if found is not None:
            return found
    found = _diff_memory(reference, emulator)
    if found is not None:
        return found
    if reference.trace is not None and emulator.trace is not None:
        return _diff_trace(reference.trace, emulator.trace)
    return None


def _diff_events(ref: tuple[Fault, ...], emu: tuple[Fault, ...]) -> Divergence | None:
    """Events in order; the first missing or extra one is an ``event`` divergence."""
    for position, (left, right) in enumerate(zip(ref, emu, strict=False)):
        found = _diff_fault(left, right, f"event {position}")
        if found is not None:
            return found
    if len(ref) != len(emu):
        position = min(len(ref), len(emu))
        return Divergence(
            "event",
            f"event {position}",
            ref[position].name if position < len(ref) else "none",
            emu[position].name if position < len(emu) else "none",
        )
    return None


def _diff_fault(ref: Fault, emu: Fault, where: str) -> Divergence | None:
    if ref.vector != emu.vector:
        return Divergence("vector", where, ref.name, emu.name)
    if ref.error_code != emu.error_code:
        return Divergence("error-code", where, ref.name, emu.name)
    if ref.rip != emu.rip:
        return Divergence("fault-rip", f"{where} rip", hex(ref.rip), hex(emu.rip))
    if ref.cr2 != emu.cr2:
        return Divergence("cr2", f"{where} cr2", _hex(ref.cr2), _hex(emu.cr2))
    return None


def _diff_registers(ref: Registers, emu: Registers, flags_mask: int) -> Divergence | None:
    pairs: list[tuple[str, int, int]] = [
        ("rip", ref.rip, emu.rip),
        (
            "rflags",
            ref.rflags & flags_mask | RFLAGS_FIXED1,
            emu.rflags & flags_mask | RFLAGS_FIXED1,
        ),
        *zip(GPR_NAMES, ref.gprs, emu.gprs, strict=True),
        ("cr0", ref.cr0, emu.cr0),
        ("cr3", ref.cr3, emu.cr3),
        ("cr4", ref.cr4, emu.cr4),
        ("efer", ref.efer, emu.efer),
        ("cpl", ref.cpl, emu.cpl),
        ("fs_base", ref.fs_base, emu.fs_base),
        ("gs_base", ref.gs_base, emu.gs_base),
    ]
    if ref.system is None or emu.system is None:
        if ref.system is not emu.system:
            return Divergence("register", "system", _present(ref.system), _present(emu.system))
    else:
        emu_system = emu.system.as_dict()
        pairs += [(name, value, emu_system[name]) for name, value in ref.system.as_dict().items()]
    for name, left, right in pairs:
        if left != right:
            return Divergence("register", name, hex(left), hex(right))
    return None


def _present(value: object) -> str:
    return "absent" if value is None else "present"


def _diff_memory(reference: Outcome, emulator: Outcome) -> Divergence | None:
    for frame in sorted(reference.memory.keys() | emulator.memory.keys()):
        left = reference.memory.get(frame)
        right = emulator.memory.get(frame)
        if left == right:
            continue
        if left is None or right is None:
            return Divergence(
                "memory",
                f"frame {frame:#x}",
                "absent" if left is None else "present",
                "absent" if right is None else "present",
            )
        offset = next(i for i, (a, b) in enumerate(zip(left, right, strict=True)) if a != b)
        end = offset + 8
        return Divergence(
            "memory",
            f"phys {frame + offset:#x}",
            left[offset:end].hex(),
            right[offset:end].hex(),
        )
    return None


def normalize_trace(trace: tuple[Access, ...]) -> list[tuple[str, int, int]]:
    """Byte-granular (kind, address, byte value) events, so engines may split accesses freely.

    Reads with no write between them commute (nothing they observe can differ), and the SDM
    leaves the order of one instruction's reads open (CMPS reads RSI first in Bochs, RDI first in
    QEMU), so each run of consecutive read events is put in address order. Writes keep program
    order: that order is observable.
    """
    events: list[tuple[str, int, int]] = []
    reads: list[tuple[str, int, int]] = []
    for access in trace:
        for i in range(access.size):
            address = (access.address + i) & 0xFFFF_FFFF_FFFF_FFFF
            event = (access.kind, address, (access.value >> (8 * i)) & 0xFF)
            if access.kind == "read":
                reads.append(event)
                continue
            events.extend(sorted(reads))
            reads.clear()
            events.append(event)
    events.extend(sorted(reads))
    return events


def _diff_trace(ref: tuple[Access, ...], emu: tuple[Access, ...]) -> Divergence | None:
    left, right = normalize_trace(ref), normalize_trace(emu)
    for position, (a, b) in enumerate(zip(left, right, strict=False)):
        if a != b:
            return Divergence(
                "trace",
                f"byte event {position}",
                f"{a[0]} {a[1]:#x}={a[2]:#04x}",
                f"{b[0]} {b[1]:#x}={b[2]:#04x}",
            )
    if len(left) != len(right):
        return Divergence("trace", "length", f"{len(left)} bytes", f"{len(right)} bytes")
    return None
