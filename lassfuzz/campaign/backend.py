"""Where chunks run: the :class:`Backend` protocol and the local multi-process backend.

The supervisor (:mod:`lassfuzz.campaign.supervisor`) only ever talks to a backend: it submits
chunks up to :attr:`Backend.capacity` at a time and polls for :data:`Event`\\ s. A backend never
loses a chunk silently: each submitted chunk comes back exactly once, either as
:class:`ChunkDone` or as :class:`WorkerLost` (the worker died in native code, or a case ran past
the chunk's wall-clock bound), after which the supervisor decides what to re-run.

:class:`LocalBackend` runs one process per worker, each with its own long-lived
:class:`~lassfuzz.campaign.work.ChunkRunner` (so its own Unicorn). Each worker talks to the
supervisor over its own pipe rather than a shared queue: a worker killed while writing can then
only break its own channel, never another worker's. Each worker also publishes, in shared
memory, the index of the case it is running and when that case started; that is how a native
crash or a hang is pinned on one case.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
from dataclasses import dataclass
from multiprocessing.context import SpawnContext, SpawnProcess
from typing import Any, Protocol

from lassfuzz.campaign.work import Chunk, ChunkResult, ChunkRunner

#: Slot values of the shared progress array: [index running or -1, monotonic start time].
_IDLE = -1.0
#: prctl(2) option: the signal a process gets when its parent dies.
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ChunkDone:
    """A chunk ran to the end."""

    result: ChunkResult


@dataclass(frozen=True)
class WorkerLost:
    """A worker stopped before finishing ``chunk``.

    ``index`` is the case it was running (None when it died between cases, e.g. at start-up);
    ``cause`` names why: a signal name (``SIGABRT``, ``SIGSEGV``), ``exit N``, or ``hang`` when
    the backend killed it because case ``index`` ran longer than ``chunk.timeout_s``. Cases of
    ``chunk`` other than ``index`` produced nothing and must be re-run.
    """

    chunk: Chunk
    index: int | None
    cause: str

    @property
    def hang(self) -> bool:
        return self.cause == "hang"


Event = ChunkDone | WorkerLost


class Backend(Protocol):
    """Runs chunks somewhere and reports back; see the module docstring for the contract."""

    @property
    def capacity(self) -> int:
        """How many chunks it runs at once (submitting more queues them)."""
        ...

    def submit(self, chunk: Chunk) -> None:
        """Start ``chunk`` (or queue it until a worker is free)."""
        ...

    def poll(self, timeout: float) -> list[Event]:
        """Events since the last poll, waiting up to ``timeout`` seconds for the first one."""
        ...

    def close(self) -> None:
        """Stop every worker now; chunks still running produce no event. Idempotent."""
        ...


def _worker_main(
    connection: multiprocessing.connection.Connection, progress: Any, supervisor: int
) -> None:
    """Body of a worker process: run chunks received on ``connection`` until it is killed.

    ``progress`` is the worker's shared ``RawArray('d', 2)``: [running index or -1, start time].
    """
    # The terminal sends SIGINT to the whole process group; only the supervisor decides how a
    # campaign stops (it then kills the workers).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(supervisor)

    def report(index: int) -> None:
        # Start time first: a reader seeing the new index then also sees a fresh start time,
        # so a case is never judged by its predecessor's start.
        progress[1] = time.monotonic()
        progress[0] = float(index)

    runner = ChunkRunner(report)
    while True:
        try:
            chunk = connection.recv()
        except EOFError:  # the supervisor is gone
            return
        connection.send(runner.run(chunk))


def _die_with_parent(supervisor: int) -> None:
    """Have the kernel kill this worker when the supervisor dies (``kill -9`` of the
    supervisor would otherwise leave a worker stuck in an endless case running forever).
    Linux only; elsewhere an orphan notices at its next message (a closed pipe) instead."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != supervisor:  # it died before prctl took effect
        os._exit(1)


class _Worker:
    """One worker process, its pipe, its progress slot and the chunks sent to it, in order."""

    def __init__(self, context: SpawnContext) -> None:
        self.progress = context.RawArray("d", [_IDLE, 0.0])
        parent, child = context.Pipe()
        self.connection = parent
        self.process: SpawnProcess = context.Process(
            target=_worker_main,
            args=(child, self.progress, os.getpid()),
            daemon=True,
            name="lassfuzz-worker",
        )
        self.process.start()
        child.close()
        #: Sent and not answered yet; the first is running (or about to), the rest wait in the
        #: pipe, so that the worker never idles while the supervisor is busy writing files.
        self.chunks: list[Chunk] = []

    def running_index(self) -> int | None:
        index = int(self.progress[0])
        return None if index < 0 else index

    def running_since(self) -> float:
        return float(self.progress[1])

    def running_chunk(self) -> Chunk:
        """The chunk holding the running case (the first sent, when between cases)."""
        index = self.running_index()
        for chunk in self.chunks:
            if index is not None and chunk.start <= index < chunk.stop:
                return chunk
        return self.chunks[0]

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.connection.close()


class LocalBackend:
    """``jobs`` worker processes on this machine; a dead worker is replaced at once."""

    #: Chunks sent ahead to each worker (the running one included).
    PREFETCH = 2

    def __init__(self, jobs: int) -> None:
        if jobs < 1:
            raise ValueError(f"jobs must be at least 1 (got {jobs})")
        # spawn, not fork: a forked child would inherit the supervisor's threads (rich's live
        # display) and locks in an unknown state.
        self._context = multiprocessing.get_context("spawn")
        self._workers = [_Worker(self._context) for _ in range(jobs)]
        self._queue: list[Chunk] = []
        self._closed = False

    @property
    def capacity(self) -> int:
        return len(self._workers)

    def submit(self, chunk: Chunk) -> None:
        self._queue.append(chunk)
        self._dispatch()

    def poll(self, timeout: float) -> list[Event]:
        events: list[Event] = []
        busy = [w for w in self._workers if w.chunks]
        if busy:
            waitables: list[multiprocessing.connection.Connection | int]
            waitables = [w.connection for w in busy]
            waitables += [w.process.sentinel for w in busy]
            multiprocessing.connection.wait(waitables, timeout=min(timeout, self._next_deadline()))
        elif timeout > 0:
            time.sleep(timeout)
        for position, worker in enumerate(self._workers):
            while worker.chunks:
                event = self._check(worker)
                if event is None:
                    break
                events.append(event)
                if isinstance(event, WorkerLost):
                    # Chunks queued behind the lost one never started: run them elsewhere.
                    waiting = [c for c in worker.chunks if c is not event.chunk]
                    self._queue[:0] = waiting
                    worker.kill()
                    self._workers[position] = _Worker(self._context)
                    break
        self._dispatch()
        return events

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            # Killing rather than asking: a worker may be deep in a case, and the supervisor
            # wants to be gone within seconds; in-flight cases are re-run on --resume.
            worker.kill()
        self._queue.clear()

    def _check(self, worker: _Worker) -> Event | None:
        """The next event of a worker with chunks outstanding, if any."""
        try:
            if worker.connection.poll():
                result: ChunkResult = worker.connection.recv()
                worker.chunks.pop(0)
                return ChunkDone(result)
        except (EOFError, OSError):
            pass  # the worker died mid-message; reported below from its exit code
        if not worker.process.is_alive():
            worker.process.join()
            cause = _cause(worker.process.exitcode)
            return WorkerLost(worker.running_chunk(), worker.running_index(), cause)
        index = worker.running_index()
        chunk = worker.running_chunk()
        if index is not None and time.monotonic() - worker.running_since() > chunk.timeout_s:
            return WorkerLost(chunk, index, "hang")
        return None

    def _next_deadline(self) -> float:
        """Seconds until the earliest running case would exceed its wall-clock bound."""
        now = time.monotonic()
        remaining = [
            w.running_chunk().timeout_s - (now - w.running_since())
            for w in self._workers
            if w.chunks and w.running_index() is not None
        ]
        return max(0.0, min(remaining, default=1.0)) + 0.01

    def _dispatch(self) -> None:
        for position, worker in enumerate(self._workers):
            if not worker.chunks and not worker.process.is_alive():
                # Died between chunks (nothing to attribute): replace it quietly.
                worker.kill()
                self._workers[position] = _Worker(self._context)
        # Breadth first: every worker gets a chunk to run before any gets one to wait.
        for depth in range(1, self.PREFETCH + 1):
            for worker in self._workers:
                if self._queue and len(worker.chunks) < depth:
                    chunk = self._queue.pop(0)
                    worker.chunks.append(chunk)
                    # If it died just now, the next poll reports the chunk as lost.
                    with contextlib.suppress(OSError):
                        worker.connection.send(chunk)


def _cause(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return signal.Signals(-exitcode).name
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit {exitcode}"


def default_jobs() -> int:
    """All cores (``--jobs`` default)."""
    return os.cpu_count() or 1
