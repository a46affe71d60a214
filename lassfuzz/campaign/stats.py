"""Campaign statistics: the counters behind ``stats.json``, ``plot_data.csv`` and the display.

:class:`Stats` adds up :class:`~lassfuzz.campaign.work.ChunkResult`\\ s and tracks ``next_index``
(the lowest case index not yet accounted for) over chunks that finish out of order. It survives
``--resume``: :meth:`Stats.resume` reads a previous ``stats.json``, keeps its counters and its
finished ranges above ``next_index`` (so no case is counted twice), and adds this run's time.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from lassfuzz.campaign.files import InputError, write_atomic
from lassfuzz.campaign.work import ChunkResult

STATS_FORMAT: Final = "lassfuzz-stats"
STATS_VERSION: Final = 1
PLOT_HEADER: Final = (
    "unix_time,elapsed_s,cases,cases_per_sec,divergences,unique_signatures,cells_covered,"
    "worker_restarts,hangs"
)
#: Skip reasons kept in stats.json (the rest are summed into the counters only).
_TOP_REASONS = 10


@dataclass(frozen=True)
class Figures:
    """Numbers the supervisor knows beyond the counters: buckets and coverage."""

    unique_by_class: Mapping[str, int]
    cells_covered: int
    cells_total: int

    @property
    def unique(self) -> int:
        return sum(self.unique_by_class.values())


@dataclass
class Stats:
    """Counters of one campaign, over all its runs (``--resume``)."""

    seed: int
    policy: str
    jobs: int
    started: float = field(default_factory=time.time)
    cases: int = 0
    compared: int = 0
    skipped: int = 0
    errors: int = 0
    hangs: int = 0
    divergences: int = 0
    known_divergences: int = 0
    worker_restarts: int = 0
    divergences_by_class: collections.Counter[str] = field(default_factory=collections.Counter)
    skip_reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    last_new_signature: float | None = None
    next_index: int = 0
    #: Finished ranges above ``next_index``, start -> stop (chunks that finished early).
    finished: dict[int, int] = field(default_factory=dict)
    #: Time and cases of earlier runs (``--resume``): cases/s counts only this run's.
    earlier_elapsed: float = 0.0
    earlier_cases: int = 0
    #: The steering state (lassfuzz.campaign.epochs), saved here so that it is always exactly
    #: in step with ``next_index`` and ``finished`` (one atomic file).
    steering: Mapping[str, Any] = field(default_factory=dict)
    #: Hit count per bucket, for the same reason: ``bucket.json`` files are written a moment
    #: before this file, so after a ``kill -9`` they may count hits of chunks that will run again.
    bucket_counts: Mapping[str, int] = field(default_factory=dict)
    run_started: float = field(default_factory=time.monotonic)
    _last_plot: tuple[float, int] | None = None

    @classmethod
    def resume(cls, path: Path, *, jobs: int) -> Stats:
        """Counters from a previous run's ``stats.json``."""
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
            stats = cls(
                seed=document["seed"],
                policy=document["policy"],
                jobs=jobs,
                started=document["started"],
                cases=document["cases"],
                compared=document["compared"],
                skipped=document["skipped"],
                errors=document["errors"],
                hangs=document["hangs"],
                divergences=document["divergences"],
                known_divergences=document["known_divergences"],
                worker_restarts=document["worker_restarts"],
                divergences_by_class=collections.Counter(document["divergences_by_class"]),
                skip_reasons=collections.Counter(document["skip_reasons"]),
                last_new_signature=document["last_new_signature"],
                next_index=document["next_index"],
                finished={int(start): stop for start, stop in document["finished"]},
                earlier_elapsed=document["elapsed_s"],
                earlier_cases=document["cases"],
                steering=document["steering"],
                bucket_counts=document["bucket_counts"],
            )
        except FileNotFoundError:
            raise InputError(f"{path}: no such file; nothing to resume") from None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise InputError(f"{path}: not a valid stats file ({error})") from None
        return stats

    def is_finished(self, index: int) -> bool:
        """Whether case ``index`` is already accounted for."""
        if index < self.next_index:
            return True
        return any(start <= index < stop for start, stop in self.finished.items())

    def mark_finished(self, start: int, stop: int) -> None:
        """Record indices ``start .. stop - 1`` as accounted for; advance ``next_index``."""
        self.finished[start] = stop
        while self.next_index in self.finished:
            self.next_index = self.finished.pop(self.next_index)

    def add(self, result: ChunkResult) -> None:
        """Count a finished chunk (divergences are counted by the supervisor, per bucket)."""
        self.cases += result.cases
        self.compared += result.compared
        self.skipped += result.skipped
        self.errors += result.errors
        self.hangs += result.hangs
        self.skip_reasons.update(result.skip_reasons)
        self.mark_finished(result.chunk.start, result.chunk.stop)

    def count_divergences(self, cls: str, count: int, *, known: bool) -> None:
        self.divergences += count
        self.divergences_by_class[cls] += count
        if known:
            self.known_divergences += count

    def run_elapsed(self) -> float:
        return max(time.monotonic() - self.run_started, 1e-9)

    def cases_per_sec(self) -> float:
        return (self.cases - self.earlier_cases) / self.run_elapsed()

    def to_dict(self, figures: Figures, *, final: bool) -> dict[str, Any]:
        """The ``stats.json`` document (docs/campaign.md)."""
        now = time.time()
        return {
            "format": STATS_FORMAT,
            "version": STATS_VERSION,
            "final": final,
            "seed": self.seed,
            "policy": self.policy,
            "started": self.started,
            "updated": now,
            "elapsed_s": round(self.earlier_elapsed + self.run_elapsed(), 3),
            "cases": self.cases,
            "cases_per_sec": round(self.cases_per_sec(), 1),
            "compared": self.compared,
            "skipped": self.skipped,
            "errors": self.errors,
            "next_index": self.next_index,
            "finished": sorted(self.finished.items()),
            "jobs": self.jobs,
            "divergences": self.divergences,
            "divergences_by_class": dict(self.divergences_by_class),
            "known_divergences": self.known_divergences,
            "unique_signatures": figures.unique,
            "unique_signatures_by_class": dict(figures.unique_by_class),
            "last_new_signature": self.last_new_signature,
            "since_last_new_signature_s": None
            if self.last_new_signature is None
            else round(now - self.last_new_signature, 3),
            "cells_covered": figures.cells_covered,
            "cells_total": figures.cells_total,
            "worker_restarts": self.worker_restarts,
            "hangs": self.hangs,
            "skip_reasons": dict(self.skip_reasons.most_common(_TOP_REASONS)),
            "steering": self.steering,
            "bucket_counts": self.bucket_counts,
        }

    def write(self, out: Path, figures: Figures, *, final: bool) -> dict[str, Any]:
        """Rewrite ``stats.json`` and append a ``plot_data.csv`` line; the document written."""
        document = self.to_dict(figures, final=final)
        write_atomic(out / "stats.json", json.dumps(document, indent=1))
        self._plot(out / "plot_data.csv", document)
        return document

    def _plot(self, path: Path, document: Mapping[str, Any]) -> None:
        now = time.monotonic()
        previous_time, previous_cases = self._last_plot or (self.run_started, self.earlier_cases)
        rate = (self.cases - previous_cases) / max(now - previous_time, 1e-9)
        self._last_plot = (now, self.cases)
        fields = (
            f"{document['updated']:.3f}",
            f"{document['elapsed_s']:.3f}",
            str(self.cases),
            f"{rate:.1f}",
            str(self.divergences),
            str(document["unique_signatures"]),
            str(document["cells_covered"]),
            str(self.worker_restarts),
            str(self.hangs),
        )
        header = "" if path.exists() else PLOT_HEADER + "\n"
        # One write of whole lines in append mode: a reader (or a kill) sees whole lines only,
        # except possibly a last line without its newline, which readers ignore.
        with path.open("a", encoding="utf-8") as handle:
            handle.write(header + ",".join(fields) + "\n")
