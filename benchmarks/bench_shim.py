"""Cases/s of plain Unicorn against Unicorn with the LASS shim, on the same cases.

Plain Unicorn is ``UnicornMachine(shim=False)``: its own ``Uc`` with QEMU's own page walk and no
Python hook but the exception one, with the same per-case reset and its budget counted by
Unicorn's ``count``. The shim column therefore pays for everything the shim adds (pre-scan, the
Python page walk, block and intercept hooks, fault rebuild). Acceptance goal: shim >= 75% of
plain, on the cases plain Unicorn runs: it answers cases with descriptor tables
(``State.system``) UNSUPPORTED at once, so those are timed apart, for the shim only. Rates are
CPU time of this process (the machine is shared). Usage::

    python benchmarks/bench_shim.py [--cases N] [--seed S] [--hand] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections.abc import Callable

from lassfuzz.case import DEFAULT_CODE_ADDRESS, Page, State, TestCase
from lassfuzz.emulator.machine import UnicornMachine
from lassfuzz.outcome import Outcome

GOAL = 0.75


def hand_cases(count: int) -> list[TestCase]:
    """Straight-line user cases of ~20 instructions with loads and stores (no generator)."""
    body = bytes.fromhex("488903488b0b48ffc04801c848894308") * 4  # 20 instructions
    data = Page(0x50_0000, user=True)
    cases = []
    for index in range(count):
        gprs = (index, 0, 0, 0x50_0000 + 8 * (index % 256)) + (0,) * 12
        state = State(cpl=3, gprs=gprs)
        cases.append(TestCase(state, body, DEFAULT_CODE_ADDRESS[3], (data,)))
    return cases


def generated_cases(count: int, seed: int) -> list[TestCase]:
    from lassfuzz.generator.generate import generate_case  # written in parallel; optional

    return [generate_case(seed, index) for index in range(count)]


def rate(run: Callable[[TestCase], Outcome], cases: list[TestCase], rounds: int) -> float:
    """Best cases/s over ``rounds`` passes, in CPU time (the machine is shared and noisy)."""
    if not cases:
        return 0.0
    run(cases[0])
    best = 0.0
    for _ in range(rounds):
        start = time.process_time()
        for case in cases:
            run(case)
        best = max(best, len(cases) / max(time.process_time() - start, 1e-9))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hand", action="store_true", help="hand-built cases, no generator")
    parser.add_argument("--profile", action="store_true", help="profile the shim run")
    args = parser.parse_args()
    cases = hand_cases(args.cases) if args.hand else generated_cases(args.cases, args.seed)
    plain = UnicornMachine(shim=False)
    shim = UnicornMachine()
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(lambda: [shim.run(case) for case in cases])
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
        return
    statuses: dict[str, int] = {}
    for case in cases:
        summary = shim.run(case).status.value
        statuses[summary] = statuses.get(summary, 0) + 1
    both = [case for case in cases if case.state.system is None]
    system = [case for case in cases if case.state.system is not None]
    plain_rate = rate(plain.run, both, args.rounds)
    shim_rate = rate(shim.run, both, args.rounds)
    source = "hand-built" if args.hand else f"generated (seed {args.seed})"
    print(f"{len(cases)} {source} cases; shim outcomes: {statuses}")
    print(f"{len(both)} cases without descriptor tables:")
    print(f"  plain Unicorn        {plain_rate:10.0f} cases/s")
    ratio = shim_rate / plain_rate
    verdict = "met" if ratio >= GOAL else "NOT met"
    print(
        f"  Unicorn + LASS shim  {shim_rate:10.0f} cases/s  {ratio:4.0%} of plain "
        f"(goal {GOAL:.0%}: {verdict})"
    )
    if system:
        system_rate = rate(shim.run, system, args.rounds)
        print(f"{len(system)} cases with descriptor tables (shim only):")
        print(f"  Unicorn + LASS shim  {system_rate:10.0f} cases/s")


if __name__ == "__main__":
    main()
