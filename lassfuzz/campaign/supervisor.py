"""The campaign supervisor: hands out chunks, gathers results, and owns the output directory.

Workers (through a :class:`~lassfuzz.campaign.backend.Backend`) only compute; every file of
the campaign directory (docs/campaign.md) is written here, by one process, so two workers can
never race on a bucket. The supervisor:

- cuts the index space into chunks, in order, skipping what a resumed campaign already did;
- re-runs the rest of a chunk whose worker died, after saving the case it died on as a
  ``tool-crash`` bucket (native crash) or under ``hangs/`` (wall-clock bound);
- merges counts, buckets, coverage and the corpus, and rewrites ``stats.json``,
  ``coverage.json`` and changed ``bucket.json`` files every :data:`STATS_INTERVAL_S`;
- stops on the case limit, the duration, the first unknown finding (``--stop-on-first``),
  SIGINT/SIGTERM or a ``STOP`` file, always closing the backend and flushing a final
  ``stats.json`` (``"final": true``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final

from lassfuzz.campaign.backend import Backend, ChunkDone, WorkerLost
from lassfuzz.campaign.buckets import TOOL_CRASH, Bucket, Buckets, tool_crash_signature
from lassfuzz.campaign.coverage import Coverage, CoverageError
from lassfuzz.campaign.display import Display
from lassfuzz.campaign.epochs import Epochs
from lassfuzz.campaign.files import InputError, write_atomic
from lassfuzz.campaign.health import HEALTH_MIN_CASES, check_health
from lassfuzz.campaign.known import Known
from lassfuzz.campaign.stats import Figures, Stats
from lassfuzz.campaign.work import (
    DEFAULT_CASE_TIMEOUT_S,
    DEFAULT_KEEP,
    DEFAULT_MAX_INSTRUCTIONS,
    CaseRecord,
    Chunk,
    ChunkResult,
    SignatureHits,
)
from lassfuzz.case import case_to_dict
from lassfuzz.generator.config import DEFAULT_CONFIG, ConfigError, GeneratorConfig

CAMPAIGN_FORMAT: Final = "lassfuzz-campaign"
CAMPAIGN_VERSION: Final = 1
STATS_INTERVAL_S: Final = 2.0
#: Cases per chunk: large enough that a chunk's round trip is noise (~0.1-0.5 s of work),
#: small enough that a kill loses little and the statistics move smoothly.
DEFAULT_CHUNK_CASES: Final = 128
#: Cases per steering epoch (lassfuzz.campaign.epochs): a multiple of the chunk size.
DEFAULT_EPOCH_CASES: Final = 16 * DEFAULT_CHUNK_CASES
#: Hang files kept (each hang is counted; a generator bug could make every case hang).
MAX_HANG_FILES: Final = 100
#: Chunks lost without a case to blame (a worker dying at start-up) before giving up.
MAX_UNATTRIBUTED_LOSSES: Final = 5


class CampaignError(Exception):
    """The campaign cannot go on (workers keep dying at start-up, a bad resume directory)."""


@dataclass(frozen=True)
class CampaignConfig:
    """What a campaign was asked to do. The first group is fixed for the campaign's life and
    recorded in ``campaign.json`` (``--resume`` checks it); the rest is per run."""

    out: Path
    seed: int
    policy: str = "sdm"  # the spec given to workers (built-in name or module:function)
    trace: bool = False
    generator: GeneratorConfig = DEFAULT_CONFIG
    max_instructions: int = DEFAULT_MAX_INSTRUCTIONS
    timeout_s: float = DEFAULT_CASE_TIMEOUT_S
    keep: int = DEFAULT_KEEP
    chunk_cases: int = DEFAULT_CHUNK_CASES
    epoch_cases: int = DEFAULT_EPOCH_CASES
    # Per run:
    cases: int | None = None  # the campaign covers indices [0, cases)
    duration_s: float | None = None  # of this run
    stop_on_first: bool = False
    resume: bool = False
    known: Mapping[str, Known] = field(default_factory=dict)

    def fixed(self) -> dict[str, Any]:
        """The ``campaign.json`` document."""
        return {
            "format": CAMPAIGN_FORMAT,
            "version": CAMPAIGN_VERSION,
            "seed": self.seed,
            "policy": self.policy,
            "trace": self.trace,
            "generator": self.generator.to_dict(),
            "max_instructions": self.max_instructions,
            "timeout_s": self.timeout_s,
            "keep": self.keep,
            "chunk_cases": self.chunk_cases,
            "epoch_cases": self.epoch_cases,
        }


def read_campaign(out: Path) -> dict[str, Any]:
    """The fixed settings of the campaign in ``out`` (``campaign.json``), for ``--resume``.

    The generator config is returned as a :class:`GeneratorConfig` under ``"generator"``.
    """
    path = out / "campaign.json"
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{out}: no campaign to resume (no campaign.json)") from None
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: not a valid campaign file ({error})") from None
    if not isinstance(document, dict) or document.get("format") != CAMPAIGN_FORMAT:
        raise InputError(f"{path}: not a lassfuzz campaign file")
    if document.get("version") != CAMPAIGN_VERSION:
        raise InputError(f"{path}: unsupported version {document.get('version')!r}")
    try:
        document["generator"] = GeneratorConfig.from_dict(document.get("generator", {}))
    except ConfigError as error:
        raise InputError(f"{path}: {error}") from None
    return document


@dataclass(frozen=True)
class CampaignOutcome:
    """How a run ended: the final ``stats.json`` document, the buckets, why it stopped."""

    stats: Mapping[str, Any]
    buckets: tuple[Bucket, ...]
    stopped: str  # "cases" | "duration" | "first finding" | "SIGINT" | "SIGTERM" | "stop file"

    @property
    def unknown_findings(self) -> tuple[Bucket, ...]:
        """Buckets not listed in known.toml: what makes ``lassfuzz fuzz`` exit 1."""
        return tuple(bucket for bucket in self.buckets if bucket.known is None)


class Supervisor:
    """Runs one campaign (or one more run of a resumed one) on a backend."""

    def __init__(self, config: CampaignConfig, backend: Backend, display: Display) -> None:
        self.config = config
        self.backend = backend
        self.display = display
        out = config.out
        self.buckets = Buckets(out / "crashes", keep=config.keep, known=config.known)
        self.coverage = Coverage()
        self.epochs = Epochs(config.generator, config.epoch_cases)
        self.stats = Stats(seed=config.seed, policy=config.policy, jobs=backend.capacity)
        #: For the health check (lassfuzz.campaign.health), over this run.
        self.no_access = 0
        self.rejected: collections.Counter[str] = collections.Counter()
        self.no_access_reasons: collections.Counter[str] = collections.Counter()
        self._error_reasons: set[str] = set()
        self._hang_files = 0
        self._retry: collections.deque[Chunk] = collections.deque()
        self._in_flight = 0
        self._unattributed = 0
        self._frontier = 0  # next index not yet handed out
        self._stop: str | None = None
        self._healthy = False
        self._earlier_compared = 0

    # ------------------------------------------------------------------ set-up and state

    def _prepare(self) -> None:
        config, out = self.config, self.config.out
        for sub in ("crashes", "corpus", "hangs", "errors"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        (out / "STOP").unlink(missing_ok=True)  # a request to a run that had already ended
        if config.resume:
            # Temporary files of writes a kill -9 interrupted (files.write_atomic's names).
            for leftover in out.rglob(".*.tmp"):
                leftover.unlink(missing_ok=True)
            self.stats = Stats.resume(out / "stats.json", jobs=self.backend.capacity)
            try:
                self.epochs = Epochs.from_dict(config.generator, self.stats.steering)
            except (KeyError, TypeError, ValueError, ConfigError) as error:
                raise InputError(f"{out / 'stats.json'}: bad steering state ({error})") from None
            self.buckets.load(self.stats.bucket_counts)
            self._load_coverage()
            self._error_reasons = {
                json.loads(path.read_text(encoding="utf-8"))["reason_key"]
                for path in (out / "errors").glob("error-*.json")
            }
            self._hang_files = len(list((out / "hangs").glob("hang-*.json")))
        elif (out / "campaign.json").exists():
            raise CampaignError(f"{out} already holds a campaign: use --resume, or another --out")
        else:
            write_atomic(out / "campaign.json", json.dumps(config.fixed(), indent=1))
        self._frontier = self.stats.next_index
        self._earlier_compared = self.stats.compared

    def _load_coverage(self) -> None:
        path = self.config.out / "coverage.json"
        if not path.exists():
            return
        try:
            self.coverage = Coverage.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, CoverageError) as error:
            raise InputError(f"{path}: {error}") from None

    # ------------------------------------------------------------------ the loop

    def run(self) -> CampaignOutcome:
        """Fuzz until a stop condition; always close the backend and flush final statistics."""
        try:
            self._prepare()
        except BaseException:
            self.backend.close()  # nothing ran: leave the directory as it was
            raise
        deadline = (
            None if self.config.duration_s is None else time.monotonic() + self.config.duration_s
        )
        last_flush = time.monotonic()
        with self._signals():
            try:
                while self._stop is None:
                    self._submit()
                    for event in self.backend.poll(0.2):
                        self._in_flight -= 1
                        if isinstance(event, ChunkDone):
                            self._done(event.result)
                        else:
                            self._lost(event)
                    self._health_check()
                    self._check_stop(deadline)
                    if time.monotonic() - last_flush >= STATS_INTERVAL_S:
                        last_flush = time.monotonic()
                        self.display.update(self._flush(final=False))
            finally:
                self.backend.close()
                document = self._flush(final=True)
                self.display.update(document)
        return CampaignOutcome(document, tuple(self.buckets), self._stop or "error")

    def _submit(self) -> None:
        while self._in_flight < 2 * self.backend.capacity:
            chunk = self._next_chunk()
            if chunk is None:
                return
            self.backend.submit(chunk)
            self._in_flight += 1

    def _next_chunk(self) -> Chunk | None:
        if self._retry:
            return self._retry.popleft()
        stats, config = self.stats, self.config
        limit = config.cases
        while self.stats.is_finished(self._frontier):
            self._frontier += 1
        start = self._frontier
        if limit is not None and start >= limit:
            return None
        epoch = self.epochs.epoch_of(start)
        generator = self.epochs.config(epoch, stats.next_index)
        if generator is None:
            return None  # steering waits for epoch - 2 to complete
        stop = min(start + config.chunk_cases, self.epochs.end_of(epoch))
        if limit is not None:
            stop = min(stop, limit)
        # Do not redo a range a previous run finished above its next_index.
        stop = min([stop, *(s for s in stats.finished if s > start)])
        self._frontier = stop
        return Chunk(
            seed=config.seed,
            start=start,
            count=stop - start,
            epoch=epoch,
            policy=config.policy,
            trace=config.trace,
            config=generator,
            max_instructions=config.max_instructions,
            timeout_s=config.timeout_s,
            keep=config.keep,
        )

    def _done(self, result: ChunkResult) -> None:
        stats, now = self.stats, time.time()
        self._unattributed = 0
        stats.add(result)
        self.no_access += result.no_access
        self.no_access_reasons.update(result.no_access_reasons)
        self.rejected.update(result.skip_reasons)
        self.rejected.update(result.error_reasons)
        for hits in self._wanted(result.findings):
            bucket = self.buckets.add(hits, now)
            known = self.config.known.get(hits.id) is not None
            stats.count_divergences(hits.cls, hits.count, known=known)
            if bucket is not None:
                self._new_bucket(bucket, now)
        for record in result.error_examples:
            self._save_error(record)
        for record in result.hang_cases:
            self._save_hang(record, "instruction bound")
        self.epochs.add(result.chunk.epoch, result.cells)
        new_cells = set(self.coverage.merge(Coverage(result.cells, result.families)))
        for record in result.corpus:
            if record.key in new_cells:
                new_cells.discard(record.key)
                case = {**record.case, "meta": {**record.case.get("meta", {}), "cell": record.key}}
                path = self.config.out / "corpus" / _cell_file(record.key)
                write_atomic(path, _compact(case), durable=False)

    def _wanted(self, findings: tuple[SignatureHits, ...]) -> tuple[SignatureHits, ...]:
        """The findings to record: all of them, except that ``--stop-on-first`` keeps only the
        lowest-index unknown one of a chunk (and the known ones, which do not stop it)."""
        if not self.config.stop_on_first:
            return findings
        if self._stop is not None:  # a chunk that finished in the same poll as the first
            return ()
        known = tuple(hits for hits in findings if hits.id in self.config.known)
        unknown = [hits for hits in findings if hits.id not in self.config.known]
        first = min(unknown, key=lambda hits: hits.first_index, default=None)
        return known if first is None else (*known, first)

    def _lost(self, event: WorkerLost) -> None:
        chunk, index, stats = event.chunk, event.index, self.stats
        stats.worker_restarts += 1
        if index is None:
            # Nothing to blame: run the whole chunk again on the fresh worker, but not forever.
            self._unattributed += 1
            if self._unattributed > MAX_UNATTRIBUTED_LOSSES:
                raise CampaignError(f"workers keep dying before running a case ({event.cause})")
            self._retry.appendleft(chunk)
            return
        self._unattributed = 0
        case = case_to_dict(chunk.case(index))
        now = time.time()
        if event.hang:
            stats.hangs += 1
            self._save_hang(
                CaseRecord("wall-clock", index, case, f"over {chunk.timeout_s:g}s"), "wall clock"
            )
        else:
            bucket = self.buckets.tool_crash(
                event.cause,
                index=index,
                case=case,
                seed=chunk.seed,
                policy=chunk.policy,
                trace=chunk.trace,
                now=now,
            )
            known = self.config.known.get(tool_crash_signature(event.cause).id) is not None
            stats.count_divergences(TOOL_CRASH, 1, known=known)
            if bucket is not None:
                self._new_bucket(bucket, now)
        stats.cases += 1
        stats.mark_finished(index, index + 1)
        # The cases before ``index`` ran but their results died with the worker: run them again
        # (deterministic, so they give the same results), then the cases after it.
        for start, stop in ((chunk.start, index), (index + 1, chunk.stop)):
            if stop > start:
                self._retry.append(dataclasses.replace(chunk, start=start, count=stop - start))

    def _new_bucket(self, bucket: Bucket, now: float) -> None:
        self.stats.last_new_signature = now
        if bucket.known is None:
            self.display.announce(bucket)
            if self.config.stop_on_first:
                self._stop = "first finding"

    def _save_error(self, record: CaseRecord) -> None:
        if record.key in self._error_reasons:
            return
        self._error_reasons.add(record.key)
        document = {
            "reason": record.detail,
            "reason_key": record.key,
            "seed": self.config.seed,
            "index": record.index,
            "case": record.case,
        }
        name = f"error-{len(self._error_reasons):04d}.json"
        write_atomic(self.config.out / "errors" / name, _json(document))

    def _save_hang(self, record: CaseRecord, bound: str) -> None:
        if self._hang_files >= MAX_HANG_FILES:
            return
        self._hang_files += 1
        meta = {**record.case.get("meta", {}), "hang": f"{bound}: {record.detail}"}
        path = self.config.out / "hangs" / f"hang-{record.index}.json"
        write_atomic(path, _json({**record.case, "meta": meta}))

    # ------------------------------------------------------------------ stopping

    def _check_stop(self, deadline: float | None) -> None:
        if self._stop is not None:
            return
        stop_file = self.config.out / "STOP"
        if stop_file.exists():
            stop_file.unlink(missing_ok=True)  # consumed: a --resume must not stop at once
            self._stop = "stop file"
        elif deadline is not None and time.monotonic() >= deadline:
            self._stop = "duration"
        elif self.config.cases is not None and self.stats.next_index >= self.config.cases:
            self._stop = "cases"

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGINT and SIGTERM ask the loop to stop (it then flushes); only in the main thread."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(number: int, frame: FrameType | None) -> None:
            self._stop = signal.Signals(number).name

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _health_check(self) -> None:
        """Judge this run's cases once there are enough (a resumed run judges its own)."""
        if self._healthy:
            return
        cases = self.stats.cases - self.stats.earlier_cases
        compared = self.stats.compared - self._earlier_compared
        if cases < HEALTH_MIN_CASES:
            return
        self._healthy = True
        check_health(
            cases=cases,
            compared=compared,
            rejected=self.rejected,
            no_access=self.no_access,
            no_access_reasons=self.no_access_reasons,
        )

    # ------------------------------------------------------------------ files

    def _flush(self, *, final: bool) -> dict[str, Any]:
        self.buckets.flush()
        path = self.config.out / "coverage.json"
        write_atomic(path, _compact(self.coverage.to_dict()), durable=False)
        by_class: collections.Counter[str] = collections.Counter(b.cls for b in self.buckets)
        figures = Figures(by_class, self.coverage.covered, self.coverage.total)
        self.stats.steering = self.epochs.to_dict(self.stats.next_index)
        self.stats.bucket_counts = self.buckets.counts()
        return self.stats.write(self.config.out, figures, final=final)


def _cell_file(cell: str) -> str:
    return "cell-" + "-".join(cell.split()) + ".json"


def _json(document: Mapping[str, Any]) -> str:
    return json.dumps(document, indent=1)


def _compact(document: Mapping[str, Any]) -> str:
    """One-line JSON for bulk files (thousands of corpus entries; ``coverage.json`` with its
    thousands of cells every interval): ``indent`` makes ``json`` fall back to its pure-Python
    encoder, ten times slower."""
    return json.dumps(document, separators=(",", ":"))
