"""Bytes after END on a multifd channel (docs/wire-format.md §2.4): never read as
packets, and the migration fails before anything is committed, whether they came
with END (in its record: seen by the channel) or after it (seen by the
destination's main process when COMPLETE comes).

A hand-made source (tests/protocol.py) drives a real destination.
"""

from __future__ import annotations

import pytest

from engine import DestinationMigration, MigrationConfig
from engine.wire import message as wire
from engine.wire import packet
from tests.harness import SECRET, MiB, guest_ram, wait_until
from tests.protocol import ChannelWriter, HandMadeSource, barrier, final_answer

pytestmark = pytest.mark.usefixtures("no_leaks")

FAST = MigrationConfig(handshake_timeout_s=2.0)


def _migrate(after_end: str) -> tuple[wire.Message, DestinationMigration]:
    """One channel, nothing but END and COMPLETE; `after_end` says what follows END:
    "" nothing, "with" a SYNC in END's own record, "later" raw bytes once END was read."""
    with guest_ram(1 * MiB, fill="zero") as dst:
        destination = DestinationMigration("tcp://127.0.0.1:0", secret=SECRET, ram=dst, config=FAST,
                                           ram_is_zeroed=True)
        destination.start()
        source = HandMadeSource(destination, list(dst.layout), channels=1)
        try:
            (sock,) = source.join_all()
            channel = ChannelWriter(sock)
            source.send(wire.Switchover())
            end = packet.encode_end(channel.sequence, 0)
            sock.sendall(end + packet.encode_sync(channel.sequence + 1, 0) if after_end == "with" else end)
            if after_end == "later":
                wait_until(lambda: barrier(destination).all_ended, "END to be read", timeout=10)
                sock.sock.sendall(b"bytes after END")  # raw: not even a record
            source.send(wire.Complete(0))
            answer = final_answer(source)
            try:
                destination.wait(10)
            except Exception:
                pass
        finally:
            source.close()
        return answer, destination


def test_nothing_after_end_completes() -> None:
    answer, destination = _migrate("")
    assert isinstance(answer, wire.Resumed), answer
    assert destination.result is not None and "late_channel_failures" not in destination.result.extra


@pytest.mark.parametrize("after_end", ["with", "later"])
def test_bytes_after_end_fail_the_migration_before_the_commit(after_end: str) -> None:
    answer, destination = _migrate(after_end)
    assert isinstance(answer, wire.Abort), answer
    assert "bytes after END on multifd channel 0" in answer.message
    assert not destination.committed
