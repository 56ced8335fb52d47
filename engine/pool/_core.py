"""The state and the failure rules both pool backends share, in one class of its own.

:class:`PoolCore` holds the lock, the job table (the pending FIFO and the running
set), the counters and the break; each backend gets it as an argument and uses
only its public methods.  The rules it enforces:

* a job's future is settled once, by whoever *claims* it first (``claim_locked``),
  and each claim counts the job as completed or failed;
* the first failure *breaks* the pool: it is recorded, the cancel token is set,
  every pending job fails with BrokenPoolError (CancelledError after ``cancel``)
  caused by it, and the break listeners (the backend) are told; later failures
  and breaks change nothing;
* once broken or closed, nothing new is accepted.

Methods named ``*_locked`` run with ``lock`` held; the others take it.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from engine.errors import BrokenPoolError, CancelledError, MigrationError, PoolError
from engine.pool._token import CancelToken

logger = logging.getLogger("multifd.pool")

BackendName = Literal["thread", "process"]

#: Cap on one pickled job and one pickled result of the process backend: jobs
#: carry descriptors (names, offsets, sockets), never bulk data.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """A snapshot of a pool.  ``failed`` counts every future that got an exception
    (raised, crashed, cancelled, or never started because the pool broke), so at
    rest ``submitted == completed + failed + pending + busy``."""

    backend: BackendName
    max_workers: int
    workers_started: int
    workers_alive: int
    busy: int
    idle: int
    pending: int
    submitted: int
    completed: int
    failed: int
    broken: bool
    worker_pids: tuple[int, ...]


@dataclass(eq=False)
class Job:
    """One submitted call and its future."""

    id: int
    future: Future[Any]
    # Thread backend: the call.  Process backend: the pickle, and the dup'd sockets
    # whose descriptors travel next to it (the job owns them until they are sent).
    call: tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]] | None = None
    payload: bytes = b""
    sockets: list[socket.socket] = field(default_factory=list)
    settled: bool = False  # under the core's lock: whoever flips it sets the future
    # Once it answers True, the job's work is done: its failure (a worker dying
    # included) fails its future but breaks nothing (WorkerPool.spare).
    spared: Callable[[], bool] | None = None

    def release(self) -> None:
        """Close the sockets the job still owns."""
        sockets, self.sockets = self.sockets, []
        for sock in sockets:
            sock.close()


def settle(future: Future[Any], result: Any = None, error: BaseException | None = None) -> None:
    """Set `future`'s outcome; a future the caller cancelled with Future.cancel() stays so."""
    try:
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
    except InvalidStateError:
        pass


class Backend(Protocol):
    """What a backend does for the pool facade; ``*_locked`` run under the core's lock."""

    workers_started: int

    def make_job(self, job_id: int, future: Future[Any], fn: Callable[..., Any],
                 args: tuple[Any, ...], kwargs: dict[str, Any]) -> Job: ...
    def on_submit_locked(self) -> None: ...  # a job was queued: start a worker if due
    def on_broken(self) -> None: ...  # a break listener: the core broke
    def on_shutdown(self) -> None: ...
    def join(self) -> bool: ...  # wait for all workers and threads (False: one is the caller)
    def alive_locked(self) -> int: ...
    def pids_locked(self) -> tuple[int, ...]: ...
    def background_alive_locked(self) -> bool: ...  # will a thread call background_exited()?


class PoolCore:
    """Lock, job table, counters and the claim/finish/break rules of one pool (module docstring).

    `name` and `cancel_grace` are the pool's, for messages and for the backends.
    The core owns the pool's cancel token: ``release()`` closes it.
    """

    def __init__(self, name: str, max_workers: int, cancel_grace: float) -> None:
        self.name = name
        self.max_workers = max_workers
        self.cancel_grace = cancel_grace
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.token = CancelToken()
        self._pending: deque[Job] = deque()
        self._running: set[Job] = set()  # started and not ended (settled or not)
        self._submitted = self._completed = self._failed = self._next_id = 0
        self._broken: BaseException | None = None
        self._broken_at = 0.0
        self._cancelled = self._closed = self._released = False
        self._break_listeners: list[Callable[[], None]] = []

    # ----------------------------------------------------------------- state (read under lock)

    @property
    def broken(self) -> BaseException | None:
        """The first failure (or the CancelledError of a cancel), once broken."""
        return self._broken

    @property
    def broken_at(self) -> float:
        """``time.monotonic()`` of the break (0.0 before)."""
        return self._broken_at

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called: no job is accepted any more."""
        return self._closed

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    @property
    def running_count(self) -> int:
        return len(self._running)

    def no_more_work_locked(self) -> bool:
        """Whether no job can start any more: broken, or closed with none pending."""
        return self._broken is not None or (self._closed and not self._pending)

    def unsettled_running_locked(self) -> list[Job]:
        """The running jobs whose futures nobody has claimed yet."""
        return [job for job in self._running if not job.settled]

    def add_break_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener()` (without the lock) after the break, once the token is set."""
        self._break_listeners.append(listener)

    # ----------------------------------------------------------------- submitting

    def reserve_id(self) -> int:
        """The id of a job about to be made.  Raises as ``check_open_locked``."""
        with self.lock:
            self.check_open_locked()
            self._next_id += 1
            return self._next_id

    def enqueue(self, job: Job, on_queued: Callable[[], None]) -> None:
        """Queue `job` and call `on_queued()` (a backend's ``on_submit_locked``) under the
        lock.  If the pool is closed or broken, or `on_queued` fails (PoolError from its
        error), the job is not queued, its sockets are closed and the error raised."""
        with self.lock:
            try:
                self.check_open_locked()
                self._pending.append(job)
                try:
                    on_queued()
                except Exception as exc:
                    self._pending.remove(job)
                    raise PoolError(f"pool {self.name!r} could not start a worker") from exc
            except BaseException:
                job.release()
                raise
            self._submitted += 1

    def check_open_locked(self) -> None:
        """PoolError once closed; once broken, BrokenPoolError (CancelledError after a
        cancel) caused by the first failure."""
        if self._closed:
            raise PoolError(f"pool {self.name!r} is shut down")
        if self._broken is not None:
            raise self.failure("cannot submit: the pool is broken")

    # ----------------------------------------------------------------- the rules

    def failure(self, message: str) -> MigrationError:
        """The error of a job the break kept from starting or ending (cause: the break)."""
        text = f"pool {self.name!r}: {message}"
        error: MigrationError = CancelledError(text) if self._cancelled else BrokenPoolError(text)
        error.__cause__ = self._broken
        return error

    def claim_locked(self, job: Job, ok: bool) -> bool:
        """Take the right to settle `job`'s future (only once); count the outcome."""
        if job.settled:
            return False
        job.settled = True
        if ok:
            self._completed += 1
        else:
            self._failed += 1
        return True

    def start_next_locked(self) -> Job | None:
        """The next pending job, now running; None once none is pending.  Jobs
        cancelled with Future.cancel() on the way are counted and released."""
        while self._pending:
            job = self._pending.popleft()
            if job.future.set_running_or_notify_cancel():
                self._running.add(job)
                return job
            self.claim_locked(job, ok=False)
            job.release()
        return None

    def break_(self, reason: BaseException, cancelled: bool = False) -> None:
        """Break the pool with `reason` (module docstring); a no-op once broken."""
        with self.lock:
            pending = self._break_locked(reason, cancelled)
        if pending is not None:
            self._after_break(pending)

    def spare(self, future: Future[Any], done: Callable[[], bool]) -> bool:
        """Let the queued or running job of `future` fail without breaking the pool
        once `done()` holds (WorkerPool.spare).  False if no such job is left."""
        with self.lock:
            for job in (*self._pending, *self._running):
                if job.future is future and not job.settled:
                    job.spared = done
                    return True
        return False

    def finish(self, job: Job, result: Any = None, error: BaseException | None = None) -> None:
        """A job ended: settle its future (unless settled already); an error breaks the
        pool first, so whoever sees the error finds the pool broken and the token set
        (unless the job's owner says its work was done: ``spare``)."""
        breaks = error is not None and not (job.spared is not None and job.spared())
        with self.lock:
            self._running.discard(job)
            claimed = self.claim_locked(job, ok=error is None)
            pending = self._break_locked(error) if error is not None and breaks else None
            self.cond.notify_all()
        if pending is not None:
            self._after_break(pending)
        if claimed:
            settle(job.future, result, error)

    def _break_locked(self, reason: BaseException, cancelled: bool = False) -> list[Job] | None:
        """Record the first failure; answer the pending jobs to fail (None if broken already)."""
        if self._broken is not None:
            return None
        self._broken, self._broken_at, self._cancelled = reason, time.monotonic(), cancelled
        pending = list(self._pending)
        self._pending.clear()
        for job in pending:
            self.claim_locked(job, ok=False)
        self.cond.notify_all()
        return pending

    def _after_break(self, pending: list[Job]) -> None:
        # The failure reaches its owner through the futures; logging it louder
        # would print every migration error twice.
        logger.debug("pool %r broken by %r", self.name, self._broken)
        self.token.set()
        for job in pending:
            job.release()
            settle(job.future, error=self.failure(f"job {job.id} never started"))
        for listener in self._break_listeners:
            listener()

    # ----------------------------------------------------------------- the end

    def close(self, background_alive_locked: Callable[[], bool]) -> bool:
        """Accept no more jobs and wake every waiter; answer whether nothing runs in the
        background (`background_alive_locked()` False), so the caller may ``release()``."""
        with self.lock:
            self._closed = True
            self.cond.notify_all()
            return not background_alive_locked()

    def background_exited(self) -> None:
        """Called by a backend's last background thread once it no longer counts as alive:
        after ``close()``, it releases the core."""
        with self.lock:
            closed = self._closed
        if closed:
            self.release()

    def release(self) -> None:
        """Close the token's descriptors (idempotent)."""
        with self.lock:
            released, self._released = self._released, True
        if not released:
            self.token.close()

    def statistics(self, backend: BackendName,
                   workers_locked: Callable[[], tuple[int, int, tuple[int, ...]]]) -> PoolStatistics:
        """A consistent snapshot; `workers_locked()` answers (started, alive, pids)."""
        with self.lock:
            started, alive, pids = workers_locked()
            busy = len(self._running)
            return PoolStatistics(
                backend=backend, max_workers=self.max_workers, workers_started=started,
                workers_alive=alive, busy=busy, idle=max(0, alive - busy),
                pending=len(self._pending), submitted=self._submitted,
                completed=self._completed, failed=self._failed,
                broken=self._broken is not None, worker_pids=pids)
