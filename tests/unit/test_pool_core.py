"""The pool's failure rules on :class:`engine.pool._core.PoolCore`, without processes.

The test plays the backend: it queues jobs, starts them (``start_next_locked``)
and ends them (``finish``), as the thread and process backends do.  The last
tests run the same rules through the facade on the thread backend.  Every wait
is on an event or a future, with a deadlock guard that a working pool never
reaches.
"""

from __future__ import annotations

import ast
import os
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

import engine.pool
from engine.errors import BrokenPoolError, CancelledError, PoolError
from engine.pool import CancelToken, WorkerPool, on_every_worker
from engine.pool._core import Job, PoolCore
from engine.pool._forkserver import _readable

GUARD = 10.0


class Harness:
    """A core, and the backend's side of it played by the test."""

    def __init__(self) -> None:
        self.core = PoolCore("unit", max_workers=2, cancel_grace=0.0)
        self.breaks = 0
        self.core.add_break_listener(self._on_broken)
        self.queued = 0  # calls of the backend's on_submit_locked
        self.fail_to_start: Exception | None = None

    def _on_broken(self) -> None:
        assert self.core.token.is_set()  # the token is set before listeners run
        self.breaks += 1

    def _on_queued(self) -> None:
        assert self.core.lock.locked()
        self.queued += 1
        if self.fail_to_start is not None:
            raise self.fail_to_start

    def submit(self, sockets: list[socket.socket] | None = None) -> Job:
        job = Job(self.core.reserve_id(), Future(), sockets=sockets or [])
        self.core.enqueue(job, self._on_queued)
        return job

    def start(self) -> Job:
        with self.core.lock:
            job = self.core.start_next_locked()
        assert job is not None
        return job

    def counts(self) -> tuple[int, int, int, int, int]:
        s = self.core.statistics("thread", lambda: (0, 0, ()))
        assert s.submitted == s.completed + s.failed + s.pending + s.busy
        return s.submitted, s.completed, s.failed, s.pending, s.busy


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    yield harness
    harness.core.release()


def test_a_job_runs_and_completes(h: Harness) -> None:
    job = h.submit()
    assert h.counts() == (1, 0, 0, 1, 0)
    assert h.start() is job and job.future.running()
    assert h.counts() == (1, 0, 0, 0, 1)
    h.core.finish(job, result=42)
    assert job.future.result(0) == 42
    assert h.counts() == (1, 1, 0, 0, 0)
    assert h.core.broken is None and not h.core.token.is_set() and h.breaks == 0


def test_finish_twice_settles_and_counts_once(h: Harness) -> None:
    job = h.submit()
    h.start()
    h.core.finish(job, result="first")
    h.core.finish(job, result="second")
    assert job.future.result(0) == "first"
    assert h.counts() == (1, 1, 0, 0, 0)


def test_claim_is_once(h: Harness) -> None:
    job = h.submit()
    h.start()
    with h.core.lock:
        assert h.core.claim_locked(job, ok=False)
        assert not h.core.claim_locked(job, ok=True)
    h.core.finish(job, result="ended")  # at rest again: the claim counted it failed
    assert not job.future.done()  # the claimer settles it, and has not yet
    assert h.counts() == (1, 0, 1, 0, 0)


def test_failure_breaks_before_the_future_says_so(h: Harness) -> None:
    failing = h.submit()
    queued = h.submit()
    h.start()
    seen: list[Any] = []
    failing.future.add_done_callback(
        lambda _: seen.append((h.core.broken, h.core.token.is_set())))
    error = ValueError("job failed")
    h.core.finish(failing, error=error)
    assert failing.future.exception(0) is error
    assert seen == [(error, True)]  # who sees the error finds the pool broken, the token set
    assert h.breaks == 1
    never = queued.future.exception(0)
    assert type(never) is BrokenPoolError and never.__cause__ is error
    assert "never started" in str(never)
    assert h.counts() == (2, 0, 2, 0, 0)


def test_break_with_queued_and_running_jobs(h: Harness) -> None:
    a, b = socket.socketpair()
    running = h.submit()
    queued = h.submit(sockets=[a])
    h.start()
    reason = RuntimeError("worker died")
    h.core.break_(reason)
    assert h.core.broken is reason and h.core.token.is_set() and h.breaks == 1
    assert isinstance(queued.future.exception(0), BrokenPoolError)
    assert a.fileno() == -1  # a job that never starts gives its sockets back
    b.close()
    assert not running.future.done()  # a running job ends on its own (or is terminated)
    with h.core.lock:
        assert h.core.unsettled_running_locked() == [running]
        assert not h.core.claim_locked(queued, ok=False)  # failed by the break already
        assert h.core.no_more_work_locked()
    assert h.counts() == (2, 0, 1, 0, 1)


def test_a_job_finishing_after_the_break_keeps_its_result(h: Harness) -> None:
    job = h.submit()
    h.start()
    h.core.break_(RuntimeError("elsewhere"))
    h.core.finish(job, result="done anyway")
    assert job.future.result(0) == "done anyway"
    assert h.counts() == (1, 1, 0, 0, 0)


def test_a_job_finishing_after_it_was_claimed_changes_nothing(h: Harness) -> None:
    job = h.submit()
    h.start()
    h.core.break_(RuntimeError("elsewhere"))
    with h.core.lock:  # what the grace period does to a job that ignores the token
        assert h.core.claim_locked(job, ok=False)
    h.core.finish(job, error=ValueError("late"))
    h.core.finish(job, result="late")
    assert not job.future.done()  # the claimer settles it, nobody else
    assert isinstance(h.core.broken, RuntimeError)  # the first failure stays the cause
    assert h.counts() == (1, 0, 1, 0, 0)


def test_second_break_is_a_no_op(h: Harness) -> None:
    first, second = RuntimeError("first"), RuntimeError("second")
    h.core.break_(first)
    h.core.break_(second, cancelled=True)
    assert h.core.broken is first and h.breaks == 1
    error = h.core.failure("x")
    assert type(error) is BrokenPoolError and error.__cause__ is first


def test_cancel_fails_queued_jobs_with_cancelled_error(h: Harness) -> None:
    queued = h.submit()
    reason = CancelledError("cancelled by the test")
    h.core.break_(reason, cancelled=True)
    error = queued.future.exception(0)
    assert type(error) is CancelledError and error.__cause__ is reason
    with pytest.raises(CancelledError) as info:
        h.submit()
    assert info.value.__cause__ is reason


def test_submit_after_break_or_close_is_refused(h: Harness) -> None:
    h.core.break_(RuntimeError("broken"))
    with pytest.raises(BrokenPoolError):
        h.submit()
    assert h.core.close(lambda: False)
    with pytest.raises(PoolError, match="shut down"):
        h.submit()
    assert h.counts() == (0, 0, 0, 0, 0)


def test_job_refused_at_enqueue_gives_its_sockets_back(h: Harness) -> None:
    h.core.close(lambda: False)
    a, b = socket.socketpair()
    job = Job(1, Future(), sockets=[a])
    with pytest.raises(PoolError):
        h.core.enqueue(job, h._on_queued)
    assert a.fileno() == -1 and h.queued == 0
    b.close()


def test_worker_that_cannot_start_unqueues_the_job(h: Harness) -> None:
    h.fail_to_start = OSError("no more processes")
    a, b = socket.socketpair()
    with pytest.raises(PoolError, match="could not start a worker") as info:
        h.submit(sockets=[a])
    assert isinstance(info.value.__cause__, OSError)
    assert a.fileno() == -1
    b.close()
    assert h.counts() == (0, 0, 0, 0, 0) and h.core.broken is None


def test_future_cancelled_while_queued_is_skipped_and_counted(h: Harness) -> None:
    a, b = socket.socketpair()
    cancelled = h.submit(sockets=[a])
    kept = h.submit()
    assert cancelled.future.cancel()
    assert h.start() is kept
    assert a.fileno() == -1
    b.close()
    with h.core.lock:
        assert h.core.start_next_locked() is None
    assert h.counts() == (2, 0, 1, 0, 1)


def test_close_then_last_background_thread_releases_the_token(h: Harness) -> None:
    token = h.core.token
    h.core.background_exited()  # not closed: the pool lives on
    token.fileno()
    assert not h.core.close(lambda: True)  # a background thread will release it
    token.fileno()
    h.core.background_exited()
    with pytest.raises(PoolError, match="closed"):
        token.fileno()
    h.core.release()  # idempotent


# --------------------------------------------------------------------------- the facade, thread backend


def wait_then(started: threading.Event, go: threading.Event, value: Any) -> Any:
    started.set()
    assert go.wait(GUARD)
    return value


def watch(token: CancelToken, started: threading.Event) -> bool:
    started.set()
    return token.wait(GUARD)


def test_shutdown_waits_for_accepted_jobs() -> None:
    pool = WorkerPool("thread", 1, name="unit")
    started, go = threading.Event(), threading.Event()
    first = pool.submit(wait_then, started, go, 1)
    second = pool.submit(wait_then, threading.Event(), go, 2)
    assert started.wait(GUARD)
    go.set()
    pool.shutdown(wait=True)
    assert (first.result(0), second.result(0)) == (1, 2)
    stats = pool.statistics()
    assert (stats.completed, stats.failed, stats.workers_alive, stats.broken) == (2, 0, 0, False)
    with pytest.raises(PoolError):
        pool.submit(int)


def test_shutdown_with_cancel_stops_watchers_and_fails_queued_jobs() -> None:
    pool = WorkerPool("thread", 1, name="unit")
    started = threading.Event()
    watcher = pool.submit(watch, pool.token, started)
    queued = pool.submit(int)
    assert started.wait(GUARD)
    pool.shutdown(wait=True, cancel=True)
    assert watcher.result(0) is True  # it saw the token it was given, and ended
    assert type(queued.exception(0)) is CancelledError
    assert isinstance(pool.broken, CancelledError)
    stats = pool.statistics()
    assert (stats.completed, stats.failed, stats.pending, stats.busy) == (1, 1, 0, 0)


def test_thread_job_ignoring_the_token_is_abandoned_and_its_late_result_dropped() -> None:
    pool = WorkerPool("thread", 2, name="unit", cancel_grace=0.0)
    started, go = threading.Event(), threading.Event()
    stubborn = pool.submit(wait_then, started, go, "late")
    assert started.wait(GUARD)
    pool.cancel()
    error = stubborn.exception(GUARD)  # abandoned after the grace period
    assert type(error) is CancelledError and "abandoned" in str(error)
    go.set()
    pool.shutdown(wait=True)
    assert stubborn.exception(0) is error
    stats = pool.statistics()
    assert (stats.completed, stats.failed, stats.busy) == (0, 1, 0)


# --------------------------------------------------------------------------- the package's shape


def test_on_every_worker_is_woken_by_the_pool_breaking() -> None:
    release = threading.Event()
    with WorkerPool("thread", 2, name="every") as pool:
        breaker = threading.Timer(0.1, pool.cancel, (PoolError("stop"),))
        breaker.start()
        try:
            with pytest.raises(PoolError, match="broke while holding"):
                on_every_worker(pool, release.wait, GUARD, timeout=GUARD, what="holding")
        finally:
            release.set()
            breaker.join()


def test_on_every_worker_whose_jobs_do_not_return_is_a_pool_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not the builtin TimeoutError of future.result(0): every failure is in the tree."""
    release = threading.Event()
    hold = engine.pool._hold_until_all

    def held_past_the_eof(*args: Any) -> int:
        pid = hold(*args)
        release.wait(GUARD)  # ran, said so, saw the EOF, and still has not returned
        return pid

    monkeypatch.setattr(engine.pool, "_hold_until_all", held_past_the_eof)
    with WorkerPool("thread", 2, name="stuck") as pool:
        try:
            with pytest.raises(PoolError, match=r"2 worker\(s\) did not return within 0 s after"):
                on_every_worker(pool, int, timeout=0.2)
        finally:
            release.set()


def test_a_token_wait_of_any_length_does_not_overflow() -> None:
    """poll() takes a C int of milliseconds: 1e7 s is beyond it (the audit's
    poll_overflow.py), and a job author's wait must not raise for it."""
    owner = CancelToken()
    view = CancelToken(owner.wait_end())  # what a worker holds: set only through the EOF
    try:
        owner.set()
        assert view.wait(1e7) is True
    finally:
        owner.close()


def test_a_fork_server_wait_of_any_length_does_not_overflow() -> None:
    r, w = os.pipe()
    try:
        os.write(w, b"x")
        assert _readable(r, 1e7) is True
    finally:
        os.close(r)
        os.close(w)


def _pool_modules() -> dict[str, ast.Module]:
    folder = Path(engine.pool.__file__).parent
    return {f"engine.pool.{p.stem}" if p.stem != "__init__" else "engine.pool":
            ast.parse(p.read_text(), str(p)) for p in sorted(folder.glob("*.py"))}


def test_pool_modules_import_downwards_only_and_never_the_facade() -> None:
    modules = _pool_modules()
    imports: dict[str, set[str]] = {}
    for name, tree in modules.items():
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        imports[name] = {m for m in found if m in modules and m != name}
        if name != "engine.pool":
            assert "engine.pool" not in imports[name], f"{name} imports the facade"
    done: set[str] = set()
    while len(done) < len(imports):  # peel off modules whose imports are all done
        ready = {m for m, deps in imports.items() if m not in done and deps <= done}
        assert ready, f"an import cycle among {sorted(set(imports) - done)}"
        done |= ready


def test_no_pool_module_touches_another_objects_private_members() -> None:
    for name, tree in _pool_modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") \
                    and not node.attr.startswith("__") \
                    and not (isinstance(node.value, ast.Name) and node.value.id == "self"):
                raise AssertionError(f"{name}:{node.lineno}: .{node.attr} of another object")
