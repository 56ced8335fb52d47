"""A generic worker pool: threads or processes, fail-fast, cancellable.

It knows nothing about migration.  It runs callables on lazily started, reused
workers under one failure rule for both backends, like a trio nursery: the first
job that raises (or worker process that dies) breaks the pool, which sets its
cancel token, fails every job not yet started and refuses new ones.

Data flow (process backend; the thread backend is the same FIFO drained by
threads ``{name}-{i}``, without pickling)::

    submit(fn, *args) ── pickle now, dup sockets ──► pending FIFO (owner process)
                                                          │
         manager thread "{name}-manager": poll() on a wake-up pair, worker sockets
                 │   ▲                      and worker sentinels ◄───────────┐
    job frame +  │   │ result frame (value, or exception + traceback)        │
    SCM_RIGHTS   ▼   │                                                       │ death
         worker process "{name}-{i}": fn(*args) ─────────────────────────────┘
    Future ◄── set_result / set_exception (by the manager)

    first failure ─► pool.broken, CancelToken set (EOF on a socketpair, seen in every
                     thread and process), pending futures fail; jobs still running
                     after cancel_grace are terminated (processes) or abandoned (threads)
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Protocol, TypeVar

from engine.errors import BrokenPoolError, CancelledError, ConfigError, MigrationError, PoolError

__all__ = ["MAX_MESSAGE_BYTES", "CancelToken", "PoolStatistics", "WorkerPool",
           "current_cancel_token"]

logger = logging.getLogger("multifd.pool")

T = TypeVar("T")
BackendName = Literal["thread", "process"]

#: Cap on one pickled job and one pickled result of the process backend: jobs
#: carry descriptors (names, offsets, sockets), never bulk data.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

# Sockets whose copies must not survive in a forked child.  A token is set, and a
# worker stopped, by EOF, which only comes once *every* copy of the other end is
# closed; a child made by fork ("fork" start method, or a job that forks) would
# otherwise hold those ends open for as long as it lives.
_CLOSE_IN_FORKED_CHILD: weakref.WeakSet[socket.socket] = weakref.WeakSet()
_close_in_forked_child = _CLOSE_IN_FORKED_CHILD.add


def _after_fork_in_child() -> None:
    for sock in list(_CLOSE_IN_FORKED_CHILD):
        with contextlib.suppress(OSError):
            sock.close()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _poll_millis(timeout: float | None) -> int:
    return -1 if timeout is None else max(0, int(timeout * 1000 + 0.999))


class CancelToken:
    """A set-once flag that threads and child processes see, and can ``select()`` on.

    A socketpair: the creating process holds the *set* end and setting closes it,
    so every copy of the *wait* end, in every process, reads EOF and stays readable.
    Hence a token is also set when its owner dies.  ``fileno()`` is the wait end.
    ``CancelToken()`` is a new token owned by this process; ``CancelToken(wait_end)``
    (in the pool's workers) views another process's token and cannot be set.
    """

    def __init__(self, _wait_end: socket.socket | None = None) -> None:
        self._lock = threading.Lock()
        self._flag = False
        self._owner = _wait_end is None
        self._set_end: socket.socket | None = None
        if _wait_end is None:
            self._set_end, _wait_end = socket.socketpair()
            _close_in_forked_child(self._set_end)
        self._wait_end: socket.socket | None = _wait_end

    def set(self) -> None:
        """Set the token (idempotent).  Raises PoolError on a token this process does not own."""
        if not self._owner:
            raise PoolError("only the process that created a cancel token can set it")
        with self._lock:
            self._flag = True
            end, self._set_end = self._set_end, None
        if end is not None:
            end.close()

    def is_set(self) -> bool:
        """Whether the token is set; never blocks."""
        return self.wait(0)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the token is set or `timeout` seconds pass; answer ``is_set()``.
        A closed token answers at once."""
        wait_end = self._wait_end
        if self._flag or wait_end is None or wait_end.fileno() < 0:
            return self._flag
        poller = select.poll()  # not select(): it fails for descriptors above 1023
        with contextlib.suppress(ValueError):  # closed under us: the pool is gone
            poller.register(wait_end, select.POLLIN)
            # Only EOF ever makes the wait end readable.  POLLNVAL: closed under us.
            events = poller.poll(_poll_millis(timeout))
            self._flag = self._flag or any(not ev & select.POLLNVAL for _, ev in events)
        return self._flag

    def raise_if_set(self) -> None:
        """Raise :class:`engine.errors.CancelledError` if the token is set."""
        if self.is_set():
            raise CancelledError("cancelled: the pool's cancel token is set")

    def fileno(self) -> int:
        """The descriptor that is readable once the token is set.  PoolError once closed."""
        wait_end = self._wait_end
        if wait_end is None or wait_end.fileno() < 0:
            raise PoolError("the cancel token is closed")
        return wait_end.fileno()

    def close(self) -> None:
        """Release the descriptors (idempotent); ``is_set()`` then answers from memory."""
        with self._lock:
            ends = (self._set_end, self._wait_end)
            self._set_end = self._wait_end = None
        for end in ends:
            if end is not None:
                end.close()

    def __repr__(self) -> str:
        return f"<CancelToken {'set' if self._flag else 'unset'}>"


# Never set, for code outside any job.  Made at import, not lazily, so that its
# descriptors exist before any leak check starts.
_NEVER_SET_PAIR = socket.socketpair()
_NEVER_SET = CancelToken(_NEVER_SET_PAIR[1])
_thread_token = threading.local()  # thread backend: the token of the job this thread runs
_process_token: CancelToken | None = None  # process backend: installed by the worker's main


def _install_process_token(token: CancelToken) -> None:
    global _process_token
    _process_token = token


def current_cancel_token() -> CancelToken:
    """The cancel token of the pool running the current job; outside any job, a never-set one."""
    token: CancelToken | None = getattr(_thread_token, "token", None)
    return token or _process_token or _NEVER_SET


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
class _Job:
    id: int
    future: Future[Any]
    # Thread backend: the call.  Process backend: the pickle, and the dup'd sockets
    # whose descriptors travel next to it (the job owns them until they are sent).
    call: tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]] | None = None
    payload: bytes = b""
    sockets: list[socket.socket] = field(default_factory=list)
    settled: bool = False  # under the pool lock: whoever flips it sets the future

    def release(self) -> None:
        sockets, self.sockets = self.sockets, []
        for sock in sockets:
            sock.close()


def _settle(future: Future[Any], result: Any = None, error: BaseException | None = None) -> None:
    try:
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
    except InvalidStateError:  # the caller cancelled a pending future with Future.cancel()
        pass


class _Backend(Protocol):
    """What a backend does for the pool; ``*_locked`` run under the pool lock."""

    workers_started: int

    def make_job(self, job_id: int, future: Future[Any], fn: Callable[..., Any],
                 args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Job: ...
    def on_submit_locked(self) -> None: ...  # a job was queued: start a worker if due
    def on_broken(self) -> None: ...
    def on_shutdown(self) -> None: ...
    def join(self) -> bool: ...  # wait for all workers and threads (False: one is the caller)
    def alive_locked(self) -> int: ...
    def pids_locked(self) -> tuple[int, ...]: ...
    def background_alive_locked(self) -> bool: ...  # will a thread call _background_exited?


class WorkerPool:
    """Run callables on up to `max_workers` threads or processes, failing fast.

    Workers start lazily, one per submitted job while fewer than `max_workers` jobs
    run, and are reused; further jobs wait in a FIFO in this process.  The first
    job that raises, or worker process that dies, *breaks* the pool (module
    docstring).  Raises ConfigError for invalid arguments.

    Sockets in a job's arguments: the process backend pickles the job in
    ``submit()`` and sends a dup of each socket by SCM_RIGHTS, so the caller may
    close its copy at once; the worker closes the job's copies when the job
    returns.  The thread backend passes the same objects: keep them open meanwhile.
    Future callbacks run in a pool thread (a worker, or the manager).
    """

    def __init__(self, backend: BackendName, max_workers: int, name: str = "pool", *,
                 cancel_grace: float = 1.0, start_method: str = "spawn") -> None:
        if backend not in ("thread", "process"):
            raise ConfigError(f"unknown pool backend {backend!r}; use 'thread' or 'process'")
        if max_workers < 1 or cancel_grace < 0:
            raise ConfigError(f"need max_workers >= 1 and cancel_grace >= 0, not "
                              f"{max_workers} and {cancel_grace}")
        self.backend: BackendName = backend
        self.max_workers = max_workers
        self.name = name
        self.cancel_grace = cancel_grace
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._pending: deque[_Job] = deque()
        self._running: set[_Job] = set()  # started and not ended (settled or not)
        self._submitted = self._completed = self._failed = self._next_id = 0
        self._broken: BaseException | None = None
        self._broken_at = 0.0
        self._cancelled = self._closed = self._released = False
        self._backend: _Backend
        if backend == "thread":
            self._backend = _ThreadBackend(self)
        else:
            from engine._process_pool import ProcessBackend  # it imports this module

            self._backend = ProcessBackend(self, start_method)
        self._token = CancelToken()

    @property
    def token(self) -> CancelToken:
        """The pool's cancel token (``current_cancel_token()`` inside its jobs)."""
        return self._token

    @property
    def broken(self) -> BaseException | None:
        """The first failure (or the CancelledError of ``cancel()``), once broken."""
        return self._broken

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Queue ``fn(*args, **kwargs)``; answer its future.

        Raises PoolError after shutdown; once broken, BrokenPoolError (CancelledError
        after ``cancel()``) caused by the first failure; (process backend) PoolError
        from the pickling error if the job cannot be sent, or is over MAX_MESSAGE_BYTES.
        """
        with self._lock:
            self._check_open_locked()
            self._next_id += 1
            job_id = self._next_id
        future: Future[T] = Future()
        job = self._backend.make_job(job_id, future, fn, args, kwargs)
        with self._lock:
            try:
                self._check_open_locked()
                self._pending.append(job)
                try:
                    self._backend.on_submit_locked()
                except Exception as exc:
                    self._pending.remove(job)
                    raise PoolError(f"pool {self.name!r} could not start a worker") from exc
            except BaseException:
                job.release()
                raise
            self._submitted += 1
        return future

    def cancel(self, cause: BaseException | None = None) -> None:
        """Break the pool with CancelledError (from `cause`): set the token, fail pending
        jobs with CancelledError, stop running ones as a failure does.  Idempotent; a
        no-op on a broken pool."""
        reason = CancelledError(f"pool {self.name!r} was cancelled")
        reason.__cause__ = cause
        self._break(reason, cancelled=True)

    def shutdown(self, wait: bool = True, cancel: bool = False) -> None:
        """Refuse new jobs, let accepted ones finish, then stop the workers (idempotent).

        `cancel`: cancel first.  `wait`: block until every started worker is joined
        and every descriptor closed; else that happens in the background.  Waits for
        running jobs; a thread job that ignores the token cannot be stopped.
        """
        if cancel:
            self.cancel()
        with self._lock:
            self._closed = True
            self._cond.notify_all()
            release_now = not self._backend.background_alive_locked()
        self._backend.on_shutdown()
        if wait and self._backend.join():
            release_now = True  # else the caller is a pool thread: the last one out releases
        if release_now:
            self._release()

    def statistics(self) -> PoolStatistics:
        """A consistent snapshot of the pool (also after shutdown)."""
        with self._lock:
            alive, busy = self._backend.alive_locked(), len(self._running)
            return PoolStatistics(
                backend=self.backend, max_workers=self.max_workers,
                workers_started=self._backend.workers_started, workers_alive=alive,
                busy=busy, idle=max(0, alive - busy), pending=len(self._pending),
                submitted=self._submitted, completed=self._completed, failed=self._failed,
                broken=self._broken is not None, worker_pids=self._backend.pids_locked())

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.shutdown(wait=True, cancel=exc is not None)

    # ----------------------------------------------------------------- for the backends

    def _check_open_locked(self) -> None:
        if self._closed:
            raise PoolError(f"pool {self.name!r} is shut down")
        if self._broken is not None:
            raise self._failure("cannot submit: the pool is broken")

    def _failure(self, message: str) -> MigrationError:
        """The error of a job the break kept from starting or ending (cause: the break)."""
        text = f"pool {self.name!r}: {message}"
        error: MigrationError = CancelledError(text) if self._cancelled else BrokenPoolError(text)
        error.__cause__ = self._broken
        return error

    def _claim_locked(self, job: _Job, ok: bool) -> bool:
        """Take the right to settle `job`'s future (only once); count the outcome."""
        if job.settled:
            return False
        job.settled = True
        if ok:
            self._completed += 1
        else:
            self._failed += 1
        return True

    def _start_next_locked(self) -> _Job | None:
        """The next pending job, now running; None once none is pending.  Jobs
        cancelled with Future.cancel() on the way are counted and released."""
        while self._pending:
            job = self._pending.popleft()
            if job.future.set_running_or_notify_cancel():
                self._running.add(job)
                return job
            self._claim_locked(job, ok=False)
            job.release()
        return None

    def _break_locked(self, reason: BaseException, cancelled: bool = False) -> list[_Job] | None:
        """Record the first failure; answer the pending jobs to fail (None if broken already)."""
        if self._broken is not None:
            return None
        self._broken, self._broken_at, self._cancelled = reason, time.monotonic(), cancelled
        pending = list(self._pending)
        self._pending.clear()
        for job in pending:
            self._claim_locked(job, ok=False)
        self._cond.notify_all()
        return pending

    def _after_break(self, pending: list[_Job]) -> None:
        # The failure reaches its owner through the futures; logging it louder
        # would print every migration error twice.
        logger.debug("pool %r broken by %r", self.name, self._broken)
        self._token.set()
        for job in pending:
            job.release()
            _settle(job.future, error=self._failure(f"job {job.id} never started"))
        self._backend.on_broken()

    def _break(self, reason: BaseException, cancelled: bool = False) -> None:
        with self._lock:
            pending = self._break_locked(reason, cancelled)
        if pending is not None:
            self._after_break(pending)

    def _finish_job(self, job: _Job, result: Any = None,
                    error: BaseException | None = None) -> None:
        """A job ended: settle its future (unless settled already); an error breaks the
        pool first, so whoever sees the error finds the pool broken and the token set."""
        with self._lock:
            self._running.discard(job)
            claimed = self._claim_locked(job, ok=error is None)
            pending = self._break_locked(error) if error is not None else None
            self._cond.notify_all()
        if pending is not None:
            self._after_break(pending)
        if claimed:
            _settle(job.future, result, error)

    def _background_exited(self) -> None:
        """Called by a backend's last background thread once it no longer counts as alive."""
        with self._lock:
            closed = self._closed
        if closed:
            self._release()

    def _release(self) -> None:
        with self._lock:
            released, self._released = self._released, True
        if not released:
            self._token.close()


class _ThreadBackend:
    """Daemon threads ``{name}-{i}`` that pop jobs from the pool's FIFO."""

    def __init__(self, pool: WorkerPool) -> None:
        self._pool = pool
        self.workers_started = self._alive = 0
        self._threads: list[threading.Thread] = []
        self._grace: threading.Thread | None = None

    def make_job(self, job_id: int, future: Future[Any], fn: Callable[..., Any],
                 args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Job:
        return _Job(job_id, future, call=(fn, args, kwargs))

    def on_submit_locked(self) -> None:
        pool = self._pool
        idle = self._alive - len(pool._running)
        if len(pool._pending) > idle and self._alive < pool.max_workers:
            thread = threading.Thread(target=self._work, daemon=True,
                                      name=f"{pool.name}-{self.workers_started}")
            thread.start()
            self._threads.append(thread)
            self.workers_started += 1
            self._alive += 1
        pool._cond.notify()

    def on_broken(self) -> None:
        # Threads cannot be killed: after cancel_grace their futures fail as those of
        # terminated processes do (so waiters wake), and the jobs' outcomes are dropped.
        pool = self._pool
        with pool._lock:
            if self._grace is None and pool._running:
                self._grace = threading.Thread(target=self._abandon_after_grace, daemon=True,
                                               name=f"{pool.name}-grace")
                self._grace.start()

    def on_shutdown(self) -> None:
        pass  # shutdown() notified the condition: idle threads see `closed` and leave

    def join(self) -> bool:
        with self._pool._lock:
            threads = list(self._threads)
        me = threading.current_thread()
        for thread in threads:
            if thread is not me:
                thread.join()
        with self._pool._lock:  # with no worker left, no break can start a grace thread
            grace = self._grace
        if grace is not None and grace is not me:
            grace.join()
        return me not in threads

    def alive_locked(self) -> int:
        return self._alive

    def background_alive_locked(self) -> bool:
        return self._alive > 0

    def pids_locked(self) -> tuple[int, ...]:
        return ()

    def _work(self) -> None:
        pool = self._pool
        try:
            while True:
                with pool._cond:
                    while not pool._pending and not pool._closed and pool._broken is None:
                        pool._cond.wait()
                    if not pool._pending:
                        return
                    job = pool._start_next_locked()
                    if job is None:  # every pending job had been cancelled
                        continue
                self._run(job)
                del job  # drop the arguments and result before waiting for more work
        finally:
            with pool._lock:
                self._alive -= 1
                last = self._alive == 0
                pool._cond.notify_all()
            if last:
                pool._background_exited()

    def _run(self, job: _Job) -> None:
        assert job.call is not None
        fn, args, kwargs = job.call
        job.call = None
        _thread_token.token = self._pool._token
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # a job's failure, whatever it is, belongs in its future
            self._pool._finish_job(job, error=exc)
        else:
            self._pool._finish_job(job, result=result)
        finally:
            _thread_token.token = None

    def _abandon_after_grace(self) -> None:
        pool = self._pool
        deadline = pool._broken_at + pool.cancel_grace
        with pool._cond:
            while True:
                stragglers = [job for job in pool._running if not job.settled]
                remaining = deadline - time.monotonic()
                if not stragglers or remaining <= 0:
                    break
                pool._cond.wait(remaining)
            for job in stragglers:
                pool._claim_locked(job, ok=False)
        for job in stragglers:
            logger.warning("pool %r: job %d ignored cancellation; abandoning it", pool.name, job.id)
            _settle(job.future, error=pool._failure(
                f"job {job.id} still ran {pool.cancel_grace}s after the pool broke; abandoned"))
