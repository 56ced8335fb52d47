"""Process backend of :class:`engine.pool.WorkerPool`: worker processes and their manager thread.

Each worker talks to the pool over its own ``socket.socketpair()`` (frames:
``engine.pool._frames``); the child's end reaches it through ``Process(args=...)``
(while spawning, multiprocessing passes sockets by descriptor inheritance, so no
resource-sharer thread starts).  Workers start with the pool's worker
environment (``engine.pool._spawn``) and run ``engine.pool._worker.worker_main``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any, cast

from engine.errors import PoolError, RemoteTraceback, WorkerCrashedError
from engine.poll import poll_events
from engine.pool._core import Job, PoolCore, settle
from engine.pool._forkserver import fork_server, server_process_factory
from engine.pool._frames import FRAME, FrameReader, encode_job
from engine.pool._spawn import process_factory
from engine.pool._token import close_in_forked_child
from engine.pool._worker import worker_main

logger = logging.getLogger("multifd.pool")

# One worker start at a time in this process, whatever the pool.  multiprocessing
# closes the owner's copy of a new child's sentinel pipe (write end) only after
# fork() returns; a worker forked by another pool in that window inherits that
# end, and the first worker's death then goes unseen until the second one exits.
# (The "fork" start method; the same lock serialized starts when it also guarded
# an environment change.)
_START_LOCK = threading.Lock()


@dataclass(eq=False)
class _Worker:
    index: int
    process: BaseProcess
    sock: socket.socket | None  # our end, non-blocking; None once closed
    reader: FrameReader = field(default_factory=FrameReader)
    job: Job | None = None  # under the core's lock
    out: memoryview | None = None  # what is left to send of the job's frame
    out_fds: list[socket.socket] = field(default_factory=list)  # to send with it
    stopping: bool = False  # we stopped or terminated it: its death is expected
    terminate_at: float | None = None  # if it has not gone by then: SIGTERM, later SIGKILL
    kill_at: float | None = None

    @property
    def label(self) -> str:
        return f"{self.process.name} (pid {self.process.pid})"

    def close_channel(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.out = None
        for sock in self.out_fds:
            sock.close()
        self.out_fds = []
        self.reader.close()


class ProcessBackend:
    """Worker processes driven by one manager thread ``{name}-manager``.

    The manager owns the workers: it starts them, sends jobs, reads results and
    watches each worker's sentinel, so a death is seen at once.  It blocks in
    ``poll()`` on those plus a wake-up socketpair; its only timeouts are the
    escalation deadlines (terminate, kill) of workers that do not stop.
    """

    def __init__(self, core: PoolCore, start_method: str, worker_env: Mapping[str, str],
                 preload: Sequence[str] = ()) -> None:
        self._process_class: Callable[..., BaseProcess]
        if start_method == "forkserver":  # ours, with an owner (engine/pool/_forkserver.py)
            server = fork_server(preload, worker_env)
            server.start()  # it imports while the pool waits for its first job
            self._process_class = server_process_factory(server)
        else:
            self._process_class = process_factory(start_method, worker_env)  # ConfigError
        self._worker_env = dict(worker_env)
        self._core = core
        self.workers_started = 0
        self._workers: dict[int, _Worker] = {}  # changed by the manager, under the pool lock
        self._manager: threading.Thread | None = None
        self._manager_alive = False
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None

    # ----------------------------------------------------------------- called by the pool

    def make_job(self, job_id: int, future: Future[Any], fn: Callable[..., Any],
                 args: tuple[Any, ...], kwargs: dict[str, Any]) -> Job:
        payload, sockets = encode_job(fn, args, kwargs)
        return Job(job_id, future, payload=payload, sockets=sockets)

    def on_submit_locked(self) -> None:
        if self._manager is None:
            self._wake_r, self._wake_w = socket.socketpair()
            for end in (self._wake_r, self._wake_w):
                end.setblocking(False)
                close_in_forked_child(end)
            self._manager = threading.Thread(target=self._run, daemon=True,
                                             name=f"{self._core.name}-manager")
            self._manager.start()
            self._manager_alive = True
        self._wake_locked()

    def on_broken(self) -> None:
        with self._core.lock:
            self._wake_locked()

    on_shutdown = on_broken

    def join(self) -> bool:
        if self._manager is threading.current_thread():
            return False  # shutdown() from a future's callback, which runs in the manager
        if self._manager is not None:
            self._manager.join()
        return True

    def alive_locked(self) -> int:
        return len(self._workers)

    def pids_locked(self) -> tuple[int, ...]:
        return tuple(w.process.pid for w in self._workers.values() if w.process.pid)

    def background_alive_locked(self) -> bool:
        return self._manager_alive

    def _wake_locked(self) -> None:
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"\0")
            except BlockingIOError:
                pass  # full of wake-ups already

    # ----------------------------------------------------------------- the manager thread

    def _run(self) -> None:
        core = self._core
        try:
            self._loop()
        except BaseException as exc:  # a bug here must not leave futures waiting for ever
            logger.exception("pool %r: manager thread failed", core.name)
            error = PoolError(f"pool {core.name!r}: the manager thread failed")
            error.__cause__ = exc
            core.break_(error)
        finally:
            self._cleanup()
            with core.lock:
                self._manager_alive = False
                assert self._wake_r is not None and self._wake_w is not None
                self._wake_r.close()
                self._wake_w.close()
                self._wake_w = None
            core.background_exited()

    def _loop(self) -> None:
        core = self._core
        while True:
            self._start_workers()
            terminated: list[Job] = []
            with core.lock:
                self._assign_locked()
                timeout = self._tend_locked(time.monotonic(), terminated)
                finished = core.no_more_work_locked() and not core.pending_count \
                    and not self._workers
                workers = list(self._workers.values())
            for job in terminated:
                settle(job.future, error=core.failure(
                    f"job {job.id} still ran {core.cancel_grace}s after the pool broke; "
                    "its worker was terminated"))
            if finished:
                return
            self._poll(workers, timeout)

    def _poll(self, workers: list[_Worker], timeout: float | None) -> None:
        assert self._wake_r is not None
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        channels: dict[int, _Worker] = {}
        sentinels: dict[int, _Worker] = {}
        for worker in workers:
            if worker.sock is not None:
                poller.register(worker.sock, select.POLLIN
                                | (select.POLLOUT if worker.out is not None else 0))
                channels[worker.sock.fileno()] = worker
            poller.register(worker.process.sentinel, select.POLLIN)
            sentinels[worker.process.sentinel] = worker
        dead = []
        for fd, revents in poll_events(poller, timeout):
            if fd in channels:
                if revents & select.POLLOUT:
                    self._send(channels[fd])
                if revents & ~select.POLLOUT:
                    self._read(channels[fd])
            elif fd in sentinels:
                dead.append(sentinels[fd])
            else:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except BlockingIOError:
                    pass
        for worker in dead:  # after the reads: a worker's last result comes before its death
            self._reap(worker)

    def _start_workers(self) -> None:
        core = self._core
        with core.lock:
            if core.broken is not None:
                return
            free = sum(1 for w in self._workers.values()
                       if w.job is None and w.sock is not None and not w.stopping)
            count = min(core.pending_count - free, core.max_workers - len(self._workers))
        for _ in range(count):
            if not self._start_one():
                return

    def _start_one(self) -> bool:
        core = self._core
        index = self.workers_started
        ours, theirs = socket.socketpair()
        close_in_forked_child(ours)  # before start(): a forked child must not hold its peer
        try:
            process = self._process_class(target=worker_main, daemon=True,
                                          args=(theirs, self._worker_env),
                                          name=f"{core.name}-{index}")
            with _START_LOCK:
                process.start()
        except Exception as exc:
            ours.close()
            error = PoolError(f"pool {core.name!r} could not start worker process {index}")
            error.__cause__ = exc
            core.break_(error)
            return False
        finally:
            theirs.close()  # the child has its copy
        ours.setblocking(False)
        logger.debug("pool %r: started %s (pid %s)", core.name, process.name, process.pid)
        with core.lock:
            self._workers[index] = _Worker(index, process, ours)
            self.workers_started += 1
        return True

    def _assign_locked(self) -> None:
        core = self._core
        idle = [w for w in self._workers.values()
                if w.job is None and w.sock is not None and not w.stopping]
        while idle and (job := core.start_next_locked()) is not None:
            worker = idle.pop(0)
            worker.job = job
            worker.out = memoryview(FRAME.pack(job.id, len(job.payload), len(job.sockets))
                                    + job.payload)
            worker.out_fds, job.sockets, job.payload = job.sockets, [], b""

    def _tend_locked(self, now: float, terminated: list[Job]) -> float | None:
        """Stop idle workers once no work can come; after a break, terminate the workers
        still running after cancel_grace (their jobs go to `terminated`); escalate to
        SIGTERM, then SIGKILL, for workers that do not go.  Answer the poll timeout."""
        core = self._core
        deadlines = []
        no_more_work = core.no_more_work_locked()
        grace_end = core.broken_at + core.cancel_grace
        for worker in self._workers.values():
            if worker.stopping:
                pass
            elif worker.job is None:
                if no_more_work:  # EOF on its control socket makes it exit
                    worker.stopping = True
                    worker.close_channel()
                    # A deadlock guard only: a job may have left a non-daemon thread behind.
                    worker.terminate_at = now + max(core.cancel_grace, 1.0)
            elif core.broken is not None:
                if now < grace_end:
                    deadlines.append(grace_end)
                else:  # the escalation planned for a broken pool, whose error its owner has
                    logger.info("pool %r: terminating %s, still running after %ss",
                                core.name, worker.label, core.cancel_grace)
                    worker.stopping = True
                    worker.close_channel()
                    worker.terminate_at = now
                    if core.claim_locked(worker.job, ok=False):
                        terminated.append(worker.job)
            if worker.terminate_at is not None:
                if now >= worker.terminate_at:
                    worker.process.terminate()
                    worker.terminate_at = None
                    worker.kill_at = now + max(core.cancel_grace, 0.1)
                else:
                    deadlines.append(worker.terminate_at)
            if worker.kill_at is not None:
                if now >= worker.kill_at:
                    worker.process.kill()
                    worker.kill_at = None
                else:
                    deadlines.append(worker.kill_at)
        return max(0.0, min(deadlines) - now) if deadlines else None

    def _send(self, worker: _Worker) -> None:
        while worker.out is not None and worker.sock is not None:
            try:
                if worker.out_fds:
                    sent = socket.send_fds(worker.sock, [worker.out],
                                           [s.fileno() for s in worker.out_fds])
                    for sock in worker.out_fds:  # in flight: the kernel holds them now
                        sock.close()
                    worker.out_fds = []
                else:
                    sent = worker.sock.send(worker.out)
            except BlockingIOError:
                return
            except OSError:
                worker.close_channel()  # it died; its sentinel will say how
                return
            worker.out = worker.out[sent:] if sent < len(worker.out) else None

    def _read(self, worker: _Worker) -> None:
        while worker.sock is not None:
            try:
                if not worker.reader.receive(worker.sock):
                    worker.close_channel()  # EOF: it is exiting; its sentinel will say how
                    return
                while (frame := worker.reader.next_frame()) is not None:
                    self._on_result(worker, *frame)
            except BlockingIOError:
                return
            except (ConnectionResetError, BrokenPipeError):
                worker.close_channel()
                return
            except PoolError as exc:
                self._fail_worker(worker, exc)
                return

    def _on_result(self, worker: _Worker, job_id: int, payload: bytes, fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
        job = worker.job
        if job is None or job.id != job_id or fds:
            raise PoolError(f"{worker.label} sent an unexpected frame (job {job_id})")
        ok: bool
        try:
            ok, value, tb = pickle.loads(payload)
        except Exception as exc:
            ok, value, tb = False, PoolError(f"cannot unpickle the result of job {job_id}"), None
            value.__cause__ = exc
        if not ok:
            if not isinstance(value, BaseException):
                value = PoolError(f"job {job_id} failed with a non-exception {value!r}")
            if tb:
                value.__cause__ = RemoteTraceback(tb)
        with self._core.lock:
            worker.job = None
        self._core.finish(job, result=value if ok else None, error=None if ok else value)

    def _fail_worker(self, worker: _Worker, error: PoolError) -> None:
        """The worker broke the protocol: kill it, and break the pool with `error`."""
        logger.error("pool %r: %s: %s", self._core.name, worker.label, error)
        worker.stopping = True
        worker.close_channel()
        worker.process.kill()
        if worker.job is not None:
            self._core.finish(worker.job, error=error)
        else:
            self._core.break_(error)

    def _reap(self, worker: _Worker) -> None:
        self._read(worker)
        worker.process.join(5.0)  # its sentinel fired: it has exited, or is about to
        if worker.process.exitcode is None:
            worker.process.kill()
            worker.process.join()
        code = cast(int, worker.process.exitcode)
        label = worker.label
        with self._core.lock:  # first: statistics() reads the pids of listed workers
            del self._workers[worker.index]
            job, worker.job = worker.job, None
        # Frees the sentinel's descriptors now, not at GC.  With the fork start method
        # another thread's multiprocessing._cleanup() may have won the waitpid() for
        # this child: then its exit status is unknown here and close() refuses.
        with contextlib.suppress(ValueError):
            worker.process.close()
        worker.close_channel()
        logger.debug("pool %r: %s exited with code %s", self._core.name, label, code)
        if worker.stopping:
            if job is not None:  # terminated: its future has failed already
                self._core.finish(job, error=self._core.failure("worker terminated"))
            return
        error = WorkerCrashedError(
            f"pool {self._core.name!r}: worker {label} died with exit code {code}"
            f"{_signal_name(code)} while {f'running job {job.id}' if job else 'idle'}",
            exitcode=code)
        if job is not None:
            self._core.finish(job, error=error)
        else:
            self._core.break_(error)

    def _cleanup(self) -> None:
        """Last act of the manager: no worker outlives it (some are left after a failure)."""
        core = self._core
        for worker in list(self._workers.values()):
            worker.close_channel()
            if worker.process.exitcode is None:
                worker.process.kill()
            worker.process.join(5.0)
            with core.lock:
                del self._workers[worker.index]
                job, worker.job = worker.job, None
            if worker.process.exitcode is not None:
                worker.process.close()
            if job is not None:
                core.finish(job, error=core.failure("the pool's manager failed"))


def _signal_name(code: int) -> str:
    try:
        return f" ({signal.Signals(-code).name})" if code < 0 else ""
    except ValueError:
        return ""
