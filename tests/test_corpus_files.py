"""Replay every hand-written case in corpus/ and every crash file in crashes/.

Each corpus case states its expected reference result in ``meta`` (``expect`` = the outcome
summary, optionally ``expect_rip``, ``expect_regs`` {register: value}, ``expect_memory``
{linear address: hex bytes}, ``expect_no_walk`` [linear addresses whose paging entries a LASS
fault must leave untouched], ``expect_events`` [[event name, saved RIP], ...]: the events of a
case with descriptor tables, in order; ``expect_alternatives`` [summaries]: the other outcomes
the reference tolerates at a LASS.md §7 open point). A crash file expects what its recorded
reference outcome says, and, once fixed, no divergence. The emulator is checked too when it
exists, and the comparison once ``lassfuzz.compare.diff`` exists.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import capstone
import pytest

from lassfuzz.arch import MASK64, PAGE_SIZE, PTE_ADDR, PTE_P
from lassfuzz.case import TestCase, case_from_json, materialize
from lassfuzz.outcome import Engine, Outcome

ROOT = Path(__file__).resolve().parent.parent
CORPUS = sorted((ROOT / "corpus").glob("*.json"))
CRASHES = sorted((ROOT / "crashes").glob("*.json"))
SUMMARY = re.compile(
    r"ok|shutdown|#(GP|SS|NP|TS|DF)\([0-9]+\)|#PF\(0x[0-9a-f]+\)|#UD|#AC\(0\)|#DE|#BP"
    r"|vector 0x[0-9a-f]+"
)
META_KEYS = {
    "description", "disassembly", "expect", "expect_rip", "expect_regs", "expect_memory",
    "expect_no_walk", "expect_events", "expect_alternatives",
}  # fmt: skip
DISASM = {
    "64": capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64),
    "compat": capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32),
}


def available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@cache
def reference() -> Engine:
    from lassfuzz.model.engine import ReferenceModel

    return ReferenceModel()


@cache
def emulator() -> Engine:
    from lassfuzz.emulator.machine import UnicornMachine
    from lassfuzz.policies import load_policy

    name, function = load_policy(None)
    return UnicornMachine(policy=function, policy_name=name)


def load(path: Path) -> tuple[TestCase, Mapping[str, Any]]:
    """The case and its expectations; for a crash file, its recorded reference summary."""
    from lassfuzz.campaign.files import load_file

    loaded = load_file(path)
    expect = dict(loaded.case.meta)
    if loaded.crash is not None:
        expect.setdefault("expect", loaded.crash["reference"]["summary"])
    return loaded.case, expect


def test_corpus_is_not_empty() -> None:
    assert CORPUS, "corpus/ holds no case files"


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name)
def test_corpus_file_is_readable(path: Path) -> None:
    case = case_from_json(path.read_text(encoding="utf-8"))
    assert set(case.meta) <= META_KEYS, f"unknown meta keys {set(case.meta) - META_KEYS}"
    assert case.meta["description"].strip()
    assert SUMMARY.fullmatch(case.meta["expect"]), case.meta["expect"]
    disasm = DISASM[case.state.mode]
    listing = "; ".join(f"{i.mnemonic} {i.op_str}".strip() for i in disasm.disasm(case.code, 0))
    assert listing == case.meta["disassembly"], "meta.disassembly does not match code.bytes"
    assert sum(i.size for i in disasm.disasm(case.code, 0)) == len(case.code), "trailing bytes"


def read_linear(case: TestCase, outcome: Outcome, address: int, size: int) -> bytes:
    """Bytes of the final memory at a linear address, through the case's own page mapping."""
    frames = materialize(case).page_frames
    result = bytearray()
    for i in range(size):
        linear = (address + i) & MASK64
        frame = frames[linear & ~(PAGE_SIZE - 1)]
        result.append(outcome.memory[frame][linear % PAGE_SIZE])
    return bytes(result)


def walk_entries(case: TestCase, address: int) -> list[tuple[int, int]]:
    """(frame, offset) of each paging entry the initial tables hold for ``address``, down to
    the first non-present one: the entries a walk for it would find (and mark Accessed)."""
    image = materialize(case)
    table, found = image.cr3, []
    for shift in (48, 39, 30, 21, 12) if case.state.la57 else (39, 30, 21, 12):
        offset = ((address >> shift) & 0x1FF) * 8
        found.append((table, offset))
        entry = int.from_bytes(image.frames[table][offset : offset + 8], "little")
        if not entry & PTE_P:
            break
        table = entry & PTE_ADDR
    return found


def check_expectations(case: TestCase, expect: Mapping[str, Any], outcome: Outcome) -> None:
    assert outcome.summary == expect["expect"], f"{outcome.engine}: {outcome.detail}"
    if "expect_rip" in expect:
        assert outcome.fault is not None
        assert hex(outcome.fault.rip) == hex(int(expect["expect_rip"], 0))
    if "expect_events" in expect:
        events = [[event.name, hex(event.rip)] for event in outcome.events]
        wanted = [[name, hex(int(rip, 0))] for name, rip in expect["expect_events"]]
        assert events == wanted, f"{outcome.engine}: events"
    registers = outcome.registers.as_dict() if outcome.registers else {}
    for name, value in expect.get("expect_regs", {}).items():
        assert hex(registers[name]) == hex(int(value, 0)), f"{outcome.engine}: {name}"
    for address, data in expect.get("expect_memory", {}).items():
        wanted = bytes.fromhex(data)
        got = read_linear(case, outcome, int(address, 0), len(wanted))
        assert got.hex() == wanted.hex(), f"{outcome.engine}: memory at {address}"
    for address in expect.get("expect_no_walk", []):
        for frame, offset in walk_entries(case, int(address, 0)):
            entry = outcome.memory[frame][offset : offset + 8]
            assert entry == materialize(case).frames[frame][offset : offset + 8], (
                f"{outcome.engine}: paging entry for {address} at {frame + offset:#x} was written"
            )


@pytest.mark.parametrize("path", CORPUS + CRASHES, ids=lambda p: p.name)
def test_replay(path: Path) -> None:
    if not available("lassfuzz.model.engine"):
        pytest.skip("lassfuzz.model.engine not written yet")
    case, expect = load(path)
    ref = reference().run(case)
    check_expectations(case, expect, ref)
    alternatives = sorted(alternative.summary for alternative in ref.alternatives)
    assert alternatives == sorted(expect.get("expect_alternatives", alternatives))
    if not available("lassfuzz.emulator.machine"):
        return
    emu = emulator().run(case)
    check_expectations(case, expect, emu)
    if available("lassfuzz.compare.diff"):
        from lassfuzz.compare.diff import first_divergence

        divergence = first_divergence(case, ref, emu)
        assert divergence is None, divergence.describe()
