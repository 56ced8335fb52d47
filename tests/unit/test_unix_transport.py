"""unix:// listening where a killed listener left its socket file."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from engine.errors import TransportBrokenError
from engine.transport import listen


def test_a_stale_socket_file_is_replaced_and_a_live_one_is_not(tmp_path: Path) -> None:
    """A listener killed with SIGKILL cannot remove its socket file: the next one
    binds there anyway.  A path a live listener holds, or a regular file, is refused."""
    path = tmp_path / "migration.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.listen(1)
    dead.close()  # the file stays, nobody listens: as after SIGKILL
    listener = listen(f"unix://{path}")
    try:
        with pytest.raises(TransportBrokenError, match="Address already in use"):
            listen(f"unix://{path}")  # the live one keeps its path
    finally:
        listener.close()
    regular = tmp_path / "notes.txt"
    regular.write_text("keep me")
    with pytest.raises(TransportBrokenError, match="Address already in use"):
        listen(f"unix://{regular}")
    assert regular.read_text() == "keep me"
