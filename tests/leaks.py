"""Leak check run around every integration and fault test.

A test may leave nothing behind: no child process, no thread, no shared-memory
segment in /dev/shm and no file descriptor (sockets included).  The check waits a
little for things that are already on their way out (a child being reaped, a
thread finishing), then fails with what is still there.

The leak check looks only at this project's segments and this run's process tree,
so other processes on the machine cannot make it fail: segments are the ones named
with :data:`engine.shm.SEGMENT_PREFIX`, children are this process's descendants,
fds and threads are this process's own.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from multiprocessing import resource_tracker

import psutil

from engine.pool import fork_server_fds, fork_server_pids
from engine.shm import SEGMENT_PREFIX

_SHM_DIR = "/dev/shm"


def _tracker_pid_and_fd() -> tuple[int | None, int | None]:
    # multiprocessing's resource tracker is a process-wide helper started on the
    # first SharedMemory; it lives as long as the test process and is not ours.
    tracker = resource_tracker._resource_tracker
    return getattr(tracker, "_pid", None), getattr(tracker, "_fd", None)


def _children() -> set[int]:
    tracker_pid, _ = _tracker_pid_and_fd()
    me = psutil.Process()
    pids = set()
    for child in me.children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.NoSuchProcess:
            continue
        pids.add(child.pid)
    pids.discard(tracker_pid)  # type: ignore[arg-type]
    # This process's fork servers are process-wide helpers too (stopped at exit; their
    # own tests check that): the workers they fork are our descendants, and counted.
    return pids - fork_server_pids()


def shm_segments() -> set[str]:
    """The names of this project's shared-memory segments now in /dev/shm.

    Only names with the project's prefix: other programs' segments are none of
    this check's business.  (Another run of this project's tests at the same time
    uses the same prefix, so it can still show up here.)
    """
    return {n for n in os.listdir(_SHM_DIR) if n.startswith(SEGMENT_PREFIX)}


def segment_mappings(pid: int | str = "self") -> list[str]:
    """The lines of process `pid`'s memory map that map this project's segments
    ([] for a process that is gone)."""
    try:
        with open(f"/proc/{pid}/maps") as maps:
            return [line for line in maps if f"{_SHM_DIR}/{SEGMENT_PREFIX}" in line]
    except OSError:
        return []


def _fds() -> set[int]:
    _, tracker_fd = _tracker_pid_and_fd()
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        fds.add(int(name))
    fds.discard(tracker_fd)  # type: ignore[arg-type]
    return fds - fork_server_fds()  # the fork servers' (see _children)


def _threads() -> set[int]:
    return {t.ident for t in threading.enumerate() if t.ident is not None}


@dataclass
class Snapshot:
    children: set[int]
    shm: set[str]
    fds: set[int]
    threads: set[int]

    @classmethod
    def take(cls) -> Snapshot:
        return cls(_children(), shm_segments(), _fds(), _threads())


def leftovers(before: Snapshot, timeout: float = 5.0) -> list[str]:
    """What exists now that did not exist in `before`, after waiting up to `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        now = Snapshot.take()
        problems = []
        if extra := now.children - before.children:
            procs = []
            for pid in sorted(extra):
                try:
                    procs.append(f"{pid}:{' '.join(psutil.Process(pid).cmdline())[:120]}")
                except psutil.NoSuchProcess:
                    procs.append(str(pid))
            problems.append(f"child processes left running: {procs}")
        if extra := now.shm - before.shm:
            problems.append(f"shared-memory segments left in /dev/shm: {sorted(extra)}")
        if extra := now.threads - before.threads:
            names = [t.name for t in threading.enumerate() if t.ident in extra]
            problems.append(f"threads left running: {names}")
        if extra := now.fds - before.fds:
            described = []
            for fd in sorted(extra):
                try:
                    described.append(f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}")
                except OSError:
                    pass
            if described:
                problems.append(f"file descriptors left open: {described}")
        if not problems or time.monotonic() > deadline:
            return problems
        time.sleep(0.05)
