"""Localizing a data divergence to the instruction that computed it.

A divergence in computed data (memory, the access trace, a general register, RFLAGS but AC:
:func:`lassfuzz.compare.differential.beyond_lass`) comes from an instruction the emulator
computes differently, and that instruction is rarely the one that faulted. A signature built
from the fault's LASS context (CPL, half, SMAP/AC, family of the faulting instruction) would
split one emulator bug into a bucket per context it happened to be followed by: measured, one
Unicorn CMPXCHG8B flags bug made 388 buckets in a 10-minute campaign. Running ever longer
prefixes of the code on both engines finds the first instruction after which the engines
already differ in the same field; the signature names that instruction instead.

Only the engines' :class:`~lassfuzz.outcome.Engine` interface is used, so this works for any
engine pair. It costs up to one run per instruction, paid only by diverging cases whose
divergence is beyond LASS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Final

from iced_x86 import Decoder, DecoderOptions, Formatter, FormatterSyntax

from lassfuzz.case import CaseFormatError, TestCase
from lassfuzz.compare.diff import Comparison, Divergence, Verdict
from lassfuzz.families import family_of

_FORMATTER: Final = Formatter(FormatterSyntax.INTEL)


@dataclass(frozen=True)
class Culprit:
    """The first instruction whose code prefix shows the divergence: its family and mnemonic
    (with prefixes, e.g. ``lock neg``), and the prefix's outcome summaries."""

    family: str
    mnemonic: str
    reference: str
    emulator: str


def divergence_key(divergence: Divergence) -> str:
    """What must match between the whole case's divergence and a prefix's: the kind, plus the
    register for register divergences (a memory divergence's frame depends on the layout)."""
    if divergence.kind == "register":
        return f"register:{divergence.field}"
    return divergence.kind


#: Runs a case on both engines: how they compare and both outcomes' summaries.
RunBoth = Callable[[TestCase], tuple[Comparison, str, str]]


def find_culprit(case: TestCase, divergence: Divergence, run: RunBoth) -> Culprit | None:
    """The first instruction ``i`` such that the code up to and including ``i`` diverges like
    ``divergence``; None when no prefix does (the divergence needs the whole case: a later
    loop, a fault's delivery)."""
    wanted = divergence_key(divergence)
    bits = 32 if case.state.mode == "compat" else 64
    decoder = Decoder(bits, case.code, DecoderOptions.NONE, case.code_address)
    for instruction in decoder:
        end = instruction.ip + instruction.len - case.code_address
        if end > len(case.code):  # a truncated last instruction: the whole case is the prefix
            return None
        try:
            prefix = replace(case, code=case.code[:end])
        except CaseFormatError:
            return None
        comparison, reference, emulator = run(prefix)
        found = comparison.divergence
        if comparison.verdict is Verdict.DIVERGE and found and divergence_key(found) == wanted:
            mnemonic = _FORMATTER.format_mnemonic(instruction)
            return Culprit(family_of(instruction), mnemonic, reference, emulator)
    return None
