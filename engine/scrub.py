"""Scrub: every present page of a snapshot against its checksum, over N channels.

``inspect_snapshot(path, verify=True)`` (engine/snapshot.py) checks the file's
structure, then hands the pages here::

    present pages (per block) ── runs ── cut into jobs of ≤ JOB_PAGES pages
        │                                 (block, file offset, first page, count) + expected words
        ▼
    pool: N worker processes (the channels)       one job each, in any order:
        open the file; preadv ≤ 4 MiB into a scratch buffer of its own;
        xxh3-64 of each page == its word?  → the damaged page numbers
        ▼
    main: damaged pages per block (each job's, merged)

Only offsets, page numbers and checksum words go to a job, and only damaged
page numbers come back: page bytes are read by the job that checks them and
never leave it.  With one channel and no pool the jobs run here, in order
(the sequential scrub).
"""

from __future__ import annotations

import contextlib
import itertools
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from engine.channel import CHANNEL_PRELOAD
from engine.errors import ConfigError
from engine.pages import pages_to_runs
from engine.pool import WorkerPool
from engine.transport import open_file
from engine.wire import snapshot_format as fmt

JOB_PAGES = 4096   # 16 MiB of pages per job: many jobs per channel, so channels finish together
READ_PAGES = 1024  # 4 MiB per preadv


@dataclass(frozen=True)
class ScrubJob:
    """Runs of present pages to check, and what each page's checksum must be."""

    runs: tuple[tuple[int, int, int, int], ...]  # (block, file offset of `first`, first, count)
    sums: np.ndarray                             # uint64: the expected words, run after run


# A job's answer: (block, damaged page numbers) per run with any, or the error it met.
JobAnswer = tuple[list[tuple[int, np.ndarray]], BaseException | None]


def plan_jobs(pages_offsets: Sequence[int], present: Sequence[np.ndarray],
              sums: Sequence[np.ndarray], page_size: int,
              job_pages: int = JOB_PAGES) -> list[ScrubJob]:
    """Every present page of every block, in file order, in jobs of at most `job_pages`."""
    jobs: list[ScrubJob] = []
    runs: list[tuple[int, int, int, int]] = []
    words: list[np.ndarray] = []
    held = 0
    for index, (base, pages, block_sums) in enumerate(zip(pages_offsets, present, sums)):
        firsts, counts = pages_to_runs(pages)
        for first, count in zip(firsts.tolist(), counts.tolist()):
            while count:
                n = min(count, job_pages - held)
                runs.append((index, base + first * page_size, first, n))
                words.append(block_sums[first:first + n])
                held += n
                first += n
                count -= n
                if held == job_pages:
                    jobs.append(ScrubJob(tuple(runs), np.concatenate(words)))
                    runs, words, held = [], [], 0
    if runs:
        jobs.append(ScrubJob(tuple(runs), np.concatenate(words)))
    return jobs


def check_job(path: str, job: ScrubJob, page_size: int) -> list[tuple[int, np.ndarray]]:
    """Read and check one job's pages; answer (block, damaged page numbers) per run
    that has any.  Raises SnapshotError when the file cannot be read."""
    file = open_file(path, "read")
    try:
        scratch = memoryview(bytearray(min(READ_PAGES, len(job.sums)) * page_size))
        damaged: list[tuple[int, np.ndarray]] = []
        at_word = 0
        for block, offset, first, count in job.runs:
            bad: list[np.ndarray] = []
            for done in range(0, count, READ_PAGES):
                n = min(READ_PAGES, count - done)
                view = scratch[:n * page_size]
                file.read_into(offset + done * page_size, [view])
                expected = job.sums[at_word + done:at_word + done + n]
                bad.append(first + done + fmt.damaged_pages(view, expected, page_size))
            at_word += count
            pages = np.concatenate(bad)
            if pages.size:
                damaged.append((block, pages))
        return damaged
    finally:
        file.close()


def scrub_pages(path: str, pages_offsets: Sequence[int], present: Sequence[np.ndarray],
                sums: Sequence[np.ndarray], page_size: int, *, channels: int = 1,
                pool: WorkerPool | None = None) -> list[np.ndarray]:
    """The damaged pages of each block (sorted page numbers), every present page
    checked, `channels` jobs at a time on worker processes: those of `pool` (a
    process pool, e.g. the VMM's warm one), else a pool of `channels` of this
    scrub's own.  ``channels=1`` without a pool: sequentially, in this process.

    Raises ConfigError for a bad `channels` or a thread pool; SnapshotError when
    the file cannot be read; a pool's error when a worker fails.
    """
    if channels < 1:
        raise ConfigError(f"a scrub needs at least 1 channel, not {channels}")
    if pool is not None and pool.backend != "process":
        raise ConfigError("a scrub runs on a process pool: page checks hold the GIL")
    jobs = plan_jobs(pages_offsets, present, sums, page_size, JOB_PAGES)
    found: list[list[np.ndarray]] = [[] for _ in present]
    if pool is None and (channels == 1 or len(jobs) <= 1):
        results = [check_job(path, job, page_size) for job in jobs]
    elif pool is not None:
        results = _run(pool, path, jobs, page_size, channels)
    else:
        # Forked from the process's channel fork server (started by the CLI, or now):
        # a spawned interpreter per worker cost more than the scrub saved.
        with WorkerPool("process", min(channels, len(jobs)), name="mfd-scrub",
                        start_method="forkserver", preload=CHANNEL_PRELOAD) as own:
            results = _run(own, path, jobs, page_size, channels)
    for result in results:
        for block, pages in result:
            found[block].append(pages)
    return [np.unique(np.concatenate(pages)) if pages else np.zeros(0, dtype=np.int64)
            for pages in found]


def _contained(path: str, job: ScrubJob, page_size: int) -> JobAnswer:
    """check_job, its failure answered instead of raised: a job that raises would
    break the pool, and the pool may be the VMM's, shared with other work."""
    try:
        return check_job(path, job, page_size), None
    except Exception as exc:
        return [], exc


def _run(pool: WorkerPool, path: str, jobs: Sequence[ScrubJob], page_size: int,
         channels: int) -> list[list[tuple[int, np.ndarray]]]:
    """Every job on `pool`, at most `channels` at a time; their answers in job
    order (the first failure raised, the jobs not yet sent never sent)."""
    answers: list[list[tuple[int, np.ndarray]]] = []
    in_flight: deque[Future[JobAnswer]] = deque()
    waiting = iter(jobs)
    while True:
        for job in itertools.islice(waiting, channels - len(in_flight)):
            in_flight.append(pool.submit(_contained, path, job, page_size))
        if not in_flight:
            return answers
        damaged, error = in_flight.popleft().result()  # a job is bounded work, or its worker dies
        if error is not None:
            for future in in_flight:  # let the jobs sent finish: the pool may be the VMM's
                with contextlib.suppress(Exception):  # the first error is the one to tell
                    future.result()
            raise error
        answers.append(damaged)


__all__ = ["JOB_PAGES", "ScrubJob", "check_job", "plan_jobs", "scrub_pages"]
