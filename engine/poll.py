"""``poll()`` for any timeout: the one place a wait's seconds become poll()'s milliseconds.

A leaf (standard library only), so that the worker pool, which knows nothing of
the engine's latch or states, and :mod:`engine.sync`'s waits share it.  A wait
longer than poll() can take (a C int of milliseconds, ~24.8 days) goes round
again instead of raising OverflowError.
"""

from __future__ import annotations

import math
import select
import time

MAX_POLL_MS = 2**31 - 1  # poll() takes a C int


def poll_events(poller: select.poll, timeout: float | None) -> list[tuple[int, int]]:
    """``poller.poll()`` until it reports an event or `timeout` seconds passed
    (None: wait for ever; zero or negative: do not wait).  Returns its
    ``(fd, events)`` pairs, ``[]`` once the time is up.  Milliseconds are
    rounded up: waking a hair early would only spin."""
    deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
    while True:
        if deadline is None:
            ms = None
        else:
            ms = min(math.ceil(max(0.0, deadline - time.monotonic()) * 1000), MAX_POLL_MS)
        try:
            events = poller.poll(ms)
        except InterruptedError:  # Python retries EINTR itself (PEP 475); belt and braces
            continue
        if events or deadline is None or time.monotonic() >= deadline:
            return events
