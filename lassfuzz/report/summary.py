"""Read and validate a campaign output directory into frozen values, and summarise it.

``lassfuzz stats`` and ``lassfuzz report`` both start here, so the terminal and the HTML page
always show the same figures. ``stats.json`` is what makes a directory a campaign: without it (or
with a malformed one) :func:`load_campaign` raises :class:`InputError` with one line. Everything
else is optional or may be mid-update while a campaign runs, so a missing optional file is simply
absent and a damaged one becomes a *problem* line shown to the user: a report on a live or
crashed campaign must still render what it can, and never hide a finding behind a traceback.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from lassfuzz.campaign.files import InputError
from lassfuzz.campaign.known import Known, load_known
from lassfuzz.campaign.stats import PLOT_HEADER, STATS_FORMAT, STATS_VERSION

#: plot_data.csv columns (docs/campaign.md), in file order: the writer's header, so the two
#: cannot drift apart.
PLOT_COLUMNS: Final = tuple(PLOT_HEADER.split(","))
#: Divergence classes in display order; other classes a future writer adds follow, sorted.
CLASSES: Final = ("lass", "base", "tool-crash")
#: A running campaign rewrites stats.json every few seconds; a non-final file older than this
#: means the campaign died without its final flush (kill -9, power loss) and may be resumed.
STALE_AFTER_S: Final = 120.0


class _Fields:
    """Typed access to one JSON object, failing with one line naming the file and the key."""

    def __init__(self, path: Path, document: Any) -> None:
        if not isinstance(document, dict):
            raise InputError(f"{path}: expected a JSON object")
        self.path = path
        self.document: dict[str, Any] = document

    def _get(self, key: str) -> Any:
        if key not in self.document:
            raise InputError(f"{self.path}: missing {key!r}")
        return self.document[key]

    def _wrong(self, key: str, expected: str) -> InputError:
        shown = repr(self.document[key])
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        return InputError(f"{self.path}: {key!r} should be {expected}, not {shown}")

    def integer(self, key: str) -> int:
        value = self._get(key)
        # bool is an int subclass in Python, but true is not a count.
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._wrong(key, "an integer")
        return value

    def number(self, key: str) -> float:
        value = self._get(key)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise self._wrong(key, "a number")
        return float(value)

    def optional_number(self, key: str) -> float | None:
        return None if self.document.get(key) is None else self.number(key)

    def text(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            raise self._wrong(key, "a string")
        return value

    def optional_text(self, key: str) -> str | None:
        return None if self.document.get(key) is None else self.text(key)

    def flag(self, key: str) -> bool:
        value = self._get(key)
        if not isinstance(value, bool):
            raise self._wrong(key, "true or false")
        return value

    def counts(self, key: str, *, optional: bool = False) -> Mapping[str, int]:
        """A ``{name: count}`` object (an empty one when optional and absent)."""
        if optional and key not in self.document:
            return MappingProxyType({})
        value = self._get(key)
        if not isinstance(value, dict) or not all(
            isinstance(n, int) and not isinstance(n, bool) for n in value.values()
        ):
            raise self._wrong(key, "an object of integer counts")
        return MappingProxyType(dict(value))

    def child(self, key: str) -> _Fields | None:
        value = self.document.get(key)
        return None if value is None else _Fields(self.path, value)


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise InputError(f"{path}: cannot read ({error.strerror})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: not valid JSON ({error})") from None


@dataclass(frozen=True)
class Stats:
    """``stats.json``: the campaign's counters at its last update."""

    final: bool
    seed: int
    policy: str
    started: float
    updated: float
    elapsed_s: float
    cases: int
    cases_per_sec: float
    compared: int
    skipped: int
    errors: int
    next_index: int
    jobs: int
    divergences: int
    divergences_by_class: Mapping[str, int]
    known_divergences: int
    unique_signatures: int
    unique_signatures_by_class: Mapping[str, int]
    last_new_signature: float | None
    cells_covered: int
    cells_total: int
    worker_restarts: int
    hangs: int
    skip_reasons: Mapping[str, int]

    @classmethod
    def load(cls, path: Path) -> Stats:
        doc = _Fields(path, _read_json(path))
        if doc.document.get("format") != STATS_FORMAT:
            raise InputError(f"{path}: not a lassfuzz statistics file (no format {STATS_FORMAT!r})")
        if doc.document.get("version") != STATS_VERSION:
            raise InputError(
                f"{path}: unsupported statistics version {doc.document.get('version')!r} "
                f"(this lassfuzz reads {STATS_VERSION})"
            )
        return cls(
            final=doc.flag("final"),
            seed=doc.integer("seed"),
            policy=doc.text("policy"),
            started=doc.number("started"),
            updated=doc.number("updated"),
            elapsed_s=doc.number("elapsed_s"),
            cases=doc.integer("cases"),
            cases_per_sec=doc.number("cases_per_sec"),
            compared=doc.integer("compared"),
            skipped=doc.integer("skipped"),
            errors=doc.integer("errors"),
            next_index=doc.integer("next_index"),
            jobs=doc.integer("jobs"),
            divergences=doc.integer("divergences"),
            divergences_by_class=doc.counts("divergences_by_class"),
            known_divergences=doc.integer("known_divergences"),
            unique_signatures=doc.integer("unique_signatures"),
            unique_signatures_by_class=doc.counts("unique_signatures_by_class"),
            last_new_signature=doc.optional_number("last_new_signature"),
            cells_covered=doc.integer("cells_covered"),
            cells_total=doc.integer("cells_total"),
            worker_restarts=doc.integer("worker_restarts"),
            hangs=doc.integer("hangs"),
            skip_reasons=doc.counts("skip_reasons", optional=True),
        )


@dataclass(frozen=True)
class PlotPoint:
    """One ``plot_data.csv`` line; ``cases_per_sec`` is the rate over that interval."""

    unix_time: float
    elapsed_s: float
    cases: float
    cases_per_sec: float
    divergences: float
    unique_signatures: float
    cells_covered: float
    worker_restarts: float
    hangs: float


@dataclass(frozen=True)
class Coverage:
    """``coverage.json``: hits per decision cell (``lassfuzz matrix`` names) and per family."""

    cells: Mapping[str, int]
    families: Mapping[str, int]

    @classmethod
    def load(cls, path: Path) -> Coverage:
        doc = _Fields(path, _read_json(path))
        return cls(cells=doc.counts("cells"), families=doc.counts("families"))


@dataclass(frozen=True)
class Bucket:
    """One ``crashes/<signature id>/`` directory. Paths are absolute and exist when not None."""

    id: str
    cls: str
    summary: str
    count: int
    first_seen: float
    last_seen: float
    first_index: int
    last_index: int
    known: Known | None
    example: Path | None
    minimized: Path | None
    further_examples: int

    @classmethod
    def load(cls, directory: Path) -> Bucket:
        path = directory / "bucket.json"
        doc = _Fields(path, _read_json(path))
        bucket_id = doc.text("id")
        # The id names files below; one that is not its directory's name could point anywhere.
        if bucket_id != directory.name:
            raise InputError(f"{path}: id {bucket_id[:50]!r} is not its directory's name")
        known = doc.child("known")
        example = directory / f"crash-{bucket_id}.json"
        # `lassfuzz minimize` writes crash-<id>.min.json beside the first example without
        # touching bucket.json, so the file on disk counts as much as the recorded name.
        # Only a bare file name is honoured: bucket.json must not point outside its bucket.
        recorded = doc.optional_text("minimized")
        names = ([recorded] if recorded and Path(recorded).name == recorded else []) + [
            f"crash-{bucket_id}.min.json"
        ]
        minimized = next((directory / n for n in names if (directory / n).is_file()), None)
        return cls(
            id=bucket_id,
            cls=doc.text("class"),
            summary=doc.text("summary"),
            count=doc.integer("count"),
            first_seen=doc.number("first_seen"),
            last_seen=doc.number("last_seen"),
            first_index=doc.integer("first_index"),
            last_index=doc.integer("last_index"),
            known=None
            if known is None
            else Known(bucket_id, known.text("reason"), known.optional_text("link")),
            example=example if example.is_file() else None,
            minimized=minimized,
            further_examples=len(list(directory.glob(f"crash-{bucket_id}-*.json"))),
        )


@dataclass(frozen=True)
class Campaign:
    """Everything a report shows about one campaign directory.

    ``plot`` is empty and ``coverage`` None when the campaign has not written them (yet);
    ``problems`` lists, one line each, optional files that exist but could not be used.
    """

    directory: Path
    stats: Stats
    plot: tuple[PlotPoint, ...]
    coverage: Coverage | None
    buckets: tuple[Bucket, ...]
    hang_files: int
    problems: tuple[str, ...]


def load_campaign(directory: Path) -> Campaign:
    """Read ``directory``; :class:`InputError` (one line) when it is not a usable campaign."""
    if not directory.is_dir():
        raise InputError(f"{directory}: no such directory")
    stats_path = directory / "stats.json"
    if not stats_path.is_file():
        if (directory / "campaign.json").is_file():
            raise InputError(f"{directory}: the campaign has not written stats.json yet")
        raise InputError(f"{directory}: not a lassfuzz campaign directory (no stats.json)")
    stats = Stats.load(stats_path)
    problems: list[str] = []
    plot = _load_plot(directory / "plot_data.csv", problems)
    coverage = None
    if (directory / "coverage.json").exists():
        try:
            coverage = Coverage.load(directory / "coverage.json")
        except InputError as error:
            problems.append(str(error))
    known: Mapping[str, Known] = {}
    if (directory / "known.toml").exists():
        try:
            known = load_known(directory / "known.toml")
        except InputError as error:
            problems.append(str(error))
    buckets = []
    crashes = directory / "crashes"
    for bucket_dir in sorted(crashes.iterdir()) if crashes.is_dir() else ():
        if not bucket_dir.is_dir():
            continue
        if not (bucket_dir / "bucket.json").exists():
            # The first example is written before bucket.json: a campaign killed in between
            # leaves an example nobody counted, which the user should still get to see.
            problems.append(f"{bucket_dir}: no bucket.json (written while the campaign died?)")
            continue
        try:
            bucket = Bucket.load(bucket_dir)
        except InputError as error:
            problems.append(str(error))
            continue
        # known.toml may have been edited since the campaign bucketed the signature (that is
        # how a morning triage marks a divergence as understood), so it wins over bucket.json.
        if bucket.id in known:
            bucket = replace(bucket, known=known[bucket.id])
        buckets.append(bucket)
    hangs = directory / "hangs"
    return Campaign(
        directory=directory,
        stats=stats,
        plot=plot,
        coverage=coverage,
        buckets=tuple(sorted(buckets, key=_bucket_order)),
        hang_files=len(list(hangs.glob("hang-*.json"))) if hangs.is_dir() else 0,
        problems=tuple(problems),
    )


def _bucket_order(bucket: Bucket) -> tuple[bool, int, str]:
    """What a morning reader wants first: unknown before known, then the most frequent."""
    return (bucket.known is not None, -bucket.count, bucket.id)


def _load_plot(path: Path, problems: list[str]) -> tuple[PlotPoint, ...]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ()
    except OSError as error:
        problems.append(f"{path}: cannot read ({error.strerror})")
        return ()
    lines = text.splitlines(keepends=True)
    # The file is append-only; a last line without its newline is a write in progress.
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
    rows = list(csv.reader(lines))
    if not rows:
        return ()
    header = rows[0]
    if tuple(header) != PLOT_COLUMNS:
        problems.append(f"{path}: unexpected header {','.join(header)[:80]!r}")
        return ()
    points = []
    bad = []
    for number, row in enumerate(rows[1:], start=2):
        try:
            values = [float(value) for value in row]
        except ValueError:
            values = []
        if len(values) != len(PLOT_COLUMNS) or not all(map(math.isfinite, values)):
            bad.append(number)
            continue
        points.append(PlotPoint(**dict(zip(PLOT_COLUMNS, values, strict=True))))
    if bad:
        problems.append(f"{path}: skipped {len(bad)} malformed line(s), first line {bad[0]}")
    return tuple(points)


# --- The summary both commands show -------------------------------------------------------


@dataclass(frozen=True)
class SummaryLine:
    label: str
    value: str


def format_utc(unix_time: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix_time))


def format_duration(seconds: float) -> str:
    """``42.5s``, ``12m 05s``, ``8h 02m``, ``3d 04h``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s"


def campaign_state(stats: Stats, now: float) -> str:
    """``final``, ``running``, or ``stale`` (not final and not updated for a while)."""
    if stats.final:
        return "final"
    return "stale" if now - stats.updated > STALE_AFTER_S else "running"


def _state_text(stats: Stats, now: float) -> str:
    state = campaign_state(stats, now)
    if state == "final":
        return "finished (final statistics)"
    ago = format_duration(max(now - stats.updated, 0.0))
    if state == "running":
        return f"running (updated {ago} ago)"
    return f"stopped without final statistics? no update for {ago} (--resume continues it)"


def since_last_new_signature(stats: Stats, now: float) -> float | None:
    """Seconds from the last new signature to the end of the run (or to now while it runs)."""
    if stats.last_new_signature is None:
        return None
    end = now if campaign_state(stats, now) == "running" else stats.updated
    return max(end - stats.last_new_signature, 0.0)


def _by_class(counts: Mapping[str, int]) -> str:
    """``lass 3, base 0, tool-crash 0``: the known classes always, then any others, sorted."""
    names = list(CLASSES) + sorted(set(counts) - set(CLASSES))
    return ", ".join(f"{name} {counts.get(name, 0):,}" for name in names)


def summary_lines(campaign: Campaign, now: float) -> tuple[SummaryLine, ...]:
    """The summary as labelled, human-formatted lines (the same in the terminal and HTML)."""
    stats = campaign.stats
    since = since_last_new_signature(stats, now)
    covered = (
        f"{stats.cells_covered} / {stats.cells_total} "
        f"({100 * stats.cells_covered / stats.cells_total:.0f}%)"
        if stats.cells_total
        else f"{stats.cells_covered} / 0"
    )
    hangs = f"{stats.hangs}"
    if campaign.hang_files:
        hangs += f" ({campaign.hang_files} in hangs/)"
    lines = [
        ("State", _state_text(stats, now)),
        ("Started", format_utc(stats.started)),
        ("Last update", format_utc(stats.updated)),
        ("Run time", format_duration(stats.elapsed_s)),
        ("Seed / policy / jobs", f"{stats.seed} / {stats.policy} / {stats.jobs}"),
        ("Cases", f"{stats.cases:,} (next index {stats.next_index:,})"),
        ("Cases/s", f"{stats.cases_per_sec:,.1f}"),
        (
            "Compared / skipped / errors",
            f"{stats.compared:,} / {stats.skipped:,} / {stats.errors:,}",
        ),
        (
            "Divergences",
            f"{stats.divergences:,} ({_by_class(stats.divergences_by_class)}); "
            f"{stats.known_divergences:,} known",
        ),
        (
            "Unique signatures",
            f"{stats.unique_signatures} ({_by_class(stats.unique_signatures_by_class)})",
        ),
        (
            "Since last new signature",
            "no signature yet" if since is None else format_duration(since),
        ),
        ("Decision cells covered", covered),
        ("Worker restarts", f"{stats.worker_restarts}"),
        ("Hangs", hangs),
    ]
    return tuple(SummaryLine(label, value) for label, value in lines)


def summary_json(campaign: Campaign, now: float) -> dict[str, Any]:
    """The summary as machine-readable JSON: the counters, the state, buckets and problems."""
    stats = campaign.stats
    counters = {
        f.name: dict(value) if isinstance(value := getattr(stats, f.name), Mapping) else value
        for f in fields(stats)
    }
    return {
        "directory": str(campaign.directory),
        "state": campaign_state(stats, now),
        **counters,
        "since_last_new_signature_s": since_last_new_signature(stats, now),
        "buckets": [
            {
                "id": b.id,
                "class": b.cls,
                "summary": b.summary,
                "count": b.count,
                "first_seen": b.first_seen,
                "last_seen": b.last_seen,
                "known": None
                if b.known is None
                else {"reason": b.known.reason, "link": b.known.link},
                "example": None if b.example is None else str(b.example),
                "minimized": None if b.minimized is None else str(b.minimized),
            }
            for b in campaign.buckets
        ],
        "problems": list(campaign.problems),
    }
