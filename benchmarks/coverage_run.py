"""Decision-cell coverage over a case budget, with coverage steering on and off.

Usage: ``python benchmarks/coverage_run.py [--cases N] [--epoch E] [--seed S] [--every K]
[--differential] [--no-steering | --only-steering]``.

Runs cases ``0 .. N-1`` of one seed in one process, in epochs of ``E`` cases (default: the
campaign's); with steering, each epoch's config comes from the campaign's own
:class:`lassfuzz.campaign.epochs.Epochs` (``steer(base, e, coverage of epochs 0 .. e - 2)``). Prints
``cases -> covered/total`` every ``K`` cases for each variant, then the cells never hit. By default
only the reference model runs (coverage is computed there; the emulator does not change it);
``--differential`` runs the full differential, so that the wall-clock column matches a
one-worker campaign and the 5-minute, 2-core acceptance can be read off (cases covered within
2 x 300 s x one worker's cases/s).
"""

from __future__ import annotations

import argparse
import time

from lassfuzz.campaign.coverage import Coverage, CoverageRecorder
from lassfuzz.campaign.epochs import Epochs
from lassfuzz.campaign.supervisor import DEFAULT_EPOCH_CASES
from lassfuzz.generator.config import DEFAULT_CONFIG
from lassfuzz.generator.generate import generate_case
from lassfuzz.model.engine import ReferenceModel
from lassfuzz.outcome import Engine


def run(
    *, steering: bool, cases: int, epoch_size: int, seed: int, every: int, differential: bool
) -> Coverage:
    recorder = CoverageRecorder()
    model = ReferenceModel(observer=recorder)
    engines: list[Engine] = [model]
    if differential:
        from lassfuzz.emulator.machine import UnicornMachine
        from lassfuzz.policies import load_policy

        name, policy = load_policy(None)
        engines.append(UnicornMachine(policy=policy, policy_name=name))
    coverage = Coverage()
    epochs = Epochs(DEFAULT_CONFIG, epoch_size)
    started = time.perf_counter()
    label = "steering" if steering else "base"
    for index in range(cases):
        epoch = epochs.epoch_of(index)
        config = epochs.config(epoch, index) if steering else DEFAULT_CONFIG
        assert config is not None  # cases run in order: epoch - 2 is always complete
        case = generate_case(seed, index, config)
        recorder.begin(case)
        try:
            for engine in engines:
                engine.run(case)
        finally:
            seen = recorder.end()
        coverage.add(seen)
        epochs.add(epoch, dict.fromkeys(seen.cells, 1))
        if (index + 1) % every == 0 or index + 1 == cases:
            elapsed = time.perf_counter() - started
            print(
                f"{label:9} {index + 1:8} cases {elapsed:7.1f} s  "
                f"covered {coverage.covered}/{coverage.total}",
                flush=True,
            )
    return coverage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=50_000)
    parser.add_argument("--epoch", type=int, default=DEFAULT_EPOCH_CASES, help="cases per epoch")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--every", type=int, default=5_000, help="print every K cases")
    parser.add_argument("--differential", action="store_true", help="also run the emulator")
    variants = parser.add_mutually_exclusive_group()
    variants.add_argument("--no-steering", action="store_true")
    variants.add_argument("--only-steering", action="store_true")
    args = parser.parse_args()
    chosen = [False] if args.no_steering else [True] if args.only_steering else [False, True]
    for steering in chosen:
        coverage = run(
            steering=steering,
            cases=args.cases,
            epoch_size=args.epoch,
            seed=args.seed,
            every=args.every,
            differential=args.differential,
        )
        missing = coverage.uncovered()
        print(f"{'steering' if steering else 'base'}: {len(missing)} reachable cells never hit")
        for name in missing:
            print(f"  {name}")


if __name__ == "__main__":
    main()
