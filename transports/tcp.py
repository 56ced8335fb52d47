"""``tcp://HOST:PORT`` — TCP sockets (port 0 when listening picks a free port).

``tls://HOST:PORT`` is the same TCP transport: the engine runs TLS 1.3 on each
connection after its hello (engine/link.py), and requires TLS files for it.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

from engine.errors import ConfigError, TransportBrokenError
from engine.sync import wait_readable
from engine.transport import (
    Connection,
    Pollable,
    SocketListener,
    bind_and_listen,
    connect_socket,
    register_transport,
)


def _host_port(uri: str) -> tuple[str, int]:
    parts = urlsplit(uri)
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"bad port in {uri!r}") from exc
    if parts.hostname is None or port is None:
        raise ConfigError(f"expected tcp://HOST:PORT or tls://HOST:PORT, got {uri!r}")
    return parts.hostname, port


def _tune(sock: socket.socket) -> None:
    # Packets go out as one sendmsg of header + pages: Nagle would only add delay.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def connect(uri: str, timeout: float, abort: Pollable | None = None) -> Connection:
    host, port = _host_port(uri)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise TransportBrokenError(f"cannot resolve {uri}: {exc.strerror or exc}") from exc
    error: TransportBrokenError | None = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            connect_socket(sock, address, timeout, abort, uri)
        except TransportBrokenError as exc:
            sock.close()
            error = exc
            if abort is not None and wait_readable([abort], 0):
                break  # aborted: do not try the host's other addresses
            continue
        _tune(sock)
        return Connection(sock, f"{host}:{port}")
    assert error is not None
    raise error


def listen(uri: str) -> SocketListener:
    host, port = _host_port(uri)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise TransportBrokenError(f"cannot listen on {uri}: {exc.strerror or exc}") from exc
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    bind_and_listen(sock, addr, uri)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    return _TcpListener(sock, f"{urlsplit(uri).scheme}://{shown}:{bound_port}")


class _TcpListener(SocketListener):
    def accept(self, timeout: float | None) -> Connection:
        conn = super().accept(timeout)
        _tune(conn.sock)
        return conn


register_transport("tcp", connect, listen)
# tls://HOST:PORT is TCP too; the engine adds TLS 1.3 after each hello (engine/link.py)
register_transport("tls", connect, listen)
