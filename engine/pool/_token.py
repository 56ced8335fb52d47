"""The pool's cancel token, and the sockets a forked child must not keep (a leaf: stdlib only).

A token is passed to the jobs that watch it as an argument (``pool.token``): the
thread backend hands over the object itself; the process backend sends a dup of
its wait end by SCM_RIGHTS with the job, and the worker rebuilds a view of it.
Nothing here is opened at import.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import weakref
from typing import Any

from engine.errors import CancelledError, PoolError
from engine.poll import poll_events

# Sockets whose copies must not survive in a forked child.  A token is set, and a
# worker stopped, by EOF, which only comes once *every* copy of the other end is
# closed; a child made by fork ("fork" start method, or a job that forks) would
# otherwise hold those ends open for as long as it lives.
_CLOSE_IN_FORKED_CHILD: weakref.WeakSet[socket.socket] = weakref.WeakSet()
close_in_forked_child = _CLOSE_IN_FORKED_CHILD.add


def _after_fork_in_child() -> None:
    for sock in list(_CLOSE_IN_FORKED_CHILD):
        with contextlib.suppress(OSError):
            sock.close()


os.register_at_fork(after_in_child=_after_fork_in_child)


class CancelToken:
    """A set-once flag that threads and child processes see, and can ``select()`` on.

    A socketpair: the creating process holds the *set* end and setting closes it,
    so every copy of the *wait* end, in every process, reads EOF and stays readable.
    Hence a token is also set when its owner dies.  ``fileno()`` is the wait end.
    ``CancelToken()`` is a new token owned by this process; ``CancelToken(wait_end)``
    (in the pool's workers) views another process's token and cannot be set.

    Jobs get the token of their pool as an argument (``pool.submit(fn, pool.token)``);
    the process backend carries it to the worker with the job (``wait_end()``).
    """

    def __init__(self, _wait_end: socket.socket | None = None) -> None:
        self._lock = threading.Lock()
        self._flag = False
        self._owner = _wait_end is None
        self._set_end: socket.socket | None = None
        if _wait_end is None:
            self._set_end, _wait_end = socket.socketpair()
            close_in_forked_child(self._set_end)
        self._wait_end: socket.socket | None = _wait_end

    def set(self) -> None:
        """Set the token (idempotent).  Raises PoolError on a token this process does not own."""
        if not self._owner:
            raise PoolError("only the process that created a cancel token can set it")
        with self._lock:
            self._flag = True
            end, self._set_end = self._set_end, None
        if end is not None:
            end.close()

    def is_set(self) -> bool:
        """Whether the token is set; never blocks."""
        return self.wait(0)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the token is set or `timeout` seconds pass; answer ``is_set()``.
        A closed token answers at once."""
        wait_end = self._wait_end
        if self._flag or wait_end is None or wait_end.fileno() < 0:
            return self._flag
        poller = select.poll()  # not select(): it fails for descriptors above 1023
        with contextlib.suppress(ValueError):  # closed under us: the pool is gone
            poller.register(wait_end, select.POLLIN)
            # Only EOF ever makes the wait end readable.  POLLNVAL: closed under us.
            events = poll_events(poller, timeout)
            self._flag = self._flag or any(not ev & select.POLLNVAL for _, ev in events)
        return self._flag

    def raise_if_set(self) -> None:
        """Raise :class:`engine.errors.CancelledError` if the token is set."""
        if self.is_set():
            raise CancelledError("cancelled: the pool's cancel token is set")

    def fileno(self) -> int:
        """The descriptor that is readable once the token is set.  PoolError once closed."""
        wait_end = self._wait_end
        if wait_end is None or wait_end.fileno() < 0:
            raise PoolError("the cancel token is closed")
        return wait_end.fileno()

    def wait_end(self) -> socket.socket:
        """The socket that reads EOF once the token is set (what a worker's view is built
        on; the process backend sends a dup of it with each job).  PoolError once closed."""
        wait_end = self._wait_end
        if wait_end is None or wait_end.fileno() < 0:
            raise PoolError("the cancel token is closed")
        return wait_end

    def close(self) -> None:
        """Release the descriptors (idempotent); ``is_set()`` then answers from memory."""
        with self._lock:
            ends = (self._set_end, self._wait_end)
            self._set_end = self._wait_end = None
        for end in ends:
            if end is not None:
                end.close()

    def __reduce__(self) -> Any:
        raise TypeError("a CancelToken crosses to another process only as an argument "
                        "of a process pool's job")

    def __repr__(self) -> str:
        return f"<CancelToken {'set' if self._flag else 'unset'}>"
