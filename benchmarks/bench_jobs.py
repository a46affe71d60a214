"""Campaign throughput with ``--jobs 1`` against ``--jobs 2`` on the same seed.

Runs the real supervisor and local worker processes for ``--duration`` seconds each into
temporary directories, and measures the steady rate from ``plot_data.csv`` (the cases between
the first and the last statistics line over the time between them), so that worker start-up
(spawning, importing Unicorn, the machine self-test) is not counted. Acceptance goal (issue 5):
``--jobs 2`` >= 1.8x ``--jobs 1`` on an otherwise idle 2-core machine.

For comparison it also measures the ceiling: the same number of bare
:class:`~lassfuzz.campaign.work.ChunkRunner` processes with no supervisor, no files and no
backend. If the ceiling itself does not scale, the machine is busy and the ratio means
nothing; the campaign rate over the ceiling is what the supervisor costs. Usage::

    python benchmarks/bench_jobs.py [--duration 20] [--seed S] [--policy P] [--jobs 1 2]
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import tempfile
import time
from pathlib import Path

from lassfuzz.campaign.backend import LocalBackend
from lassfuzz.campaign.display import PlainDisplay
from lassfuzz.campaign.supervisor import CampaignConfig, Supervisor
from lassfuzz.campaign.work import Chunk, ChunkRunner

GOAL = 1.8


def steady_rate(out: Path) -> float:
    """Cases/s between the first and the last line of ``plot_data.csv``."""
    lines = [line.split(",") for line in (out / "plot_data.csv").read_text().splitlines()[1:]]
    if len(lines) < 2:
        raise SystemExit(f"{out}: too few statistics lines; use a longer --duration")
    (t0, _, cases0, *_), (t1, _, cases1, *_) = lines[0], lines[-1]
    return (int(cases1) - int(cases0)) / (float(t1) - float(t0))


def measure(jobs: int, *, seed: int, policy: str, duration: float) -> float:
    with tempfile.TemporaryDirectory(prefix=f"bench-jobs{jobs}-") as directory:
        out = Path(directory)
        config = CampaignConfig(out=out, seed=seed, policy=policy, duration_s=duration)
        Supervisor(config, LocalBackend(jobs), PlainDisplay(io.StringIO())).run()
        return steady_rate(out)


def bare_runner(seed: int, policy: str, start: int, duration: float) -> float:
    """Cases/s of one process running chunks back to back (after a warm-up chunk)."""
    runner = ChunkRunner()
    runner.run(Chunk(seed=seed, start=start, count=32, policy=policy))
    started, cases = time.perf_counter(), 0
    while time.perf_counter() - started < duration:
        chunk = Chunk(seed=seed, start=start + 32 + cases, count=128, policy=policy)
        cases += runner.run(chunk).cases
    return cases / (time.perf_counter() - started)


def ceiling(jobs: int, *, seed: int, policy: str, duration: float) -> float:
    """Total cases/s of ``jobs`` bare runner processes on disjoint index ranges."""
    arguments = [(seed, policy, job * 10**7, duration) for job in range(jobs)]
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        return sum(pool.starmap(bare_runner, arguments))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per measurement")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--policy", default="sdm")
    parser.add_argument("--jobs", type=int, nargs=2, default=(1, 2), metavar=("A", "B"))
    args = parser.parse_args()
    settings = {"seed": args.seed, "policy": args.policy, "duration": args.duration}
    rates, bare = {}, {}
    for jobs in args.jobs:
        rates[jobs] = measure(jobs, **settings)
        bare[jobs] = ceiling(jobs, **settings)
        print(
            f"--jobs {jobs}: {rates[jobs]:8.1f} cases/s  (bare runners: {bare[jobs]:8.1f}, "
            f"campaign at {100 * rates[jobs] / bare[jobs]:.0f}% of them)"
        )
    low, high = args.jobs
    ratio = rates[high] / rates[low]
    verdict = "meets" if ratio >= GOAL else "misses"
    print(f"ratio --jobs {high} / --jobs {low}: {ratio:.2f}x ({verdict} the {GOAL}x goal)")
    print(f"bare runners' ratio (what the machine allows now): {bare[high] / bare[low]:.2f}x")


if __name__ == "__main__":  # required: workers are spawned, and re-import this module
    main()
