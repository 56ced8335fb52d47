"""One suite for both WorkerPool backends, on real threads and processes (no mocks).

Jobs are module-level functions: the process backend pickles them by reference.
Jobs that wait do so on a socket or on the pool's cancel token, with a generous
deadlock guard, so a failing test ends instead of hanging.
"""

from __future__ import annotations

import concurrent.futures
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import psutil
import pytest

from engine import errors
from engine.errors import (
    BrokenPoolError,
    CancelledError,
    MigrationError,
    PoolError,
    RemoteTraceback,
    WorkerCrashedError,
)
from engine.pool import (
    MAX_MESSAGE_BYTES,
    CancelToken,
    PoolStatistics,
    WorkerPool,
)

GRACE = 0.2  # cancel_grace of the pools under test
GUARD = 10.0  # deadlock guard for every wait; never reached when the code works

# --------------------------------------------------------------------------- jobs


def add(a: int, b: int = 0) -> int:
    return a + b


def identity(value: Any) -> Any:
    return value


def whoami() -> tuple[int, str]:
    return os.getpid(), threading.current_thread().name


def fail(message: str, delay: float = 0.0) -> None:
    time.sleep(delay)
    raise ValueError(message)


def rendezvous(sock: socket.socket) -> int:
    """Say we are up, then wait for the go-ahead."""
    sock.sendall(b"u")
    sock.settimeout(GUARD)
    assert sock.recv(1) == b"g"
    return os.getpid()


def wait_for_cancel(ready: socket.socket, token: CancelToken) -> bool:
    ready.sendall(b"r")
    return token.wait(GUARD)


def cancel_then_raise(ready: socket.socket, token: CancelToken) -> str:
    ready.sendall(b"r")
    token.wait(GUARD)
    token.raise_if_set()
    return "never cancelled"


def select_on_token(ready: socket.socket, token: CancelToken) -> bool:
    ready.sendall(b"r")
    readable, _, _ = select.select([token], [], [], GUARD)
    return readable == [token] and token.is_set()


def ignore_cancel(ready: socket.socket, seconds: float) -> str:
    ready.sendall(b"r")
    time.sleep(seconds)
    return "finished anyway"


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def shrug_off_sigint() -> str:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)
    return "still here"


def report_token(sock: socket.socket, token: CancelToken) -> None:
    sock.sendall(f"{os.getpid()}\n".encode())
    sock.sendall(b"s" if token.wait(GUARD) else b"n")


def leave_a_thread_behind() -> None:
    threading.Thread(target=time.sleep, args=(60,), daemon=False).start()


class NeedsTwoArguments(Exception):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(a)  # so pickle's rebuild, cls(*args), fails


def raise_unrebuildable() -> None:
    raise NeedsTwoArguments(1, 2)


def big_result() -> bytes:
    return b"x" * (MAX_MESSAGE_BYTES + 1)


@dataclass
class Channel:
    sock: socket.socket
    suffix: bytes


def echo_upper(channel: Channel) -> tuple[int, int]:
    sock = channel.sock
    sock.settimeout(GUARD)
    data = sock.recv(100)
    sock.sendall(data.upper() + channel.suffix)
    return int(sock.family), int(sock.type)


# --------------------------------------------------------------------------- fixtures


class Kit:
    """Makes pools and socketpairs for one test; tears them down in that order."""

    def __init__(self, backend: str) -> None:
        self.backend: Literal["thread", "process"] = "thread" if backend == "thread" else "process"
        self._pools: list[WorkerPool] = []
        self._sockets: list[socket.socket] = []

    def pool(self, max_workers: int = 2, **kwargs: Any) -> WorkerPool:
        kwargs.setdefault("cancel_grace", GRACE)
        pool = WorkerPool(self.backend, max_workers, name=f"test-{self.backend}", **kwargs)
        self._pools.append(pool)
        return pool

    def socketpair(self, *args: Any) -> tuple[socket.socket, socket.socket]:
        ours, theirs = socket.socketpair(*args)
        ours.settimeout(GUARD)
        self._sockets += [ours, theirs]
        return ours, theirs

    def hand_over(self, sock: socket.socket) -> None:
        """After submit: the process backend sent a dup, so the caller may close its socket."""
        if self.backend == "process":
            sock.close()

    def close(self) -> None:
        for pool in self._pools:
            pool.shutdown(wait=True, cancel=True)
        for sock in self._sockets:
            sock.close()


@pytest.fixture(params=["thread", "process"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def kit(backend: str) -> Iterator[Kit]:
    kit = Kit(backend)
    yield kit
    kit.close()


process_only = pytest.mark.parametrize("backend", ["process"])


def wait_ready(sock: socket.socket, expected: bytes = b"r") -> None:
    assert sock.recv(1) == expected


def eventually(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


# --------------------------------------------------------------------------- running jobs


def test_submit_and_result(kit: Kit) -> None:
    pool = kit.pool()
    assert pool.submit(add, 2, 3).result(GUARD) == 5
    assert pool.submit(add, 2, b=40).result(GUARD) == 42
    future = pool.submit(add, 1)
    assert isinstance(future, concurrent.futures.Future)
    assert future.result(GUARD) == 1


def test_jobs_beyond_max_workers_queue_and_reuse_workers(kit: Kit) -> None:
    pool = kit.pool(max_workers=2)
    futures = [pool.submit(whoami) for _ in range(12)]
    workers = {f.result(GUARD) for f in futures}
    assert 1 <= len(workers) <= 2
    if kit.backend == "thread":
        assert {name for _, name in workers} <= {"test-thread-0", "test-thread-1"}
    else:
        assert os.getpid() not in {pid for pid, _ in workers}
    stats = pool.statistics()
    assert stats.workers_started <= 2
    assert (stats.submitted, stats.completed, stats.failed, stats.pending) == (12, 12, 0, 0)


def test_every_job_gets_a_worker_while_fewer_than_max_run(kit: Kit) -> None:
    pool = kit.pool(max_workers=3)
    pairs = [kit.socketpair() for _ in range(3)]
    futures = []
    for _, theirs in pairs:
        futures.append(pool.submit(rendezvous, theirs))
        kit.hand_over(theirs)
    for ours, _ in pairs:  # all three run at once, or this blocks
        wait_ready(ours, b"u")
    assert pool.statistics().busy == 3
    assert pool.statistics().workers_started == 3
    for ours, _ in pairs:
        ours.sendall(b"g")
    pids = {f.result(GUARD) for f in futures}
    assert len(pids) == (3 if kit.backend == "process" else 1)


def test_job_exception_reaches_its_future(kit: Kit) -> None:
    pool = kit.pool()
    error = pool.submit(fail, "boom").exception(GUARD)
    assert type(error) is ValueError and str(error) == "boom"
    assert pool.broken is error
    if kit.backend == "process":
        cause = error.__cause__
        assert isinstance(cause, RemoteTraceback)
        assert "in fail" in cause.tb and "ValueError: boom" in cause.tb
    else:
        assert error.__traceback__ is not None


def test_first_failure_breaks_the_pool(kit: Kit) -> None:
    pool = kit.pool(max_workers=2)
    ours, theirs = kit.socketpair()
    sibling = pool.submit(wait_for_cancel, theirs, pool.token)
    kit.hand_over(theirs)
    wait_ready(ours)
    failing = pool.submit(fail, "first", delay=0.3)
    pending = [pool.submit(add, i) for i in range(3)]  # both workers are busy: these queue
    first = failing.exception(GUARD)
    assert isinstance(first, ValueError) and str(first) == "first"
    assert pool.broken is first
    for future in pending:
        error = future.exception(GUARD)
        assert type(error) is BrokenPoolError
        assert error.__cause__ is first
    assert sibling.result(GUARD) is True  # it saw its token set, and ended
    with pytest.raises(BrokenPoolError) as info:
        pool.submit(add, 1)
    assert info.value.__cause__ is first
    stats = pool.statistics()
    assert stats.broken
    assert (stats.submitted, stats.completed, stats.failed) == (5, 1, 4)


@pytest.mark.parametrize("trigger", ["cancel", "failure"])
def test_job_ignoring_the_token_is_stopped_after_grace(kit: Kit, trigger: str) -> None:
    pool = kit.pool(max_workers=2)
    ours, theirs = kit.socketpair()
    # A thread cannot be killed, so its stubborn job ends by itself a little later.
    stubborn = pool.submit(ignore_cancel, theirs, 0.8 if kit.backend == "thread" else 60)
    kit.hand_over(theirs)
    wait_ready(ours)
    start = time.monotonic()
    if trigger == "cancel":
        pool.cancel()
    else:
        pool.submit(fail, "first").exception(GUARD)
    error = stubborn.exception(GUARD)
    # Not before the grace (a lower bound: load can only lengthen it); that it ended at
    # all, with the pool's error, shows the grace ended it (the job runs on for 60 s).
    assert time.monotonic() - start >= GRACE * 0.9
    assert type(error) is (CancelledError if trigger == "cancel" else BrokenPoolError)
    assert f"still ran {GRACE}s after the pool broke" in str(error)
    assert error.__cause__ is pool.broken
    if kit.backend == "process":
        eventually(lambda: pool.statistics().workers_alive == 0)


@process_only
def test_killed_worker_breaks_the_pool_at_once(kit: Kit) -> None:
    pool = kit.pool(max_workers=2)
    pid = pool.submit(os.getpid).result(GUARD)  # the worker is up
    error = pool.submit(die).exception(GUARD)
    assert type(error) is WorkerCrashedError  # the crash itself, not a timeout, ended it
    assert error.exitcode == -signal.SIGKILL
    assert str(pid) in str(error) and "-9" in str(error)
    assert pool.broken is error
    with pytest.raises(BrokenPoolError) as info:
        pool.submit(add, 1)
    assert info.value.__cause__ is error
    eventually(lambda: pool.statistics().workers_alive == 0)


@process_only
def test_idle_worker_death_breaks_the_pool(kit: Kit) -> None:
    pool = kit.pool(max_workers=1)
    pid = pool.submit(os.getpid).result(GUARD)
    os.kill(pid, signal.SIGKILL)
    eventually(lambda: pool.broken is not None)
    assert isinstance(pool.broken, WorkerCrashedError)
    assert pool.broken.exitcode == -signal.SIGKILL


@process_only
def test_workers_ignore_sigint(kit: Kit) -> None:
    pool = kit.pool(max_workers=1)
    assert pool.submit(shrug_off_sigint).result(GUARD) == "still here"


# --------------------------------------------------------------------------- cancel and token


def test_cancel_wakes_threads_blocked_in_result(kit: Kit) -> None:
    pool = kit.pool(max_workers=1)
    ours, theirs = kit.socketpair()
    running = pool.submit(cancel_then_raise, theirs, pool.token)
    kit.hand_over(theirs)
    pending = pool.submit(add, 1)
    wait_ready(ours)
    why = KeyError("operator pressed stop")

    def cancel_soon() -> None:
        time.sleep(0.1)
        pool.cancel(why)

    canceller = threading.Thread(target=cancel_soon)
    canceller.start()
    try:
        with pytest.raises(CancelledError) as info:
            pending.result(GUARD)  # blocks until cancel() from the other thread
        assert info.value.__cause__ is pool.broken
        with pytest.raises(CancelledError):  # engine's, raised by the job's raise_if_set()
            running.result(GUARD)
    finally:
        canceller.join()
    assert isinstance(pool.broken, CancelledError)
    assert pool.broken.__cause__ is why
    assert not issubclass(CancelledError, concurrent.futures.CancelledError)
    with pytest.raises(CancelledError):
        pool.submit(add, 1)


def test_cancel_token_works_in_select_inside_a_job(kit: Kit) -> None:
    pool = kit.pool()
    ours, theirs = kit.socketpair()
    future = pool.submit(select_on_token, theirs, pool.token)
    kit.hand_over(theirs)
    wait_ready(ours)
    assert not pool.token.is_set()
    pool.cancel()
    assert future.result(GUARD) is True  # the job ended normally: its result stands
    assert pool.token.is_set()


def test_with_block_cancels_when_an_exception_propagates(kit: Kit) -> None:
    ours, theirs = kit.socketpair()
    with pytest.raises(RuntimeError):
        with kit.pool() as pool:
            future = pool.submit(wait_for_cancel, theirs, pool.token)
            kit.hand_over(theirs)
            wait_ready(ours)
            raise RuntimeError("caller failed")
    assert future.result(0) is True
    assert isinstance(pool.broken, CancelledError)


def try_to_set(token: CancelToken) -> str:
    try:
        token.set()
    except PoolError as exc:
        return str(exc)
    return "set"


def count_fds(*unused: Any) -> int:
    return len(os.listdir("/proc/self/fd"))


@process_only
def test_token_passed_to_a_process_job_is_a_view_closed_after_it(kit: Kit) -> None:
    pool = kit.pool(max_workers=1)
    assert "only the process that created" in pool.submit(try_to_set, pool.token).result(GUARD)
    assert not pool.token.is_set()
    before = pool.submit(count_fds).result(GUARD)
    assert pool.submit(count_fds, pool.token).result(GUARD) == before + 1  # its view
    assert pool.submit(count_fds).result(GUARD) == before  # closed when the job returned


def test_token_pickles_only_as_a_job_argument() -> None:
    token = CancelToken()
    try:
        with pytest.raises(TypeError, match="only as an argument"):
            pickle.dumps(token)
    finally:
        token.close()


def test_cancel_token_set_close() -> None:
    token = CancelToken()
    assert select.select([token], [], [], 0)[0] == []
    waiter = threading.Thread(target=token.wait, args=(GUARD,))
    waiter.start()
    token.set()
    waiter.join(GUARD)
    assert not waiter.is_alive()
    assert token.is_set() and token.wait() and select.select([token], [], [], 0)[0] == [token]
    with pytest.raises(CancelledError):
        token.raise_if_set()
    token.close()
    token.close()
    assert token.is_set()
    with pytest.raises(PoolError):
        token.fileno()


# --------------------------------------------------------------------------- sockets and pickling


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM])
def test_socket_argument_carries_data_both_ways(kit: Kit, kind: socket.SocketKind) -> None:
    pool = kit.pool()
    ours, theirs = kit.socketpair(socket.AF_UNIX, kind)
    future = pool.submit(echo_upper, Channel(theirs, b"!"))  # a socket inside a dataclass
    kit.hand_over(theirs)  # closed right after submit (process backend)
    ours.sendall(b"hello")
    assert ours.recv(100) == b"HELLO!"
    assert future.result(GUARD) == (socket.AF_UNIX, kind)
    if kit.backend == "process" and kind == socket.SOCK_STREAM:
        assert ours.recv(100) == b""  # the pool's dup and the job's copy are both closed


@process_only
def test_unpicklable_argument_raises_in_submit(kit: Kit) -> None:
    pool = kit.pool()
    _, theirs = kit.socketpair()
    with pytest.raises(PoolError) as info:
        pool.submit(identity, (theirs, threading.Lock()))  # the socket's dup is closed again
    assert isinstance(info.value.__cause__, TypeError)
    with pytest.raises(PoolError):
        pool.submit(lambda: 1)
    assert pool.submit(add, 1, 2).result(GUARD) == 3  # a refused job does not break the pool
    assert pool.statistics().submitted == 1


@process_only
def test_oversized_job_and_result_fail_with_pool_error(kit: Kit) -> None:
    pool = kit.pool()
    with pytest.raises(PoolError, match="cap"):
        pool.submit(identity, b"x" * MAX_MESSAGE_BYTES)
    error = pool.submit(big_result).exception(GUARD)
    assert type(error) is PoolError and "cap" in str(error)
    assert pool.broken is error


@process_only
def test_exception_that_cannot_cross_still_reaches_the_future(kit: Kit) -> None:
    pool = kit.pool()
    error = pool.submit(raise_unrebuildable).exception(GUARD)
    assert type(error) is PoolError and "NeedsTwoArguments" in str(error)
    assert isinstance(error.__cause__, RemoteTraceback)
    assert "raise NeedsTwoArguments(1, 2)" in error.__cause__.tb
    assert pool.broken is error


def test_error_classes_pickle_round_trip() -> None:
    classes = [c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, MigrationError)]
    assert {PoolError, BrokenPoolError, WorkerCrashedError, CancelledError,
            RemoteTraceback} <= set(classes)
    for cls in classes:
        if cls is WorkerCrashedError:
            error: MigrationError = WorkerCrashedError("worker 7 died", exitcode=-9)
        else:
            error = cls("something")
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is cls and copy.args == error.args and vars(copy) == vars(error)
        assert str(copy) == str(error)
    crashed = pickle.loads(pickle.dumps(WorkerCrashedError("w", exitcode=-9)))
    assert isinstance(crashed, WorkerCrashedError) and crashed.exitcode == -9


@process_only
def test_fork_start_method(kit: Kit) -> None:
    # Forked workers inherit every descriptor; the token's set end must not survive
    # in them, or setting the token would never reach EOF.
    pool = kit.pool(max_workers=2, start_method="fork")
    ours, theirs = kit.socketpair()
    future = pool.submit(select_on_token, theirs, pool.token)
    kit.hand_over(theirs)
    wait_ready(ours)
    a, b = kit.socketpair()
    echo = pool.submit(echo_upper, Channel(b, b"?"))
    b.close()
    a.sendall(b"x")
    assert a.recv(10) == b"X?"
    assert echo.result(GUARD) == (socket.AF_UNIX, socket.SOCK_STREAM)
    pool.cancel()
    assert future.result(GUARD) is True


# The owner of a pool, run as a separate process that the test kills.
_OWNER = """
import socket, sys, time
from engine.pool import WorkerPool
from tests.integration.test_pool import report_token
sock = socket.socket(fileno=int(sys.argv[1]))
pool = WorkerPool("process", 1, name="orphaned")
pool.submit(report_token, sock, pool.token)
sock.close()
time.sleep(60)
"""


@process_only
def test_token_is_set_when_the_owner_dies(kit: Kit) -> None:
    ours, theirs = kit.socketpair()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    owner = subprocess.Popen([sys.executable, "-c", _OWNER, str(theirs.fileno())],
                             pass_fds=[theirs.fileno()], cwd=root)
    try:
        theirs.close()
        reader = ours.makefile("rb")
        worker_pid = int(reader.readline())  # the job runs in the owner's worker
    finally:
        owner.kill()
        owner.wait()
    assert reader.read(1) == b"s"  # the owner's death set the token: EOF on its socketpair
    reader.close()

    def worker_gone() -> bool:  # orphaned: it may linger as a zombie of another reaper
        try:
            return psutil.Process(worker_pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    eventually(worker_gone, timeout=GUARD)


@process_only
def test_worker_that_does_not_exit_is_terminated_at_shutdown(kit: Kit) -> None:
    pool = kit.pool(max_workers=1)
    pool.submit(leave_a_thread_behind).result(GUARD)  # the worker cannot finish exiting
    pool.shutdown()  # returns at all only because the worker was terminated
    assert pool.statistics().workers_alive == 0


# --------------------------------------------------------------------------- lifecycle


def test_pool_that_never_got_a_job_starts_nothing(kit: Kit) -> None:
    threads = set(threading.enumerate())
    children = psutil.Process().children()
    pool = kit.pool(max_workers=4)
    stats = pool.statistics()
    assert (stats.workers_started, stats.workers_alive, stats.submitted) == (0, 0, 0)
    pool.shutdown()
    assert set(threading.enumerate()) == threads
    assert psutil.Process().children() == children
    assert pool.statistics().workers_started == 0


def test_shutdown_twice_and_submit_after_shutdown(kit: Kit) -> None:
    pool = kit.pool()
    assert pool.submit(add, 1).result(GUARD) == 1
    pool.shutdown()
    pool.shutdown()
    pool.shutdown(wait=False, cancel=True)
    with pytest.raises(PoolError) as info:
        pool.submit(add, 1)
    assert type(info.value) is PoolError
    stats = pool.statistics()
    assert (stats.workers_alive, stats.busy, stats.completed) == (0, 0, 1)
    assert stats.worker_pids == ()


def test_shutdown_runs_accepted_jobs_first(kit: Kit) -> None:
    pool = kit.pool(max_workers=1)
    futures = [pool.submit(add, i) for i in range(5)]
    pool.shutdown(wait=True)
    assert [f.result(0) for f in futures] == list(range(5))


def test_shutdown_without_wait_finishes_in_the_background(kit: Kit) -> None:
    pool = kit.pool(max_workers=2)
    ours, theirs = kit.socketpair()
    running = pool.submit(rendezvous, theirs)
    kit.hand_over(theirs)
    futures = [pool.submit(add, i) for i in range(4)]
    wait_ready(ours, b"u")
    pool.shutdown(wait=False)  # returns with a job still blocked (else this deadlocks)
    assert not running.done()
    ours.sendall(b"g")
    assert [f.result(GUARD) for f in futures] == list(range(4))
    running.result(GUARD)
    # The leak check after the test waits for the workers to be gone.


def test_statistics(kit: Kit) -> None:
    pool = kit.pool(max_workers=2)
    pairs = [kit.socketpair() for _ in range(2)]
    futures = []
    for _, theirs in pairs:
        futures.append(pool.submit(rendezvous, theirs))
        kit.hand_over(theirs)
    queued = pool.submit(add, 7)
    for ours, _ in pairs:
        wait_ready(ours, b"u")
    stats = pool.statistics()
    assert isinstance(stats, PoolStatistics)
    assert (stats.backend, stats.max_workers) == (kit.backend, 2)
    assert (stats.workers_started, stats.workers_alive, stats.busy, stats.idle) == (2, 2, 2, 0)
    assert (stats.pending, stats.submitted, stats.completed, stats.failed) == (1, 3, 0, 0)
    assert not stats.broken
    if kit.backend == "process":
        children = {p.pid for p in psutil.Process().children()}
        assert len(stats.worker_pids) == 2 and set(stats.worker_pids) <= children
    else:
        assert stats.worker_pids == ()
    for ours, _ in pairs:
        ours.sendall(b"g")
    assert queued.result(GUARD) == 7
    for future in futures:
        future.result(GUARD)
    stats = pool.statistics()
    assert (stats.busy, stats.pending, stats.completed) == (0, 0, 3)
    assert stats.submitted == stats.completed + stats.failed + stats.pending + stats.busy
    with pytest.raises(AttributeError):
        stats.busy = 5  # type: ignore[misc]


# --------------------------------------------------------------------------- worker environment


def exec_environment() -> dict[str, str]:
    """The environment this process was exec'd with (not what it set since)."""
    with open("/proc/self/environ", "rb") as f:
        entries = [e.decode() for e in f.read().split(b"\0") if e]
    return dict(e.split("=", 1) for e in entries)


def getenv(name: str) -> str | None:
    return os.environ.get(name)


@process_only
def test_spawned_workers_start_with_the_pool_environment(kit: Kit,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "3")  # the owner's own setting wins
    default = kit.pool(max_workers=1)
    env = default.submit(exec_environment).result(GUARD)  # in place at exec: before any import
    assert env["OPENBLAS_NUM_THREADS"] == "1" and env["OMP_NUM_THREADS"] == "1"
    assert env["MKL_NUM_THREADS"] == "3"
    custom = kit.pool(max_workers=1, worker_env={"MULTIFD_TEST_WORKER_ENV": "per-pool"})
    env = custom.submit(exec_environment).result(GUARD)
    assert env["MULTIFD_TEST_WORKER_ENV"] == "per-pool" and "OPENBLAS_NUM_THREADS" not in env
    assert "OPENBLAS_NUM_THREADS" not in os.environ  # the owner's environment never changed
    assert "MULTIFD_TEST_WORKER_ENV" not in os.environ


@process_only
def test_forked_workers_get_the_pool_environment(kit: Kit) -> None:
    pool = kit.pool(max_workers=1, start_method="fork",
                    worker_env={"MULTIFD_TEST_WORKER_ENV": "forked"})
    assert pool.submit(getenv, "MULTIFD_TEST_WORKER_ENV").result(GUARD) == "forked"
    assert "MULTIFD_TEST_WORKER_ENV" not in os.environ


# --------------------------------------------------------------------------- concurrent starts


def pipe_write_ends() -> set[str]:
    """The pipes this process holds a write end of."""
    held = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("pipe:"):
                with open(f"/proc/self/fdinfo/{fd}") as info:
                    flags = next(line for line in info if line.startswith("flags:"))
                if int(flags.split()[1], 8) & os.O_WRONLY:
                    held.add(link)
        except (OSError, StopIteration):
            continue
    return held


def pipe_read_ends() -> set[str]:
    return {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if fd.isdigit() and os.path.exists(f"/proc/self/fd/{fd}")
            and os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:")} - pipe_write_ends()


def test_workers_forked_by_concurrent_pools_hold_no_other_workers_sentinel() -> None:
    # A worker holds the write end of its own sentinel pipe: the owner sees its death
    # when that closes.  One forked by another pool in the middle of this start would
    # hold it too, and this worker's death would go unseen while that one lives.
    pools = [WorkerPool("process", 2, name=f"forked-{i}", start_method="fork",
                        cancel_grace=GRACE) for i in range(4)]
    barrier = threading.Barrier(len(pools))
    held: list[set[str]] = []

    def start(pool: WorkerPool) -> None:
        barrier.wait(GUARD)
        futures = [pool.submit(pipe_write_ends) for _ in range(2)]
        held.extend(f.result(GUARD) for f in futures)

    def run_all(target: Callable[[WorkerPool], None]) -> None:
        threads = [threading.Thread(target=target, args=(pool,)) for pool in pools]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    try:
        run_all(start)
        sentinels = pipe_read_ends()  # ours: the read ends of the workers' sentinel pipes
        assert len(held) == 2 * len(pools)
        assert [len(ends & sentinels) for ends in held] == [1] * len(held)  # each its own
    finally:  # all at once: a leaked end must not make one pool wait for another
        run_all(lambda pool: pool.shutdown(wait=True, cancel=True))
