"""A listener that cannot be set up is a clear TransportBrokenError, and leaks nothing."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

from engine import DestinationMigration
from engine.errors import TransportBrokenError
from engine.transport import listen
from tests.harness import SECRET


def test_tcp_port_in_use() -> None:
    first = listen("tcp://127.0.0.1:0")
    try:
        with pytest.raises(TransportBrokenError, match=f"cannot listen on {first.address}"):
            listen(first.address)
    finally:
        first.close()


def test_unix_socket_in_a_missing_directory(tmp_path: Path) -> None:
    uri = f"unix://{tmp_path}/no/such/dir.sock"
    with pytest.raises(TransportBrokenError, match=f"cannot listen on {uri}: No such file"):
        listen(uri)


def test_a_destination_that_cannot_listen_releases_what_it_made() -> None:
    """The operation's latch (a pipe) is made before the listen: an object whose
    constructor raised can never be closed, so the constructor releases it."""
    first = listen("tcp://127.0.0.1:0")
    gc.disable()  # the constructor's own cleanup, not the collector's, must do it
    try:
        with pytest.raises(TransportBrokenError):  # warm (imports, the fork server)
            DestinationMigration(first.address, secret=SECRET)
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(20):
            with pytest.raises(TransportBrokenError, match="cannot listen on"):
                DestinationMigration(first.address, secret=SECRET)
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        gc.enable()
        first.close()
