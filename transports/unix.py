"""``unix:///PATH`` — Unix-domain stream sockets on this host."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from urllib.parse import urlsplit

from engine.errors import ConfigError
from engine.transport import (
    Connection,
    Pollable,
    SocketListener,
    bind_and_listen,
    connect_socket,
    register_transport,
)


def _path(uri: str) -> str:
    parts = urlsplit(uri)
    path = parts.path if not parts.netloc else f"/{parts.netloc}{parts.path}"
    if not path:
        raise ConfigError(f"expected unix:///PATH, got {uri!r}")
    return path


def connect(uri: str, timeout: float, abort: Pollable | None = None) -> Connection:
    path = _path(uri)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connect_socket(sock, path, timeout, abort, uri)
    except BaseException:
        sock.close()
        raise
    return Connection(sock, path)


def _remove_if_stale(path: str) -> None:
    """Remove `path` if it is a socket file nobody listens on (its listener was
    killed, and could not remove it).  Anything else (a live listener, its backlog
    full or not, a regular file) stays, for the bind to refuse.  The probe does not
    wait: a connect that cannot complete at once is a live listener.  Nothing there:
    no probe, so a usual listen sends nobody a connect."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    except OSError:
        pass
    finally:
        probe.close()


def listen(uri: str) -> SocketListener:
    path = _path(uri)
    _remove_if_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bind_and_listen(sock, path, uri)
    inode = os.stat(path).st_ino

    def remove_socket_file() -> None:
        # Only remove the file if it is still ours (not replaced by a new listener).
        try:
            if os.stat(path).st_ino == inode:
                os.unlink(path)
        except FileNotFoundError:
            pass

    return SocketListener(sock, f"unix://{path}", cleanup=remove_socket_file)


register_transport("unix", connect, listen)
