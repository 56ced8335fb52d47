"""The kernel's limit on this machine: the same bytes through plain sockets.

N sender processes each push one contiguous share of a shared-memory source
region with ``sendmsg`` of 1 MiB memoryview slices; N receiver processes
``recv_into`` the matching share of a destination region (allocated up front,
like the migration's destination RAM).  No headers, no scheduling, no sync:
what is left is what the kernel and the copies cost.  The processes run as jobs
on the engine's process pool, so they start the same way channels do.
"""

from __future__ import annotations

import socket
import time

from engine.pool import WorkerPool
from engine.shm import GuestRAM, RamHandle

CHUNK = 1 << 20


def _sender(handle: RamHandle, sock: socket.socket, start: int, length: int, go: socket.socket) -> None:
    ram = GuestRAM.attach(handle, populate=True)  # as channels do
    try:
        view = ram.blocks[0].pages
        go.send(b"r")  # attached and ready
        go.recv(1)     # wait for the start signal so process start-up is not timed
        for offset in range(start, start + length, CHUNK):
            sock.sendall(view[offset:min(offset + CHUNK, start + length)])
        del view
    finally:
        sock.close()
        go.close()
        ram.close()


def _receiver(
    handle: RamHandle, sock: socket.socket, start: int, length: int, ready: socket.socket
) -> float:
    ram = GuestRAM.attach(handle, populate=True)  # as channels do
    try:
        view = ram.blocks[0].pages[start:start + length]
        ready.send(b"r")
        ready.close()
        got = 0
        while got < length:
            n = sock.recv_into(view[got:], length - got)
            if not n:
                raise RuntimeError("sender closed early")
            got += n
        del view
        return time.perf_counter()
    finally:
        sock.close()
        ram.close()


def raw_socket_seconds(src: GuestRAM, dst: GuestRAM, streams: int) -> float:
    """Seconds to move all of `src` block 0 into `dst` block 0 over `streams` socket pairs."""
    size = src.blocks[0].size
    share = size // streams
    with WorkerPool("process", 2 * streams, name="bench-raw") as pool:
        go_main, ready_main, receivers = [], [], []
        for i in range(streams):
            start = i * share
            length = share if i < streams - 1 else size - start
            a, b = _tcp_pair()
            go_a, go_b = socket.socketpair()
            ready_a, ready_b = socket.socketpair()
            receivers.append(pool.submit(_receiver, dst.handle, b, start, length, ready_b))
            pool.submit(_sender, src.handle, a, start, length, go_b)
            for s in (a, b, go_b, ready_b):
                s.close()
            go_main.append(go_a)
            ready_main.append(ready_a)
        for peer in go_main + ready_main:  # every process started and attached
            if peer.recv(1) != b"r":
                raise RuntimeError("a baseline process failed to start")
        for peer in ready_main:
            peer.close()
        started = time.perf_counter()
        for go in go_main:
            go.send(b"!")
        finished = max(f.result() for f in receivers)
        for go in go_main:
            go.close()
    return finished - started


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair over loopback (the transport the migration uses)."""
    listener = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(listener.getsockname())
    b, _ = listener.accept()
    listener.close()
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return a, b
