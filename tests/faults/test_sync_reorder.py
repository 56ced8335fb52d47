"""The reorder the destination's sync barrier exists for (docs/architecture.md, "The multifd core").

Page P goes in epoch 1 on channel 0 (content 0xAA) and again in epoch 2 on
channel 1 (content 0xBB). The test forces, on the wire, the order in which a
destination without a barrier writes them the wrong way round:

    channel 1:  SYNC(1), P(epoch 2, 0xBB)          sent first
    main:       SYNC_MARKER(1)
    channel 0:  P(epoch 1, 0xAA), SYNC(1)          sent only after the marker

Channel 1's copy of P is on the destination's socket before channel 0's.  Only
the barrier (channel 1 stops reading at SYNC(1) until every channel reached it)
keeps the stale 0xAA from landing last.  A hand-made source (tests/protocol.py)
sends the packets, built with the codec, to a real DestinationMigration.
"""

from __future__ import annotations

import time

import pytest

from engine import DestinationMigration, MigrationConfig
from engine.errors import MigrationError
from engine.sync import ChannelState
from engine.wire import message as wire
from engine.wire import packet
from tests.harness import SECRET, MiB, guest_ram, wait_until
from tests.protocol import ChannelWriter, HandMadeSource, destination_failure, final_answer
from tests.protocol import barrier as protocol_barrier

pytestmark = pytest.mark.usefixtures("no_leaks")

PAGE = 4096
P = 37                 # the page sent twice, in block 0
OLD, NEW = 0xAA, 0xBB  # its content in epoch 1 (channel 0) and epoch 2 (channel 1)
# How long channel 1 is given to read past its SYNC before channel 0 sends its
# stale copy. With the barrier it cannot, and the test waits all of it; without
# it, P turns NEW within milliseconds and the wait ends there. The wait never
# decides the outcome with a barrier: there, channel 1 is released only after
# channel 0's SYNC, which follows channel 0's P on the same connection, so NEW
# lands last whatever the timing. It only makes sure a broken barrier shows.
HOLD_S = 0.5
FAST = MigrationConfig(handshake_timeout_s=2.0)


def _join(source: HandMadeSource) -> list[ChannelWriter]:
    """Open every channel with a hello from the codec; wait for CHANNELS_READY."""
    socks = [source.channel(source.channel_hello(i), i) for i in range(source.channels)]
    assert source.next_message() == wire.ChannelsReady()
    return [ChannelWriter(s) for s in socks]


def _sync(channel: ChannelWriter, epoch: int) -> None:
    channel.sock.sendall(packet.encode_sync(channel.sequence, epoch))
    channel.sequence += 1


def _page(channel: ChannelWriter, epoch: int, page: int, fill: int) -> None:
    header = packet.encode_ram_pages(channel.sequence, 0, 0, epoch, [(page, 1, False)], PAGE)
    channel.sock.sendall(header + bytes([fill]) * PAGE)
    channel.sequence += 1


def _complete(source: HandMadeSource, channels: list[ChannelWriter], final_epoch: int) -> wire.Message:
    """End the migration as a real source does (engine/source.py); the destination's answer.

    SWITCHOVER, END on every channel, COMPLETE(final_epoch), then whatever the
    destination answers (tests/protocol.py final_answer).
    """
    source.send(wire.Switchover())
    for channel in channels:
        channel.end(final_epoch)
    source.send(wire.Complete(final_epoch))
    return final_answer(source)


def test_a_page_of_the_next_epoch_is_not_overwritten_by_a_late_stale_copy() -> None:
    with guest_ram(1 * MiB, fill="zero") as dst:
        def content() -> set[int]:
            """The distinct byte values in page P of the destination's RAM."""
            return set(bytes(dst.blocks[0].pages[P * PAGE:(P + 1) * PAGE]))

        destination = DestinationMigration("tcp://127.0.0.1:0", secret=SECRET, ram=dst,
                                           config=FAST, ram_is_zeroed=True)
        destination.start()
        source = HandMadeSource(destination, list(dst.layout), channels=2)
        try:
            ch0, ch1 = _join(source)
            barrier = protocol_barrier(destination)

            # Channel 1 closes epoch 1 (it sent nothing in it) and sends P's new copy.
            _sync(ch1, 1)
            _page(ch1, 2, P, NEW)
            wait_until(lambda: barrier.states[1] is ChannelState.AT_BARRIER,
                       "channel 1 to read SYNC(1)", timeout=10)
            # Give channel 1 the chance to read past its SYNC (see HOLD_S).
            deadline = time.monotonic() + HOLD_S
            while content() != {NEW} and time.monotonic() < deadline:
                time.sleep(0.01)

            # The marker, and only then channel 0's stale copy of P and its SYNC(1).
            source.send(wire.SyncMarker(1))
            _page(ch0, 1, P, OLD)
            _sync(ch0, 1)
            wait_until(lambda: barrier.epochs == [2, 2], "the barrier to release epoch 1",
                       timeout=10)

            answer = _complete(source, [ch0, ch1], final_epoch=1)
            # END was read on every channel: no channel writes guest RAM any more.
            assert barrier.all_ended
            landed = content()
            assert landed == {NEW}, (
                f"page {P} holds {sorted(map(hex, landed))}: epoch 1's copy from channel 0 "
                f"landed after epoch 2's from channel 1 (expected {NEW:#x})")
            assert isinstance(answer, wire.Resumed), f"the destination answered {answer}"
            result = destination.wait(10)
            assert result.status == "completed" and result.rounds == 2  # epoch 1, then the final
            assert content() == {NEW}
            # Nothing else was written.
            memory = bytes(dst.blocks[0].pages)
            assert memory[:P * PAGE] == bytes(P * PAGE)
            assert memory[(P + 1) * PAGE:] == bytes(len(memory) - (P + 1) * PAGE)
        finally:
            source.close()
            if not destination.done():
                destination.cancel("test over")
            try:
                destination.wait(10)
            except MigrationError:
                pass


def test_a_repeated_marker_is_refused_at_once() -> None:
    """Markers come one per epoch, in order: a second SYNC_MARKER(1) would wait for
    a sync 1 that never comes again (a stall until the stall timeout)."""
    with guest_ram(1 * MiB, fill="zero") as dst:
        destination = DestinationMigration("tcp://127.0.0.1:0", secret=SECRET, ram=dst,
                                           config=FAST, ram_is_zeroed=True)
        destination.start()
        source = HandMadeSource(destination, list(dst.layout), channels=1)

        def repeat_the_marker(channels: list[ChannelWriter], source: HandMadeSource) -> None:
            (ch0,) = channels
            _page(ch0, 1, P, NEW)
            _sync(ch0, 1)
            source.send(wire.SyncMarker(1))
            source.send(wire.SyncMarker(1))

        failure = destination_failure(destination, source, repeat_the_marker)
        assert "SYNC_MARKER(1) while the channels are in epoch 2" in failure
