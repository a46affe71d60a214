"""The exhaustive LASS access matrix (``lassfuzz matrix``), in the style of kvm-unit-tests access.c.

Every legal combination of the flags that decide one access (mode, CPL, kind, SS segment, address
half, CR4.LASS/SMAP/SMEP, RFLAGS.AC, page U/S, CPUID LASS bit, LA57) becomes one small case doing
exactly that access from code that is always fetchable, so each cell tests the access and nothing
else. Each cell is run on every engine and the one-word outcomes are printed side by side.

Kinds: ``read``, ``write`` and ``fetch`` are explicit accesses; ``implicit-read`` is the descriptor
read of ``lar eax, ebx`` with an LDT placed at the cell's address (an implicit supervisor access at
any CPL). An LDT rather than the GDT, because delivering the fault reads the GDT again: with the GDT
at the cell's address every failing cell would end in a triple fault and show "shutdown" instead of
the fault that decides it. The IDT, TSS, GDT and kernel stack stay in the supervisor half, so a
fault is delivered to a handler (HLT) and the cell shows its name, e.g. ``#GP(0)``.

To add a dimension: add a field to :class:`Cell`, its values to :func:`cells`' product, a
legality rule to :func:`_legal` if some combinations make no sense, and its effect to
:func:`cell_case`.
"""

from __future__ import annotations

import enum
import itertools
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from types import MappingProxyType
from typing import Any, Final, TextIO

from lassfuzz.arch import (
    CR4_LA57,
    CR4_LASS,
    CR4_SMAP,
    CR4_SMEP,
    EFER_SCE,
    GPR_NAMES,
    MASK64,
    PAGE_MASK,
    PAGE_SIZE,
    RFLAGS_AC,
)
from lassfuzz.case import (
    COMPAT_CODE_ADDRESS,
    DEFAULT_CODE_ADDRESS,
    DEFAULT_CR4,
    DEFAULT_EFER,
    DEFAULT_RFLAGS,
    Page,
    State,
    System,
    TestCase,
)
from lassfuzz.outcome import Engine, Status
from lassfuzz.system import (
    EXTRA_SEL,
    GDT_LIMIT_WITH_EXTRA,
    STACK_SELECTOR,
    Tables,
    gdt_with_ldt,
    segment_descriptor,
)

#: Engine name → column name in the output, in output order.
COLUMNS: Final = {"model": "reference", "unicorn": "emulator"}
#: Summaries that are not architectural results (an engine could not run the cell).
_NOT_RESULTS: Final = frozenset(status.value for status in Status if not status.comparable)


class Region(enum.Enum):
    """Where the access goes."""

    USER = "user-half"
    SUPERVISOR = "supervisor-half"
    WRAP = "wrap"  # from the top of the supervisor half into page 0 (data kinds only)


#: Addresses by LA57 and region. With LA57 the halves' edges move to the 57-bit boundaries
#: (LASS.md section 8 item 11): the first address above the 48-bit user top, and the lowest
#: 57-bit supervisor address; the 2^64 wrap stays where it is.
_REGION_ADDRESS: Final = {
    False: {
        Region.USER: 0x0000_0000_1000_0000,
        Region.SUPERVISOR: 0xFFFF_8000_0000_0000,
        Region.WRAP: 0xFFFF_FFFF_FFFF_FFFC,
    },
    True: {
        Region.USER: 0x0000_8000_0000_0000,
        Region.SUPERVISOR: 0xFF00_0000_0000_0000,
        Region.WRAP: 0xFFFF_FFFF_FFFF_FFFC,
    },
}
#: Data cells move 8 bytes (so the wrap cell touches 4 bytes on each side of 2^64); 32-bit code
#: moves 4. A descriptor is 8 bytes in either mode.
_DATA_SIZE: Final = {"64": 8, "compat": 4}
_DESCRIPTOR_SIZE: Final = 8

# Instruction encodings by mode (checked against capstone in tests/test_matrix.py).
_LOAD: Final = {"64": bytes.fromhex("488b03"), "compat": bytes.fromhex("8b03")}  # mov rax, [rbx]
_STORE: Final = {"64": bytes.fromhex("488903"), "compat": bytes.fromhex("8903")}  # mov [rbx], rax
_STACK_LOAD: Final = {  # mov rax, [rsp]   (SS segment)
    "64": bytes.fromhex("488b0424"),
    "compat": bytes.fromhex("8b0424"),
}
_STACK_STORE: Final = {  # mov [rsp], rax   (SS segment)
    "64": bytes.fromhex("48890424"),
    "compat": bytes.fromhex("890424"),
}
_JMP_RBX: Final = bytes.fromhex("ffe3")  # jmp rbx (jmp ebx in 32-bit code)
_JMP_RCX: Final = bytes.fromhex("ffe1")  # jmp rcx: the fetched code returns to code_end
_LAR: Final = bytes.fromhex("0f02c3")  # lar eax, ebx: reads the descriptor EBX selects
_STORE_VALUE: Final = {"64": 0x1122_3344_5566_7788, "compat": 0x5566_7788}
#: LDT index 0, TI = 1, RPL 3: the descriptor at the LDT base, i.e. at the cell's address.
_LDT_SELECTOR: Final = 0x7
#: The implicit-read cells' tables, handler and kernel stack: supervisor-half pages.
_TABLES: Final = Tables(
    gdt=0xFFFF_FFFF_C000_0000,
    idt=0xFFFF_FFFF_C000_1000,
    tss=0xFFFF_FFFF_C000_2000,
    handler=0xFFFF_FFFF_C000_3000,
    rsp0=0xFFFF_FFFF_C000_5000,
)
_KERNEL_STACK_PAGE: Final = 0xFFFF_FFFF_C000_4000


@dataclass(frozen=True)
class Cell:
    """One point of the decision space. The field names are the JSON interface; ``size`` is the
    data size, or for a fetch the length of the instruction fetched at ``address``."""

    mode: str  # "64" | "compat"
    cpl: int
    kind: str  # "read" | "write" | "fetch" | "implicit-read"
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
    la57: bool = False

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
            ("la57", self.la57),
        )
        return " ".join(words + [word for word, on in flags if on])


def _legal(cell: Cell) -> bool:
    """Combinations that exist, each rule with its reason."""
    # CR4.LASS needs the CPUID bit (else MOV CR4 #GPs, LASS.md §1).
    if cell.cr4_lass and not cell.lass_supported:
        return False
    # Only explicit data accesses have a segment (SS or not); a fetch across 2^64 is an open
    # point (LASS.md §7).
    if cell.kind == "fetch" and (cell.stack or cell.region is Region.WRAP):
        return False
    if cell.kind == "implicit-read" and cell.stack:
        return False
    if cell.mode == "compat":
        # Explicit 32-bit addresses lie below 4 GiB: they reach neither the supervisor half nor
        # the 2^64 wrap, and LA57 moves none of them (only descriptor-table bases are 64-bit).
        if cell.kind != "implicit-read" and (cell.region is not Region.USER or cell.la57):
            return False
        # At CPL 0-2 with LASS on, the cell's own code (below 4 GiB, bit 63 = 0) cannot be
        # fetched: no access but the fetch is ever made.
        if cell.cpl < 3 and cell.cr4_lass and cell.kind != "fetch":
            return False
    return True


def cells() -> tuple[Cell, ...]:
    """Every legal cell, each exactly once, in a stable order: the 64-bit CPL 0/3 explicit cells
    without LA57 first (the original matrix, in its order), then the others."""
    flag = (False, True)
    product: Iterable[tuple[Any, ...]] = itertools.product(
        ("64", "compat"),  # mode
        (0, 3, 1, 2),  # cpl
        ("read", "write", "fetch", "implicit-read"),  # kind
        flag,  # stack
        tuple(Region),
        flag,  # la57
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
            implicit=kind == "implicit-read",
            stack=stack,
            address=_REGION_ADDRESS[la57][region],
            size=_size(mode, kind),
            cr4_lass=lass,
            cr4_smap=smap,
            cr4_smep=smep,
            ac=ac,
            page_user=user,
            lass_supported=supported,
            la57=la57,
        )
        for mode, cpl, kind, stack, region, la57, supported, lass, smap, smep, ac, user in product
        # A fetch of 2 bytes at the wrap address does not wrap (and one across 2^64 would be an
        # open point, LASS.md §7): no fetch-wrap cells.
        if kind != "fetch" or region is not Region.WRAP
    )
    legal = [cell for cell in candidates if _legal(cell)]
    return tuple(sorted(legal, key=_added_by_issue_6))


def _size(mode: str, kind: str) -> int:
    if kind == "fetch":
        return len(_JMP_RCX)
    return _DESCRIPTOR_SIZE if kind == "implicit-read" else _DATA_SIZE[mode]


def _added_by_issue_6(cell: Cell) -> bool:
    """Whether the cell is beyond the original matrix (a stable sort key)."""
    return cell.mode != "64" or cell.cpl in (1, 2) or cell.kind == "implicit-read" or cell.la57


def cell_case(cell: Cell) -> TestCase:
    """The one-instruction case for ``cell``.

    Code sits where fetching is always allowed at the cell's CPL (user page in the user half for
    CPL3, supervisor page in the supervisor half for CPL 0-2; below 4 GiB in compatibility mode,
    where nothing else exists). The accessed pages carry the cell's U/S bit, writable, NX off; a
    fetch target holds ``jmp rcx`` back to the end of the code; an implicit-read target holds
    the LDT (one DPL 3 data descriptor), with the other tables in the supervisor half.
    """
    if not _legal(cell):
        raise ValueError(f"illegal matrix cell: {cell.name}")
    regs = dict.fromkeys(GPR_NAMES, 0)
    mode = cell.mode
    code_address = COMPAT_CODE_ADDRESS if mode == "compat" else DEFAULT_CODE_ADDRESS[cell.cpl]
    target = b""  # the bytes at the cell's address
    system: System | None = None
    extra: tuple[Page, ...] = ()
    if cell.kind == "fetch":
        code = _JMP_RBX
        regs.update(rbx=cell.address, rcx=code_address + len(code))
        target = _JMP_RCX
    elif cell.kind == "implicit-read":
        code = _LAR
        regs.update(rbx=_LDT_SELECTOR, rsp=_TABLES.rsp0)
        target = segment_descriptor(code=False, dpl=3).to_bytes(8, "little")
        system, extra = _ldt_system(cell)
    else:
        write = cell.kind == "write"
        if cell.stack:
            code = (_STACK_STORE if write else _STACK_LOAD)[mode]
        else:
            code = (_STORE if write else _LOAD)[mode]
        regs["rsp" if cell.stack else "rbx"] = cell.address
        regs["rax"] = _STORE_VALUE[mode] if write else 0
    contents: dict[int, bytearray] = {}
    for i in range(cell.size):
        linear = (cell.address + i) & MASK64
        data = contents.setdefault(linear & PAGE_MASK, bytearray(PAGE_SIZE))
        if i < len(target):
            data[linear & ~PAGE_MASK] = target[i]
    pages = [
        Page(base, user=cell.page_user, writable=True, nx=False, data=bytes(data))
        for base, data in sorted(contents.items())
    ]
    cr4 = DEFAULT_CR4
    cr4 |= CR4_LASS if cell.cr4_lass else 0
    cr4 |= CR4_SMAP if cell.cr4_smap else 0
    cr4 |= CR4_SMEP if cell.cr4_smep else 0
    cr4 |= CR4_LA57 if cell.la57 else 0
    state = State(
        mode=mode,
        cpl=cell.cpl,
        gprs=tuple(regs[name] for name in GPR_NAMES),
        rflags=DEFAULT_RFLAGS | (RFLAGS_AC if cell.ac else 0),
        cr4=cr4,
        efer=DEFAULT_EFER | (EFER_SCE if system is not None else 0),
        lass_supported=cell.lass_supported,
        system=system,
    )
    return TestCase(
        state=state,
        code=code,
        code_address=code_address,
        pages=(*pages, *extra),
        meta=MappingProxyType({"description": f"matrix cell: {cell.name}"}),
    )


def _ldt_system(cell: Cell) -> tuple[System, tuple[Page, ...]]:
    """The System and the supervisor-half table pages of an implicit-read cell: the standard
    tables, plus an LDT (limit: one descriptor) at the cell's address, loaded in LDTR."""
    contents = _TABLES.contents()
    contents[_TABLES.gdt] = gdt_with_ldt(_TABLES.tss, cell.address, _DESCRIPTOR_SIZE - 1)
    contents[_KERNEL_STACK_PAGE] = b""
    pages = tuple(
        Page(address, user=False, writable=address != _TABLES.handler, data=data)
        for address, data in sorted(contents.items())
    )
    system = _TABLES.system(mode=cell.mode, cpl=cell.cpl)
    stack = STACK_SELECTOR[cell.cpl]
    # A 32-bit mode has no use for a null FS/GS; keep every data segment flat and loaded.
    fs = stack if cell.mode == "compat" else 0
    system = replace(system, gdt_limit=GDT_LIMIT_WITH_EXTRA, ldtr=EXTRA_SEL, fs=fs, gs=fs)
    return system, pages


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
