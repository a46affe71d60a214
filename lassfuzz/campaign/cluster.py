"""Run a campaign's chunks on a Dask distributed cluster (``lassfuzz fuzz --cluster ADDRESS``).

:class:`DaskBackend` implements :class:`~lassfuzz.campaign.backend.Backend` on an existing
``dask scheduler`` and its ``dask worker`` processes (the ``lassfuzz[cluster]`` extra). Only
chunks travel to the cluster and only :class:`~lassfuzz.campaign.work.ChunkResult`\\ s come back:
the supervisor, on the machine that started the campaign, still writes every file.

Each worker process gets a :class:`RunnerPlugin` holding one long-lived
:class:`~lassfuzz.campaign.work.ChunkRunner` (one Unicorn, one reference model), behind a lock
because a worker started with ``--nthreads`` above 1 would otherwise run two chunks on the same
Unicorn instance at once.

Native crashes and hangs. A case that crashes Unicorn kills the whole worker process; its
nanny starts a new one and the scheduler re-runs the chunk elsewhere, up to its
``allowed-failures`` setting, before failing the task with ``KilledWorker``. To still blame the
exact case, as the local backend does, each worker keeps the index it is running in a small
memory-mapped *progress file* on its own disk, named after its nanny (the one thing a
replacement process shares with the process it replaces), and has :mod:`faulthandler` write the
fatal signal beside it. The replacement reads both at start-up and publishes a *post-mortem*
event (index and cause) on the scheduler; when a chunk fails with ``KilledWorker`` the backend
looks for a post-mortem inside the chunk's range and reports
:class:`~lassfuzz.campaign.backend.WorkerLost` with it. A watchdog thread enforces the per-case
wall-clock bound the same way: it marks the progress file and kills its own process.
Without a nanny (``dask worker --no-nanny``) nothing replaces a dead worker, so a loss is
reported without a case (the supervisor then re-runs the whole chunk, a bounded number of
times). A progress file is removed when the campaign ends, except that of a worker that died
and was not replaced before the end (16 bytes in ``$TMPDIR/lassfuzz-dask``).
"""

from __future__ import annotations

import contextlib
import faulthandler
import hashlib
import mmap
import os
import queue
import signal
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Final, TypeVar

from dask.typing import Key
from distributed import Client, Future, WorkerPlugin, get_worker
from distributed.scheduler import KilledWorker
from distributed.worker import Worker

from lassfuzz.campaign.backend import ChunkDone, Event, WorkerLost
from lassfuzz.campaign.supervisor import CampaignError
from lassfuzz.campaign.work import Chunk, ChunkResult, ChunkRunner

#: Seconds to reach the scheduler, and to wait for its first worker.
CONNECT_TIMEOUT_S: Final = 10.0
WORKERS_TIMEOUT_S: Final = 30.0
#: After a ``KilledWorker``, how long to wait for the replacement worker's post-mortem (it
#: arrives once the nanny has started a new process: about a second).
POST_MORTEM_GRACE_S: Final = 15.0
#: How often the capacity (total worker threads) is asked of the scheduler.
CAPACITY_REFRESH_S: Final = 1.0
WATCHDOG_PERIOD_S: Final = 0.2

#: Progress file layout: the index being run (-1 between cases) and whether the watchdog
#: killed the process for running it too long.
_PROGRESS: Final = struct.Struct("<qq")
_IDLE: Final = -1
#: faulthandler's words for the fatal signals it catches.
_FATAL: Final = {
    "Segmentation fault": "SIGSEGV",
    "Aborted": "SIGABRT",
    "Bus error": "SIGBUS",
    "Floating-point exception": "SIGFPE",
    "Illegal instruction": "SIGILL",
}
#: Cause of a loss whose process left no fatal-signal report (SIGKILL, the OOM killer, exit).
KILLED: Final = "killed"


T = TypeVar("T")


class ClusterError(CampaignError):
    """The cluster cannot run the campaign; the message is one line."""


class RunnerPlugin(WorkerPlugin):
    """Lives in every worker process: the chunk runner, its progress file and its watchdog."""

    def __init__(self, name: str) -> None:
        self.name = name  # also the post-mortem event topic
        self._lock = threading.Lock()
        self._runner: ChunkRunner | None = None
        self._progress: _ProgressFile | None = None
        self._bound = 0.0  # wall-clock bound of the chunk being run
        self._running: tuple[int, float, float] | None = None  # index, start, bound
        self._stop = threading.Event()

    def __reduce__(self) -> tuple[type[RunnerPlugin], tuple[str]]:
        # Travels to the workers as its name only; everything else is per process.
        return (RunnerPlugin, (self.name,))

    def setup(self, worker: Worker) -> None:
        self._runner = ChunkRunner(self._report)
        if worker.nanny is not None:  # without a nanny nobody replaces the process
            self._progress = _ProgressFile(self.name, str(worker.nanny))
            post_mortem = self._progress.take_post_mortem()
            if post_mortem is not None:
                worker.log_event(self.name, post_mortem)
        threading.Thread(target=self._watch, name=f"{self.name}-watchdog", daemon=True).start()

    def teardown(self, worker: Worker) -> None:
        self._stop.set()
        if self._progress is not None:
            self._progress.remove()

    def run(self, chunk: Chunk) -> ChunkResult:
        runner = self._runner
        assert runner is not None  # setup() runs before any task
        with self._lock:
            self._bound = chunk.timeout_s
            return runner.run(chunk)

    def _report(self, index: int) -> None:
        self._running = None if index < 0 else (index, time.monotonic(), self._bound)
        if self._progress is not None:
            self._progress.write(index)

    def _watch(self) -> None:
        while not self._stop.wait(WATCHDOG_PERIOD_S):
            running = self._running
            if running is None:
                continue
            index, started, bound = running
            if time.monotonic() - started > bound:
                # Native code cannot be interrupted from another thread: end the process and
                # let the post-mortem name the case.
                if self._progress is not None:
                    self._progress.write(index, hang=True)
                os.kill(os.getpid(), signal.SIGKILL)


def _run_chunk(chunk: Chunk, plugin: str) -> ChunkResult:
    """The task body: run ``chunk`` on this worker's runner."""
    runner = get_worker().plugins[plugin]
    assert isinstance(runner, RunnerPlugin)
    return runner.run(chunk)


class _ProgressFile:
    """A worker slot's progress file and fatal-signal file (see the module docstring)."""

    def __init__(self, plugin: str, nanny: str) -> None:
        slot = hashlib.sha1(f"{plugin} {nanny}".encode()).hexdigest()[:20]
        directory = Path(tempfile.gettempdir()) / "lassfuzz-dask"
        directory.mkdir(exist_ok=True)
        self._path = directory / f"{slot}.progress"
        self._fault_path = directory / f"{slot}.fault"
        previous = self._path.read_bytes() if self._path.exists() else b""
        self._previous = _PROGRESS.unpack(previous) if len(previous) == _PROGRESS.size else None
        self._previous_fault = (
            self._fault_path.read_text(errors="replace") if self._fault_path.exists() else ""
        )
        with self._path.open("wb") as handle:
            handle.write(_PROGRESS.pack(_IDLE, 0))
        with self._path.open("r+b") as handle:
            self._map = mmap.mmap(handle.fileno(), _PROGRESS.size)
        self._fault: IO[str] = self._fault_path.open("w")
        faulthandler.enable(self._fault)

    def take_post_mortem(self) -> dict[str, Any] | None:
        """What the process this one replaces was doing when it died, if it was in a case."""
        if self._previous is None or self._previous[0] == _IDLE:
            return None
        index, hang = self._previous
        cause = "hang" if hang else KILLED
        for words, name in _FATAL.items():
            if f"Fatal Python error: {words}" in self._previous_fault:
                cause = name
        return {"index": index, "cause": cause}

    def write(self, index: int, *, hang: bool = False) -> None:
        _PROGRESS.pack_into(self._map, 0, index, int(hang))

    def remove(self) -> None:
        faulthandler.disable()
        self._fault.close()
        self._map.close()
        self._path.unlink(missing_ok=True)
        self._fault_path.unlink(missing_ok=True)


class DaskBackend:
    """Chunks as Dask tasks on the cluster whose scheduler is at ``address``."""

    def __init__(
        self,
        address: str,
        *,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        workers_timeout_s: float = WORKERS_TIMEOUT_S,
    ) -> None:
        try:
            self._client = Client(address, timeout=connect_timeout_s, set_as_default=False)
        except (OSError, ValueError, TimeoutError) as error:
            raise ClusterError(f"cannot reach the Dask scheduler at {address}: {error}") from None
        try:
            self._client.wait_for_workers(1, timeout=workers_timeout_s)
            # A name of its own per campaign: several campaigns can share a cluster, and a
            # post-mortem from another one never matches.
            self._plugin = f"lassfuzz-{uuid.uuid4().hex[:12]}"
            self._client.register_plugin(RunnerPlugin(self._plugin), name=self._plugin)
        except TimeoutError:
            self._client.close()
            raise ClusterError(
                f"the Dask scheduler at {address} has no workers (waited "
                f"{workers_timeout_s:g}s); start some: dask worker {address} --nthreads 1"
            ) from None
        except Exception as error:  # whatever a worker raised setting the plugin up
            self._client.close()
            raise ClusterError(
                f"the Dask workers cannot run lassfuzz ({type(error).__name__}: {error}); "
                "install the same lassfuzz on every worker"
            ) from None
        self._address = address
        self._chunks: dict[Key, tuple[Future[ChunkResult], Chunk]] = {}
        self._finished: queue.Queue[Future[ChunkResult]] = queue.Queue()
        self._lost: dict[Key, tuple[Chunk, float]] = {}  # task key -> (chunk, give-up time)
        self._capacity = 1
        self._capacity_at = -CAPACITY_REFRESH_S
        self._closed = False

    @property
    def capacity(self) -> int:
        """Total worker threads, re-read at most every second; at least 1 so that a campaign
        whose workers are all restarting keeps chunks queued on the scheduler."""
        now = time.monotonic()
        if now - self._capacity_at >= CAPACITY_REFRESH_S:
            self._capacity_at = now
            threads = self._scheduler(self._client.nthreads)
            self._capacity = max(1, sum(threads.values()))
        return self._capacity

    def submit(self, chunk: Chunk) -> None:
        key = f"lassfuzz-chunk-{chunk.start}-{chunk.stop}-{uuid.uuid4().hex[:8]}"
        # retries=0: a chunk that raises is a bug to report, not to repeat; a chunk whose
        # worker dies is re-run by the scheduler itself (its allowed-failures).
        future: Future[ChunkResult] = self._scheduler(
            lambda: self._client.submit(
                _run_chunk, chunk, self._plugin, key=key, pure=False, retries=0
            )
        )
        self._chunks[key] = (future, chunk)
        future.add_done_callback(self._finished.put)

    def poll(self, timeout: float) -> list[Event]:
        futures: list[Future[ChunkResult]] = []
        with contextlib.suppress(queue.Empty):
            futures.append(self._finished.get(timeout=timeout))
            while True:
                futures.append(self._finished.get_nowait())
        events = [event for event in map(self._event, futures) if event is not None]
        return events + self._attribute_losses()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # The scheduler may be gone already; the plugin's teardown frees the workers' engines.
        with contextlib.suppress(Exception):
            self._client.cancel([future for future, _ in self._chunks.values()], force=True)
        with contextlib.suppress(Exception):
            self._client.unregister_worker_plugin(self._plugin)
        self._chunks.clear()
        self._client.close()

    def _event(self, future: Future[ChunkResult]) -> Event | None:
        entry = self._chunks.get(future.key)
        if entry is None:
            return None  # cancelled by close()
        chunk = entry[1]
        if future.status == "finished":
            del self._chunks[future.key]
            return ChunkDone(future.result())
        if future.status == "error":
            error = future.exception()
            if isinstance(error, KilledWorker):
                self._lost[future.key] = (chunk, time.monotonic() + POST_MORTEM_GRACE_S)
                return None
            raise ClusterError(
                f"chunk {chunk.start}..{chunk.stop - 1} failed on the cluster: "
                f"{type(error).__name__}: {error}"
            )
        raise ClusterError(
            f"lost chunk {chunk.start}..{chunk.stop - 1}: the Dask scheduler at {self._address} "
            f"{'is gone' if self._client.status in ('closing', 'closed') else 'cancelled it'}"
        )

    def _scheduler(self, call: Callable[[], T]) -> T:
        """``call()``, a request to the scheduler; losing the scheduler ends the campaign."""
        try:
            return call()
        except (OSError, RuntimeError, TimeoutError) as error:
            # OSError covers distributed's CommClosedError; RuntimeError its closed pool.
            raise ClusterError(
                f"lost the Dask scheduler at {self._address} ({type(error).__name__}: {error})"
            ) from None

    def _attribute_losses(self) -> list[Event]:
        """WorkerLost events for killed chunks whose post-mortem arrived or is overdue."""
        if not self._lost:
            return []
        logged = self._scheduler(lambda: self._client.get_events(self._plugin))
        post_mortems = [msg for _, msg in logged]
        events: list[Event] = []
        now = time.monotonic()
        for key, (chunk, give_up) in list(self._lost.items()):
            found = [m for m in post_mortems if chunk.start <= m["index"] < chunk.stop]
            if not found and now < give_up:
                continue
            del self._lost[key]
            del self._chunks[key]
            if found:
                events.append(WorkerLost(chunk, found[-1]["index"], found[-1]["cause"]))
            else:
                events.append(WorkerLost(chunk, None, KILLED))
        return events
