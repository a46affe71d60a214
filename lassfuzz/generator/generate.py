"""Deterministic case generation: ``generate_case(seed, index)``.

Each case draws from its own stream (numpy ``SeedSequence(seed, spawn_key=(index,))`` seeding a
private ``random.Random``), so a case depends only on (seed, index, config): not on the process,
the number of workers or the order cases are made in.
"""

from __future__ import annotations

import functools
from types import MappingProxyType
from typing import Any, Final

from lassfuzz.arch import MASK64
from lassfuzz.case import Page, TestCase
from lassfuzz.generator.choices import Chooser, RandomChooser, Weighted
from lassfuzz.generator.config import DEFAULT_CONFIG, GROUPS, ConfigError, GeneratorConfig
from lassfuzz.generator.instructions import (
    BUILDERS,
    PRIVILEGED_GROUPS,
    TERMINAL_GROUPS,
    CodeBuilder,
    GroupBuilder,
    assemble,
    landing_pad,
)
from lassfuzz.generator.layout import draw_setup
from lassfuzz.generator.system_groups import LONG_MODE_GROUPS, SYSTEM_BUILDERS

__all__ = ["GENERATOR_VERSION", "ConfigError", "GeneratorConfig", "build_case", "generate_case"]

#: Recorded in ``case.meta``; bump whenever the same (seed, index, config) would give another case.
GENERATOR_VERSION: Final = "lassfuzz-gen-2"


#: Every group's builder: the common ones and those that need descriptor tables.
ALL_BUILDERS: Final[dict[str, GroupBuilder]] = {**BUILDERS, **SYSTEM_BUILDERS}


@functools.lru_cache(maxsize=128)
def _group_tables(
    config: GeneratorConfig, cpl: int, system: bool, bits: int
) -> tuple[Weighted[str], Weighted[str]]:
    """Weighted group tables for the body and for the last group (terminators only last).

    At CPL > 0 privileged groups (which just #GP there) get a quarter of their weight, so that
    such cases still run past them most of the time. Groups the case cannot use (system groups
    without tables, 64-bit-only groups in 32-bit code) are left out, unless nothing else is left:
    then their builders fall back to a plain MOV.
    """
    order = {name: position for position, name in enumerate(GROUPS)}
    pairs = sorted(config.groups, key=lambda pair: order[pair[0]])
    if cpl > 0:
        pairs = [(n, -(-w // 4) if n in PRIVILEGED_GROUPS else w) for n, w in pairs]
    unusable = set() if system else set(SYSTEM_BUILDERS)
    unusable |= LONG_MODE_GROUPS if bits == 32 else set()
    usable = [(name, weight) for name, weight in pairs if name not in unusable]
    if any(weight for name, weight in usable if name not in TERMINAL_GROUPS):
        pairs = usable
    body = [(name, weight) for name, weight in pairs if name not in TERMINAL_GROUPS]
    if not any(weight for _, weight in body):
        raise ConfigError("groups: only terminal groups (hlt, ud2) have a positive weight")
    return Weighted.of(body), Weighted.of(pairs)


def build_case(chooser: Chooser, config: GeneratorConfig, meta: dict[str, Any]) -> TestCase:
    """Draw one case from ``chooser``: the single generation logic behind both choice sources."""
    setup = draw_setup(chooser, config)
    builder = CodeBuilder(chooser, config, setup)
    body, last = _group_tables(config, setup.control.cpl, setup.system is not None, builder.bits)
    layout = setup.layout
    count = chooser.integer(config.min_instructions, config.max_instructions)
    groups = builder.build(count, body, last, ALL_BUILDERS)
    code = assemble(groups, layout.code_address, builder.bits)
    pad_code = landing_pad((layout.code_address + len(code)) & MASK64, builder.bits)
    pads = tuple(
        Page(address, user=user, writable=False, data=pad_code) for address, user in layout.pads
    )
    code_pages = () if layout.code_page is None else (layout.code_page,)
    return TestCase(
        state=setup.state(),
        code=code,
        code_address=layout.code_address,
        pages=(*layout.pages, *pads, *code_pages, *setup.system_pages),
        meta=MappingProxyType(meta),
    )


def generate_case(seed: int, index: int, config: GeneratorConfig = DEFAULT_CONFIG) -> TestCase:
    """Case ``index`` of the campaign with ``seed``; the same arguments give the same case."""
    meta: dict[str, Any] = {"seed": seed, "index": index, "generator": GENERATOR_VERSION}
    changed = config.to_dict()
    if changed:
        meta["config"] = changed
    return build_case(RandomChooser.for_case(seed, index), config, meta)
