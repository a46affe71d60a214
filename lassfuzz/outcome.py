"""The Outcome contract: what every engine reports after running a case.

The reference model, the Unicorn machine and any future engine (another emulator, KVM) return
the same :class:`Outcome`, so comparison, crash files and display never look at an engine's
internals. An engine plugs in by implementing :class:`Engine`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from lassfuzz.arch import GPR_NAMES, VECTOR_NAMES, VECTORS_WITH_ERROR_CODE
from lassfuzz.case import SELECTOR_NAMES, TestCase


class Status(enum.Enum):
    """How a run ended."""

    COMPLETED = "completed"  # RIP reached the end of the code
    HALTED = "halted"  # HLT at CPL0
    FAULT = "fault"  # an exception ended the case (a case without an IDT: State.system is None)
    SHUTDOWN = "shutdown"  # triple fault (cases with an IDT)
    HANG = "hang"  # the instruction budget ran out
    UNSUPPORTED = "unsupported"  # the engine cannot run this case; ``detail`` names why
    ERROR = "error"  # the engine itself failed (crash, policy raised); ``detail`` names why

    @property
    def comparable(self) -> bool:
        """Whether an outcome with this status says something about the architecture."""
        return self in (Status.COMPLETED, Status.HALTED, Status.FAULT, Status.SHUTDOWN)


@dataclass(frozen=True)
class Fault:
    """An architectural exception: vector, error code (None for vectors without one), RIP of
    the faulting instruction (or the branch target, for a fetch fault), CR2 for #PF.

    ``access`` ("read", "write", "fetch") and ``address`` (linear address of the first
    offending byte) describe the access that faulted, when there was one. They are for
    signatures and display only and are not compared: engines may see a split access differently.
    """

    vector: int
    error_code: int | None
    rip: int
    cr2: int | None = None
    access: str | None = None
    address: int | None = None

    @property
    def name(self) -> str:
        """The short form used in matrices and signatures: ``#GP(0)``, ``#PF(0x5)``, ``#UD``."""
        base = VECTOR_NAMES.get(self.vector, f"vector {self.vector:#x}")
        if self.vector not in VECTORS_WITH_ERROR_CODE:
            return base
        code = self.error_code or 0
        return f"{base}({code:#x})" if self.vector == 14 else f"{base}({code})"


@dataclass(frozen=True)
class SystemRegisters:
    """Final selectors and descriptor-table registers, reported for cases with a ``System``.
    ``selectors`` follow :data:`lassfuzz.case.SELECTOR_NAMES` (RPL bits included)."""

    selectors: tuple[int, ...]
    gdt_base: int
    gdt_limit: int
    idt_base: int
    idt_limit: int

    def as_dict(self) -> dict[str, int]:
        return {
            **dict(zip(SELECTOR_NAMES, self.selectors, strict=True)),
            "gdt_base": self.gdt_base,
            "gdt_limit": self.gdt_limit,
            "idt_base": self.idt_base,
            "idt_limit": self.idt_limit,
        }


@dataclass(frozen=True)
class Registers:
    """Final architectural register state. ``system`` is None exactly when the case has no
    ``State.system``."""

    gprs: tuple[int, ...]
    rip: int
    rflags: int
    cr0: int
    cr3: int
    cr4: int
    efer: int
    cpl: int
    fs_base: int
    gs_base: int
    system: SystemRegisters | None = None

    def as_dict(self) -> dict[str, int]:
        named = dict(zip(GPR_NAMES, self.gprs, strict=True))
        system = {} if self.system is None else self.system.as_dict()
        return {
            **named,
            "rip": self.rip,
            "rflags": self.rflags,
            "cr0": self.cr0,
            "cr3": self.cr3,
            "cr4": self.cr4,
            "efer": self.efer,
            "cpl": self.cpl,
            "fs_base": self.fs_base,
            "gs_base": self.gs_base,
            **system,
        }


@dataclass(frozen=True)
class Access:
    """One entry of the access trace: a data access by linear address, in program order.

    Instruction fetches are not traced. ``value`` is the little-endian value read or written.
    """

    kind: str  # "read" | "write"
    address: int
    size: int
    value: int
    implicit: bool = False


@dataclass(frozen=True)
class Outcome:
    """What one engine observed running one case.

    ``memory`` maps each physical frame of the case's image (page tables included) to its final
    bytes. ``undefined_flags`` is the RFLAGS mask the SDM leaves undefined at the end of the run
    (comparisons ignore those bits). ``alternatives`` lists further outcomes the specification
    tolerates (LASS.md section 7); a result equal to any of them is not a divergence.
    ``detail`` says, for a human, why it ended that way (which LASS rule fired, what is
    unsupported, what failed). ``events`` lists, in order, every exception or interrupt raised
    in a case with an IDT (delivered or not: a #GP whose delivery fails is followed by the #DF),
    with ``rip`` = the RIP the event saves (the faulting instruction, or the next one for INT n).
    """

    engine: str
    status: Status
    registers: Registers | None = None
    fault: Fault | None = None
    memory: Mapping[int, bytes] = field(default_factory=lambda: MappingProxyType({}))
    trace: tuple[Access, ...] | None = None
    undefined_flags: int = 0
    instructions: int = 0
    detail: str = ""
    alternatives: tuple[Outcome, ...] = ()
    events: tuple[Fault, ...] = ()

    @property
    def summary(self) -> str:
        """One word for tables: ``ok``, ``#GP(0)``, ``#PF(0x5)``, ``unsupported``..."""
        if self.status is Status.FAULT and self.fault is not None:
            return self.fault.name
        if self.events and self.status is not Status.SHUTDOWN:
            return self.events[0].name
        if self.status in (Status.COMPLETED, Status.HALTED):
            return "ok"
        return str(self.status.value)


class Engine(Protocol):
    """Anything that can run a case. ``trace=True`` asks for the access trace (slower)."""

    name: str

    def run(self, case: TestCase, *, trace: bool = False) -> Outcome: ...


def fault_to_dict(fault: Fault) -> dict[str, Any]:
    return {
        "vector": fault.vector,
        "error_code": fault.error_code,
        "rip": hex(fault.rip),
        "cr2": None if fault.cr2 is None else hex(fault.cr2),
        "access": fault.access,
        "address": None if fault.address is None else hex(fault.address),
    }


def outcome_to_dict(outcome: Outcome) -> dict[str, Any]:
    """JSON-ready form of an outcome, for crash files."""
    registers = outcome.registers
    return {
        "engine": outcome.engine,
        "status": outcome.status.value,
        "summary": outcome.summary,
        "detail": outcome.detail,
        "instructions": outcome.instructions,
        "fault": None if outcome.fault is None else fault_to_dict(outcome.fault),
        "events": [fault_to_dict(event) for event in outcome.events],
        "registers": None
        if registers is None
        else {name: hex(value) for name, value in registers.as_dict().items()},
        "undefined_flags": hex(outcome.undefined_flags),
        # Frames are 4 KiB; trailing zero bytes are left out to keep crash files readable.
        "memory": {hex(frame): data.rstrip(b"\0").hex() for frame, data in outcome.memory.items()},
        "trace": None
        if outcome.trace is None
        else [
            {
                "kind": a.kind,
                "address": hex(a.address),
                "size": a.size,
                "value": hex(a.value),
                "implicit": a.implicit,
            }
            for a in outcome.trace
        ],
        "alternatives": [outcome_to_dict(alt) for alt in outcome.alternatives],
    }
