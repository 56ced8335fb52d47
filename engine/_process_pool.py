"""Process backend of :class:`engine.pool.WorkerPool`, and the worker process's main loop.

Each worker talks to the pool over its own ``socket.socketpair()``; the child's
end reaches it through ``Process(args=...)`` (while spawning, multiprocessing
passes sockets by descriptor inheritance, so no resource-sharer thread starts).
One frame per job and per result, the same both ways::

    0          8          12     14
    ┌──────────┬──────────┬──────┬──────────────────────────────────┐
    │  job id  │  length  │ nfds │ payload: `length` bytes (pickle) │
    └──────────┴──────────┴──────┴──────────────────────────────────┘
      u64        u32        u16    network byte order

The `nfds` descriptors (the sockets among a job's arguments) ride as SCM_RIGHTS
on the ``sendmsg()`` that carries the frame's first byte, so they reach the
reader no later than their frame; the reader queues them in order.  A job is
``pickle((fn, args, kwargs))`` with each socket replaced by a persistent id; a
result is ``pickle((ok, value or exception, traceback text))``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing
import os
import pickle
import select
import signal
import socket
import struct
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any, cast

from engine.errors import ConfigError, PoolError, RemoteTraceback, WorkerCrashedError
from engine.pool import (
    MAX_MESSAGE_BYTES,
    CancelToken,
    _close_in_forked_child,
    _install_process_token,
    _Job,
    _poll_millis,
    _settle,
)

if TYPE_CHECKING:
    from engine.pool import WorkerPool

logger = logging.getLogger("multifd.pool")

# job id (u64), payload length (u32), descriptor count (u16): see the module docstring.
_FRAME = struct.Struct("!QIH")
_MAX_FDS = 250  # per frame; Linux refuses more than 253 (SCM_MAX_FD) in one message
_RECV_CHUNK = 256 * 1024


# Worker processes import numpy but do no linear algebra: one BLAS thread each,
# or OpenBLAS's idle workers spin and steal CPU from the channels (measured:
# setup 418 → 334 ms and ~3 % more throughput with 2 channels on 2 cores).  A
# spawned child inherits the environment at start(), so set these defaults
# around start() only, without touching the owner's own environment for good.
_WORKER_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def _worker_environment() -> Iterator[None]:
    with _ENV_LOCK:
        added = [name for name in _WORKER_ENV if name not in os.environ]
        for name in added:
            os.environ[name] = _WORKER_ENV[name]
        try:
            yield
        finally:
            for name in added:
                os.environ.pop(name, None)


class _FrameReader:
    """Reassembles frames from stream chunks and the descriptors received with them."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._fds: deque[int] = deque()

    def receive(self, sock: socket.socket) -> bool:
        """One ``recvmsg()`` from `sock`; False at EOF.  Raises BlockingIOError when a
        non-blocking `sock` has nothing, PoolError if descriptors were cut off."""
        data, fds, flags, _ = socket.recv_fds(sock, _RECV_CHUNK, _MAX_FDS)
        self._buffer += data
        self._fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            raise PoolError("descriptors were lost in transit (MSG_CTRUNC)")
        return bool(data)

    def next_frame(self) -> tuple[int, bytes, list[int]] | None:
        """The next whole frame as (job id, payload, descriptors), or None for more data.
        Raises PoolError for a frame over the caps, or one whose descriptors are missing."""
        if len(self._buffer) < _FRAME.size:
            return None
        job_id, length, nfds = _FRAME.unpack_from(self._buffer)
        if length > MAX_MESSAGE_BYTES or nfds > _MAX_FDS:
            raise PoolError(f"corrupt frame: {length} bytes, {nfds} descriptors")
        end = _FRAME.size + length
        if len(self._buffer) < end:
            return None
        if len(self._fds) < nfds:
            raise PoolError("corrupt frame: its descriptors did not come with it")
        payload = bytes(self._buffer[_FRAME.size:end])
        del self._buffer[:end]
        return job_id, payload, [self._fds.popleft() for _ in range(nfds)]

    def close(self) -> None:
        """Close the descriptors received and not handed out."""
        while self._fds:
            os.close(self._fds.popleft())


class _JobPickler(pickle.Pickler):
    """Pickles a job, replacing each socket by the index of a dup sent by SCM_RIGHTS."""

    def __init__(self, file: io.BytesIO, sockets: list[socket.socket]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._sockets = sockets

    def persistent_id(self, obj: Any) -> Any:
        if not isinstance(obj, socket.socket):
            return None
        dup = obj.dup()  # now: the caller may close its socket once submit() returns
        _close_in_forked_child(dup)
        self._sockets.append(dup)
        return ("socket", len(self._sockets) - 1, int(obj.family), int(obj.type), obj.proto)


class _JobUnpickler(pickle.Unpickler):
    """Unpickles a job, making each socket id a socket on the received descriptor."""

    def __init__(self, payload: bytes, fds: list[int], adopted: list[socket.socket]) -> None:
        super().__init__(io.BytesIO(payload))
        self._fds = fds
        self._adopted = adopted

    def persistent_load(self, pid: Any) -> Any:
        kind, index, family, type_, proto = pid
        if kind != "socket" or not 0 <= index < len(self._fds) or self._fds[index] < 0:
            raise pickle.UnpicklingError(f"bad persistent id {pid!r}")
        sock = socket.socket(family, type_, proto, fileno=self._fds[index])
        self._fds[index] = -1  # the socket object owns it now
        self._adopted.append(sock)
        return sock


def encode_job(fn: Callable[..., Any], args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> tuple[bytes, list[socket.socket]]:
    """Pickle a job; answer the payload and the dup'd sockets to send with it.
    Raises PoolError (from the pickling error) if the job cannot be sent."""
    buffer = io.BytesIO()
    sockets: list[socket.socket] = []
    try:
        try:
            _JobPickler(buffer, sockets).dump((fn, args, kwargs))
        except Exception as exc:
            raise PoolError(f"cannot send the job to a worker process: {exc}") from exc
        if len(sockets) > _MAX_FDS:
            raise PoolError(f"a job may carry {_MAX_FDS} sockets at most, not {len(sockets)}")
        if buffer.tell() > MAX_MESSAGE_BYTES:
            raise PoolError(f"the job pickles to {buffer.tell()} bytes, over the "
                            f"{MAX_MESSAGE_BYTES}-byte cap: pass descriptors, not data")
    except PoolError:
        for sock in sockets:
            sock.close()
        raise
    return buffer.getvalue(), sockets


def _encode_reply(ok: bool, value: Any, tb: str | None) -> bytes:
    """Pickle a job's outcome; one that cannot cross becomes a PoolError."""
    try:
        data = pickle.dumps((ok, value, tb), protocol=pickle.HIGHEST_PROTOCOL)
        if not ok:
            pickle.loads(data)  # an exception that cannot be rebuilt would fail the owner
    except Exception as exc:
        what = "result" if ok else f"exception ({type(value).__qualname__})"
        error = PoolError(f"the job's {what} cannot be pickled: {exc!r}")
        return pickle.dumps((False, error, tb or "".join(traceback.format_exception(exc))))
    if len(data) > MAX_MESSAGE_BYTES:
        error = PoolError(f"the job's result pickles to {len(data)} bytes, over the "
                          f"{MAX_MESSAGE_BYTES}-byte cap")
        return pickle.dumps((False, error, tb))
    return data


def _run_job(payload: bytes, fds: list[int]) -> bytes:
    adopted: list[socket.socket] = []
    try:
        try:
            fn, args, kwargs = _JobUnpickler(payload, fds, adopted).load()
        except Exception as exc:
            raise PoolError("the worker could not unpickle the job") from exc
        finally:
            for fd in fds:
                if fd >= 0:
                    os.close(fd)
        result = fn(*args, **kwargs)
    except BaseException as exc:  # a job's failure, whatever it is, belongs in its future
        return _encode_reply(False, exc, "".join(traceback.format_exception(exc)))
    finally:
        for sock in adopted:  # the job's copies: the job has them while it runs
            sock.close()
    return _encode_reply(True, result, None)


def _worker_main(control: socket.socket, token_end: socket.socket) -> None:
    """Main of a worker process: run jobs from `control` until it reaches EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the owner handles Ctrl-C, and cancels us
    _install_process_token(CancelToken(token_end))
    control.setblocking(True)
    reader = _FrameReader()
    try:
        while True:
            frame = reader.next_frame()
            if frame is None:
                if not reader.receive(control):
                    return  # EOF: the pool stopped us, or the owner died
                continue
            job_id, payload, fds = frame
            reply = _run_job(payload, fds)
            del payload, fds
            control.sendall(_FRAME.pack(job_id, len(reply), 0) + reply)
    except (BrokenPipeError, ConnectionResetError):
        return  # the owner is gone: nobody to report to
    finally:
        reader.close()
        control.close()


@dataclass(eq=False)
class _Worker:
    index: int
    process: BaseProcess
    sock: socket.socket | None  # our end, non-blocking; None once closed
    reader: _FrameReader = field(default_factory=_FrameReader)
    job: _Job | None = None  # under the pool lock
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

    def __init__(self, pool: WorkerPool, start_method: str) -> None:
        try:
            context = multiprocessing.get_context(start_method)
        except ValueError as exc:
            raise ConfigError(f"unknown start method {start_method!r}") from exc
        # Every concrete context has Process; typeshed's BaseContext does not say so.
        self._process_class: Callable[..., BaseProcess] = cast(Any, context).Process
        self._pool = pool
        self.workers_started = 0
        self._workers: dict[int, _Worker] = {}  # changed by the manager, under the pool lock
        self._manager: threading.Thread | None = None
        self._manager_alive = False
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None

    # ----------------------------------------------------------------- called by the pool

    def make_job(self, job_id: int, future: Future[Any], fn: Callable[..., Any],
                 args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Job:
        payload, sockets = encode_job(fn, args, kwargs)
        return _Job(job_id, future, payload=payload, sockets=sockets)

    def on_submit_locked(self) -> None:
        if self._manager is None:
            self._wake_r, self._wake_w = socket.socketpair()
            for end in (self._wake_r, self._wake_w):
                end.setblocking(False)
                _close_in_forked_child(end)
            self._manager = threading.Thread(target=self._run, daemon=True,
                                             name=f"{self._pool.name}-manager")
            self._manager.start()
            self._manager_alive = True
        self._wake_locked()

    def on_broken(self) -> None:
        with self._pool._lock:
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
        pool = self._pool
        try:
            self._loop()
        except BaseException as exc:  # a bug here must not leave futures waiting for ever
            logger.exception("pool %r: manager thread failed", pool.name)
            error = PoolError(f"pool {pool.name!r}: the manager thread failed")
            error.__cause__ = exc
            pool._break(error)
        finally:
            self._cleanup()
            with pool._lock:
                self._manager_alive = False
                assert self._wake_r is not None and self._wake_w is not None
                self._wake_r.close()
                self._wake_w.close()
                self._wake_w = None
            pool._background_exited()

    def _loop(self) -> None:
        pool = self._pool
        while True:
            self._start_workers()
            terminated: list[_Job] = []
            with pool._lock:
                self._assign_locked()
                timeout = self._tend_locked(time.monotonic(), terminated)
                finished = (pool._closed or pool._broken is not None) and not pool._pending \
                    and not self._workers
                workers = list(self._workers.values())
            for job in terminated:
                _settle(job.future, error=pool._failure(
                    f"job {job.id} still ran {pool.cancel_grace}s after the pool broke; "
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
        for fd, revents in poller.poll(_poll_millis(timeout)):
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
        pool = self._pool
        with pool._lock:
            if pool._broken is not None:
                return
            free = sum(1 for w in self._workers.values()
                       if w.job is None and w.sock is not None and not w.stopping)
            count = min(len(pool._pending) - free, pool.max_workers - len(self._workers))
        for _ in range(count):
            if not self._start_one():
                return

    def _start_one(self) -> bool:
        pool = self._pool
        index = self.workers_started
        ours, theirs = socket.socketpair()
        _close_in_forked_child(ours)  # before start(): a forked child must not hold its peer
        try:
            process = self._process_class(target=_worker_main, daemon=True,
                                          args=(theirs, pool._token._wait_end),
                                          name=f"{pool.name}-{index}")
            with _worker_environment():
                process.start()
        except Exception as exc:
            ours.close()
            error = PoolError(f"pool {pool.name!r} could not start worker process {index}")
            error.__cause__ = exc
            pool._break(error)
            return False
        finally:
            theirs.close()  # the child has its copy
        ours.setblocking(False)
        logger.debug("pool %r: started %s (pid %s)", pool.name, process.name, process.pid)
        with pool._lock:
            self._workers[index] = _Worker(index, process, ours)
            self.workers_started += 1
        return True

    def _assign_locked(self) -> None:
        pool = self._pool
        idle = [w for w in self._workers.values()
                if w.job is None and w.sock is not None and not w.stopping]
        while idle and (job := pool._start_next_locked()) is not None:
            worker = idle.pop(0)
            worker.job = job
            worker.out = memoryview(_FRAME.pack(job.id, len(job.payload), len(job.sockets))
                                    + job.payload)
            worker.out_fds, job.sockets, job.payload = job.sockets, [], b""

    def _tend_locked(self, now: float, terminated: list[_Job]) -> float | None:
        """Stop idle workers once no work can come; after a break, terminate the workers
        still running after cancel_grace (their jobs go to `terminated`); escalate to
        SIGTERM, then SIGKILL, for workers that do not go.  Answer the poll timeout."""
        pool = self._pool
        deadlines = []
        no_more_work = pool._broken is not None or (pool._closed and not pool._pending)
        grace_end = pool._broken_at + pool.cancel_grace
        for worker in self._workers.values():
            if worker.stopping:
                pass
            elif worker.job is None:
                if no_more_work:  # EOF on its control socket makes it exit
                    worker.stopping = True
                    worker.close_channel()
                    # A deadlock guard only: a job may have left a non-daemon thread behind.
                    worker.terminate_at = now + max(pool.cancel_grace, 1.0)
            elif pool._broken is not None:
                if now < grace_end:
                    deadlines.append(grace_end)
                else:  # the escalation planned for a broken pool, whose error its owner has
                    logger.info("pool %r: terminating %s, still running after %ss",
                                pool.name, worker.label, pool.cancel_grace)
                    worker.stopping = True
                    worker.close_channel()
                    worker.terminate_at = now
                    if pool._claim_locked(worker.job, ok=False):
                        terminated.append(worker.job)
            if worker.terminate_at is not None:
                if now >= worker.terminate_at:
                    worker.process.terminate()
                    worker.terminate_at = None
                    worker.kill_at = now + max(pool.cancel_grace, 0.1)
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
        with self._pool._lock:
            worker.job = None
        self._pool._finish_job(job, result=value if ok else None, error=None if ok else value)

    def _fail_worker(self, worker: _Worker, error: PoolError) -> None:
        """The worker broke the protocol: kill it, and break the pool with `error`."""
        logger.error("pool %r: %s: %s", self._pool.name, worker.label, error)
        worker.stopping = True
        worker.close_channel()
        worker.process.kill()
        if worker.job is not None:
            self._pool._finish_job(worker.job, error=error)
        else:
            self._pool._break(error)

    def _reap(self, worker: _Worker) -> None:
        self._read(worker)
        worker.process.join(5.0)  # its sentinel fired: it has exited, or is about to
        if worker.process.exitcode is None:
            worker.process.kill()
            worker.process.join()
        code = cast(int, worker.process.exitcode)
        label = worker.label
        with self._pool._lock:  # first: statistics() reads the pids of listed workers
            del self._workers[worker.index]
            job, worker.job = worker.job, None
        worker.process.close()  # frees the sentinel's descriptors now, not at GC
        worker.close_channel()
        logger.debug("pool %r: %s exited with code %s", self._pool.name, label, code)
        if worker.stopping:
            if job is not None:  # terminated: its future has failed already
                self._pool._finish_job(job, error=self._pool._failure("worker terminated"))
            return
        error = WorkerCrashedError(
            f"pool {self._pool.name!r}: worker {label} died with exit code {code}"
            f"{_signal_name(code)} while {f'running job {job.id}' if job else 'idle'}",
            exitcode=code)
        if job is not None:
            self._pool._finish_job(job, error=error)
        else:
            self._pool._break(error)

    def _cleanup(self) -> None:
        """Last act of the manager: no worker outlives it (some are left after a failure)."""
        pool = self._pool
        for worker in list(self._workers.values()):
            worker.close_channel()
            if worker.process.exitcode is None:
                worker.process.kill()
            worker.process.join(5.0)
            with pool._lock:
                del self._workers[worker.index]
                job, worker.job = worker.job, None
            if worker.process.exitcode is not None:
                worker.process.close()
            if job is not None:
                pool._finish_job(job, error=pool._failure("the pool's manager failed"))


def _signal_name(code: int) -> str:
    try:
        return f" ({signal.Signals(-code).name})" if code < 0 else ""
    except ValueError:
        return ""
