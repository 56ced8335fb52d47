"""The resource tracker that unlinks a dead owner's shared memory.

Python's ``multiprocessing.resource_tracker`` is a helper process that unlinks,
once this process is gone, every segment this process registered and did not
unregister.  :mod:`engine.shm` registers the segments it owns (:func:`register`
on create and adopt, :func:`unregister` on unlink and disown), so guest RAM
whose owner is killed does not stay in /dev/shm until reboot::

    owner process ──register(name)──► resource tracker (own process group)
        │ dies (SIGKILL, OOM kill)         │ sees its pipe close
        ▼                                  ▼
                                      shm_unlink(name) for each name still held

Registration is counted per process (a process that both disowns and adopts a
segment registers it once), and the tracker is started in a process group of its
own, so a kill of the owner's group spares it.
"""

from __future__ import annotations

import os
import signal
import threading
from multiprocessing import resource_tracker, spawn, util
from typing import Any, cast

_TRACKER_TYPE = "shared_memory"

# Names this process registered with its resource tracker, and how many of this
# process's segments hold each (see engine/shm.py's docstring).
_registered: dict[str, int] = {}
_registered_lock = threading.Lock()


def start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker in a process group of its own, unless
    this process has one already (started by anyone: left as it is).

    The tracker unlinks the segments this process registered (:func:`register`)
    once it is gone: the guest RAM a command owned, when it is killed.  Started by
    multiprocessing it stays in the owner's process group, so ``kill -9 -- -PGID``
    (a shell's ``kill -9 %1``) killed it with the command, and the RAM stayed in
    /dev/shm until reboot.  CPython 3.11's ``ResourceTracker.ensure_running``, but
    for the group; later calls of that find it running.
    """
    tracker: Any = resource_tracker._resource_tracker  # its private fields: CPython 3.11's
    with tracker._lock:
        if tracker._fd is not None:
            return
        read, write = os.pipe()
        try:
            os.set_inheritable(read, True)
            # Its descriptors are 0-2 and `read`, as close_fds and pass_fds would leave them.
            closed = [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds() if fd > 2 and fd != read]
            command = f"from multiprocessing.resource_tracker import main;main({read})"
            executable = spawn.get_executable()
            # Unlinking what a dead owner left (a killed command, the spare names of an
            # unanswered COMMIT) is its job: not a warning on the owner's terminal.
            quiet = ["-W", "ignore:resource_tracker:UserWarning"]
            argv = [executable, *cast(Any, util)._args_from_interpreter_flags(), *quiet, "-c", command]
            # SIGINT and SIGTERM blocked until its main ignores them, as ensure_running does.
            pid = os.posix_spawn(executable, argv, os.environ, file_actions=closed,
                                 setpgroup=0, setsigmask={signal.SIGINT, signal.SIGTERM})
        except BaseException:
            os.close(write)
            raise
        else:
            tracker._fd, tracker._pid = write, pid
        finally:
            os.close(read)


def _inheritable_fds() -> list[int]:
    """This process's descriptors a child would inherit (those without close-on-exec)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if os.get_inheritable(fd):
                found.append(fd)
        except OSError:  # the directory's own descriptor, closed since
            pass
    return found


def register(path: str) -> None:
    """Count one more of this process's segments named `path` ("/" + name); the
    first hands the name to the resource tracker (started here if need be)."""
    with _registered_lock:
        _registered[path] = _registered.get(path, 0) + 1
        if _registered[path] == 1:
            start_resource_tracker()  # out of our process group: a group kill spares it
            resource_tracker.register(path, _TRACKER_TYPE)


def unregister(path: str) -> None:
    """Count one fewer; the last takes the name off the tracker.  A name this
    process never registered is left alone."""
    with _registered_lock:
        count = _registered.get(path, 0)
        if count == 0:
            return
        if count == 1:
            del _registered[path]
            resource_tracker.unregister(path, _TRACKER_TYPE)
        else:
            _registered[path] = count - 1
