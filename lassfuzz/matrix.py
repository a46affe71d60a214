"""The exhaustive LASS access matrix (``lassfuzz matrix``), in the style of kvm-unit-tests access.c.

Every legal combination of the flags that decide one access (CPL, kind, SS segment, address half,
CR4.LASS/SMAP/SMEP, RFLAGS.AC, page U/S, CPUID LASS bit) becomes one small case doing exactly that
access from code that is always fetchable, so each cell tests the access and nothing else. Each
cell is run on every engine and the one-word outcomes are printed side by side.

To add a dimension: add a field to :class:`Cell`, its values to :func:`cells`' product, a
legality rule to :func:`_legal` if some combinations make no sense, and its effect to
:func:`cell_case`.
"""

from __future__ import annotations

import enum
import itertools
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any, Final, TextIO

from lassfuzz.arch import (
    CR4_LASS,
    CR4_SMAP,
    CR4_SMEP,
    GPR_NAMES,
    MASK64,
    PAGE_MASK,
    RFLAGS_AC,
)
from lassfuzz.case import DEFAULT_CODE_ADDRESS, DEFAULT_CR4, DEFAULT_RFLAGS, Page, State, TestCase
from lassfuzz.outcome import Engine, Status

#: Engine name → column name in the output, in output order.
COLUMNS: Final = {"model": "reference", "unicorn": "emulator"}
#: Summaries that are not architectural results (an engine could not run the cell).
_NOT_RESULTS: Final = frozenset(status.value for status in Status if not status.comparable)


class Region(enum.Enum):
    """Where the access goes."""

    USER = "user-half"
    SUPERVISOR = "supervisor-half"
    WRAP = "wrap"  # from the top of the supervisor half into page 0 (data kinds only)


_REGION_ADDRESS: Final = {
    Region.USER: 0x0000_0000_1000_0000,
    Region.SUPERVISOR: 0xFFFF_8000_0000_0000,
    Region.WRAP: 0xFFFF_FFFF_FFFF_FFFC,
}
#: Data cells move 8 bytes (so the wrap cell touches 4 bytes on each side of 2^64).
_DATA_SIZE: Final = 8

# Instruction encodings (checked against capstone in tests/test_matrix.py).
_LOAD: Final = bytes.fromhex("488b03")  # mov rax, [rbx]
_STORE: Final = bytes.fromhex("488903")  # mov [rbx], rax
_STACK_LOAD: Final = bytes.fromhex("488b0424")  # mov rax, [rsp]   (SS segment)
_STACK_STORE: Final = bytes.fromhex("48890424")  # mov [rsp], rax   (SS segment)
_JMP_RBX: Final = bytes.fromhex("ffe3")  # jmp rbx
_JMP_RCX: Final = bytes.fromhex("ffe1")  # jmp rcx: the fetched code returns to code_end
_STORE_VALUE: Final = 0x1122_3344_5566_7788


@dataclass(frozen=True)
class Cell:
    """One point of the decision space. The field names are the JSON interface; ``size`` is the
    data size, or for a fetch the length of the instruction fetched at ``address``."""

    mode: str
    cpl: int
    kind: str  # "read" | "write" | "fetch"
    implicit: bool
    stack: bool
    address: int
    size: int
    cr4_lass: bool
    cr4_smap: bool
    cr4_smep: bool
    ac: bool
    page_user: bool
    lass_supported: bool

    @property
    def region(self) -> Region:
        if self.address + self.size > MASK64 + 1:
            return Region.WRAP
        return Region.SUPERVISOR if self.address >> 63 else Region.USER

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def name(self) -> str:
        """The cell's flags, access.c style: only set flags are named (lass implies its CPUID
        bit, so ``lass-cpuid`` is named only when the bit is set but CR4.LASS is not)."""
        words = [] if self.mode == "64" else [self.mode]
        words += [f"cpl{self.cpl}", self.kind, self.region.value]
        flags = (
            ("implicit", self.implicit),
            ("stack", self.stack),
            ("lass", self.cr4_lass),
            ("lass-cpuid", self.lass_supported and not self.cr4_lass),
            ("smap", self.cr4_smap),
            ("smep", self.cr4_smep),
            ("ac", self.ac),
            ("user-page", self.page_user),
        )
        return " ".join(words + [word for word, on in flags if on])


def _legal(cell: Cell) -> bool:
    """Combinations that exist: CR4.LASS needs the CPUID bit (else MOV CR4 #GPs, LASS.md §1);
    only data accesses have a segment or can wrap (a fetch across 2^64 is LASS.md §7)."""
    if cell.cr4_lass and not cell.lass_supported:
        return False
    return cell.kind != "fetch" or not (cell.stack or cell.region is Region.WRAP)


def cells() -> tuple[Cell, ...]:
    """Every legal cell, each exactly once, in a stable order."""
    flag = (False, True)
    product: Iterable[tuple[Any, ...]] = itertools.product(
        ("64",),  # mode
        (0, 3),  # cpl
        ("read", "write", "fetch"),  # kind
        flag,  # stack
        tuple(Region),
        flag,  # lass_supported
        flag,  # cr4_lass
        flag,  # cr4_smap
        flag,  # cr4_smep
        flag,  # ac
        flag,  # page_user
    )
    candidates = (
        Cell(
            mode=mode,
            cpl=cpl,
            kind=kind,
            implicit=False,
            stack=stack,
            address=_REGION_ADDRESS[region],
            size=len(_JMP_RCX) if kind == "fetch" else _DATA_SIZE,
            cr4_lass=lass,
            cr4_smap=smap,
            cr4_smep=smep,
            ac=ac,
            page_user=user,
            lass_supported=supported,
        )
        for mode, cpl, kind, stack, region, supported, lass, smap, smep, ac, user in product
        # A fetch wrapping past 2^64 is an open point (LASS.md §7): no fetch-wrap cells.
        if kind != "fetch" or region is not Region.WRAP
    )
    return tuple(cell for cell in candidates if _legal(cell))


def cell_case(cell: Cell) -> TestCase:
    """The one-instruction case for ``cell``.

    Code sits where fetching is always allowed at the cell's CPL (user page in the user half for
    CPL3, supervisor page in the supervisor half for CPL0). The accessed pages carry the cell's
    U/S bit, writable, NX off; a fetch target holds ``jmp rcx`` back to the end of the code.
    """
    if not _legal(cell):
        raise ValueError(f"illegal matrix cell: {cell.name}")
    regs = dict.fromkeys(GPR_NAMES, 0)
    code_address = DEFAULT_CODE_ADDRESS[cell.cpl]
    if cell.kind == "fetch":
        code = _JMP_RBX
        regs.update(rbx=cell.address, rcx=code_address + len(code))
    else:
        write = cell.kind == "write"
        code = (
            (_STACK_STORE if write else _STACK_LOAD) if cell.stack else (_STORE if write else _LOAD)
        )
        regs["rsp" if cell.stack else "rbx"] = cell.address
        regs["rax"] = _STORE_VALUE if write else 0
    target_pages = sorted({(cell.address + i) & MASK64 & PAGE_MASK for i in range(cell.size)})
    pages = []
    for base in target_pages:
        data = b""
        if cell.kind == "fetch":
            data = bytes(cell.address - base) + _JMP_RCX
        pages.append(Page(base, user=cell.page_user, writable=True, nx=False, data=data))
    cr4 = DEFAULT_CR4
    cr4 |= CR4_LASS if cell.cr4_lass else 0
    cr4 |= CR4_SMAP if cell.cr4_smap else 0
    cr4 |= CR4_SMEP if cell.cr4_smep else 0
    state = State(
        mode=cell.mode,
        cpl=cell.cpl,
        gprs=tuple(regs[name] for name in GPR_NAMES),
        rflags=DEFAULT_RFLAGS | (RFLAGS_AC if cell.ac else 0),
        cr4=cr4,
        lass_supported=cell.lass_supported,
    )
    return TestCase(
        state=state,
        code=code,
        code_address=code_address,
        pages=tuple(pages),
        meta=MappingProxyType({"description": f"matrix cell: {cell.name}"}),
    )


@dataclass(frozen=True)
class MatrixRow:
    """One cell and each engine's one-word outcome (``Outcome.summary``), by engine name."""

    cell: Cell
    results: Mapping[str, str]

    @property
    def differs(self) -> bool:
        """Engines disagree, or one could not give an architectural result for the cell."""
        summaries = set(self.results.values())
        return len(summaries) > 1 or bool(summaries & _NOT_RESULTS)


def run_matrix(engines: Mapping[str, Engine]) -> list[MatrixRow]:
    """Run every cell on every engine."""
    rows = []
    for cell in cells():
        case = cell_case(cell)
        results = {name: engine.run(case).summary for name, engine in engines.items()}
        rows.append(MatrixRow(cell, MappingProxyType(results)))
    return rows


def differing(rows: Iterable[MatrixRow]) -> list[MatrixRow]:
    """The rows where the engines differ (see :attr:`MatrixRow.differs`)."""
    return [row for row in rows if row.differs]


def _columns(row: MatrixRow) -> list[tuple[str, str]]:
    """(column name, summary) in output order: reference, emulator, then any other engine."""
    known = [(COLUMNS[name], row.results[name]) for name in COLUMNS if name in row.results]
    others = [(name, summary) for name, summary in row.results.items() if name not in COLUMNS]
    return known + others


def format_json(row: MatrixRow) -> str:
    """``{"cell": {...}, "reference": "#GP(0)", "emulator": "ok"}`` on one line."""
    return json.dumps({"cell": row.cell.to_dict(), **dict(_columns(row))})


def format_human(row: MatrixRow) -> str:
    """``cpl3 read supervisor-half lass smap: reference #GP(0) emulator ok``."""
    return f"{row.cell.name}: " + " ".join(f"{col} {summary}" for col, summary in _columns(row))


def matrix_main(
    json_output: bool, policy: str | None, out: TextIO, reference_only: bool = False
) -> int:
    """``lassfuzz matrix``: print every cell, then (human form) the differing cells again, then
    a summary line. Exit status 0 when no cell differs, 1 otherwise. Raises PolicyError for an
    unknown ``policy``."""
    from lassfuzz.model.engine import ReferenceModel

    engines: dict[str, Engine] = {"model": ReferenceModel()}
    if not reference_only:
        from lassfuzz.emulator.machine import UnicornMachine
        from lassfuzz.policies import load_policy

        name, function = load_policy(policy)
        engines["unicorn"] = UnicornMachine(policy=function, policy_name=name)
    rows = run_matrix(engines)
    bad = differing(rows)
    summary = f"{len(rows)} cells, {len(bad)} differ"
    if json_output:
        for row in rows:
            out.write(format_json(row) + "\n")
        # Kept as JSON so that the output stays one JSON document per line.
        out.write(json.dumps({"summary": summary, "cells": len(rows), "differ": len(bad)}) + "\n")
    else:
        for row in rows:
            out.write(format_human(row) + "\n")
        if bad:
            out.write(f"\n{len(bad)} differing cells:\n")
            for row in bad:
                out.write(format_human(row) + "\n")
        out.write(summary + "\n")
    return 1 if bad else 0
