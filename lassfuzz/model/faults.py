"""How the interpreter stops an instruction: an architectural exception, a halt, or "cannot run".

These are raised inside an instruction and caught by the engine, which discards the
instruction's pending effects (faults are precise, docs/machine.md "Running a case").
"""

from __future__ import annotations

from lassfuzz.arch import VEC_GP, VEC_UD


class CpuFault(Exception):
    """An exception the architecture raises: vector, error code, CR2 (for #PF), the access that
    faulted and why (``reason``: the LASS rule, the paging check...).

    ``wrapped_fetch`` marks a fetch fault on bytes that wrapped past 2^64, whose reported RIP is
    an open point (LASS.md §7): the engine then adds the tolerated alternative outcome.
    """

    def __init__(
        self,
        vector: int,
        error_code: int | None,
        reason: str,
        *,
        cr2: int | None = None,
        access: str | None = None,
        address: int | None = None,
        wrapped_fetch: bool = False,
    ) -> None:
        super().__init__(reason)
        self.vector = vector
        self.error_code = error_code
        self.reason = reason
        self.cr2 = cr2
        self.access = access
        self.address = address
        self.wrapped_fetch = wrapped_fetch


def general_protection(reason: str) -> CpuFault:
    """#GP(0) raised by an instruction itself (privilege, operand checks, branch targets)."""
    return CpuFault(VEC_GP, 0, reason)


def invalid_opcode(reason: str) -> CpuFault:
    """#UD (no error code)."""
    return CpuFault(VEC_UD, None, reason)


class Halted(Exception):
    """HLT at CPL0 ended the case (docs/machine.md: Status.HALTED, RIP after the HLT)."""


class Unsupported(Exception):
    """The model cannot run this faithfully; the message names the instruction or state."""


class SoftwareInterrupt(Exception):
    """INT n / INT3 completed its own checks: the engine delivers ``vector`` through the IDT
    with ``return_rip`` (the next instruction) as the saved RIP (SDM Vol. 2 INT n)."""

    def __init__(self, vector: int, return_rip: int) -> None:
        super().__init__(f"INT {vector:#x}")
        self.vector = vector
        self.return_rip = return_rip
