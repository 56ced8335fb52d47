"""Worker processes that start with the pool's worker environment, the owner's left alone.

A spawned worker is a fresh interpreter, which may import numpy (the owner's
``__main__``, re-imported by multiprocessing) before any code of ours runs in
it; so its environment has to be right at ``exec()``.  multiprocessing starts it
with the owner's environment and has no knob for another, so the spawn start
method gets a Popen of its own here: CPython's ``popen_spawn_posix.Popen._launch``
(3.11) with the launch done by :class:`subprocess.Popen`, which takes ``env``,
and reaping left to that object.  Fork and forkserver workers are copies of a
running process: ``worker_main`` sets the environment in them, first thing.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import subprocess
from collections.abc import Callable, Mapping
from multiprocessing import popen_spawn_posix, process, reduction, spawn, util
from multiprocessing.context import SpawnProcess, set_spawning_popen
from multiprocessing.process import BaseProcess
from typing import Any, cast

from engine.errors import ConfigError

#: Worker processes import numpy but do no linear algebra: one BLAS thread each,
#: or OpenBLAS's idle workers spin and steal CPU from the channels (measured:
#: setup 418 → 334 ms and ~3 % more throughput with 2 channels on 2 cores).
DEFAULT_WORKER_ENV: Mapping[str, str] = {
    "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


#: The process group of every interpreter the pool starts (a spawned worker, a fork
#: server, and so the workers a server forks): one of its own, not the owner's.  A
#: terminal's Ctrl-C goes to the foreground group: it must reach the owner only,
#: which cancels what its workers run and stops them.  Sent to a worker too, it
#: landed while the fresh interpreter re-imported the owner's ``__main__``, before
#: the worker could ignore it, and printed that import's KeyboardInterrupt traceback.
OWN_PROCESS_GROUP = 0


def child_environment(worker_env: Mapping[str, str]) -> dict[str, str]:
    """The owner's environment, plus each of `worker_env`'s names it does not set."""
    env = dict(os.environ)
    for name, value in worker_env.items():
        env.setdefault(name, value)
    return env


def _close_fds(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


class _EnvSpawnPopen(popen_spawn_posix.Popen):
    """``popen_spawn_posix.Popen`` whose child starts with ``process_obj.worker_env``."""

    _fds: list[int]  # the base class's: descriptors the child inherits

    def __init__(self, process_obj: _EnvSpawnProcess) -> None:
        self._child: subprocess.Popen[bytes] | None = None
        self._env = child_environment(process_obj.worker_env)
        super().__init__(process_obj)

    def _launch(self, process_obj: BaseProcess) -> None:  # CPython 3.11's, but for the launch
        from multiprocessing import resource_tracker

        tracker_fd = cast(int, resource_tracker.getfd())
        self._fds.append(tracker_fd)
        prep_data = spawn.get_preparation_data(process_obj.name)
        fp = io.BytesIO()
        set_spawning_popen(self)
        try:
            reduction.dump(prep_data, fp)
            reduction.dump(process_obj, fp)
        finally:
            set_spawning_popen(None)

        parent_r = child_w = child_r = parent_w = None
        try:
            parent_r, child_w = os.pipe()
            child_r, parent_w = os.pipe()
            cmd = spawn.get_command_line(tracker_fd=tracker_fd, pipe_handle=child_r)
            self._fds.extend([child_r, child_w])
            # As util.spawnv_passfds does it (close_fds, these fds only, signals as
            # they are), with `env`, in a process group of its own (OWN_PROCESS_GROUP).
            self._child = subprocess.Popen(
                cmd, executable=spawn.get_executable(), pass_fds=sorted(set(self._fds)),
                env=self._env, restore_signals=False, process_group=OWN_PROCESS_GROUP)
            self.pid = self._child.pid
            self.sentinel = parent_r
            with open(parent_w, "wb", closefd=False) as f:
                f.write(fp.getbuffer())
        finally:
            fds_to_close = [fd for fd in (parent_r, parent_w) if fd is not None]
            self.finalizer = util.Finalize(self, _close_fds, fds_to_close)
            for fd in (child_r, child_w):
                if fd is not None:
                    os.close(fd)

    def poll(self, flag: int = os.WNOHANG) -> int | None:
        # The subprocess object reaps the child (and so will not reap it again later).
        if self.returncode is None and self._child is not None:
            self.returncode = self._child.poll() if flag & os.WNOHANG else self._child.wait()
        return self.returncode


class _EnvSpawnProcess(SpawnProcess):
    """A spawn-context Process whose child starts with `worker_env` (module docstring)."""

    def __init__(self, *args: Any, worker_env: Mapping[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.worker_env = dict(worker_env)

    @staticmethod
    def _Popen(process_obj: BaseProcess) -> _EnvSpawnPopen:  # noqa: N802 (multiprocessing's name)
        return _EnvSpawnPopen(cast(_EnvSpawnProcess, process_obj))


def process_factory(start_method: str,
                    worker_env: Mapping[str, str]) -> Callable[..., process.BaseProcess]:
    """``Process(target=..., args=..., name=..., daemon=...)`` for `start_method`, whose
    processes start with `worker_env` (spawn: at exec; the others: ``worker_main`` sets
    it).  Raises ConfigError for an unknown start method."""
    try:
        context = multiprocessing.get_context(start_method)
    except ValueError as exc:
        raise ConfigError(f"unknown start method {start_method!r}") from exc
    if context.get_start_method() == "spawn":
        env = dict(worker_env)
        return lambda **kwargs: _EnvSpawnProcess(worker_env=env, **kwargs)
    # Every concrete context has Process; typeshed's BaseContext does not say so.
    return cast(Callable[..., process.BaseProcess], cast(Any, context).Process)
