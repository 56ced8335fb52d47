"""A fork server per process: worker processes forked in milliseconds from a warm interpreter.

Spawning a worker costs a fresh interpreter and its imports (~0.1–0.2 s each on
two busy cores); forking one from a process that already imported them costs a
few ms.  The owner must not fork itself (it has threads and other operations'
sockets), so, as multiprocessing's ``forkserver`` start method does, a small
single-threaded server process is spawned once, imports the `preload` modules,
and forks each worker on request::

    owner ── connect(unix socket), SCM_RIGHTS: the child's pipes + fds ──► fork server
      ▲                                                                     │ fork()
      └──── pid, later the exit status (the "sentinel" pipe) ◄───────────── worker

Unlike multiprocessing's (one per process, started by the first pool that asks,
stopped only at exit, always with the owner's environment), ours is an object
with an owner: :func:`fork_server` answers this process's server for a (preload,
worker environment) pair, started with that environment at exec (so numpy's BLAS
threads are set before it is imported), and :meth:`ForkServer.stop` or
:func:`stop_fork_servers` (also at exit) stops it, waiting for it to go.  The
server loop itself and the child's start are CPython's (``multiprocessing.
forkserver.main``, ``popen_forkserver``): only the launch, the environment and
the lifetime are ours.

A `preload` entry is a module name, or ``"module:function"``: the function is
called (no arguments) in the server after the import, so a caller can do its
warm-up there (resolve plug-ins, build tables) once instead of in every worker.
"""

from __future__ import annotations

import atexit
import importlib
import io
import os
import select
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from multiprocessing import (
    connection,
    forkserver,
    popen_forkserver,
    process,
    reduction,
    resource_tracker,
    spawn,
    util,
)
from multiprocessing.context import ForkServerProcess, set_spawning_popen
from typing import Any, cast

from engine.errors import PoolError
from engine.poll import poll_events
from engine.pool._spawn import DEFAULT_WORKER_ENV, OWN_PROCESS_GROUP, child_environment

_Key = tuple[tuple[str, ...], tuple[tuple[str, str], ...]]  # (preload, worker_env's items)
_SERVERS: dict[_Key, ForkServer] = {}
FORK_TIMEOUT_S = 120.0  # a fork request waits this long at most (the server may be importing)
_SERVERS_LOCK = threading.Lock()


def _readable(fd: int, timeout: float) -> bool:
    """Is `fd` readable (or at EOF) within `timeout` s?  poll(), not select(): a VMM may
    hold descriptors numbered above select()'s 1023."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poll_events(poller, timeout))


def import_preload(preload: Sequence[str]) -> None:
    """Import each ``module`` (and call each ``module:function``) of `preload`.  Raises
    what the import or the call raises."""
    for entry in preload:
        name, _, function = entry.partition(":")
        module = importlib.import_module(name)
        if function:
            getattr(module, function)()


def serve(listener_fd: int, alive_r: int, ready_w: int, preload: list[str],
          main: dict[str, Any]) -> None:
    """The server process's main: import the owner's ``__main__`` as its children would
    (`main`: spawn's preparation data about it), import (and call) the preloads, say so
    on `ready_w`, then serve forks."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the owner handles Ctrl-C, and stops us
    # Once here, not in every child: a child finds it imported and skips it.
    # (multiprocessing's forkserver asks for "main_path", a key spawn no longer writes.)
    try:
        spawn.prepare(main)
    except Exception:  # a child that needs it fails with its own error
        pass
    for entry in preload:
        try:
            import_preload([entry])
        except Exception:  # a worker that needs it fails with its own error, in its job
            pass
    try:
        os.write(ready_w, b"\1")
    except BrokenPipeError:
        pass  # the owner stopped us meanwhile: forkserver.main sees it and returns
    os.close(ready_w)
    forkserver.main(listener_fd, alive_r, [])


class ForkServer:
    """One fork server process (module docstring).  Thread-safe; start() is lazy."""

    def __init__(self, preload: Sequence[str], worker_env: Mapping[str, str]) -> None:
        self.preload = tuple(preload)
        self.worker_env = dict(worker_env)
        self.key: _Key = (self.preload, tuple(sorted(self.worker_env.items())))
        self._lock = threading.Lock()
        self._server: subprocess.Popen[bytes] | None = None
        self._address: str | None = None
        self._alive_w: int | None = None
        self._ready_r: int | None = None  # until the server said it is ready

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs."""
        return self._server.pid if self._server is not None else None

    def held_fds(self) -> tuple[int, ...]:
        """The descriptors this process holds for the server while it runs."""
        return tuple(fd for fd in (self._alive_w, self._ready_r) if fd is not None)

    def start(self) -> None:
        """Start the server if it is not running (returns at once: it imports in the
        background; the first fork waits for it).  Raises PoolError if it cannot start."""
        with self._lock:
            self._start_locked()

    def _start_locked(self) -> None:
        if self._server is not None:
            if self._server.poll() is None:
                return
            self._forget_locked()  # it died: start another
        resource_tracker.ensure_running()
        data = spawn.get_preparation_data("ignore")
        main = {key: value for key, value in data.items()
                if key in ("init_main_from_name", "init_main_from_path", "sys_path")}
        listener = socket.socket(socket.AF_UNIX)
        alive_r, alive_w = os.pipe()
        ready_r, ready_w = os.pipe()
        try:
            address = cast(str, connection.arbitrary_address("AF_UNIX"))  # type: ignore[attr-defined]
            listener.bind(address)
            os.chmod(address, 0o600)
            listener.listen()
            command = (f"from engine.pool._forkserver import serve; "
                       f"serve({listener.fileno()}, {alive_r}, {ready_w}, {list(self.preload)!r}, "
                       f"{main!r})")
            self._server = subprocess.Popen(
                [spawn.get_executable(), "-c", command],
                pass_fds=(listener.fileno(), alive_r, ready_w), env=child_environment(self.worker_env),
                restore_signals=False, stdin=subprocess.DEVNULL, process_group=OWN_PROCESS_GROUP)
        except OSError as exc:
            os.close(alive_w)
            os.close(ready_r)
            raise PoolError(f"could not start the fork server: {exc}") from exc
        finally:
            listener.close()
            os.close(alive_r)
            os.close(ready_w)
        self._address, self._alive_w, self._ready_r = address, alive_w, ready_r

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Start the server if needed and wait until it has imported its preloads.
        Raises PoolError if it died first or `timeout` passed."""
        with self._lock:
            self._start_locked()
            ready_r = self._ready_r
            if ready_r is None:
                return
            if not _readable(ready_r, timeout):
                raise PoolError(f"the fork server did not start within {timeout:.0f} s")
            answer = os.read(ready_r, 1)
            os.close(ready_r)
            self._ready_r = None
            if not answer:
                raise PoolError("the fork server exited while it started")

    def connect_to_new_process(self, fds: list[int]) -> tuple[int, int]:
        """Ask the server for a child; answer (status_r, data_w) as multiprocessing's does."""
        with self._lock:
            self._start_locked()
            address, alive_w = self._address, self._alive_w
        assert address is not None and alive_w is not None
        if len(fds) + 4 >= forkserver.MAXFDS_TO_SEND:
            raise ValueError("too many fds")
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(address)
            parent_r, child_w = os.pipe()
            child_r, parent_w = os.pipe()
            try:
                tracker = cast(int, resource_tracker.getfd())
                reduction.sendfds(client, [child_r, child_w, alive_w, tracker, *fds])
            except BaseException:
                os.close(parent_r)
                os.close(parent_w)
                raise
            finally:
                os.close(child_r)
                os.close(child_w)
        return parent_r, parent_w

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server and wait for it (its running workers keep running; the server
        goes when the last of them has).  Idempotent."""
        with self._lock:
            server = self._server
            if server is None:
                return
            # Still importing: it has forked nothing yet, so nothing needs it; do not
            # wait for its imports (a command that failed at once exits at once).
            starting = self._ready_r is not None and not _readable(self._ready_r, 0)
            self._forget_locked()
            if starting:
                server.kill()
            try:
                server.wait(timeout)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()

    def _forget_locked(self) -> None:
        if self._ready_r is not None:
            os.close(self._ready_r)
        if self._alive_w is not None:
            os.close(self._alive_w)  # EOF on its "alive" pipe: the server exits
        if self._address is not None:
            try:
                os.unlink(self._address)
            except FileNotFoundError:
                pass
        self._server, self._address, self._alive_w, self._ready_r = None, None, None, None


class _ServerPopen(popen_forkserver.Popen):
    """``popen_forkserver.Popen`` that asks the process's :class:`ForkServer`."""

    _fds: list[int]  # the base class's: descriptors the child gets (its DupFd indices)

    def __init__(self, process_obj: _ServerProcess) -> None:
        with _SERVERS_LOCK:
            self._server = _SERVERS[process_obj.fork_server_key]
        super().__init__(process_obj)

    def _launch(self, process_obj: process.BaseProcess) -> None:  # CPython 3.11's, our server
        prep_data = spawn.get_preparation_data(process_obj.name)
        buf = io.BytesIO()
        set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            set_spawning_popen(None)
        self.sentinel, w = self._server.connect_to_new_process(self._fds)
        parent_w = os.dup(w)
        self.finalizer = util.Finalize(self, util.close_fds,  # type: ignore[attr-defined]
                                       (parent_w, self.sentinel))
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        # A deadlock guard only: a server stuck in its imports must not hang the pool.
        if not _readable(self.sentinel, FORK_TIMEOUT_S):
            raise PoolError(f"the fork server forked no worker within {FORK_TIMEOUT_S:.0f} s")
        self.pid = forkserver.read_signed(self.sentinel)


class _ServerProcess(ForkServerProcess):
    # The server's key in _SERVERS, not the server: the process object is pickled.
    def __init__(self, *args: Any, fork_server_key: _Key, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fork_server_key = fork_server_key

    @staticmethod
    def _Popen(process_obj: process.BaseProcess) -> _ServerPopen:  # noqa: N802 (multiprocessing's name)
        return _ServerPopen(cast(_ServerProcess, process_obj))


def fork_server(preload: Sequence[str] = (), worker_env: Mapping[str, str] | None = None) -> ForkServer:
    """This process's fork server for `preload` and `worker_env` (default: the pool's
    :data:`~engine.pool.DEFAULT_WORKER_ENV`); not started until asked to."""
    candidate = ForkServer(preload, DEFAULT_WORKER_ENV if worker_env is None else worker_env)
    with _SERVERS_LOCK:
        return _SERVERS.setdefault(candidate.key, candidate)


def stop_fork_servers() -> None:
    """Stop every fork server of this process (also done at exit)."""
    with _SERVERS_LOCK:
        servers = list(_SERVERS.values())
    for server in servers:
        server.stop()


def fork_server_pids() -> set[int]:
    """The pids of this process's running fork servers (for leak checks)."""
    with _SERVERS_LOCK:
        return {pid for server in _SERVERS.values() if (pid := server.pid) is not None}


def fork_server_fds() -> set[int]:
    """The descriptors this process holds for its running fork servers (for leak checks)."""
    with _SERVERS_LOCK:
        return {fd for server in _SERVERS.values() for fd in server.held_fds()}


def server_process_factory(server: ForkServer) -> Callable[..., process.BaseProcess]:
    """``Process(**kwargs)`` whose children `server` forks."""
    return lambda **kwargs: _ServerProcess(fork_server_key=server.key, **kwargs)


atexit.register(stop_fork_servers)
