"""Scrub: every chunk of a snapshot against its chunk word, or its present pages
against their page words, over N channels.

``inspect_snapshot(path, verify=True)`` (engine/snapshot.py) checks the file's
structure, then hands the pages here::

    each block's chunks (1 MiB of RAM) that hold a present page or have a word
        ── cut into jobs of whole chunks, ≤ JOB_PAGES pages of work each
        │   (block, file offset, first page, pages, chunk word) + runs + expected page words
        ▼
    pool: N worker processes (the channels)       one job each, in any order:
        open the file; per chunk: preadv each run of present pages to its place in
        a 1 MiB scratch buffer of its own (absent pages zero);
        a chunk word (not 0): xxh3-64 of the chunk == its word?  yes: every page intact
        else (no word, or a mismatch): xxh3-64 of each page == its word?
            → the damaged page numbers; none, yet the chunk word does not match:
              the damaged chunk
        ▼
    main: damaged pages and chunks per block (each job's, merged)

This is the restore's check (clients/ram_payload.py: one hash per chunk, page
words to name a damaged page), applied to every chunk with a word, sparse ones
too: a file damaged by accident that the restore would refuse is never reported
intact.  (A forger who makes a page's word disagree with its chunk's can: the
restore checks a sparse chunk page by page; docs/snapshot-format.md says so.)  Only offsets,
page numbers and checksum words go to a job, and only damaged page and chunk
numbers come back: page bytes are read by the job that checks them and never
leave it.  With one channel and no pool the jobs run here, in order (the
sequential scrub).
"""

from __future__ import annotations

import contextlib
import itertools
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from engine.channel import channel_pool
from engine.errors import ConfigError
from engine.pages import cut_runs, pages_to_runs
from engine.pool import JobFailure, WorkerPool, contained
from engine.transport import open_file
from engine.wire import snapshot_format as fmt

JOB_PAGES = 4096   # 16 MiB of pages per job: many jobs per channel, so channels finish together


@dataclass(frozen=True)
class ScrubJob:
    """Whole chunks to check: where each lies, its word, its runs of present pages
    and what each of those pages' checksum must be."""

    chunks: tuple[tuple[int, int, int, int, int, int], ...]  # (block, file offset of its first page,
                                                             #  first page, pages, chunk word or 0, runs)
    runs: np.ndarray  # int64 (n, 2): (first page, count) of each chunk's runs, chunk after chunk
    sums: np.ndarray  # uint64: the expected page words, run after run


# What a job finds: (block, damaged page numbers) per chunk with any, and
# (block, chunk) for each chunk whose word does not match though every page does.
Found = tuple[list[tuple[int, np.ndarray]], list[tuple[int, int]]]


def plan_jobs(pages_offsets: Sequence[int], present: Sequence[np.ndarray],
              sums: Sequence[tuple[np.ndarray, np.ndarray]], page_size: int,
              job_pages: int = JOB_PAGES) -> list[ScrubJob]:
    """Every chunk of every block that holds a present page or has a word, in file
    order, in jobs of whole chunks worth at most about `job_pages` pages of work
    (a chunk checked by its word counts all its pages: they are hashed)."""
    jobs: list[ScrubJob] = []
    chunks: list[tuple[int, int, int, int, int, int]] = []
    runs: list[np.ndarray] = []
    words: list[np.ndarray] = []
    held = 0
    for index, (base, pages, (page_words, chunk_words)) in enumerate(zip(pages_offsets, present, sums)):
        n_pages = page_words.size
        firsts, counts, _ = cut_runs(*pages_to_runs(pages), fmt.CHUNK_PAGES)  # runs of present pages
        per_chunk = np.bincount(firsts // fmt.CHUNK_PAGES, minlength=chunk_words.size)
        pages_per_chunk = np.bincount(pages // fmt.CHUNK_PAGES, minlength=chunk_words.size)
        run_at = np.concatenate(([0], np.cumsum(per_chunk)))
        word_at = np.concatenate(([0], np.cumsum(pages_per_chunk)))
        block_runs = np.stack([firsts, counts], axis=1).astype(np.int64)
        for chunk in np.flatnonzero((pages_per_chunk > 0) | (chunk_words != 0)).tolist():
            first = chunk * fmt.CHUNK_PAGES
            word = int(chunk_words[chunk])
            chunks.append((index, base + first * page_size, first, min(fmt.CHUNK_PAGES, n_pages - first),
                           word, int(per_chunk[chunk])))
            runs.append(block_runs[run_at[chunk]:run_at[chunk + 1]])
            words.append(page_words[pages[word_at[chunk]:word_at[chunk + 1]]])
            held += fmt.CHUNK_PAGES if word else int(pages_per_chunk[chunk])
            if held >= job_pages:
                jobs.append(_job(chunks, runs, words))
                chunks, runs, words, held = [], [], [], 0
    if chunks:
        jobs.append(_job(chunks, runs, words))
    return jobs


def _job(chunks: list[tuple[int, int, int, int, int, int]], runs: list[np.ndarray],
         words: list[np.ndarray]) -> ScrubJob:
    return ScrubJob(tuple(chunks), np.concatenate(runs), np.concatenate(words))  # words: uint64 already


def check_job(path: str, job: ScrubJob, page_size: int, identity: tuple[int, int] | None = None) -> Found:
    """Read and check one job's chunks; answer (block, damaged page numbers) per
    chunk that has any, and (block, chunk) per chunk that has none but does not
    match its word.  Raises SnapshotError when the file cannot be read, or is no
    longer the one `identity` names (engine.transport.open_file)."""
    file = open_file(path, "read", identity=identity)
    try:
        scratch = bytearray(fmt.CHUNK_PAGES * page_size)
        zeros = np.frombuffer(scratch, dtype=np.uint8)
        buffer = memoryview(scratch)
        damaged: list[tuple[int, np.ndarray]] = []
        bad_chunks: list[tuple[int, int]] = []
        at_run = at_word = 0
        for block, offset, first, n_pages, word, n_runs in job.chunks:
            runs = job.runs[at_run:at_run + n_runs].tolist()
            at_run += n_runs
            held = sum(count for _, count in runs)
            chunk = buffer[:n_pages * page_size]
            if word and held < n_pages:
                zeros[:n_pages * page_size] = 0  # absent pages hash as zeros, as restored
            for at, count in runs:
                start = (at - first) * page_size
                file.read_into(offset + start, [chunk[start:start + count * page_size]])
            expected = job.sums[at_word:at_word + held]
            at_word += held
            if word and fmt.chunk_sum(chunk) == word:
                continue  # one hash for the whole chunk: every page intact
            bad, done = [], 0
            for at, count in runs:
                start = (at - first) * page_size
                bad.append(at + fmt.damaged_pages(chunk[start:start + count * page_size],
                                                  expected[done:done + count], page_size))
                done += count
            pages = np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64)
            if pages.size:
                damaged.append((block, pages))
            elif word:
                bad_chunks.append((block, first // fmt.CHUNK_PAGES))
        return damaged, bad_chunks
    finally:
        file.close()


def scrub_pages(path: str, pages_offsets: Sequence[int], present: Sequence[np.ndarray],
                sums: Sequence[tuple[np.ndarray, np.ndarray]], page_size: int, *, channels: int = 1,
                pool: WorkerPool | None = None,
                identity: tuple[int, int] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per block, its damaged pages and the chunks whose word does not match though
    every page does (sorted numbers); every present page and chunk word checked,
    `channels` jobs at a time on worker processes: those of `pool` (a process
    pool, e.g. the VMM's warm one), else a pool of `channels` of this scrub's own.
    ``channels=1`` without a pool: sequentially, in this process.  `sums`: each
    block's page words and chunk words; `identity`: the file the caller checked
    (a job that finds another at `path` fails: it was replaced meanwhile).

    Raises ConfigError for a bad `channels` or a thread pool; SnapshotError when
    the file cannot be read; a pool's error when a worker fails.
    """
    if channels < 1:
        raise ConfigError(f"a scrub needs at least 1 channel, not {channels}")
    if pool is not None and pool.backend != "process":
        raise ConfigError("a scrub runs on a process pool: page checks hold the GIL")
    jobs = plan_jobs(pages_offsets, present, sums, page_size, JOB_PAGES)
    if pool is None and (channels == 1 or len(jobs) <= 1):
        results = [check_job(path, job, page_size, identity) for job in jobs]
    elif pool is not None:
        results = _run(pool, path, jobs, page_size, channels, identity)
    else:
        # Forked from the process's channel fork server (started by the CLI, or now):
        # a spawned interpreter per worker cost more than the scrub saved.
        with channel_pool(min(channels, len(jobs)), "mfd-scrub") as own:
            results = _run(own, path, jobs, page_size, channels, identity)
    found: list[list[np.ndarray]] = [[] for _ in present]
    found_chunks: list[list[int]] = [[] for _ in present]
    for damaged, bad_chunks in results:
        for block, pages in damaged:
            found[block].append(pages)
        for block, chunk in bad_chunks:
            found_chunks[block].append(chunk)
    return [(np.unique(np.concatenate(pages)) if pages else np.zeros(0, dtype=np.int64),
             np.unique(np.asarray(chunks, dtype=np.int64)))
            for pages, chunks in zip(found, found_chunks)]


def _run(pool: WorkerPool, path: str, jobs: Sequence[ScrubJob], page_size: int,
         channels: int, identity: tuple[int, int] | None) -> list[Found]:
    """Every job on `pool`, at most `channels` at a time; their answers in job
    order (the first failure raised, the jobs not yet sent never sent)."""
    answers: list[Found] = []
    in_flight: deque[Future[Found | JobFailure]] = deque()
    waiting = iter(jobs)
    while True:
        for job in itertools.islice(waiting, channels - len(in_flight)):
            # Contained: a job that raised would break the pool, which may be the VMM's.
            in_flight.append(pool.submit(contained, check_job, path, job, page_size, identity))
        if not in_flight:
            return answers
        answer = in_flight.popleft().result()  # a job is bounded work, or its worker dies
        if isinstance(answer, JobFailure):
            for future in in_flight:  # let the jobs sent finish: the pool may be the VMM's
                with contextlib.suppress(Exception):  # the first error is the one to tell
                    future.result()
            raise answer.rebuilt()  # with the worker's traceback as its cause
        answers.append(answer)


__all__ = ["JOB_PAGES", "ScrubJob", "check_job", "plan_jobs", "scrub_pages"]
