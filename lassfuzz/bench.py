"""``lassfuzz bench``: cases/s and instructions/s of every engine, on the same cases, in one run.

Rates are measured here and reported, never asserted in tests: this machine is shared and noisy,
so only ratios measured in one run mean something, and time is this process's CPU time (another
process on the same cores then slows a row less than its wall-clock time). Instructions/s counts
the reference model's instruction count for each case (the one engine that counts every
architectural instruction).

Plain Unicorn cannot run cases with descriptor tables (it has no IDT delivery and no privilege
switches without the shim): it answers "unsupported" for them at once, which would make it look
fast. So the four engine rows are timed on the generated cases plain Unicorn can run, and the
differential is timed once more on the whole default mix (``differential_full_mix``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from lassfuzz.case import TestCase
from lassfuzz.compare.differential import Differential
from lassfuzz.generator.generate import generate_case
from lassfuzz.outcome import Engine, Outcome, Status
from lassfuzz.policies import Policy

#: Timed rounds per row (see run_benchmark).
ROUNDS = 3
ROWS = (
    ("unicorn", "plain Unicorn (no shim)"),
    ("unicorn_shim", "Unicorn + LASS shim"),
    ("model", "reference model"),
    ("differential", "full differential"),
    ("differential_full_mix", "differential, whole mix"),
)


def _timed(run: Callable[[TestCase], object], cases: list[TestCase]) -> float:
    """Seconds ``run`` takes over ``cases``, each run on a fresh copy: a case caches its
    physical image (``materialize``), which a campaign builds once per case, so a row must
    not inherit another row's."""
    run(dataclasses.replace(cases[0]))  # warm caches (decoders, translation) outside the timing
    fresh = [dataclasses.replace(case) for case in cases]
    start = time.process_time()
    for case in fresh:
        run(case)
    return time.process_time() - start


def run_benchmark(
    *, cases: int, seed: int, policy: Policy, policy_name: str
) -> dict[str, dict[str, Any]]:
    """Generate ``cases`` cases and time each engine on all of them."""
    from lassfuzz.emulator.machine import UnicornMachine
    from lassfuzz.model.engine import ReferenceModel

    mix = [generate_case(seed, index) for index in range(cases)]
    model = ReferenceModel()
    shim = UnicornMachine(policy=policy, policy_name=policy_name)
    plain = UnicornMachine(shim=False)
    batch = [case for case in mix if plain.run(case).status is not Status.UNSUPPORTED]
    if not batch:
        raise ValueError("plain Unicorn can run none of the generated cases")
    differential = Differential(model, shim)
    rows: dict[str, tuple[list[TestCase], Callable[[TestCase], object]]] = {
        "unicorn": (batch, plain.run),
        "unicorn_shim": (batch, shim.run),
        "model": (batch, model.run),
        "differential": (batch, differential.run),
        "differential_full_mix": (mix, differential.run),
    }
    # Rows take turns, ROUNDS times, and each keeps its fastest round: a neighbour's burst
    # then slows one round of every row instead of the whole of one row (measured: the first
    # row alone lost up to 2x when the rows ran one after another).
    best: dict[str, float] = {}
    for _ in range(ROUNDS):
        for name, (run_cases, engine_run) in rows.items():
            seconds = _timed(engine_run, run_cases)
            best[name] = min(seconds, best.get(name, seconds))
    timings = {name: (rows[name][0], best[name]) for name in rows}
    counted = {id(batch): _instructions(model, batch), id(mix): _instructions(model, mix)}
    return {
        name: {
            "cases": len(run),
            "seconds": round(seconds, 4),
            "cases_per_sec": round(len(run) / seconds, 1),
            "instructions_per_sec": round(counted[id(run)] / seconds, 1),
        }
        for name, (run, seconds) in timings.items()
    }


def _instructions(model: Engine, cases: list[TestCase]) -> int:
    outcomes: list[Outcome] = [model.run(case) for case in cases]
    return sum(outcome.instructions for outcome in outcomes)


def format_table(results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'engine':<28} {'cases':>6} {'cases/s':>10} {'instructions/s':>15}"]
    for key, label in ROWS:
        row = results[key]
        lines.append(
            f"{label:<28} {row['cases']:>6} {row['cases_per_sec']:>10.1f} "
            f"{row['instructions_per_sec']:>15.1f}"
        )
    plain = results["unicorn"]["cases_per_sec"]
    lines.append(
        f"shim keeps {results['unicorn_shim']['cases_per_sec'] / plain:.0%} of plain Unicorn; "
        f"differential runs at {results['differential']['cases_per_sec'] / plain:.0%} of it"
    )
    return "\n".join(lines) + "\n"
