"""The process backend's wire: frames on a worker's socketpair, and how jobs and results pickle.

Each worker talks to the pool over its own ``socket.socketpair()``.  One frame
per job and per result, the same both ways::

    0          8          12     14
    ┌──────────┬──────────┬──────┬──────────────────────────────────┐
    │  job id  │  length  │ nfds │ payload: `length` bytes (pickle) │
    └──────────┴──────────┴──────┴──────────────────────────────────┘
      u64        u32        u16    network byte order

The `nfds` descriptors (the sockets and cancel tokens among a job's arguments)
ride as SCM_RIGHTS on the ``sendmsg()`` that carries the frame's first byte, so
they reach the reader no later than their frame; the reader queues them in
order.  A job is ``pickle((fn, args, kwargs))`` with each socket, and each
:class:`~engine.pool.CancelToken` (its wait end), replaced by a persistent id; a
result is ``pickle((ok, value or exception, traceback text))``.
"""

from __future__ import annotations

import io
import os
import pickle
import socket
import struct
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

from engine.errors import PoolError
from engine.pool._core import MAX_MESSAGE_BYTES
from engine.pool._token import CancelToken, close_in_forked_child

# job id (u64), payload length (u32), descriptor count (u16): see the module docstring.
FRAME = struct.Struct("!QIH")
MAX_FDS = 250  # per frame; Linux refuses more than 253 (SCM_MAX_FD) in one message
_RECV_CHUNK = 256 * 1024


class FrameReader:
    """Reassembles frames from stream chunks and the descriptors received with them."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._fds: deque[int] = deque()

    def receive(self, sock: socket.socket) -> bool:
        """One ``recvmsg()`` from `sock`; False at EOF.  Raises BlockingIOError when a
        non-blocking `sock` has nothing, PoolError if descriptors were cut off."""
        data, fds, flags, _ = socket.recv_fds(sock, _RECV_CHUNK, MAX_FDS)
        self._buffer += data
        self._fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            raise PoolError("descriptors were lost in transit (MSG_CTRUNC)")
        return bool(data)

    def next_frame(self) -> tuple[int, bytes, list[int]] | None:
        """The next whole frame as (job id, payload, descriptors), or None for more data.
        Raises PoolError for a frame over the caps, or one whose descriptors are missing."""
        if len(self._buffer) < FRAME.size:
            return None
        job_id, length, nfds = FRAME.unpack_from(self._buffer)
        if length > MAX_MESSAGE_BYTES or nfds > MAX_FDS:
            raise PoolError(f"corrupt frame: {length} bytes, {nfds} descriptors")
        end = FRAME.size + length
        if len(self._buffer) < end:
            return None
        if len(self._fds) < nfds:
            raise PoolError("corrupt frame: its descriptors did not come with it")
        payload = bytes(self._buffer[FRAME.size:end])
        del self._buffer[:end]
        return job_id, payload, [self._fds.popleft() for _ in range(nfds)]

    def close(self) -> None:
        """Close the descriptors received and not handed out."""
        while self._fds:
            os.close(self._fds.popleft())


class _JobPickler(pickle.Pickler):
    """Pickles a job, replacing each socket (and each token's wait end) by the index of
    a dup sent by SCM_RIGHTS."""

    def __init__(self, file: io.BytesIO, sockets: list[socket.socket]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._sockets = sockets

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, CancelToken):
            kind, sock = "token", obj.wait_end()
        elif isinstance(obj, socket.socket):
            kind, sock = "socket", obj
        else:
            return None
        dup = sock.dup()  # now: the caller may close its socket once submit() returns
        close_in_forked_child(dup)
        self._sockets.append(dup)
        return (kind, len(self._sockets) - 1, int(sock.family), int(sock.type), sock.proto)


class JobUnpickler(pickle.Unpickler):
    """Unpickles a job, making each socket id a socket on the received descriptor (and
    each token id a view of the token on it); the job's sockets go to `adopted`."""

    def __init__(self, payload: bytes, fds: list[int], adopted: list[socket.socket]) -> None:
        super().__init__(io.BytesIO(payload))
        self._fds = fds
        self._adopted = adopted

    def persistent_load(self, pid: Any) -> Any:
        kind, index, family, type_, proto = pid
        if kind not in ("socket", "token") or not 0 <= index < len(self._fds) \
                or self._fds[index] < 0:
            raise pickle.UnpicklingError(f"bad persistent id {pid!r}")
        sock = socket.socket(family, type_, proto, fileno=self._fds[index])
        self._fds[index] = -1  # the socket object owns it now
        self._adopted.append(sock)
        return sock if kind == "socket" else CancelToken(sock)


def encode_job(fn: Callable[..., Any], args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> tuple[bytes, list[socket.socket]]:
    """Pickle a job; answer the payload and the dup'd sockets to send with it.
    Raises PoolError (from the pickling error) if the job cannot be sent."""
    buffer = io.BytesIO()
    sockets: list[socket.socket] = []
    try:
        try:
            _JobPickler(buffer, sockets).dump((fn, args, kwargs))
        except Exception as exc:
            raise PoolError(f"cannot send the job to a worker process: {exc}") from exc
        if len(sockets) > MAX_FDS:
            raise PoolError(f"a job may carry {MAX_FDS} sockets at most, not {len(sockets)}")
        if buffer.tell() > MAX_MESSAGE_BYTES:
            raise PoolError(f"the job pickles to {buffer.tell()} bytes, over the "
                            f"{MAX_MESSAGE_BYTES}-byte cap: pass descriptors, not data")
    except PoolError:
        for sock in sockets:
            sock.close()
        raise
    return buffer.getvalue(), sockets


def encode_reply(ok: bool, value: Any, tb: str | None) -> bytes:
    """Pickle a job's outcome; one that cannot cross becomes a PoolError."""
    try:
        data = pickle.dumps((ok, value, tb), protocol=pickle.HIGHEST_PROTOCOL)
        if not ok:
            pickle.loads(data)  # an exception that cannot be rebuilt would fail the owner
    except Exception as exc:
        what = "result" if ok else f"exception ({type(value).__qualname__})"
        error = PoolError(f"the job's {what} cannot be pickled: {exc!r}")
        return pickle.dumps((False, error, tb or "".join(traceback.format_exception(exc))))
    if len(data) > MAX_MESSAGE_BYTES:
        error = PoolError(f"the job's result pickles to {len(data)} bytes, over the "
                          f"{MAX_MESSAGE_BYTES}-byte cap")
        return pickle.dumps((False, error, tb))
    return data
