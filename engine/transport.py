"""Transports: how bytes move between the two sides.  They know nothing of pages.

A transport module (``transports/tcp.py``, ``transports/unix.py``) turns a URI
into a connected :class:`Connection` (``connect``) or a :class:`Listener`
(``listen``); ``transports/file.py`` opens snapshot files.  The engine names no
transport: a scheme is found in the registry, and a scheme not registered yet is
looked up among the installed packages' ``multifd.transports`` entry points
(pyproject.toml lists the built-in ones), whose module registers itself when
imported.  Third parties add schemes the same way, or call
:func:`register_transport` directly.

Every socket error is translated to the engine's tree here, in one place:
EOF → TransportClosedError; reset, refused, timeout → TransportBrokenError.
"""

from __future__ import annotations

import errno
import importlib.metadata
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from engine.errors import (
    ConfigError,
    MigrationError,
    SnapshotError,
    TransportBrokenError,
    TransportClosedError,
)
from engine.scatter import IOV_MAX, Buffer, advance, batch, flat_views
from engine.sync import Pollable, wait_readable, wait_writable


def broken(exc: OSError, what: str) -> TransportBrokenError | TransportClosedError:
    """The one-line error a failed socket call becomes (`what`: "send to PEER", ...)."""
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return TransportBrokenError(f"{what}: timed out")
    if exc.errno in (errno.EPIPE, errno.ECONNRESET):  # the link failed: broken, not closed
        return TransportBrokenError(f"{what}: connection broken ({exc.strerror})")
    if exc.errno in (errno.ESHUTDOWN, errno.ENOTCONN):
        return TransportClosedError(f"{what}: connection closed ({exc.strerror})")
    return TransportBrokenError(f"{what}: {exc.strerror or exc}")


class Connection:
    """A connected, reliable byte stream over a socket.

    ``send_buffers`` writes a list of buffers with as few system calls as the
    kernel allows (``sendmsg``); ``recv_into_buffers`` scatters exactly the bytes
    that fill the given buffers (``recvmsg_into``): page data goes from guest
    memory to the socket and from the socket to guest memory with no copy in
    Python.
    """

    def __init__(self, sock: socket.socket, peer: str = "") -> None:
        self.sock = sock
        self.peer = peer or _describe(sock)

    def fileno(self) -> int:
        return self.sock.fileno()

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)

    def send_buffers(self, buffers: Sequence[Buffer]) -> int:
        """Write every byte of every buffer, in order.  Returns the byte count.

        Each ``sendmsg`` carries at most :data:`SEND_STEP` bytes (see there).
        """
        views = flat_views(buffers)
        total = sum(v.nbytes for v in views)
        start = 0
        try:
            while start < len(views):
                start = advance(views, start, self.sock.sendmsg(batch(views, start)))
        except OSError as exc:
            raise self._failed(exc, f"send to {self.peer}") from exc
        return total

    def send_all(self, data: Buffer) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise self._failed(exc, f"send to {self.peer}") from exc

    def recv_into_buffers(self, buffers: Sequence[memoryview]) -> int:
        """Fill every buffer completely, in order.  Returns the byte count.

        Raises TransportClosedError if the stream ends before they are full.
        """
        views = [b for b in buffers if b.nbytes]
        total = sum(v.nbytes for v in views)
        start = 0
        try:
            while start < len(views):
                got = self.sock.recvmsg_into(views[start:start + IOV_MAX])[0]
                if got == 0:
                    raise TransportClosedError(f"{self.peer} closed the connection mid-packet")
                start = advance(views, start, got)
        except OSError as exc:
            raise self._failed(exc, f"receive from {self.peer}") from exc
        return total

    def recv_exact(self, n: int) -> bytes:
        """Read exactly `n` bytes.  Raises TransportClosedError on early EOF."""
        buf = bytearray(n)
        self.recv_into_buffers([memoryview(buf)])
        return bytes(buf)

    def _failed(self, exc: OSError, what: str) -> MigrationError:
        """The error a failed socket call becomes: every method here raises it, so a
        subclass (TLS, which says more) overrides only this."""
        return broken(exc, what)

    def recv_exact_or_eof(self, n: int) -> bytes | None:
        """Read exactly `n` bytes, or return None on EOF before the first byte."""
        buf = bytearray(n)
        view = memoryview(buf)
        try:
            got = self.sock.recv_into(view, n)
        except OSError as exc:
            raise self._failed(exc, f"receive from {self.peer}") from exc
        if got == 0:
            return None
        if got < n:
            self.recv_into_buffers([view[got:]])
        return bytes(buf)

    def recv_some(self, max_bytes: int = 65536) -> bytes:
        """Whatever is available (blocking for at least one byte); b"" at EOF."""
        try:
            return self.sock.recv(max_bytes)
        except OSError as exc:
            raise self._failed(exc, f"receive from {self.peer}") from exc

    def send_with_fds(self, data: bytes, fds: Sequence[int]) -> None:
        """Write all of `data`, its first byte carrying `fds` (SCM_RIGHTS: the
        receiver gets its own descriptors of the same open files).  Unix sockets
        only; the descriptors stay open here."""
        if self.sock.family != socket.AF_UNIX:
            raise ConfigError(f"descriptors can only be passed over a unix socket, not to {self.peer}")
        try:
            sent = socket.send_fds(self.sock, [data], list(fds))
            if sent < len(data):
                self.sock.sendall(data[sent:])
        except OSError as exc:
            raise self._failed(exc, f"send to {self.peer}") from exc

    def recv_some_with_fds(self, max_fds: int, max_bytes: int = 65536) -> tuple[bytes, list[int]]:
        """:meth:`recv_some`, also taking the descriptors that came with those bytes
        (at most `max_fds`; the caller owns and closes them).  More descriptors
        than that is a TransportBrokenError (the kernel closed the excess)."""
        try:
            data, fds, flags, _ = socket.recv_fds(self.sock, max_bytes, max(1, max_fds))
        except OSError as exc:
            raise self._failed(exc, f"receive from {self.peer}") from exc
        if flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            raise TransportBrokenError(f"{self.peer} sent more than {max_fds} descriptors")
        return data, list(fds)
    def pending(self) -> int:
        """Bytes received and held in this process (a poll on the socket cannot see
        them): 0 here; a TLS connection may hold decrypted bytes."""
        return 0

    def peek(self) -> bool | None:
        """Without blocking or reading: True if received bytes wait to be read (held
        in this process, :meth:`pending`, or in the socket), None at the peer's end
        of the stream (EOF, or an error), False while nothing came."""
        if self.pending():
            return True
        if not self.readable(0):  # (a socket with a timeout would wait it out in recv)
            return False
        try:  # the plain socket's recv (a TLS one's too: its records): peek, never consume
            return True if socket.socket.recv(self.sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT) else None
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return None

    def readable(self, timeout: float = 0.0) -> bool:
        """True if a read would not block (data, EOF or an error are waiting)."""
        return bool(wait_readable([self.sock], timeout))

    def shutdown_read(self) -> None:
        """Wake a reader blocked on this socket (it sees EOF); writing still works."""
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def shutdown(self) -> None:
        """Stop both directions, waking any thread or process blocked on this socket."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def bind_and_listen(sock: socket.socket, address: object, uri: str) -> None:
    """Bind `sock` to `address` and listen; on failure close it and raise
    TransportBrokenError naming `uri`."""
    try:
        sock.bind(address)  # type: ignore[arg-type]
        sock.listen(socket.SOMAXCONN)  # the kernel's cap: a burst of strangers waits, not the source
    except OSError as exc:
        sock.close()
        raise TransportBrokenError(f"cannot listen on {uri}: {exc.strerror or exc}") from exc


def connect_socket(
    sock: socket.socket, address: object, timeout: float, abort: Pollable | None, what: str
) -> None:
    """Connect `sock` within `timeout` s; give up at once when `abort` becomes readable.

    Raises TransportBrokenError (refused, unreachable, timed out, aborted); the
    socket is left blocking.
    """
    sock.setblocking(False)
    try:
        error = sock.connect_ex(address)  # type: ignore[arg-type]
        if error in (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
            writable = wait_writable([sock], timeout, abort)
            if abort is not None and wait_readable([abort], 0):
                raise TransportBrokenError(f"connecting to {what} was aborted")
            if not writable:
                raise TransportBrokenError(f"cannot connect to {what}: timed out")
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise TransportBrokenError(f"cannot connect to {what}: {os.strerror(error)}")
    finally:
        sock.setblocking(True)


class Listener(Protocol):
    """A bound, listening endpoint."""

    address: str  # a URI that reaches it, with the real port once bound

    def fileno(self) -> int: ...
    def accept(self, timeout: float | None) -> Connection: ...
    def close(self) -> None: ...


class SocketListener:
    """A listening socket; :meth:`accept` hands out :class:`Connection` objects."""

    def __init__(self, sock: socket.socket, address: str, cleanup: Callable[[], None] | None = None):
        self.sock = sock
        self.address = address
        self._cleanup = cleanup

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self, timeout: float | None) -> Connection:
        """Wait up to `timeout` seconds for a connection.  Raises TransportBrokenError."""
        self.sock.settimeout(timeout)
        try:
            conn, _ = self.sock.accept()
        except OSError as exc:
            raise broken(exc, f"accept on {self.address}") from exc
        conn.settimeout(None)
        return Connection(conn)

    def close(self) -> None:
        self.sock.close()
        if self._cleanup is not None:
            self._cleanup()
            self._cleanup = None


def close_all(conns: Iterable[Connection]) -> None:
    """Close every connection (closing one twice is harmless)."""
    for conn in conns:
        conn.close()


def _describe(sock: socket.socket) -> str:
    try:
        peer = sock.getpeername()
    except OSError:
        return "peer"
    if isinstance(peer, tuple):
        return f"{peer[0]}:{peer[1]}"
    return str(peer) or "unix peer"


# ---------------------------------------------------------------------------
# The registry: URI scheme -> transport module.


ConnectFn = Callable[[str, float, "Pollable | None"], Connection]


@dataclass(frozen=True)
class TransportEntry:
    connect: ConnectFn
    listen: Callable[[str], Listener]


_REGISTRY: dict[str, TransportEntry] = {}
_FILE_OPENERS: dict[str, Callable[..., PositionalFile]] = {}  # "file": the one there is
ENTRY_POINTS = "multifd.transports"


def register_transport(scheme: str, connect: ConnectFn, listen: Callable[[str], Listener]) -> None:
    """Make ``scheme://`` URIs usable with :func:`connect` and :func:`listen`."""
    _REGISTRY[scheme] = TransportEntry(connect, listen)


def register_file_transport(open_file: Callable[..., PositionalFile]) -> None:
    """Install the opener :func:`open_file` uses for snapshot files."""
    _FILE_OPENERS["file"] = open_file


def _installed(scheme: str) -> bool:
    """Import the module an installed package declares for `scheme` (it registers
    itself).  False if no package declares one."""
    found = importlib.metadata.entry_points(group=ENTRY_POINTS, name=scheme)
    for entry in found:
        entry.load()
    return bool(found)


def check_address(uri: object) -> None:
    """ConfigError unless `uri` is an address of a known transport (its host and
    port are checked when it is used)."""
    _entry(uri)


def _entry(uri: object) -> TransportEntry:
    if not isinstance(uri, str):
        raise ConfigError(f"an address is a string such as tcp://HOST:PORT or unix:///PATH, not {uri!r}")
    try:
        scheme = urlsplit(uri).scheme
    except ValueError as exc:  # "Invalid IPv6 URL": a '[' without its ']'
        raise ConfigError(f"address {uri!r} is not a URL: {exc}") from None
    if not scheme:
        raise ConfigError(f"address {uri!r} has no scheme; use e.g. tcp://HOST:PORT or unix:///PATH")
    if scheme not in _REGISTRY:
        _installed(scheme)
    try:
        return _REGISTRY[scheme]
    except KeyError:
        declared = {e.name for e in importlib.metadata.entry_points(group=ENTRY_POINTS)} - {"file"}
        known = sorted(set(_REGISTRY) | declared)
        raise ConfigError(f"unknown transport {scheme!r} in {uri!r}; known: {known}") from None


def connect(uri: str, timeout: float = 10.0, abort: Pollable | None = None) -> Connection:
    """Open a connection to `uri`, giving up when `abort` becomes readable.

    Raises ConfigError or TransportBrokenError.
    """
    return _entry(uri).connect(uri, timeout, abort)


def listen(uri: str) -> Listener:
    """Bind and listen on `uri`.  Raises ConfigError or TransportBrokenError."""
    return _entry(uri).listen(uri)


# ---------------------------------------------------------------------------
# Files: positional I/O for snapshots (the ``file`` entry point: transports/file.py).


class PositionalFile(Protocol):
    """An open snapshot file (transports/file.py's SnapshotFile)."""

    path: str

    def write_at(self, offset: int, buffers: Sequence[Buffer]) -> int: ...
    def read_into(self, offset: int, buffers: Sequence[Buffer]) -> int: ...
    def read_at(self, offset: int, length: int) -> bytes: ...
    def size(self) -> int: ...
    def identity(self) -> tuple[int, int]: ...
    def sync(self) -> None: ...
    def publish(self) -> str: ...
    def discard(self) -> None: ...
    def close(self) -> None: ...


def open_file(path: str, mode: str, direct_io: bool = False,
              identity: tuple[int, int] | None = None) -> PositionalFile:
    """Open a snapshot file: ``create`` (a partial file for target `path`),
    ``write`` or ``read``.  `identity`: the file another process opened at `path`
    (its :meth:`PositionalFile.identity`), which this one must be too (a channel
    opens by name).  Raises SnapshotError."""
    if "file" not in _FILE_OPENERS and not _installed("file"):
        raise ConfigError(f"no file transport is installed to open {path}")
    file = _FILE_OPENERS["file"](path, mode, direct_io)
    if identity is not None and file.identity() != identity:
        file.close()
        raise SnapshotError(f"{path} was replaced while in use: another file took its name "
                            f"(renamed over it, or written anew); nothing was read from that one")
    return file
