"""``lassfuzz bench``: cases/s and instructions/s of every engine, on the same cases, in one run.

Rates are measured here and reported, never asserted in tests: this machine is shared and noisy,
so only ratios measured in one run mean something. Instructions/s counts the reference model's
instruction count for each case (the one engine that counts every architectural instruction).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from lassfuzz.case import TestCase
from lassfuzz.compare.differential import Differential
from lassfuzz.generator.generate import generate_case
from lassfuzz.outcome import Outcome
from lassfuzz.policies import Policy

ROWS = (
    ("unicorn", "plain Unicorn (no shim)"),
    ("unicorn_shim", "Unicorn + LASS shim"),
    ("model", "reference model"),
    ("differential", "full differential"),
)


def _timed(run: Callable[[TestCase], object], cases: list[TestCase]) -> float:
    run(cases[0])  # warm caches (decoders, translation) outside the measurement
    start = time.perf_counter()
    for case in cases:
        run(case)
    return time.perf_counter() - start


def run_benchmark(
    *, cases: int, seed: int, policy: Policy, policy_name: str
) -> dict[str, dict[str, Any]]:
    """Generate ``cases`` cases and time each engine on all of them."""
    from lassfuzz.emulator.machine import UnicornMachine
    from lassfuzz.model.engine import ReferenceModel

    batch = [generate_case(seed, index) for index in range(cases)]
    model = ReferenceModel()
    shim = UnicornMachine(policy=policy, policy_name=policy_name)
    plain = UnicornMachine(shim=False)
    outcomes: list[Outcome] = [model.run(case) for case in batch]
    instructions = sum(outcome.instructions for outcome in outcomes)
    differential = Differential(model, shim)
    timings = {
        "unicorn": _timed(plain.run, batch),
        "unicorn_shim": _timed(shim.run, batch),
        "model": _timed(model.run, batch),
        "differential": _timed(differential.run, batch),
    }
    return {
        name: {
            "cases": cases,
            "seconds": round(seconds, 4),
            "cases_per_sec": round(cases / seconds, 1),
            "instructions_per_sec": round(instructions / seconds, 1),
        }
        for name, seconds in timings.items()
    }


def format_table(results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'engine':<28} {'cases/s':>10} {'instructions/s':>15}"]
    for key, label in ROWS:
        row = results[key]
        lines.append(
            f"{label:<28} {row['cases_per_sec']:>10.1f} {row['instructions_per_sec']:>15.1f}"
        )
    plain = results["unicorn"]["cases_per_sec"]
    lines.append(
        f"shim keeps {results['unicorn_shim']['cases_per_sec'] / plain:.0%} of plain Unicorn; "
        f"differential runs at {results['differential']['cases_per_sec'] / plain:.0%} of it"
    )
    return "\n".join(lines) + "\n"
