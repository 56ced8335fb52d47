"""The process pool's crash matrix: every way a job can fail to bring its result back.

For each case the job's future fails with an error that names the cause (the
signal, the exit code, the pickling failure, or the job's own exception), the
pool is broken by that error (the first failure breaks the pool: the job queued
behind it fails with BrokenPoolError caused by it, and the pool's token is set),
and after shutdown no worker process is left.
"""

from __future__ import annotations

import ctypes
import multiprocessing.process
import os
import select
import signal
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

import psutil
import pytest

from engine.errors import BrokenPoolError, PoolError, RemoteTraceback, WorkerCrashedError
from engine.pool import WorkerPool

GUARD = 10.0  # deadlock guard for every wait; never reached when the code works


def segfault() -> None:
    ctypes.string_at(0)  # reads address 0: SIGSEGV


def abort() -> None:
    os.abort()


def exit_hard(code: int) -> None:
    os._exit(code)


def exit_politely(code: int) -> None:
    sys.exit(code)


def kill_myself() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def unpicklable_result() -> Any:
    return threading.Lock()


class HoldsALock(Exception):
    def __init__(self) -> None:
        super().__init__("the job failed", threading.Lock())


def raise_unpicklable() -> None:
    raise HoldsALock()


class NeedsTwoArguments(Exception):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(a)  # so pickle's rebuild, cls(*args), fails


def raise_unrebuildable() -> None:
    raise NeedsTwoArguments(1, 2)


def check_crash(code: int, signame: str | None) -> Callable[[BaseException], None]:
    def check(error: BaseException) -> None:
        assert type(error) is WorkerCrashedError
        assert error.exitcode == code
        assert f"exit code {code}" in str(error) and "while running job" in str(error)
        if signame is not None:
            assert f"({signame})" in str(error)
    return check


def check_raised(kind: type[BaseException], *words: str) -> Callable[[BaseException], None]:
    def check(error: BaseException) -> None:
        assert type(error) is kind
        assert all(word in str(error) for word in words), str(error)
        assert isinstance(error.__cause__, RemoteTraceback)  # the worker's traceback
    return check


def check_system_exit(error: BaseException) -> None:
    # sys.exit() in a job is the job raising SystemExit: the future carries it as is.
    assert type(error) is SystemExit and error.code == 2
    assert isinstance(error.__cause__, RemoteTraceback)


CASES: dict[str, tuple[Callable[..., Any], tuple[Any, ...], Callable[[BaseException], None]]] = {
    "segfault": (segfault, (), check_crash(-signal.SIGSEGV, "SIGSEGV")),
    "abort": (abort, (), check_crash(-signal.SIGABRT, "SIGABRT")),
    "sigkill": (kill_myself, (), check_crash(-signal.SIGKILL, "SIGKILL")),
    "os._exit(3)": (exit_hard, (3,), check_crash(3, None)),
    "os._exit(0)": (exit_hard, (0,), check_crash(0, None)),
    "sys.exit(2)": (exit_politely, (2,), check_system_exit),
    "unpicklable result": (unpicklable_result, (), check_raised(
        PoolError, "result cannot be pickled", "lock")),
    "unpicklable exception": (raise_unpicklable, (), check_raised(
        PoolError, "exception (HoldsALock) cannot be pickled")),
    "unrebuildable exception": (raise_unrebuildable, (), check_raised(
        PoolError, "exception (NeedsTwoArguments) cannot be pickled")),
}


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
@pytest.mark.parametrize("case", list(CASES))
def test_crash_fails_the_future_breaks_the_pool_and_leaves_nothing(case: str, start_method: str) -> None:
    job, args, check = CASES[case]
    pool = WorkerPool("process", 1, name=f"crash-{case}", cancel_grace=0.2, start_method=start_method)
    try:
        pid = pool.submit(os.getpid).result(GUARD)  # the worker is up
        crashing = pool.submit(job, *args)
        queued = pool.submit(os.getpid)  # behind it, on the one worker
        error = crashing.exception(GUARD)
        assert error is not None
        check(error)
        assert pool.broken is error  # the first failure breaks the pool
        assert pool.token.is_set()
        never = queued.exception(GUARD)
        assert type(never) is BrokenPoolError and never.__cause__ is error
        with pytest.raises(BrokenPoolError):
            pool.submit(os.getpid)
    finally:
        pool.shutdown(wait=True)
    stats = pool.statistics()
    assert (stats.workers_alive, stats.busy, stats.pending) == (0, 0, 0)
    assert (stats.completed, stats.failed) == (1, 2)
    assert _gone(pid)


def work_until_told(sock: Any, token: Any) -> str:
    """A sibling at work: it ends with "told" when a byte comes, "cancelled" if the token is set."""
    select.select([sock, token], [], [], GUARD)
    if token.is_set():
        return "cancelled"
    return "told" if sock.recv(1) else "closed"


@pytest.mark.parametrize("done", [True, False])
def test_a_spared_job_that_dies_after_its_work_breaks_nothing(done: bool) -> None:
    """A job whose owner says its work is done (``spare``) may die: its future fails with
    the crash, but the pool is not broken and a sibling at work goes on (a multifd channel
    that dies after its last word).  Not done yet: the crash breaks the pool as always."""
    pool = WorkerPool("process", 2, name="spared", cancel_grace=0.2)
    ours, theirs = socket.socketpair()
    try:
        sibling = pool.submit(work_until_told, theirs, pool.token)
        theirs.close()
        crashing = pool.submit(kill_myself)
        assert pool.spare(crashing, lambda: done)
        error = crashing.exception(GUARD)
        check_crash(-signal.SIGKILL, "SIGKILL")(error)
        if done:
            assert pool.broken is None and not pool.token.is_set()
            ours.send(b"!")
            assert sibling.result(GUARD) == "told"  # it finished its own work
            assert pool.submit(os.getpid).result(GUARD) > 0  # and the pool takes more
        else:
            assert pool.broken is error and pool.token.is_set()
            assert sibling.result(GUARD) == "cancelled"
        assert pool.spare(crashing, lambda: True) is False  # it has ended
    finally:
        ours.close()
        pool.shutdown(wait=True)
    stats = pool.statistics()
    assert (stats.workers_alive, stats.busy, stats.pending) == (0, 0, 0)


def test_a_crashed_worker_whose_process_will_not_close_still_fails_its_job(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With the fork start method another thread's multiprocessing._cleanup() can win
    the waitpid() for a dead worker, and Process.close() then refuses ("still
    running"): that killed the pool's manager thread (the job hung until the
    stall timeout, descriptors leaked). The crash is reported all the same."""
    def refuse(self: Any) -> None:
        raise ValueError("Cannot close a process while it is still running.")

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "close", refuse)
    pool = WorkerPool("process", 1, name="crash-close-refused", cancel_grace=0.2, start_method="fork")
    try:
        pool.submit(os.getpid).result(GUARD)
        error = pool.submit(exit_hard, 3).exception(GUARD)
        assert type(error) is WorkerCrashedError and error.exitcode == 3
    finally:
        monkeypatch.undo()
        pool.shutdown(wait=True)
