"""Benchmark case generation: microseconds per case, single core.

Usage: ``python benchmarks/bench_generator.py [--cases N] [--seed S] [--max-instructions M]``.
The budget is ~150 us per case (the whole differential must reach >= 1000 cases/s on one core).
"""

from __future__ import annotations

import argparse
import statistics
import time

from lassfuzz.generator.generate import GeneratorConfig, generate_case


def bench(cases: int, seed: int, config: GeneratorConfig, repeats: int = 3) -> list[float]:
    """Microseconds per case for ``repeats`` runs over case indexes 0..cases-1."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for index in range(cases):
            generate_case(seed, index, config)
        rates.append((time.perf_counter() - start) / cases * 1e6)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-instructions", type=int, default=32)
    args = parser.parse_args()
    config = GeneratorConfig(max_instructions=args.max_instructions)
    rates = bench(args.cases, args.seed, config)
    print(
        f"generate_case: {statistics.median(rates):.1f} us/case median "
        f"(runs: {', '.join(f'{r:.1f}' for r in rates)}), "
        f"{1e6 / statistics.median(rates):.0f} cases/s, max_instructions={args.max_instructions}"
    )


if __name__ == "__main__":
    main()
