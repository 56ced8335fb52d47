"""Scatter/gather: flat byte views and vectored-call batching.

A leaf module (standard library only): sockets (engine/transport.py) and files
(transports/file.py) move guest pages with ``sendmsg``/``recvmsg_into`` and
``pwritev``/``preadv`` in batches cut here, so no page is ever copied to be sent.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

Buffer = bytes | bytearray | memoryview

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


# Bytes per sendmsg call.  Measured over loopback, one stream from shared memory
# into pre-touched shared memory (bench/baseline.py's receiver), median of 5:
#   per call  256 KiB  1 MiB  2 MiB  8 MiB
#   GB/s      2.44     3.79   3.51   2.54
#   CPU ms/GiB 430     280    300    410
# Small calls pay per call; one huge call holds the socket lock so long that
# ACKs pile up in its backlog.  (Non-blocking attempts into a nearly full
# socket were worse still: they degenerate into many small copies.)
SEND_STEP = 1 << 20


def _flat(buffer: Buffer) -> memoryview:
    """A flat byte view of `buffer` (guest-page views already are: no cast)."""
    view = memoryview(buffer)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def flat_views(buffers: Sequence[Buffer]) -> list[memoryview]:
    """Flat byte views of the non-empty `buffers`, for scatter/gather calls."""
    views = [_flat(buffer) for buffer in buffers]
    return [view for view in views if view.nbytes]


def batch(views: list[memoryview], start: int, step: int = SEND_STEP) -> list[memoryview]:
    """The IOVs of the next vectored call: from views[start], at most `step` bytes
    and IOV_MAX buffers."""
    iovs: list[memoryview] = []
    size = 0
    for view in views[start:start + IOV_MAX]:
        take = min(view.nbytes, step - size)
        iovs.append(view if take == view.nbytes else view[:take])
        size += take
        if size >= step:
            break
    return iovs


def advance(views: list[memoryview], start: int, done: int) -> int:
    """Account for `done` bytes moved from views[start:]: skip the buffers they
    filled, trim the one they ended in.  Returns the new start."""
    while done and start < len(views):
        size = views[start].nbytes
        if done >= size:
            done -= size
            start += 1
        else:
            views[start] = views[start][done:]
            done = 0
    return start
