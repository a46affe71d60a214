"""``lassfuzz show``: a case or crash file in human form.

Disassembly (capstone, independent of the decoder both engines use), the initial state and
pages, and for crash files both recorded outcomes side by side with the first divergence marked
and the LASS rule each side reported.
"""

from __future__ import annotations

from typing import Any

import capstone

from lassfuzz.arch import GPR_NAMES
from lassfuzz.campaign.files import LoadedFile
from lassfuzz.case import TestCase

_REGISTER_ORDER = (
    "rip", "rflags", *GPR_NAMES, "cr0", "cr3", "cr4", "efer", "cpl", "fs_base", "gs_base",
)  # fmt: skip


def disassemble(case: TestCase) -> list[str]:
    """One line per instruction: address, bytes, capstone text; undecodable bytes as .byte."""
    engine = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    lines = []
    offset = 0
    while offset < len(case.code):
        address = case.code_address + offset
        decoded = next(engine.disasm(case.code[offset:], address, 1), None)
        if decoded is None:
            lines.append(
                f"  {address:#018x}  {case.code[offset]:02x}  .byte {case.code[offset]:#04x}"
            )
            offset += 1
            continue
        text = f"{decoded.mnemonic} {decoded.op_str}".strip()
        lines.append(f"  {address:#018x}  {decoded.bytes.hex():<24} {text}")
        offset += decoded.size
    lines.append(f"  {case.code_end:#018x}  (end of code)")
    return lines


def _state_lines(case: TestCase) -> list[str]:
    state = case.state
    nonzero = [
        f"{name}={value:#x}" for name, value in zip(GPR_NAMES, state.gprs, strict=True) if value
    ]
    lines = [
        f"  mode {state.mode}  cpl {state.cpl}  lass_supported {state.lass_supported}",
        f"  rflags {state.rflags:#x}  cr0 {state.cr0:#x}  cr4 {state.cr4:#x}  efer {state.efer:#x}",
        f"  fs_base {state.fs_base:#x}  gs_base {state.gs_base:#x}",
        "  " + ("  ".join(nonzero) if nonzero else "all GPRs zero"),
        "  pages:",
    ]
    for page in case.all_pages():
        flags = " ".join(
            name
            for name, on in (
                ("user" if page.user else "supervisor", True),
                ("rw" if page.writable else "ro", True),
                ("nx", page.nx),
                ("not-present", not page.present),
                ("A", page.accessed),
                ("D", page.dirty),
            )
            if on
        )
        lines.append(f"    {page.address:#018x}  {flags}")
    return lines


def _outcome_rows(outcome: dict[str, Any]) -> dict[str, str]:
    fault = outcome.get("fault") or {}
    rows = {
        "outcome": str(outcome.get("summary")),
        "fault rip": str(fault.get("rip", "-")),
        "cr2": str(fault.get("cr2") or "-"),
        "access": f"{fault.get('access') or '-'} {fault.get('address') or ''}".strip(),
    }
    registers = outcome.get("registers") or {}
    rows.update({name: str(registers.get(name, "-")) for name in _REGISTER_ORDER})
    return rows


def _side_by_side(crash: dict[str, Any]) -> list[str]:
    reference = _outcome_rows(crash["reference"])
    emulator = _outcome_rows(crash["emulator"])
    divergence = crash.get("divergence") or {}
    first_field = divergence.get("field")
    lines = [f"  {'':10} {'reference':<24} {'emulator':<24}"]
    for name in reference:
        left, right = reference[name], emulator[name]
        marker = "  "
        if left != right:
            marker = ">>" if name == first_field or name == "outcome" else " *"
        lines.append(f"{marker}{name:10} {left:<24} {right:<24}")
    for side in ("reference", "emulator"):
        detail = crash[side].get("detail")
        if detail:
            lines.append(f"  {side} says: {detail}")
    return lines


def render(loaded: LoadedFile) -> str:
    """The whole human-readable view of a case or crash file."""
    case = loaded.case
    out = [f"{loaded.path}"]
    description = case.meta.get("description")
    if description:
        out.append(f"  {description}")
    crash = loaded.crash
    if crash is not None:
        out.append(
            f"signature {crash['signature']['id'][:12]} ({crash['class']}): {crash['summary']}"
        )
        divergence = crash["divergence"]
        out.append(
            f"FIRST DIVERGENCE: {divergence['kind']} {divergence['field']}: "
            f"reference {divergence['reference']}, emulator {divergence['emulator']}"
        )
        versions = crash.get("versions", {})
        out.append(
            "found with "
            + ", ".join(f"{k} {v}" for k, v in versions.items())
            + f"; seed {crash.get('seed')} index {crash.get('index')}"
        )
    out.append("code:")
    out.extend(disassemble(case))
    out.append("initial state:")
    out.extend(_state_lines(case))
    if crash is not None:
        out.append("outcomes:")
        out.extend(_side_by_side(crash))
    return "\n".join(out) + "\n"
