"""The access matrix: enumeration, case building, output, and the reference column against an
independent, access.c-style expectation of LASS.md §3–§5."""

from __future__ import annotations

import importlib.util
import io
import json
import struct
from dataclasses import dataclass, replace
from functools import cache

import capstone
import pytest

from lassfuzz.arch import (
    CR4_LA57,
    CR4_LASS,
    CR4_SMAP,
    CR4_SMEP,
    MASK64,
    PAGE_SIZE,
    PFEC_I,
    PFEC_P,
    PFEC_U,
    PFEC_W,
    RFLAGS_AC,
    VECTOR_NAMES,
)
from lassfuzz.case import TestCase, case_from_json, case_to_json
from lassfuzz.matrix import (
    Cell,
    MatrixRow,
    Region,
    cell_case,
    cells,
    differing,
    format_human,
    format_json,
    run_matrix,
)
from lassfuzz.model.lass import Kind, check_access
from lassfuzz.outcome import Engine, Fault, Outcome, Status
from lassfuzz.system import EXTRA_SEL, segment_descriptor

CELL_KEYS = [
    "mode", "cpl", "kind", "implicit", "stack", "address", "size",
    "cr4_lass", "cr4_smap", "cr4_smep", "ac", "page_user", "lass_supported", "la57",
]  # fmt: skip


# ------------------------------------------------------------------ independent expectation


def lass_fault(cell: Cell) -> str | None:
    """The LASS fault the SDM requires for ``cell`` (LASS.md §3 rows, §4 vector), if any."""
    if not cell.cr4_lass:
        return None
    fault = "#SS(0)" if cell.stack else "#GP(0)"
    if cell.mode == "compat" and cell.cpl < 3:
        return fault  # row 3 for the cell's own code: bit 63 counts as 0 (LASS.md §1)
    if cell.mode == "compat" and not cell.implicit:
        halves = {0}  # 32-bit addresses (LASS.md §1); descriptor-table bases stay 64-bit
    else:
        halves = {((cell.address + i) & MASK64) >> 63 for i in range(cell.size)}
    if cell.cpl == 3 and not cell.implicit:
        return fault if 1 in halves else None  # rows 1, 2
    if cell.kind == "fetch":
        return fault if 0 in halves else None  # row 3
    exempt = cell.ac and not cell.implicit  # rows 5 and 7: AC exempts explicit accesses only
    return fault if cell.cr4_smap and not exempt and 0 in halves else None  # rows 4-9


def paging_result(cell: Cell) -> str:
    """What paging says about the access (SDM 4.6, 4.7; EFER.NXE is on in every cell). An
    implicit access is a supervisor access whatever the CPL, and AC never exempts it from SMAP."""
    user = cell.cpl == 3 and not cell.implicit
    error = PFEC_P
    error |= PFEC_W if cell.kind == "write" else 0
    error |= PFEC_U if user else 0
    error |= PFEC_I if cell.kind == "fetch" else 0
    if user:
        denied = not cell.page_user
    elif cell.kind == "fetch":
        denied = cell.page_user and cell.cr4_smep
    else:
        denied = cell.page_user and cell.cr4_smap and (cell.implicit or not cell.ac)
    return f"#PF({error:#x})" if denied else "ok"


def expected(cell: Cell) -> str:
    """Canonical (always true here), then LASS, then paging: machine.md's order of checks."""
    return lass_fault(cell) or paging_result(cell)


def test_lass_rules_module_agrees_with_expectation_on_every_cell() -> None:
    """lassfuzz.model.lass, driven with each cell's access, against :func:`lass_fault`."""
    for cell in cells():
        case = cell_case(cell)
        decision = check_access(
            cell.address,
            cell.size,
            Kind("read" if cell.implicit else cell.kind),
            implicit=cell.implicit,
            stack=cell.stack,
            cpl=cell.cpl,
            cr4=case.state.cr4,
            rflags=case.state.rflags,
            efer=case.state.efer,
            # Implicit accesses use 64-bit linear addresses even in compatibility mode.
            cs_l=cell.mode == "64" or cell.implicit,
        )
        got = None if decision.vector is None else f"{VECTOR_NAMES[decision.vector]}(0)"
        assert got == lass_fault(cell), cell.name


# ------------------------------------------------------------------ enumeration


def test_cells_cover_every_legal_combination_once() -> None:
    all_cells = cells()
    # Counted independently. 64-bit, per CPL (4) and LA57 (2): data kinds (read, write) x stack
    # x 3 regions; fetch x 2 regions; implicit-read x 3 regions; (CPUID bit, CR4.LASS) has 3
    # legal pairs; SMAP, SMEP, AC, U/S free.
    free = 2**4
    long_mode = 4 * 2 * (2 * 2 * 3 + 2 + 3) * 3 * free
    # Compatibility mode: explicit kinds only in the user half without LA57 (data x stack, and
    # fetch), implicit-read in 3 regions x LA57; at CPL 0-2 with LASS on only the fetch cell.
    explicit, implicit = 2 * 2 + 1, 3 * 2
    compat_cpl3 = (explicit + implicit) * 3 * free
    compat_supervisor = 3 * ((explicit + implicit) * 2 * free + 1 * free)
    assert len(all_cells) == long_mode + compat_cpl3 + compat_supervisor == 8160
    # The original matrix comes first, in its order.
    original = [c for c in all_cells if c.mode == "64" and c.cpl in (0, 3)]
    original = [c for c in original if c.kind != "implicit-read" and not c.la57]
    assert list(all_cells[: len(original)]) == original and len(original) == 1344
    keys = {tuple(cell.to_dict().values()) for cell in all_cells}
    assert len(keys) == len(all_cells)
    assert len({cell.name for cell in all_cells}) == len(all_cells), "names must be unique"
    for flag in ("cr4_smap", "cr4_smep", "ac", "page_user", "stack", "lass_supported", "la57"):
        assert {getattr(cell, flag) for cell in all_cells} == {False, True}
    assert {cell.cpl for cell in all_cells} == {0, 1, 2, 3}
    assert {(cell.mode, cell.kind) for cell in all_cells} == {
        (mode, kind)
        for mode in ("64", "compat")
        for kind in ("read", "write", "fetch", "implicit-read")
    }
    assert {cell.region for cell in all_cells if cell.kind == "fetch"} == {
        Region.USER,
        Region.SUPERVISOR,
    }


def test_illegal_cells_absent_and_rejected() -> None:
    all_cells = cells()
    assert not [c for c in all_cells if c.cr4_lass and not c.lass_supported]
    assert not [c for c in all_cells if c.kind == "fetch" and (c.stack or c.region is Region.WRAP)]
    assert not [c for c in all_cells if c.implicit and c.stack]
    compat = [c for c in all_cells if c.mode == "compat"]
    assert not [c for c in compat if not c.implicit and (c.region is not Region.USER or c.la57)]
    assert not [c for c in compat if c.cpl < 3 and c.cr4_lass and c.kind != "fetch"]
    legal = all_cells[0]
    with pytest.raises(ValueError, match="illegal matrix cell"):
        cell_case(replace(legal, cr4_lass=True, lass_supported=False))
    with pytest.raises(ValueError, match="illegal matrix cell"):
        cell_case(replace(legal, mode="compat", address=0xFFFF_8000_0000_0000))


def test_cell_json_fields_are_the_interface() -> None:
    cell = next(c for c in cells() if c.region is Region.SUPERVISOR and c.cpl == 3)
    assert list(cell.to_dict()) == CELL_KEYS
    assert cell.to_dict()["address"] == 0xFFFF_8000_0000_0000


# ------------------------------------------------------------------ case building

DISASM = {
    "64": capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64),
    "compat": capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32),
}


def disassemble(code: bytes, mode: str = "64") -> list[str]:
    return [f"{i.mnemonic} {i.op_str}" for i in DISASM[mode].disasm(code, 0)]


def page_of(case: TestCase, address: int) -> bool:
    """The U/S bit of the page holding ``address`` (KeyError if unmapped)."""
    return {p.address: p.user for p in case.all_pages()}[address & ~(PAGE_SIZE - 1)]


def test_cell_case_does_exactly_the_cell_access() -> None:
    for cell in cells():
        check_cell_case(cell)


def check_cell_case(cell: Cell) -> None:
    case = cell_case(cell)
    state = case.state
    assert (state.mode, state.cpl, state.lass_supported) == (
        cell.mode,
        cell.cpl,
        cell.lass_supported,
    ), cell.name
    assert bool(state.cr4 & CR4_LASS) == cell.cr4_lass
    assert bool(state.cr4 & CR4_SMAP) == cell.cr4_smap
    assert bool(state.cr4 & CR4_SMEP) == cell.cr4_smep
    assert bool(state.cr4 & CR4_LA57) == cell.la57
    assert bool(state.rflags & RFLAGS_AC) == cell.ac
    # Code is always fetchable at the cell's CPL in 64-bit mode: its own half, its own U/S.
    # Compatibility-mode code lies below 4 GiB.
    assert (case.code_address >> 63) == (cell.cpl < 3 and cell.mode == "64"), cell.name
    assert page_of(case, case.code_address) == (cell.cpl == 3)
    for i in range(cell.size):
        assert page_of(case, (cell.address + i) & MASK64) == cell.page_user
    assert all(p.writable and not p.nx and p.present for p in case.pages if not state.system)
    wide = cell.mode == "64"
    if cell.kind == "fetch":
        assert disassemble(case.code, cell.mode) == ["jmp rbx" if wide else "jmp ebx"]
        assert state.gpr("rbx") == cell.address
        target = next(p for p in case.pages if p.address == cell.address & ~(PAGE_SIZE - 1))
        offset = cell.address - target.address
        assert disassemble(target.data[offset:], cell.mode) == ["jmp rcx" if wide else "jmp ecx"]
        assert state.gpr("rcx") == case.code_end
    elif cell.kind == "implicit-read":
        check_implicit_read(cell, case)
    else:
        assert state.system is None
        base = ("rsp" if cell.stack else "rbx") if wide else ("esp" if cell.stack else "ebx")
        memory = f"{'qword' if wide else 'dword'} ptr [{base}]"
        register = "rax" if wide else "eax"
        want = f"mov {register}, {memory}" if cell.kind == "read" else f"mov {memory}, {register}"
        assert disassemble(case.code, cell.mode) == [want]
        assert state.gpr(base.replace("e", "r", 1)) == cell.address
    assert case_from_json(case_to_json(case)) == case


def check_implicit_read(cell: Cell, case: TestCase) -> None:
    """``lar eax, ebx`` with EBX selecting LDT entry 0, and the LDT based at the cell's address
    (every other table page in the supervisor half)."""
    system = case.state.system
    assert system is not None and system.ldtr == EXTRA_SEL
    assert disassemble(case.code, cell.mode) == ["lar eax, ebx"]
    assert case.state.gpr("rbx") == 0b111  # index 0, TI = 1, RPL 3
    pages = {page.address: page.data.ljust(PAGE_SIZE, b"\0") for page in case.all_pages()}
    gdt = pages[system.gdt_base]
    low, high = struct.unpack_from("<QQ", gdt, EXTRA_SEL)
    base = (low >> 16 & 0xFF_FFFF) | (low >> 56) << 24 | high << 32
    assert (base, low >> 40 & 0x9F) == (cell.address, 0x82)  # present LDT descriptor
    descriptor = bytes(
        pages[(cell.address + i) & MASK64 & ~(PAGE_SIZE - 1)][(cell.address + i) % PAGE_SIZE]
        for i in range(8)
    )
    assert descriptor == segment_descriptor(code=False, dpl=3).to_bytes(8, "little")
    tables = (system.gdt_base, system.idt_base, case.state.gpr("rsp") - 1)
    assert all(address >> 63 for address in tables)


# ------------------------------------------------------------------ running and output


@dataclass
class FakeEngine:
    """Faults with #GP(0) on CPL3 cells; used to test the plumbing without a real engine."""

    name: str
    gp_on_cpl3: bool

    def run(self, case: TestCase, *, trace: bool = False) -> Outcome:
        if self.gp_on_cpl3 and case.state.cpl == 3:
            return Outcome(self.name, Status.FAULT, fault=Fault(13, 0, case.code_address))
        return Outcome(self.name, Status.COMPLETED)


def test_run_matrix_and_differing() -> None:
    engines: dict[str, Engine] = {
        "model": FakeEngine("model", gp_on_cpl3=True),
        "unicorn": FakeEngine("unicorn", gp_on_cpl3=False),
    }
    rows = run_matrix(engines)
    assert [row.cell for row in rows] == list(cells())
    assert {row.results["model"] for row in rows if row.cell.cpl == 3} == {"#GP(0)"}
    assert {row.results["unicorn"] for row in rows} == {"ok"}
    assert [row.cell for row in differing(rows)] == [c for c in cells() if c.cpl == 3]


def test_unrunnable_result_counts_as_differing() -> None:
    cell = cells()[0]
    assert differing([MatrixRow(cell, {"model": "unsupported"})])
    assert not differing([MatrixRow(cell, {"model": "#GP(0)"})])


def test_format_json_and_human() -> None:
    cell = next(
        c
        for c in cells()
        if c.cpl == 3 and c.kind == "read" and c.region is Region.SUPERVISOR and not c.stack
        and c.cr4_lass and c.cr4_smap and not (c.cr4_smep or c.ac or c.page_user)
    )  # fmt: skip
    row = MatrixRow(cell, {"unicorn": "ok", "model": "#GP(0)"})
    document = json.loads(format_json(row))
    assert list(document) == ["cell", "reference", "emulator"]
    assert document == {"cell": cell.to_dict(), "reference": "#GP(0)", "emulator": "ok"}
    assert format_human(row) == "cpl3 read supervisor-half lass smap: reference #GP(0) emulator ok"
    only_model = MatrixRow(cell, {"model": "#GP(0)"})
    assert list(json.loads(format_json(only_model))) == ["cell", "reference"]


# ------------------------------------------------------------------ against the real engines


@cache
def reference_rows() -> list[MatrixRow]:
    from lassfuzz.model.engine import ReferenceModel

    return run_matrix({"model": ReferenceModel()})


@cache
def emulator_rows(policy: str | None) -> list[MatrixRow]:
    from lassfuzz.emulator.machine import UnicornMachine
    from lassfuzz.policies import load_policy

    name, function = load_policy(policy)
    return run_matrix({"unicorn": UnicornMachine(policy=function, policy_name=name)})


def need(module: str) -> None:
    """Skip while a colleague's module does not exist yet; a module that exists but fails to
    import is an error, not a skip."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} not written yet")


def test_reference_matches_lass_md_on_every_cell() -> None:
    need("lassfuzz.model.engine")
    wrong = [
        f"{row.cell.name}: reference {row.results['model']}, expected {expected(row.cell)}"
        for row in reference_rows()
        if row.results["model"] != expected(row.cell)
    ]
    assert not wrong, f"{len(wrong)} cells:\n" + "\n".join(wrong)


def emulator_differences(policy: str | None) -> list[str]:
    need("lassfuzz.model.engine")
    need("lassfuzz.emulator.machine")
    pairs = zip(reference_rows(), emulator_rows(policy), strict=True)
    return [
        f"{ref.cell.name}: reference {ref.results['model']} emulator {emu.results['unicorn']}"
        for ref, emu in pairs
        if ref.results["model"] != emu.results["unicorn"]
    ]


def test_default_policy_emulator_equals_reference() -> None:
    differences = emulator_differences(None)
    assert not differences, "\n".join(differences)


@pytest.mark.slow  # the whole matrix on both engines once more
def test_policy_none_differs_exactly_on_lass_faults() -> None:
    differences = emulator_differences("none")
    lass_faults = [
        f"{row.cell.name}: reference {row.results['model']} emulator {paging_result(row.cell)}"
        for row in reference_rows()
        if row.results["model"] in ("#GP(0)", "#SS(0)")
    ]
    assert differences == lass_faults


def test_policy_bochs_differs_only_in_compat_mode_and_on_implicit_accesses_with_ac() -> None:
    """Bochs' two deviations (LASS.md §6): no check outside 64-bit mode (D1), and AC exempting
    implicit accesses (D2). Every differing cell is one of those, and D1 is every
    compatibility-mode cell where the SDM faults, implicit reads included."""
    differences = emulator_differences("bochs")
    by_name = {cell.name: cell for cell in cells()}
    differing_cells = [by_name[line.split(": reference ")[0]] for line in differences]
    d1 = [cell for cell in differing_cells if cell.mode == "compat"]
    d2 = [cell for cell in differing_cells if cell.mode == "64" and cell.implicit and cell.ac]
    assert d2 and any(cell.implicit for cell in d1)
    assert len(d1) + len(d2) == len(differing_cells), "\n".join(differences)
    compat_lass_faults = [
        row.cell
        for row in reference_rows()
        if row.cell.mode == "compat" and row.results["model"] in ("#GP(0)", "#SS(0)")
    ]
    assert d1 == compat_lass_faults


def test_matrix_main_reference_only() -> None:
    need("lassfuzz.model.engine")
    from lassfuzz.matrix import matrix_main

    out = io.StringIO()
    status = matrix_main(True, None, out, reference_only=True)
    lines = out.getvalue().splitlines()
    assert len(lines) == len(cells()) + 1
    first = json.loads(lines[0])
    assert list(first) == ["cell", "reference"]
    assert json.loads(lines[-1]) == {
        "summary": f"{len(cells())} cells, 0 differ",
        "cells": len(cells()),
        "differ": 0,
    }
    assert status == 0


@pytest.mark.slow  # the whole matrix on both engines once more
def test_matrix_main_human_lists_differing_cells_again() -> None:
    need("lassfuzz.model.engine")
    need("lassfuzz.emulator.machine")
    from lassfuzz.matrix import matrix_main

    out = io.StringIO()
    status = matrix_main(False, "none", out)  # no LASS in the shim: LASS cells must differ
    lines = out.getvalue().splitlines()
    cell_lines = lines[: len(cells())]
    assert [line.split(":")[0] for line in cell_lines] == [cell.name for cell in cells()]
    listed = lines[len(cells()) + 2 : -1]
    assert lines[len(cells()) : len(cells()) + 2] == ["", f"{len(listed)} differing cells:"]
    assert listed and set(listed) <= set(cell_lines)
    for line in listed:
        reference, emulator = line.split(": reference ")[1].split(" emulator ")
        assert reference != emulator
    assert lines[-1] == f"{len(cells())} cells, {len(listed)} differ"
    assert status == 1
