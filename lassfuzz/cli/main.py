"""``lassfuzz`` command line: fuzz, repro, minimize, show, bench, matrix, stats, report.

Exit codes are part of the interface: 0 nothing found (or does not reproduce), 1 divergence
found (or reproduced), 2 usage or runtime error, always with one clear line on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from lassfuzz import __version__

if TYPE_CHECKING:
    from lassfuzz.campaign.backend import Backend
    from lassfuzz.compare.differential import Differential

EXIT_OK = 0
EXIT_FOUND = 1
EXIT_ERROR = 2

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class UsageError(Exception):
    """Bad command-line input; reported as one line with exit status 2."""


def parse_duration(text: str) -> float:
    """``600``, ``90s``, ``10m``, ``8h``, ``1d`` → seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (examples: 600, 90s, 10m, 8h)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lassfuzz",
        description="Differential fuzzer for Intel LASS: Unicorn + LASS shim vs a reference model.",
    )
    parser.add_argument("--version", action="version", version=f"lassfuzz {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def policy_option(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--policy",
            default=None,
            metavar="P",
            help="shim policy: sdm (default), bochs, none, or package.module:function",
        )

    def trace_option(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--trace",
            action="store_true",
            help="also compare access traces (slower; crash files found with it replay with it)",
        )

    fuzz = sub.add_parser("fuzz", help="run a fuzzing campaign")
    fuzz.add_argument("--out", type=Path, default=Path("."), help="output directory (default: .)")
    fuzz.add_argument("--duration", type=parse_duration, default=None, help="e.g. 600, 10m, 8h")
    fuzz.add_argument(
        "--cases",
        type=int,
        default=None,
        metavar="N",
        help="stop when cases 0..N-1 are done (also on resume)",
    )
    fuzz.add_argument("--seed", type=int, default=None, help="campaign seed (default: 1)")
    fuzz.add_argument("--stop-on-first", action="store_true", help="stop at the first divergence")
    fuzz.add_argument(
        "--jobs", type=int, default=None, metavar="N", help="worker processes (default: all cores)"
    )
    fuzz.add_argument(
        "--cluster",
        default=None,
        metavar="tcp://HOST:PORT",
        help="run the workers on this Dask scheduler's cluster (needs lassfuzz[cluster])",
    )
    fuzz.add_argument(
        "--resume", action="store_true", help="continue the campaign in --out where it stopped"
    )
    fuzz.add_argument(
        "--keep", type=int, default=None, metavar="N", help="newest examples kept per bucket (5)"
    )
    fuzz.add_argument(
        "--known",
        type=Path,
        default=None,
        metavar="FILE",
        help="known signatures (TOML), besides DIR/known.toml",
    )
    fuzz.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="wall-clock bound per case; slower cases go to hangs/ (default: 10)",
    )
    fuzz.add_argument(
        "--max-instructions",
        type=int,
        default=None,
        metavar="N",
        help="instruction bound per engine run (default: 10000)",
    )
    trace_option(fuzz)
    fuzz.set_defaults(trace=None)  # None = not given: --resume keeps the recorded mode
    policy_option(fuzz)

    repro = sub.add_parser("repro", help="re-run a crash or case file")
    repro.add_argument("file", type=Path)
    trace_option(repro)
    policy_option(repro)

    minimize = sub.add_parser("minimize", help="shrink a crash file, keeping its signature")
    minimize.add_argument("file", type=Path)
    minimize.add_argument("-o", "--out", type=Path, default=None, help="output file")
    policy_option(minimize)

    show = sub.add_parser("show", help="print a case or crash file for humans")
    show.add_argument("file", type=Path)

    bench = sub.add_parser("bench", help="measure cases/s and instructions/s of every engine")
    bench.add_argument("--cases", type=int, default=300, help="generated cases to run")
    bench.add_argument("--seed", type=int, default=1)
    bench.add_argument("--json", action="store_true", help="print JSON")
    policy_option(bench)

    matrix = sub.add_parser("matrix", help="run the exhaustive LASS access matrix")
    matrix.add_argument("--json", action="store_true", help="print JSON lines")
    matrix.add_argument(
        "--reference-only", action="store_true", help="run the reference model only"
    )
    policy_option(matrix)

    stats = sub.add_parser("stats", help="print a campaign directory's summary")
    stats.add_argument("dir", type=Path, help="campaign output directory")
    stats.add_argument("--json", action="store_true", help="print the summary as JSON")

    report = sub.add_parser("report", help="write a self-contained HTML report of a campaign")
    report.add_argument("dir", type=Path, help="campaign output directory")
    report.add_argument(
        "-o", "--out", type=Path, default=Path("report.html"), help="default: report.html"
    )
    return parser


def _differential(policy: str | None, *, trace: bool = False) -> tuple[Differential, str]:
    from lassfuzz.compare.differential import Differential
    from lassfuzz.emulator.machine import UnicornMachine
    from lassfuzz.model.engine import ReferenceModel
    from lassfuzz.policies import PolicyError, load_policy

    try:
        name, function = load_policy(policy)
    except PolicyError as error:
        raise UsageError(str(error)) from None
    machine = UnicornMachine(policy=function, policy_name=name)
    return Differential(ReferenceModel(), machine, trace=trace), name


def _cluster_backend(address: str) -> Backend:
    """``--cluster``: the Dask backend, or one clear line if the extra or the cluster is missing."""
    try:
        from lassfuzz.campaign.cluster import ClusterError, DaskBackend
    except ModuleNotFoundError as error:
        if error.name not in ("dask", "distributed"):
            raise
        raise UsageError(
            "--cluster needs the cluster extra: pip install 'lassfuzz[cluster]'"
        ) from None
    # The campaign reports a cluster failure itself, in one line; distributed's own log lines
    # (reconnection attempts, its view of the failure) would only bury that line.
    for logger in ("distributed", "distributed.client"):
        logging.getLogger(logger).setLevel(logging.CRITICAL)
    try:
        return DaskBackend(address)
    except ClusterError as error:
        raise UsageError(str(error)) from None


def cmd_fuzz(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from lassfuzz.campaign.backend import LocalBackend, default_jobs
    from lassfuzz.campaign.display import Display, LiveDisplay, PlainDisplay
    from lassfuzz.campaign.fuzz import FuzzOptions, configure
    from lassfuzz.campaign.health import HealthCheckError
    from lassfuzz.campaign.supervisor import CampaignError, Supervisor
    from lassfuzz.policies import PolicyError, load_policy

    for name, value, least in (
        ("--cases", args.cases, 1),
        ("--jobs", args.jobs, 1),
        ("--keep", args.keep, 0),
        ("--max-instructions", args.max_instructions, 1),
    ):
        if value is not None and value < least:
            raise UsageError(f"{name} must be at least {least}")
    if args.timeout is not None and not args.timeout > 0:
        raise UsageError("--timeout must be positive")
    if args.cases is None and args.duration is None:
        raise UsageError("give --cases N or --duration D (a campaign needs an end)")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        probe = args.out / ".lassfuzz-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise UsageError(
            f"{args.out}: output directory is not writable ({error.strerror})"
        ) from None
    config = configure(
        FuzzOptions(
            out=args.out,
            seed=args.seed,
            policy=args.policy,
            trace=args.trace,
            max_instructions=args.max_instructions,
            timeout_s=args.timeout,
            keep=args.keep,
            cases=args.cases,
            duration_s=args.duration,
            stop_on_first=args.stop_on_first,
            resume=args.resume,
            known=args.known,
        )
    )
    try:
        load_policy(config.policy)  # here, with one clear line, rather than in every worker
    except PolicyError as error:
        raise UsageError(str(error)) from None
    backend: Backend
    if args.cluster is None:
        backend = LocalBackend(args.jobs or default_jobs())
    elif args.jobs is not None:
        raise UsageError("--jobs and --cluster exclude each other (a cluster has its own workers)")
    else:
        backend = _cluster_backend(args.cluster)
    display: Display = LiveDisplay(out) if out.isatty() else PlainDisplay(err)
    try:
        outcome = Supervisor(config, backend, display).run()
    except (HealthCheckError, CampaignError) as error:
        raise UsageError(str(error)) from None
    finally:
        display.close()
    stats = outcome.stats
    if outcome.stopped in ("SIGINT", "SIGTERM", "stop file"):
        err.write(f"stopped ({outcome.stopped}); statistics flushed, --resume continues\n")
    out.write(
        f"{stats['cases']} cases in {stats['elapsed_s']:.1f}s "
        f"({stats['cases_per_sec']} cases/s), {stats['compared']} compared, "
        f"{stats['skipped']} skipped, {stats['errors']} errors, {stats['hangs']} hangs\n"
    )
    for cls in ("lass", "base", "tool-crash"):
        buckets = [b for b in outcome.buckets if b.cls == cls]
        count = stats["divergences_by_class"].get(cls, 0)
        out.write(f"{cls} divergences: {count} ({len(buckets)} unique)\n")
        for bucket in sorted(buckets, key=lambda b: -b.count):
            known = "  (known)" if bucket.known is not None else ""
            out.write(f"  {bucket.count:6d}  {bucket.summary}  crashes/{bucket.id}/{known}\n")
    return EXIT_FOUND if outcome.unknown_findings else EXIT_OK


def _rerun(path: Path, policy: str | None, trace: bool) -> tuple[int, str]:
    """Re-run a file; (exit status, one-line verdict)."""
    from lassfuzz.campaign.files import load_file
    from lassfuzz.compare.diff import Verdict

    loaded = load_file(path)
    differential, _ = _differential(policy, trace=trace or loaded.trace)
    result, signature = differential.signature(loaded.case)
    verdict = result.comparison.verdict
    if verdict is Verdict.ERROR:
        raise UsageError(f"engine error: {result.comparison.reason}")
    if verdict is Verdict.SKIPPED:
        raise UsageError(f"case cannot be compared: {result.comparison.reason}")
    expected = loaded.signature
    if signature is None:
        return EXIT_OK, "no divergence"
    if expected is None:
        return EXIT_FOUND, f"divergence: {signature.describe()}"
    if signature == expected:
        return EXIT_FOUND, f"reproduced: {signature.describe()}"
    return EXIT_OK, (
        f"a different divergence: {signature.describe()} (expected {expected.describe()})"
    )


def cmd_repro(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    status, line = _rerun(args.file, args.policy, args.trace)
    out.write(line + "\n")
    return status


def cmd_minimize(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from lassfuzz.campaign.files import crash_document, crash_filename, load_file, write_atomic
    from lassfuzz.campaign.minimize import MinimizeStep, minimize
    from lassfuzz.case import TestCase
    from lassfuzz.compare.diff import Verdict

    loaded = load_file(args.file)
    differential, policy_name = _differential(args.policy, trace=loaded.trace)
    _, signature = differential.signature(loaded.case)
    if signature is None:
        found_with = (loaded.crash or {}).get("versions", {}).get("policy")
        hint = (
            f" (found with --policy {found_with})" if found_with not in (None, policy_name) else ""
        )
        raise UsageError(
            f"{args.file}: does not diverge with policy {policy_name}{hint}; nothing to minimize"
        )
    if loaded.signature is not None and loaded.signature != signature:
        raise UsageError(
            f"{args.file}: diverges differently now ({signature.describe()}); not minimizing"
        )

    def still_fails(candidate: TestCase) -> bool:
        return differential.signature(candidate)[1] == signature

    def progress(step: MinimizeStep) -> None:
        err.write(
            f"{step.pass_name}: {step.accepted} accepted of {step.tried} tried, "
            f"{step.instructions} instructions left\n"
        )

    smallest = minimize(loaded.case, still_fails, progress=progress)
    final = differential.run(smallest)
    if final.comparison.verdict is not Verdict.DIVERGE:
        raise UsageError("internal error: the minimized case no longer diverges")
    finding = differential.triage(final)
    crash = loaded.crash or {}
    document = crash_document(
        finding,
        policy_name=policy_name,
        seed=crash.get("seed"),
        index=crash.get("index"),
        trace=loaded.trace,
    )
    target = args.out or args.file.with_name(crash_filename(signature, minimized=True))
    try:
        write_atomic(target, json.dumps(document, indent=1))
    except OSError as error:
        raise UsageError(f"{target}: cannot write ({error.strerror})") from None
    out.write(f"minimized to {len(smallest.code)} code bytes: {target}\n")
    return EXIT_FOUND


def cmd_show(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from lassfuzz.campaign.files import load_file
    from lassfuzz.cli.show import render

    loaded = load_file(args.file)
    out.write(render(loaded))
    return EXIT_OK


def cmd_bench(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from lassfuzz.bench import format_table, run_benchmark
    from lassfuzz.policies import PolicyError, load_policy

    try:
        name, function = load_policy(args.policy)
    except PolicyError as error:
        raise UsageError(str(error)) from None
    results = run_benchmark(cases=args.cases, seed=args.seed, policy=function, policy_name=name)
    out.write(json.dumps(results) + "\n" if args.json else format_table(results))
    return EXIT_OK


def cmd_matrix(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from lassfuzz.matrix import matrix_main
    from lassfuzz.policies import PolicyError

    try:
        return matrix_main(args.json, args.policy, out, reference_only=args.reference_only)
    except PolicyError as error:
        raise UsageError(str(error)) from None


def cmd_stats(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    import time

    from lassfuzz.report.summary import load_campaign, summary_json
    from lassfuzz.report.terminal import write_plain, write_rich

    campaign = load_campaign(args.dir)
    now = time.time()
    if args.json:
        out.write(json.dumps(summary_json(campaign, now), indent=1) + "\n")
    else:
        (write_rich if out.isatty() else write_plain)(campaign, out, now)
    return EXIT_OK


def cmd_report(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from lassfuzz.campaign.files import write_atomic
    from lassfuzz.report.html import render_report
    from lassfuzz.report.summary import load_campaign

    campaign = load_campaign(args.dir)
    page = render_report(campaign, out_dir=args.out.absolute().parent)
    try:
        write_atomic(args.out, page)
    except OSError as error:
        raise UsageError(f"{args.out}: cannot write ({error.strerror})") from None
    out.write(f"report: {args.out}\n")
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace, TextIO, TextIO], int]] = {
    "fuzz": cmd_fuzz,
    "repro": cmd_repro,
    "minimize": cmd_minimize,
    "show": cmd_show,
    "bench": cmd_bench,
    "matrix": cmd_matrix,
    "stats": cmd_stats,
    "report": cmd_report,
}


def main(argv: Sequence[str] | None = None) -> int:
    from lassfuzz.campaign.files import InputError

    args = _build_parser().parse_args(argv)
    try:
        status = COMMANDS[args.command](args, sys.stdout, sys.stderr)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        # `lassfuzz matrix | head` closed the pipe early: not an error. Point stdout at
        # /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (UsageError, InputError) as error:
        print(f"lassfuzz {args.command}: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"lassfuzz {args.command}: interrupted", file=sys.stderr)
        return EXIT_ERROR
