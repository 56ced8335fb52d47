"""A listener that cannot be set up is a clear TransportBrokenError, and leaks nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import TransportBrokenError
from engine.transport import listen


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
