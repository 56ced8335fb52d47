"""The source's main-channel messages out of their order (docs/wire-format.md §3):
the destination refuses each as the source's fault, a RemoteProtocolError, and
the source hears that class in the ABORT; never this side's LocalProtocolError,
which would call a peer's mistake our own bug."""

from __future__ import annotations

import pytest

from engine import DestinationMigration, MigrationConfig, SourceMigration
from engine.errors import RemoteProtocolError
from engine.wire import message as wire
from tests.harness import SECRET, MiB, guest_ram, outcomes
from tests.protocol import ChannelWriter, HandMadeSource, destination_failure

pytestmark = pytest.mark.usefixtures("no_leaks")

CONFIG = MigrationConfig(channels=1, stall_timeout_s=10, handshake_timeout_s=10)


class TwiceSwitchoverSource(SourceMigration):
    """A source that sends SWITCHOVER twice (the read audit's repro)."""

    def _send_message(self, record: wire.Message) -> None:
        super()._send_message(record)
        if isinstance(record, wire.Switchover):
            super()._send_message(record)


def test_a_repeated_switchover_is_the_sources_fault_on_both_sides() -> None:
    with guest_ram(4 * MiB) as src:
        destination = DestinationMigration("tcp://127.0.0.1:0", secret=SECRET,
                                           config=CONFIG.for_destination())
        destination.start()
        source = TwiceSwitchoverSource(src, destination.address, secret=SECRET, config=CONFIG)
        source.start()
        source_error, destination_error = outcomes(source, destination)
        if destination.ram is not None:
            destination.ram.close()
            destination.ram.unlink()
    for error in (source_error, destination_error):
        assert type(error) is RemoteProtocolError, error
        assert "SWITCHOVER after SWITCHOVER is out of place (expected COMPLETE)" in str(error)


@pytest.mark.parametrize(("messages", "error"), [
    pytest.param([wire.Complete(0)], "COMPLETE before SWITCHOVER is out of place", id="complete-first"),
    pytest.param([wire.Switchover(), wire.SyncMarker(1)], "SYNC_MARKER after SWITCHOVER is out of place",
                 id="sync-marker-after-switchover"),
    pytest.param([wire.Switchover(), wire.RamHandover(("pc.ram",))], "RAM_HANDOVER without LOCAL",
                 id="handover-not-local"),
    pytest.param([wire.DevicesDone(())], "DEVICES_DONE without devices", id="devices-done-no-devices"),
    pytest.param([wire.Switchover(), wire.Commit()], "COMMIT after SWITCHOVER is out of place",
                 id="commit-before-complete"),
])
def test_main_channel_messages_out_of_place(messages: list[wire.Message], error: str) -> None:
    def run(channels: list[ChannelWriter], source: HandMadeSource) -> None:
        for message in messages:
            source.send(message)

    with guest_ram(4 * MiB, fill="zero") as dst:
        destination = DestinationMigration("tcp://127.0.0.1:0", secret=SECRET, ram=dst,
                                           config=CONFIG.for_destination())
        destination.start()
        source = HandMadeSource(destination, list(dst.layout), channels=1)
        assert error in destination_failure(destination, source, run)
        (failure,) = outcomes(destination)  # the same error again, now its class
    assert type(failure) is RemoteProtocolError
