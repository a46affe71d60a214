"""Units of campaign work: a :class:`Chunk` of case indices, its :class:`ChunkResult`, and the
:class:`ChunkRunner` that turns one into the other inside a worker process.

A chunk is the only thing that crosses a process (or machine) boundary towards a worker, and a
chunk result the only thing coming back, so both are small, frozen and picklable: JSON-ready
dicts for documents, tuples and plain mappings for counts. Case ``i`` is always
``generate_case(seed, i, chunk.config)``, so which worker runs a chunk never changes its result.

A worker process keeps one :class:`ChunkRunner` (and so one Unicorn instance and one reference
model, whose set-up costs far more than a case) for its whole life. The runner reports the index
of the case it is about to run through a callback, so that a supervisor watching from outside
can name the exact case when the worker dies in native code or stops making progress.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lassfuzz.campaign.coverage import Coverage, CoverageRecorder
from lassfuzz.campaign.files import crash_document
from lassfuzz.campaign.health import no_access_reason
from lassfuzz.case import TestCase, case_to_dict
from lassfuzz.compare.diff import Verdict
from lassfuzz.compare.differential import Differential, Result
from lassfuzz.compare.signature import Signature
from lassfuzz.generator.config import DEFAULT_CONFIG, GeneratorConfig
from lassfuzz.generator.generate import generate_case
from lassfuzz.outcome import Status

#: Per-case bounds used when the command line does not say otherwise.
DEFAULT_MAX_INSTRUCTIONS = 10_000
DEFAULT_CASE_TIMEOUT_S = 10.0
#: Examples of one signature kept besides the first (``--keep``).
DEFAULT_KEEP = 5


@dataclass(frozen=True)
class Chunk:
    """Cases ``start .. start + count - 1`` of a campaign and everything needed to run them.

    ``policy`` is the policy *spec* (a built-in name or ``package.module:function``), resolved
    by the worker, because functions do not travel between processes reliably. ``config`` is
    the generator configuration in force for the chunk's ``epoch`` (coverage steering changes it
    per epoch, deterministically). ``max_instructions`` bounds each engine run;
    ``timeout_s`` is the wall-clock bound per case, enforced by whoever watches the worker.
    ``keep`` is how many newest examples per signature a result carries besides the first.
    """

    seed: int
    start: int
    count: int
    epoch: int = 0
    policy: str = "sdm"
    trace: bool = False
    config: GeneratorConfig = DEFAULT_CONFIG
    max_instructions: int = DEFAULT_MAX_INSTRUCTIONS
    timeout_s: float = DEFAULT_CASE_TIMEOUT_S
    keep: int = DEFAULT_KEEP

    def __post_init__(self) -> None:
        if self.start < 0 or self.count < 1:
            raise ValueError(
                f"chunk needs start >= 0 and count >= 1 (got {self.start}, {self.count})"
            )

    @property
    def stop(self) -> int:
        """One past the last index."""
        return self.start + self.count

    def case(self, index: int) -> TestCase:
        """Case ``index`` of this campaign (the same whoever generates it)."""
        return generate_case(self.seed, index, self.config)


@dataclass(frozen=True)
class SignatureHits:
    """All divergences of one signature within a chunk.

    ``examples`` are crash documents (:func:`lassfuzz.campaign.files.crash_document`) in index
    order: the chunk's first hit, then up to ``chunk.keep`` of its newest.
    """

    id: str
    cls: str  # "lass" | "base"
    summary: str
    count: int
    first_index: int
    last_index: int
    examples: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True)
class CaseRecord:
    """One case worth saving on its own: an engine-error example, a hang, a corpus entry.

    ``key`` is the error reason, the hang reason or the coverage cell, depending on the list.
    """

    key: str
    index: int
    case: Mapping[str, Any]  # case_to_dict form; empty when the case could not be generated
    detail: str = ""


@dataclass(frozen=True)
class ChunkResult:
    """What running a :class:`Chunk` produced. Counts cover every case of the chunk."""

    chunk: Chunk
    cases: int
    compared: int
    skipped: int
    errors: int
    hangs: int
    #: Compared cases whose reference run made no data access reaching the LASS check, and
    #: why (lassfuzz.campaign.health.no_access_reason -> cases).
    no_access: int
    no_access_reasons: Mapping[str, int]
    #: Reason (:func:`reason_key`) -> cases, for skipped cases and engine errors.
    skip_reasons: Mapping[str, int]
    error_reasons: Mapping[str, int]
    findings: tuple[SignatureHits, ...]
    #: The first case per engine-error reason.
    error_examples: tuple[CaseRecord, ...]
    #: Every case that exhausted the instruction bound on both engines.
    hang_cases: tuple[CaseRecord, ...]
    #: Cases per decision cell and per instruction family (lassfuzz.campaign.coverage), over
    #: the compared cases.
    cells: Mapping[str, int]
    families: Mapping[str, int]
    #: The first case per decision cell hit in this chunk (the supervisor keeps the campaign's
    #: first over all chunks).
    corpus: tuple[CaseRecord, ...]
    elapsed_s: float

    @property
    def divergences(self) -> int:
        return sum(hits.count for hits in self.findings)


#: Called with the index of the case about to run, and with -1 when the runner goes idle.
IndexReporter = Callable[[int], None]

_running_index = -1


def running_index() -> int:
    """The index of the case this process is running, or -1 between cases.

    For test policies that must misbehave on exactly one case (a policy sees accesses, not
    cases); a campaign itself never needs it.
    """
    return _running_index


@dataclass
class _Tally:
    """Mutable accumulator behind one :class:`ChunkResult`."""

    chunk: Chunk
    compared: int = 0
    skipped: int = 0
    errors: int = 0
    no_access: int = 0
    no_access_reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    skip_reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    error_reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    hits: dict[str, _Hits] = field(default_factory=dict)
    error_examples: dict[str, CaseRecord] = field(default_factory=dict)
    hang_cases: list[CaseRecord] = field(default_factory=list)
    coverage: Coverage = field(default_factory=Coverage)
    corpus: list[CaseRecord] = field(default_factory=list)


@dataclass
class _Hits:
    signature: Signature
    cls: str
    count: int
    last_index: int
    first: dict[str, Any]
    #: The newest further hits, documented (triaged) only when the chunk ends: a frequent bug
    #: would otherwise cost a triage run per hit.
    newest: collections.deque[tuple[Result, int]]


class ChunkRunner:
    """Runs chunks in one process with long-lived engines.

    Engines are built on first use and rebuilt only when a chunk asks for another policy,
    trace mode or instruction bound (a campaign never does, so in practice once per process).
    """

    def __init__(self, report: IndexReporter | None = None) -> None:
        self._report = report
        self._recorder = CoverageRecorder()
        self._key: tuple[str, bool, int] | None = None
        self._differential: Differential | None = None
        self._policy_name = ""

    def differential(self, chunk: Chunk) -> Differential:
        """The engines for ``chunk``, built once per (policy, trace, bound)."""
        key = (chunk.policy, chunk.trace, chunk.max_instructions)
        if self._differential is None or key != self._key:
            from lassfuzz.emulator.machine import UnicornMachine
            from lassfuzz.model.engine import ReferenceModel
            from lassfuzz.policies import load_policy

            name, function = load_policy(chunk.policy)
            machine = UnicornMachine(
                policy=function, policy_name=name, max_instructions=chunk.max_instructions
            )
            model = ReferenceModel(max_instructions=chunk.max_instructions, observer=self._recorder)
            self._differential = Differential(model, machine, trace=chunk.trace)
            self._policy_name = name
            self._key = key
        return self._differential

    def run(self, chunk: Chunk) -> ChunkResult:
        """Run every case of ``chunk``; never raises for a case (errors are counted)."""
        started = time.monotonic()
        differential = self.differential(chunk)
        tally = _Tally(chunk)
        try:
            for index in range(chunk.start, chunk.stop):
                self._running(index)
                self._one(differential, tally, index)
            findings = tuple(
                self._signature_hits(differential, chunk, hits) for hits in tally.hits.values()
            )
        finally:
            self._running(-1)
        return ChunkResult(
            chunk=chunk,
            cases=chunk.count,
            compared=tally.compared,
            skipped=tally.skipped,
            errors=tally.errors,
            hangs=len(tally.hang_cases),
            no_access=tally.no_access,
            no_access_reasons=dict(tally.no_access_reasons),
            skip_reasons=dict(tally.skip_reasons),
            error_reasons=dict(tally.error_reasons),
            findings=findings,
            error_examples=tuple(tally.error_examples.values()),
            hang_cases=tuple(tally.hang_cases),
            cells=dict(+tally.coverage.cells),
            families=dict(+tally.coverage.families),
            corpus=tuple(tally.corpus),
            elapsed_s=time.monotonic() - started,
        )

    def _running(self, index: int) -> None:
        global _running_index
        _running_index = index
        if self._report is not None:
            self._report(index)

    def _one(self, differential: Differential, tally: _Tally, index: int) -> None:
        chunk = tally.chunk
        try:
            case = chunk.case(index)
        except Exception as error:  # a generator bug: counted, and the health check judges
            _count_error(tally, f"generator exception {type(error).__name__}: {error}", index, None)
            return
        # Only this first run is recorded: triage re-runs the case with LASS off, which would
        # count cells the campaign never asked for.
        self._recorder.begin(case)
        try:
            result = differential.run(case)
        except Exception as error:  # a bug in an engine must not end an overnight campaign
            self._recorder.end()
            reason = f"exception {type(error).__name__}: {error}"
            _count_error(tally, reason, index, case)
            return
        seen = self._recorder.end()
        verdict = result.comparison.verdict
        if verdict is Verdict.ERROR:
            _count_error(tally, result.comparison.reason, index, case)
            return
        if verdict is Verdict.SKIPPED:
            tally.skipped += 1
            tally.skip_reasons[reason_key(result.comparison.reason)] += 1
            if result.reference.status is Status.HANG and result.emulator.status is Status.HANG:
                record = CaseRecord(
                    "instructions", index, case_to_dict(case), result.comparison.reason
                )
                tally.hang_cases.append(record)
            return
        tally.compared += 1
        if not seen.data_accesses:
            tally.no_access += 1
            tally.no_access_reasons[no_access_reason(seen, result.reference)] += 1
        first_cells = tally.coverage.add(seen)
        if first_cells:
            document = case_to_dict(case)  # one object for all its cells: pickled once
            tally.corpus.extend(CaseRecord(cell, index, document) for cell in first_cells)
        if verdict is Verdict.DIVERGE:
            self._count_divergence(differential, tally, result, index)

    def _count_divergence(
        self, differential: Differential, tally: _Tally, result: Result, index: int
    ) -> None:
        divergence = result.comparison.divergence
        assert divergence is not None  # a DIVERGE verdict always carries one
        signature = differential.signature_of(result)
        hits = tally.hits.get(signature.id)
        chunk = tally.chunk
        if hits is not None:
            hits.count += 1
            hits.last_index = index
            hits.newest.append((result, index))
            return
        document = self._document(differential, chunk, result, index, signature)
        tally.hits[signature.id] = _Hits(
            signature, document["class"], 1, index, document, collections.deque(maxlen=chunk.keep)
        )

    def _signature_hits(
        self, differential: Differential, chunk: Chunk, hits: _Hits
    ) -> SignatureHits:
        newest = (
            self._document(differential, chunk, result, index, hits.signature)
            for result, index in hits.newest
        )
        return SignatureHits(
            id=hits.signature.id,
            cls=hits.cls,
            summary=hits.signature.describe(),
            count=hits.count,
            first_index=hits.first["index"],
            last_index=hits.last_index,
            examples=(hits.first, *newest),
        )

    def _document(
        self,
        differential: Differential,
        chunk: Chunk,
        result: Result,
        index: int,
        signature: Signature,
    ) -> dict[str, Any]:
        self._running(index)  # triage runs the case again: a crash there is this case's too
        finding = differential.triage(result, signature)
        return crash_document(
            finding,
            policy_name=self._policy_name,
            seed=chunk.seed,
            index=index,
            trace=differential.trace,
        )


def reason_key(reason: str) -> str:
    """Group skip and error reasons by their first words (addresses and bytes vary)."""
    return " ".join(reason.split()[:4])


def _count_error(tally: _Tally, reason: str, index: int, case: TestCase | None) -> None:
    tally.errors += 1
    key = reason_key(reason)
    tally.error_reasons[key] += 1
    if key not in tally.error_examples:
        document = {} if case is None else case_to_dict(case)
        tally.error_examples[key] = CaseRecord(key, index, document, reason)
