"""The fuzzing loop: generate, run both sides, compare, triage, and keep what matters.

Output directory layout (README, "Campaign output"):
``corpus/`` first case per coverage key, ``crashes/`` one crash file per unique signature,
``errors/`` one example per tool-error reason, ``stats.json`` rewritten atomically.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lassfuzz.campaign.files import crash_document, crash_filename, write_atomic
from lassfuzz.case import case_to_json
from lassfuzz.compare.diff import Verdict
from lassfuzz.compare.differential import Differential, Finding, Result
from lassfuzz.compare.signature import Signature, family_at_fault
from lassfuzz.generator.generate import generate_case

#: Health check (Hypothesis-style): after this many cases, a campaign that compares almost
#: nothing is broken (a bad generator or a failing engine), and says so instead of "passing".
HEALTH_MIN_CASES = 200
HEALTH_MIN_COMPARED_RATIO = 0.5
STATS_INTERVAL_S = 2.0


class HealthCheckError(Exception):
    """The campaign compares too few cases to mean anything."""


@dataclass(frozen=True)
class CampaignConfig:
    out: Path
    seed: int
    cases: int | None = None
    duration_s: float | None = None
    stop_on_first: bool = False
    policy_name: str = "sdm"


@dataclass
class Stats:
    """Counters of one campaign; serialised to ``stats.json``."""

    seed: int
    policy: str
    started: float = field(default_factory=time.time)
    cases: int = 0
    compared: int = 0
    skipped: int = 0
    errors: int = 0
    divergences: int = 0
    divergences_by_class: collections.Counter[str] = field(default_factory=collections.Counter)
    signatures: dict[str, dict[str, Any]] = field(default_factory=dict)
    skip_reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    next_index: int = 0

    def elapsed(self) -> float:
        return max(time.time() - self.started, 1e-9)

    def to_dict(self, *, final: bool) -> dict[str, Any]:
        elapsed = self.elapsed()
        by_class: dict[str, int] = collections.Counter()
        for entry in self.signatures.values():
            by_class[entry["class"]] += 1
        return {
            "seed": self.seed,
            "policy": self.policy,
            "final": final,
            "started": self.started,
            "updated": time.time(),
            "elapsed_s": round(elapsed, 3),
            "cases": self.cases,
            "cases_per_sec": round(self.cases / elapsed, 1),
            "compared": self.compared,
            "skipped": self.skipped,
            "errors": self.errors,
            "divergences": self.divergences,
            "divergences_by_class": dict(self.divergences_by_class),
            "unique_signatures": len(self.signatures),
            "unique_signatures_by_class": dict(by_class),
            "next_index": self.next_index,
            "skip_reasons": dict(self.skip_reasons.most_common(10)),
            "signatures": self.signatures,
        }

    def progress_line(self) -> str:
        lass = self.divergences_by_class.get("lass", 0)
        base = self.divergences_by_class.get("base", 0)
        return (
            f"cases {self.cases}  {self.cases / self.elapsed():.0f} cases/s  "
            f"divergences {self.divergences} (lass {lass}, base {base})  "
            f"unique {len(self.signatures)}  skipped {self.skipped}  errors {self.errors}"
        )


class Campaign:
    """One fuzzing campaign writing into ``config.out``."""

    def __init__(
        self,
        config: CampaignConfig,
        differential: Differential,
        *,
        progress: Callable[[Stats], None] | None = None,
        finding: Callable[[Finding, bool], None] | None = None,
    ) -> None:
        self.config = config
        self.differential = differential
        self.stats = Stats(seed=config.seed, policy=config.policy_name)
        self.progress = progress
        self.on_finding = finding
        self.coverage: set[tuple[Any, ...]] = set()
        self.error_reasons: set[str] = set()
        for sub in ("corpus", "crashes"):
            (config.out / sub).mkdir(parents=True, exist_ok=True)

    def run(self) -> Stats:
        """Fuzz until the case count, the duration or the first finding; always flush stats."""
        config = self.config
        deadline = None if config.duration_s is None else time.monotonic() + config.duration_s
        last_flush = time.monotonic()
        index = 0
        try:
            while config.cases is None or index < config.cases:
                if deadline is not None and time.monotonic() >= deadline:
                    break
                found = self.step(index)
                index += 1
                self.stats.next_index = index
                now = time.monotonic()
                if now - last_flush >= STATS_INTERVAL_S:
                    last_flush = now
                    self.flush(final=False)
                    if self.progress is not None:
                        self.progress(self.stats)
                if found and config.stop_on_first:
                    break
                self.health_check()
        finally:
            self.flush(final=True)
            if self.progress is not None:
                self.progress(self.stats)
        return self.stats

    def step(self, index: int) -> bool:
        """Run case ``index``; True when it produced a divergence."""
        case = generate_case(self.config.seed, index)
        result = self.differential.run(case)
        stats = self.stats
        stats.cases += 1
        verdict = result.comparison.verdict
        if verdict is Verdict.SKIPPED:
            stats.skipped += 1
            stats.skip_reasons[_reason_key(result.comparison.reason)] += 1
            return False
        if verdict is Verdict.ERROR:
            stats.errors += 1
            self.save_error(result, index)
            return False
        stats.compared += 1
        self.keep_if_new(result)
        if verdict is not Verdict.DIVERGE:
            return False
        finding = self.differential.triage(result)
        stats.divergences += 1
        stats.divergences_by_class[finding.cls] += 1
        new = self.record(finding, index)
        if self.on_finding is not None:
            self.on_finding(finding, new)
        return True

    def record(self, finding: Finding, index: int) -> bool:
        """Count a finding; write its crash file when the signature is new. True if new."""
        signature: Signature = finding.signature
        entry = self.stats.signatures.get(signature.id)
        if entry is not None:
            entry["count"] += 1
            entry["last_index"] = index
            return False
        name = crash_filename(signature)
        document = crash_document(
            finding,
            policy_name=self.config.policy_name,
            seed=self.config.seed,
            index=index,
            trace=self.differential.trace,
        )
        write_atomic(self.config.out / "crashes" / name, json.dumps(document, indent=1))
        self.stats.signatures[signature.id] = {
            "summary": signature.describe(),
            "class": finding.cls,
            "count": 1,
            "first_index": index,
            "last_index": index,
            "file": f"crashes/{name}",
        }
        return True

    def keep_if_new(self, result: Result) -> None:
        """Keep in ``corpus/`` the first case reaching each coverage key."""
        key = coverage_key(result)
        if key in self.coverage:
            return
        self.coverage.add(key)
        name = f"case-{len(self.coverage):05d}.json"
        write_atomic(self.config.out / "corpus" / name, case_to_json(result.case))

    def save_error(self, result: Result, index: int) -> None:
        reason = _reason_key(result.comparison.reason)
        if reason in self.error_reasons:
            return
        self.error_reasons.add(reason)
        name = f"error-{len(self.error_reasons):04d}.json"
        document = {
            "reason": result.comparison.reason,
            "seed": self.config.seed,
            "index": index,
            "case": json.loads(case_to_json(result.case)),
        }
        write_atomic(self.config.out / "errors" / name, json.dumps(document, indent=1))

    def flush(self, *, final: bool) -> None:
        write_atomic(
            self.config.out / "stats.json", json.dumps(self.stats.to_dict(final=final), indent=1)
        )

    def health_check(self) -> None:
        stats = self.stats
        if stats.cases != HEALTH_MIN_CASES:
            return
        if stats.compared < HEALTH_MIN_COMPARED_RATIO * stats.cases:
            reasons = {**stats.skip_reasons}
            raise HealthCheckError(
                f"only {stats.compared} of {stats.cases} cases could be compared "
                f"({stats.errors} engine errors; skipped: {reasons})"
            )


def coverage_key(result: Result) -> tuple[Any, ...]:
    """What makes a case "new": CPL, the reference outcome class, and the faulting family."""
    reference = result.reference
    fault = reference.fault
    return (
        result.case.state.cpl,
        reference.summary,
        None if fault is None else fault.access,
        None if fault is None or fault.address is None else fault.address >> 63,
        family_at_fault(result.case, fault),
    )


def _reason_key(reason: str) -> str:
    """Group skip/error reasons by their first words (addresses and bytes vary)."""
    return " ".join(reason.split()[:4])
