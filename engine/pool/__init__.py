"""A generic worker pool: threads or processes, fail-fast, cancellable.

It knows nothing about migration.  It runs callables on lazily started, reused
workers under one failure rule for both backends, like a trio nursery: the first
job that raises (or worker process that dies) breaks the pool, which sets its
cancel token, fails every job not yet started and refuses new ones — unless its
owner said the job's work was done (``spare``): then only its future fails.

The package::

    __init__.py   WorkerPool, the facade: arguments, submit/cancel/shutdown/statistics
    _core.py      PoolCore: lock, job table, counters, the claim/finish/break rules
    _thread.py    ThreadBackend: daemon threads draining the core's FIFO
    _process.py   ProcessBackend: worker processes and their manager thread
    _frames.py    the process backend's frames, and how jobs and results pickle
    _worker.py    the worker process's main loop
    _spawn.py     worker processes that start with the pool's worker environment
    _forkserver.py  a fork server per process: workers forked from a warm interpreter
    _token.py     CancelToken (a leaf)

Each backend gets the core as an argument and uses only its public methods;
imports go downwards in that list (``_worker`` needs only ``_frames``).

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

A job that watches the cancel token gets it as an argument:
``pool.submit(fn, ..., pool.token)``; the process backend carries it with the job.
"""

from __future__ import annotations

import os
import select
import socket
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from engine.errors import CancelledError, ConfigError, PoolError, RemoteTraceback
from engine.poll import poll_events
from engine.pool._core import MAX_MESSAGE_BYTES, Backend, BackendName, PoolCore, PoolStatistics
from engine.pool._forkserver import (
    ForkServer,
    fork_server,
    fork_server_fds,
    fork_server_pids,
    import_preload,
    stop_fork_servers,
)
from engine.pool._process import ProcessBackend
from engine.pool._spawn import DEFAULT_WORKER_ENV
from engine.pool._thread import ThreadBackend
from engine.pool._token import CancelToken

__all__ = ["DEFAULT_WORKER_ENV", "MAX_MESSAGE_BYTES", "CancelToken", "ForkServer", "JobFailure",
           "PoolStatistics", "WorkerPool", "contained", "fork_server", "fork_server_fds",
           "fork_server_pids", "on_every_worker", "stop_fork_servers", "warm_up"]

T = TypeVar("T")


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
    A :class:`CancelToken` among the arguments travels the same way (the worker
    gets a view of it).  Future callbacks run in a pool thread (a worker, or the
    manager).

    `worker_env` (process backend): variables each worker process starts with where
    the owner's environment does not set them (default: :data:`DEFAULT_WORKER_ENV`,
    one BLAS thread).  The owner's own environment is never changed.

    `start_method` (process backend): "spawn" (a fresh interpreter per worker),
    "forkserver" (forked in milliseconds from this process's fork server for
    `preload` and `worker_env`, :func:`fork_server`, started now) or "fork".
    `preload`: modules (``"module"`` or ``"module:function"``, called) the workers
    will need: the fork server imports them once; :func:`warm_up` in every worker.
    """

    def __init__(self, backend: BackendName, max_workers: int, name: str = "pool", *,
                 cancel_grace: float = 1.0, start_method: str = "spawn",
                 worker_env: Mapping[str, str] | None = None, preload: Sequence[str] = ()) -> None:
        if backend not in ("thread", "process"):
            raise ConfigError(f"unknown pool backend {backend!r}; use 'thread' or 'process'")
        if max_workers < 1 or cancel_grace < 0:
            raise ConfigError(f"need max_workers >= 1 and cancel_grace >= 0, not "
                              f"{max_workers} and {cancel_grace}")
        self.backend: BackendName = backend
        self.max_workers = max_workers
        self.name = name
        self.cancel_grace = cancel_grace
        self.preload = tuple(preload)
        self._core = PoolCore(name, max_workers, cancel_grace)
        self._backend: Backend
        try:
            if backend == "thread":
                self._backend = ThreadBackend(self._core)
            else:
                env = DEFAULT_WORKER_ENV if worker_env is None else worker_env
                self._backend = ProcessBackend(self._core, start_method, env, self.preload)
        except BaseException:
            self._core.release()
            raise
        self._core.add_break_listener(self._backend.on_broken)

    @property
    def token(self) -> CancelToken:
        """The pool's cancel token: pass it to the jobs that watch it."""
        return self._core.token

    @property
    def broken(self) -> BaseException | None:
        """The first failure (or the CancelledError of ``cancel()``), once broken."""
        return self._core.broken

    @property
    def closed(self) -> bool:
        """Shut down: it takes no more jobs."""
        return self._core.closed

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Queue ``fn(*args, **kwargs)``; answer its future.

        Raises PoolError after shutdown; once broken, BrokenPoolError (CancelledError
        after ``cancel()``) caused by the first failure; (process backend) PoolError
        from the pickling error if the job cannot be sent, or is over MAX_MESSAGE_BYTES.
        """
        job_id = self._core.reserve_id()
        future: Future[T] = Future()
        job = self._backend.make_job(job_id, future, fn, args, kwargs)
        self._core.enqueue(job, self._backend.on_submit_locked)
        return future

    def spare(self, future: Future[Any], done: Callable[[], bool]) -> bool:
        """Once ``done()`` answers True, a failure of `future`'s job (its worker dying
        included) still fails the future but no longer breaks the pool: its work was
        done, and its siblings go on (a job that handed over its last result by
        other means, then died).  ``done()`` runs on the pool thread that sees the failure.  Call it
        right after ``submit()``; False if the job has already ended."""
        return self._core.spare(future, done)

    def cancel(self, cause: BaseException | None = None) -> None:
        """Break the pool with CancelledError (from `cause`): set the token, fail pending
        jobs with CancelledError, stop running ones as a failure does.  Idempotent; a
        no-op on a broken pool."""
        reason = CancelledError(f"pool {self.name!r} was cancelled")
        reason.__cause__ = cause
        self._core.break_(reason, cancelled=True)

    def shutdown(self, wait: bool = True, cancel: bool = False) -> None:
        """Refuse new jobs, let accepted ones finish, then stop the workers (idempotent).

        `cancel`: cancel first.  `wait`: block until every started worker is joined
        and every descriptor closed; else that happens in the background.  Waits for
        running jobs; a thread job that ignores the token cannot be stopped.
        """
        if cancel:
            self.cancel()
        release_now = self._core.close(self._backend.background_alive_locked)
        self._backend.on_shutdown()
        if wait and self._backend.join():
            release_now = True  # else the caller is a pool thread: the last one out releases
        if release_now:
            self._core.release()

    def statistics(self) -> PoolStatistics:
        """A consistent snapshot of the pool (also after shutdown)."""
        backend = self._backend
        return self._core.statistics(self.backend, lambda: (
            backend.workers_started, backend.alive_locked(), backend.pids_locked()))

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.shutdown(wait=True, cancel=exc is not None)


def _hold_until_all(sock: socket.socket, fn: Callable[..., Any], args: tuple[Any, ...]) -> int:
    """A job of :func:`on_every_worker`: run `fn`, say so on `sock`, hold the worker until EOF."""
    fn(*args)
    sock.sendall(b"\1")
    while sock.recv(64):
        pass
    return os.getpid()


def on_every_worker(pool: WorkerPool, fn: Callable[..., Any], *args: Any, timeout: float = 60.0,
                    what: str = "running a job on every worker") -> list[int]:
    """Run `fn(*args)` once in every worker of `pool` (starting those not started yet),
    and return once all of them have (their pids; thread workers: this process's).

    Every worker runs one such job at the same time, so each gets one: call it on an
    idle pool.  Raises PoolError if one fails (the pool is then broken), the pool is
    shut down meanwhile, or `timeout` passes first (waiting for the jobs to run, and
    again for them to return); `what` names the step in that error.
    """
    ours, theirs = socket.socketpair()
    futures: list[Future[int]] = []
    try:
        futures = [pool.submit(_hold_until_all, theirs, fn, args) for _ in range(pool.max_workers)]
        deadline = time.monotonic() + timeout
        # A job says it ran on `ours`; the token wakes the wait the moment the pool breaks.
        poller = select.poll()
        poller.register(ours, select.POLLIN)
        poller.register(pool.token.fileno(), select.POLLIN)
        ready = 0
        while ready < len(futures):
            if pool.broken is not None:
                raise PoolError(f"pool {pool.name!r} broke while {what}") from pool.broken
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PoolError(f"pool {pool.name!r}: {len(futures) - ready} worker(s) not "
                                f"done {what} within {timeout:.0f} s")
            for fd, _ in poll_events(poller, remaining):
                if fd == ours.fileno():
                    ready += len(ours.recv(len(futures)))
                elif pool.broken is None:  # the token closed under us, not set
                    raise PoolError(f"pool {pool.name!r} was shut down while {what}")
    finally:
        ours.close()  # EOF: the jobs return
        try:
            futures_wait(futures, timeout)
        finally:
            theirs.close()  # a thread worker's job held this very socket
    stuck = sum(not future.done() for future in futures)
    if stuck:
        raise PoolError(f"pool {pool.name!r}: {stuck} worker(s) did not return within "
                        f"{timeout:.0f} s after {what}")
    return [future.result() for future in futures]


@dataclass(frozen=True)
class JobFailure:
    """An exception a job answered instead of raising (:func:`contained`), with its
    traceback formatted where it ran: pickling drops ``__traceback__``."""

    error: BaseException
    traceback: str

    @classmethod
    def of(cls, exc: BaseException) -> JobFailure:
        return cls(exc, "".join(traceback.format_exception(exc)))

    def rebuilt(self) -> BaseException:
        """The error, with the worker's traceback as its cause (a RemoteTraceback)
        unless it has one already (it did not cross a process boundary)."""
        if self.traceback and self.error.__cause__ is None:
            self.error.__cause__ = RemoteTraceback(self.traceback)
        return self.error


def contained(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | JobFailure:
    """`fn(*args, **kwargs)`, an Exception it raises answered as a :class:`JobFailure`:
    submit this (``pool.submit(contained, fn, ...)``) to run `fn` on a pool shared
    with other work, which a job that raises would break, failing every other job."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        return JobFailure.of(exc)


def warm_up(pool: WorkerPool, timeout: float = 60.0) -> list[int]:
    """Start every worker of `pool` now, each importing the pool's `preload`, and
    return once all of them have (their pids; thread workers: this process's).
    Call it on an idle pool, before the jobs that should find it warm.  Raises
    PoolError (:func:`on_every_worker`)."""
    return on_every_worker(pool, import_preload, pool.preload, timeout=timeout, what="warming up")
