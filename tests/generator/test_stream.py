"""The generated stream is pinned: a crash file's (seed, index, config) must keep giving its case.

If a digest changes, the generator now makes other cases for the same arguments: that is only
allowed together with a new ``GENERATOR_VERSION`` (and new digests here).
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from lassfuzz.case import TestCase
from lassfuzz.generator.generate import GENERATOR_VERSION, GeneratorConfig, generate_case

_SYSTEM_FIELDS = (
    "gdt_base", "gdt_limit", "idt_base", "idt_limit", "cs", "ss", "ds", "es", "fs", "gs", "tr",
    "ldtr", "star", "lstar", "sfmask",
)  # fmt: skip


def fingerprint(case: TestCase) -> bytes:
    """Every generated field of ``case``, independent of the JSON form."""
    s = case.state
    system = None if s.system is None else tuple(getattr(s.system, n) for n in _SYSTEM_FIELDS)
    pages = tuple(
        (p.address, p.user, p.writable, p.nx, p.present, p.accessed, p.dirty, p.data)
        for p in case.pages
    )
    fields = (
        s.mode, s.cpl, s.gprs, s.rflags, s.cr0, s.cr4, s.efer, s.fs_base, s.gs_base,
        s.lass_supported, system, case.code, case.code_address, pages, sorted(case.meta.items()),
    )  # fmt: skip
    return repr(fields).encode()


@pytest.mark.parametrize(
    ("seed", "count", "changes", "digest"),
    [
        (1, 200, {}, "9b49f09179050936"),
        (2, 200, {}, "2077b484d6d9fbfb"),
        (
            3,
            100,
            {"p_compat": 0.9, "p_system": 0.9, "p_cpl12": 0.5, "max_instructions": 64},
            "4fc7c697cfad9a65",
        ),
        (
            4,
            100,
            {
                "p_la57": 0.9,
                "p_wrap_access": 0.5,
                "p_safe_access": 0.1,
                "p_index": 0.6,
                "p_segment_override": 0.6,
            },
            "3e8f50a5258dba5e",
        ),
    ],
)
def test_cases_are_the_pinned_ones(
    seed: int, count: int, changes: dict[str, Any], digest: str
) -> None:
    assert GENERATOR_VERSION == "lassfuzz-gen-2"  # the stream these digests pin
    config = GeneratorConfig.from_dict(changes)
    hashed = hashlib.sha256()
    for index in range(count):
        hashed.update(fingerprint(generate_case(seed, index, config)))
    assert hashed.hexdigest()[:16] == digest
