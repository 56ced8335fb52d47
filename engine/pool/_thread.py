"""Thread backend of :class:`engine.pool.WorkerPool`: daemon threads that drain the core's FIFO."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from engine.pool._core import Job, PoolCore, settle

logger = logging.getLogger("multifd.pool")


class ThreadBackend:
    """Daemon threads ``{name}-{i}`` that pop jobs from `core`'s FIFO."""

    def __init__(self, core: PoolCore) -> None:
        self._core = core
        self.workers_started = self._alive = 0
        self._threads: list[threading.Thread] = []
        self._grace: threading.Thread | None = None

    def make_job(self, job_id: int, future: Future[Any], fn: Callable[..., Any],
                 args: tuple[Any, ...], kwargs: dict[str, Any]) -> Job:
        return Job(job_id, future, call=(fn, args, kwargs))

    def on_submit_locked(self) -> None:
        core = self._core
        idle = self._alive - core.running_count
        if core.pending_count > idle and self._alive < core.max_workers:
            thread = threading.Thread(target=self._work, daemon=True,
                                      name=f"{core.name}-{self.workers_started}")
            thread.start()
            self._threads.append(thread)
            self.workers_started += 1
            self._alive += 1
        core.cond.notify()

    def on_broken(self) -> None:
        # Threads cannot be killed: after cancel_grace their futures fail as those of
        # terminated processes do (so waiters wake), and the jobs' outcomes are dropped.
        core = self._core
        with core.lock:
            if self._grace is None and core.running_count:
                self._grace = threading.Thread(target=self._abandon_after_grace, daemon=True,
                                               name=f"{core.name}-grace")
                self._grace.start()

    def on_shutdown(self) -> None:
        pass  # close() notified the condition: idle threads see `closed` and leave

    def join(self) -> bool:
        with self._core.lock:
            threads = list(self._threads)
        me = threading.current_thread()
        for thread in threads:
            if thread is not me:
                thread.join()
        with self._core.lock:  # with no worker left, no break can start a grace thread
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
        core = self._core
        try:
            while True:
                with core.cond:
                    while not core.pending_count and not core.closed and core.broken is None:
                        core.cond.wait()
                    if not core.pending_count:
                        return
                    job = core.start_next_locked()
                    if job is None:  # every pending job had been cancelled
                        continue
                self._run(job)
                del job  # drop the arguments and result before waiting for more work
        finally:
            with core.lock:
                self._alive -= 1
                last = self._alive == 0
                core.cond.notify_all()
            if last:
                core.background_exited()

    def _run(self, job: Job) -> None:
        assert job.call is not None
        fn, args, kwargs = job.call
        job.call = None
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # a job's failure, whatever it is, belongs in its future
            self._core.finish(job, error=exc)
        else:
            self._core.finish(job, result=result)

    def _abandon_after_grace(self) -> None:
        core = self._core
        deadline = core.broken_at + core.cancel_grace
        with core.cond:
            while True:
                stragglers = core.unsettled_running_locked()
                remaining = deadline - time.monotonic()
                if not stragglers or remaining <= 0:
                    break
                core.cond.wait(remaining)
            for job in stragglers:
                core.claim_locked(job, ok=False)
        for job in stragglers:
            logger.warning("pool %r: job %d ignored cancellation; abandoning it", core.name, job.id)
            settle(job.future, error=core.failure(
                f"job {job.id} still ran {core.cancel_grace}s after the pool broke; abandoned"))
