"""The local backend: real worker processes, native crashes and hangs pinned on one case."""

from __future__ import annotations

import time

import pytest

from lassfuzz.campaign.backend import ChunkDone, Event, LocalBackend, WorkerLost
from lassfuzz.campaign.work import Chunk
from tests.campaign.faulty_policies import MISBEHAVE, consulted


def collect(backend: LocalBackend, expected: int, limit_s: float = 120.0) -> list[Event]:
    events: list[Event] = []
    deadline = time.monotonic() + limit_s
    while len(events) < expected and time.monotonic() < deadline:
        events.extend(backend.poll(0.5))
    return events


def test_chunks_come_back_done() -> None:
    backend = LocalBackend(2)
    try:
        for start in (0, 20, 40):
            backend.submit(Chunk(seed=1, start=start, count=20))
        events = collect(backend, 3)
    finally:
        backend.close()
    assert backend.capacity == 2
    assert all(isinstance(event, ChunkDone) for event in events)
    starts = sorted(event.result.chunk.start for event in events if isinstance(event, ChunkDone))
    assert starts == [0, 20, 40]


@pytest.mark.slow
def test_abort_and_hang_lose_one_worker_each_and_name_the_case(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    abort_at, hang_at = consulted(seed=1, count=40)[5::6][:2]
    monkeypatch.setenv("LASSFUZZ_TEST_ABORT_AT", str(abort_at))
    monkeypatch.setenv("LASSFUZZ_TEST_HANG_AT", str(hang_at))
    backend = LocalBackend(2)
    try:
        backend.submit(Chunk(seed=1, start=0, count=abort_at + 1, policy=MISBEHAVE))
        backend.submit(
            Chunk(
                seed=1,
                start=abort_at + 1,
                count=hang_at - abort_at,
                policy=MISBEHAVE,
                timeout_s=1.0,
            )
        )
        lost = collect(backend, 2)
        # The replaced workers work: the rest of the index space runs normally.
        backend.submit(Chunk(seed=1, start=hang_at + 1, count=10, policy=MISBEHAVE))
        backend.submit(Chunk(seed=1, start=hang_at + 11, count=10, policy=MISBEHAVE))
        done = collect(backend, 2)
    finally:
        backend.close()
    causes = sorted((event.index, event.cause) for event in lost if isinstance(event, WorkerLost))
    assert causes == [(abort_at, "SIGABRT"), (hang_at, "hang")]
    assert all(isinstance(event, ChunkDone) for event in done) and len(done) == 2


@pytest.mark.slow
def test_chunks_waiting_behind_a_lost_one_still_run(monkeypatch: pytest.MonkeyPatch) -> None:
    abort_at = consulted(seed=1, count=20)[0]
    monkeypatch.setenv("LASSFUZZ_TEST_ABORT_AT", str(abort_at))
    backend = LocalBackend(1)
    chunks = [
        Chunk(seed=1, start=start, count=count, policy=MISBEHAVE)
        for start, count in ((0, abort_at + 1), (abort_at + 1, 5), (abort_at + 6, 5))
    ]
    try:
        for chunk in chunks:
            backend.submit(chunk)
        events = collect(backend, 3)
    finally:
        backend.close()
    lost = [event for event in events if isinstance(event, WorkerLost)]
    done = [event.result.chunk for event in events if isinstance(event, ChunkDone)]
    assert [(event.chunk, event.index) for event in lost] == [(chunks[0], abort_at)]
    assert sorted(done, key=lambda chunk: chunk.start) == chunks[1:]
