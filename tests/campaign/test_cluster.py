"""The Dask backend on a real cluster: ``scripts/cluster-local.sh`` starts a ``dask scheduler`` and
two ``dask worker`` processes on 127.0.0.1 for the module, and everything is torn down even when
a test fails."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lassfuzz.campaign.backend import ChunkDone, Event, WorkerLost
from lassfuzz.campaign.cluster import ClusterError, DaskBackend
from lassfuzz.campaign.work import Chunk
from lassfuzz.cli.main import EXIT_ERROR, main
from tests.campaign.faulty_policies import MISBEHAVE, consulted

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def faulty() -> tuple[int, int]:
    """The cases the workers' faulty policy aborts on and hangs on (as in test_backend)."""
    abort_at, hang_at = consulted(seed=1, count=40)[5::6][:2]
    return abort_at, hang_at


@pytest.fixture(scope="module")
def cluster(faulty: tuple[int, int]) -> Iterator[str]:
    """The address of a scheduler with two single-threaded workers."""
    env = {
        **os.environ,
        "LASSFUZZ_VENV": sys.prefix,
        # The faulty test policy: importable by the workers, armed for two cases.
        "PYTHONPATH": str(ROOT),
        "LASSFUZZ_TEST_ABORT_AT": str(faulty[0]),
        "LASSFUZZ_TEST_HANG_AT": str(faulty[1]),
    }
    process = subprocess.Popen(
        [str(ROOT / "scripts" / "cluster-local.sh"), "-n", "2", "-p", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # one process group: the teardown reaches every process
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        ready, _, _ = select.select([process.stdout], [], [], 60)
        address = process.stdout.readline().strip() if ready else ""
        if not address.startswith("tcp://"):
            process.kill()
            pytest.fail(f"cluster-local.sh did not start: {process.stderr.read()}")
        yield address
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


def fuzz(out: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """``lassfuzz fuzz`` in a process of its own, from the repository root."""
    command = [sys.executable, "-m", "lassfuzz", "fuzz", "--out", str(out), *options]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


def findings(out: Path) -> dict[str, Any]:
    """Every bucket of a campaign directory: its counters and how many examples it kept.

    Which examples a bucket keeps depends on the order chunks finish in (the first one to arrive
    stays the first example), so only their number is compared."""
    buckets = {}
    for bucket in sorted((out / "crashes").iterdir()):
        document = json.loads((bucket / "bucket.json").read_text())
        fields = ("class", "count", "first_index", "last_index", "summary")
        examples = len(list(bucket.glob("crash-*.json")))
        buckets[bucket.name] = {**{name: document[name] for name in fields}, "files": examples}
    return buckets


@pytest.mark.slow
def test_a_cluster_campaign_finds_what_a_local_one_finds(cluster: str, tmp_path: Path) -> None:
    options = ("--cases", "400", "--policy", "none", "--seed", "7")
    remote = fuzz(tmp_path / "cluster", "--cluster", cluster, *options)
    local = fuzz(tmp_path / "local", "--jobs", "1", *options)
    assert remote.returncode == local.returncode == 1, remote.stderr + local.stderr
    stats = json.loads((tmp_path / "cluster" / "stats.json").read_text())
    assert stats["final"] and stats["cases"] == stats["next_index"] == 400
    assert stats["jobs"] == 2  # the cluster's worker threads
    assert stats["divergences"] > 0
    local_stats = json.loads((tmp_path / "local" / "stats.json").read_text())
    for name in ("compared", "skipped", "errors", "divergences", "cells_covered", "hangs"):
        assert stats[name] == local_stats[name], name
    assert findings(tmp_path / "cluster") == findings(tmp_path / "local")
    coverage = json.loads((tmp_path / "cluster" / "coverage.json").read_text())
    assert coverage == json.loads((tmp_path / "local" / "coverage.json").read_text())
    assert sum(coverage["cells"].values()) > 0
    corpus = sorted(path.name for path in (tmp_path / "cluster" / "corpus").iterdir())
    assert corpus == sorted(path.name for path in (tmp_path / "local" / "corpus").iterdir())


def collect(backend: DaskBackend, expected: int, limit_s: float = 90.0) -> list[Event]:
    events: list[Event] = []
    deadline = time.monotonic() + limit_s
    while len(events) < expected and time.monotonic() < deadline:
        events.extend(backend.poll(0.5))
    return events


@pytest.mark.slow
def test_a_native_crash_and_a_hang_are_pinned_on_their_case(
    cluster: str, faulty: tuple[int, int]
) -> None:
    abort_at, hang_at = faulty
    backend = DaskBackend(cluster)
    try:
        assert backend.capacity == 2
        backend.submit(Chunk(seed=1, start=0, count=abort_at + 1, policy=MISBEHAVE))
        rest = hang_at - abort_at
        backend.submit(
            Chunk(seed=1, start=abort_at + 1, count=rest, policy=MISBEHAVE, timeout_s=1.0)
        )
        lost = collect(backend, 2)
        # The nannies replaced the dead workers, which run chunks again.
        backend.submit(Chunk(seed=1, start=hang_at + 1, count=10, policy=MISBEHAVE))
        done = collect(backend, 1)
    finally:
        backend.close()
    causes = sorted((event.index, event.cause) for event in lost if isinstance(event, WorkerLost))
    assert causes == [(abort_at, "SIGABRT"), (hang_at, "hang")]
    assert [type(event) for event in done] == [ChunkDone]


def eventually(condition: Callable[[], bool], limit_s: float = 30.0) -> bool:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.mark.slow
def test_capacity_follows_workers_joining_and_leaving(cluster: str) -> None:
    backend = DaskBackend(cluster)
    try:
        assert eventually(lambda: backend.capacity == 2)  # after replacements by the nannies
        command = [f"{sys.prefix}/bin/dask", "worker", cluster, "--nthreads", "2"]
        command += ["--no-nanny", "--no-dashboard", "--host", "127.0.0.1"]
        extra = subprocess.Popen(command, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            assert eventually(lambda: backend.capacity == 4)  # threads, not processes
        finally:
            extra.terminate()
            try:
                extra.wait(timeout=20)
            finally:
                extra.kill()
        assert eventually(lambda: backend.capacity == 2)
    finally:
        backend.close()


def test_an_unreachable_scheduler_is_one_clear_error() -> None:
    with pytest.raises(
        ClusterError, match=r"cannot reach the Dask scheduler at tcp://127\.0\.0\.1:1"
    ):
        DaskBackend("tcp://127.0.0.1:1", connect_timeout_s=0.5)


def test_without_the_extra_fuzz_cluster_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.delitem(sys.modules, "lassfuzz.campaign.cluster")
    monkeypatch.setitem(sys.modules, "distributed", None)  # makes `import distributed` fail
    status = main(["fuzz", "--cases", "1", "--out", str(tmp_path), "--cluster", "tcp://h:1"])
    assert status == EXIT_ERROR
    assert capsys.readouterr().err == (
        "lassfuzz fuzz: --cluster needs the cluster extra: pip install 'lassfuzz[cluster]'\n"
    )
