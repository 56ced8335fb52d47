"""unix:// listening where a killed listener left its socket file."""

from __future__ import annotations

import socket
import threading
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


def test_a_live_listener_with_a_full_backlog_is_not_waited_for(tmp_path: Path) -> None:
    """The stale-file probe never blocks: a connect to a live listener whose queue is
    full would wait without limit, so it counts as live at once."""
    path = tmp_path / "busy.sock"
    busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    busy.bind(str(path))
    busy.listen(0)
    queued = []
    try:
        while True:  # fill its queue
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            queued.append(client)
            try:
                client.connect(str(path))
            except BlockingIOError:
                break
        errors: list[BaseException] = []

        def try_listen() -> None:
            try:
                listen(f"unix://{path}").close()
            except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
                errors.append(exc)

        attempt = threading.Thread(target=try_listen, name="test-listen")
        attempt.start()
        attempt.join(10)
        assert not attempt.is_alive(), "listen() waited on a live listener's full queue"
        assert len(errors) == 1 and "Address already in use" in str(errors[0])
        assert path.exists()
    finally:
        for client in queued:
            client.close()
        busy.close()
