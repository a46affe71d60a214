"""The supervisor on an in-process backend: merging, lost workers, stopping, resuming."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from lassfuzz.campaign.backend import ChunkDone, Event, WorkerLost
from lassfuzz.campaign.buckets import tool_crash_signature
from lassfuzz.campaign.display import PlainDisplay
from lassfuzz.campaign.health import HealthCheckError
from lassfuzz.campaign.known import Known
from lassfuzz.campaign.supervisor import (
    CampaignConfig,
    CampaignError,
    CampaignOutcome,
    Supervisor,
)
from lassfuzz.campaign.work import Chunk, ChunkRunner


class InlineBackend:
    """Runs chunks in this process, newest first (so chunks finish out of order), and can
    pretend that a worker died on chosen cases or that a STOP file appeared."""

    def __init__(
        self,
        capacity: int,
        *,
        lose: Mapping[int, str] | None = None,
        stop_after: tuple[int, Path] | None = None,
    ) -> None:
        self._capacity = capacity
        self.runner = ChunkRunner()
        self.queue: list[Chunk] = []
        self.lose = dict(lose or {})
        self.stop_after = stop_after
        self.polls = 0
        self.closed = False

    @property
    def capacity(self) -> int:
        return self._capacity

    def submit(self, chunk: Chunk) -> None:
        self.queue.append(chunk)

    def poll(self, timeout: float) -> list[Event]:
        self.polls += 1
        if self.stop_after is not None and self.polls == self.stop_after[0]:
            (self.stop_after[1] / "STOP").write_text("")
        if not self.queue:
            return []
        chunk = self.queue.pop()
        for index, cause in sorted(self.lose.items()):
            if chunk.start <= index < chunk.stop:
                del self.lose[index]
                return [WorkerLost(chunk, index, cause)]
        return [ChunkDone(self.runner.run(chunk))]

    def close(self) -> None:
        self.closed = True


def run(out: Path, backend: InlineBackend, **settings: Any) -> CampaignOutcome:
    options: dict[str, Any] = {
        "seed": 3,
        "policy": "none",
        "cases": 400,
        "chunk_cases": 50,
        "epoch_cases": 100,  # several steered epochs within a short run
        **settings,
    }
    config = CampaignConfig(out=out, **options)
    outcome = Supervisor(config, backend, PlainDisplay(io.StringIO())).run()
    assert backend.closed
    return outcome


def summary(out: Path) -> dict[str, Any]:
    """What must be the same however the campaign was cut, ordered or interrupted."""
    stats = json.loads((out / "stats.json").read_text())
    buckets = {
        path.parent.name: json.loads(path.read_text())["count"]
        for path in (out / "crashes").glob("*/bucket.json")
    }
    coverage = json.loads((out / "coverage.json").read_text())
    keys = ("cases", "compared", "skipped", "errors", "divergences", "next_index")
    return {
        **{key: stats[key] for key in keys},
        "buckets": buckets,
        "cells": coverage["cells"],
        "corpus": sorted(path.name for path in (out / "corpus").iterdir()),
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("reference")
    outcome = run(out, InlineBackend(1))
    assert outcome.stopped == "cases" and outcome.stats["final"] is True
    assert outcome.stats["divergences"] > 0 and outcome.unknown_findings
    return summary(out)


def test_order_and_parallelism_do_not_change_results(
    tmp_path: Path, reference: dict[str, Any]
) -> None:
    run(tmp_path, InlineBackend(3))
    assert summary(tmp_path) == reference
    assert not list(tmp_path.rglob("*.tmp"))
    lines = (tmp_path / "plot_data.csv").read_text().splitlines()
    assert len(lines) >= 2 and lines[-1].split(",")[2] == "400"


def test_lost_workers_become_a_tool_crash_and_a_hang(tmp_path: Path) -> None:
    outcome = run(tmp_path, InlineBackend(2, lose={37: "SIGSEGV", 320: "hang"}))
    stats = outcome.stats
    assert stats["cases"] == 400 and stats["next_index"] == 400
    assert stats["worker_restarts"] == 2 and stats["hangs"] == 1
    assert stats["divergences_by_class"]["tool-crash"] == 1
    crash_id = tool_crash_signature("SIGSEGV").id
    bucket = json.loads((tmp_path / "crashes" / crash_id / "bucket.json").read_text())
    assert bucket["class"] == "tool-crash" and bucket["first_index"] == 37
    hang = json.loads((tmp_path / "hangs" / "hang-320.json").read_text())
    assert hang["meta"]["index"] == 320 and "wall clock" in hang["meta"]["hang"]
    # Every other case ran exactly once: the two lost ones are all that is missing. (Counts
    # differ from the reference's: the lost cases' coverage is missing, so steering differs.)
    mine = summary(tmp_path)
    assert mine["compared"] + mine["skipped"] + mine["errors"] == 398


def test_stop_file_then_resume_matches_an_uninterrupted_run(
    tmp_path: Path, reference: dict[str, Any]
) -> None:
    first = run(tmp_path, InlineBackend(3, stop_after=(6, tmp_path)))
    assert first.stopped == "stop file" and not (tmp_path / "STOP").exists()
    stopped = json.loads((tmp_path / "stats.json").read_text())
    assert stopped["final"] is True and 0 < stopped["cases"] < 400
    second = run(tmp_path, InlineBackend(2), resume=True)
    assert second.stopped == "cases"
    assert summary(tmp_path) == reference


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_signals_stop_the_campaign_with_final_statistics(
    tmp_path: Path, number: signal.Signals
) -> None:
    class Signalling(InlineBackend):
        def poll(self, timeout: float) -> list[Event]:
            if self.polls == 3:
                os.kill(os.getpid(), number)
            return super().poll(timeout)

    previous = signal.getsignal(number)
    outcome = run(tmp_path, Signalling(2))
    assert outcome.stopped == number.name and outcome.stats["final"] is True
    assert 0 < outcome.stats["cases"] < 400
    assert signal.getsignal(number) == previous  # the campaign's handler is gone again


def test_resume_continues_to_a_larger_case_count(tmp_path: Path, reference: dict[str, Any]) -> None:
    run(tmp_path, InlineBackend(2), cases=250)
    leftover = tmp_path / "corpus" / ".cell-x.json.k3j_1f.tmp"  # as a kill -9 mid-write leaves
    leftover.write_text("{")
    run(tmp_path, InlineBackend(2), resume=True)
    assert summary(tmp_path) == reference
    assert not leftover.exists()


def test_a_directory_with_a_campaign_needs_resume(tmp_path: Path) -> None:
    run(tmp_path, InlineBackend(1), cases=50)
    with pytest.raises(CampaignError, match="already holds a campaign"):
        run(tmp_path, InlineBackend(1), cases=50)


def test_stop_on_first_records_one_finding(tmp_path: Path) -> None:
    outcome = run(tmp_path, InlineBackend(2), stop_on_first=True)
    assert outcome.stopped == "first finding"
    assert len(outcome.buckets) == 1 and outcome.stats["unique_signatures"] == 1


def test_known_findings_count_but_do_not_alarm(tmp_path: Path, reference: dict[str, Any]) -> None:
    known = {key: Known(key, "understood") for key in reference["buckets"]}
    outcome = run(tmp_path, InlineBackend(2), known=known)
    assert outcome.unknown_findings == ()
    assert outcome.stats["known_divergences"] == outcome.stats["divergences"] > 0
    bucket = next((tmp_path / "crashes").glob("*/bucket.json"))
    assert json.loads(bucket.read_text())["known"] == {"reason": "understood", "link": None}


def test_a_campaign_that_compares_nothing_fails_its_health_check(tmp_path: Path) -> None:
    with pytest.raises(HealthCheckError, match="could not be compared"):
        run(tmp_path, InlineBackend(1), max_instructions=1, cases=400)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["final"] is True and stats["hangs"] > 0
    assert 0 < len(list((tmp_path / "hangs").iterdir())) <= 100


def test_workers_dying_at_start_up_end_the_campaign(tmp_path: Path) -> None:
    class Broken(InlineBackend):
        def poll(self, timeout: float) -> list[Event]:
            return [WorkerLost(self.queue.pop(), None, "exit 1")] if self.queue else []

    with pytest.raises(CampaignError, match=r"dying before running a case \(exit 1\)"):
        run(tmp_path, Broken(1))


def test_chunks_carry_the_campaign_settings(tmp_path: Path) -> None:
    backend = InlineBackend(1)
    submitted: list[Chunk] = []
    original = backend.submit
    backend.submit = lambda chunk: (submitted.append(chunk), original(chunk))[1]  # type: ignore[method-assign]
    run(tmp_path, backend, cases=250, keep=1, timeout_s=3.0, trace=True)
    first = submitted[0]
    assert (first.seed, first.policy, first.keep, first.timeout_s, first.trace) == (
        3,
        "none",
        1,
        3.0,
        True,
    )
    assert [c.start for c in sorted(submitted, key=lambda c: c.start)] == [0, 50, 100, 150, 200]
    assert {c.epoch for c in submitted} == {0, 1, 2}
    assert dataclasses.replace(first, start=0) == first
