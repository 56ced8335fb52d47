"""The operation layer's shape: one base, the networked migration and the
snapshots as siblings, one state enum.  (What they do is tested end to end in
tests/integration; this pins what the layering promises.)"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
from concurrent.futures import Future

import pytest

import engine
from engine.config import NEGOTIATED, SHARED_LOCAL, SOURCE_LOCAL, DestinationConfig, MigrationConfig
from engine.destination import DestinationMigration
from engine.errors import ConfigError, PoolError
from engine.migration import Migration
from engine.multifd import ChannelLink
from engine.operation import Operation
from engine.saving import SavingOperation
from engine.shm import GuestRAM
from engine.snapshot import SnapshotRestore, SnapshotSave
from engine.source import SourceMigration
from engine.stats import StatsTracker
from engine.sync import MigrationState


def test_snapshots_are_operations_without_a_network() -> None:
    assert issubclass(SnapshotRestore, Operation) and not issubclass(SnapshotRestore, Migration)
    assert issubclass(SnapshotSave, SavingOperation) and not issubclass(SnapshotSave, Migration)
    assert issubclass(SourceMigration, Migration) and issubclass(SourceMigration, SavingOperation)
    assert issubclass(engine.DestinationMigration, Migration)
    assert not issubclass(engine.DestinationMigration, SavingOperation)
    # What only a peer has is not on the snapshots at all.
    for snapshot in (SnapshotSave, SnapshotRestore):
        for name in ("secret", "_main", "_send_message", "_read_message", "_commit", "networked"):
            assert not hasattr(snapshot, name), (snapshot.__name__, name)


def test_a_restore_has_no_secret_and_a_migration_needs_one(tmp_path) -> None:
    restore = SnapshotRestore(str(tmp_path / "none.snap"))
    assert restore.state is MigrationState.NONE and not hasattr(restore, "secret")
    restore.latch.close()
    ram = GuestRAM.create([("pc.ram", 1 << 20)])
    try:
        with pytest.raises(ConfigError, match="shared secret"):
            SourceMigration(ram, "tcp://127.0.0.1:1", secret=b"")
        with pytest.raises(ConfigError, match=r"^the secret must be bytes, not str \(encode it\)$"):
            SourceMigration(ram, "tcp://127.0.0.1:1", secret="s3cret")  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match=r"^the secret must be bytes, not str"):
            DestinationMigration("tcp://127.0.0.1:0", secret="s3cret")  # type: ignore[arg-type]
    finally:
        ram.close()
        ram.unlink()


def test_one_state_enum_exported_and_spelled_as_strings() -> None:
    assert engine.MigrationState is MigrationState
    assert "MigrationState" in engine.__all__ and "Operation" in engine.__all__
    assert MigrationState.COMPLETED == "completed" and isinstance(MigrationState.ACTIVE, str)
    assert MigrationState.OUTCOME_UNKNOWN == "outcome_unknown"
    assert f"{MigrationState.SWITCHOVER:<12}|" == "switchover  |"
    assert json.loads(json.dumps({"status": MigrationState.CANCELLED})) == {"status": "cancelled"}
    # Live statistics carry the same enum.
    tracker = StatsTracker(1 << 20, 4096)
    assert tracker.snapshot(MigrationState.ACTIVE).state == "active"


def test_config_fields_are_negotiated_or_local_each_exactly_once() -> None:
    names = {f.name for f in dataclasses.fields(MigrationConfig)}
    assert NEGOTIATED | SOURCE_LOCAL | SHARED_LOCAL == names
    assert not (NEGOTIATED & SOURCE_LOCAL or NEGOTIATED & SHARED_LOCAL or SOURCE_LOCAL & SHARED_LOCAL)
    assert SHARED_LOCAL == {f.name for f in dataclasses.fields(DestinationConfig)}
    # What CONFIG carries is negotiated (its wire record has a field for each but verify,
    # which COMPLETE carries).
    assert {"channels", "packet_pages", "compression", "zero_page_detection", "verify"} <= NEGOTIATED
    config = MigrationConfig(stall_timeout_s=5.0, cancel_grace_s=0.5, start_method="fork", channels=4)
    assert config.for_destination() == DestinationConfig(stall_timeout_s=5.0, cancel_grace_s=0.5,
                                                         start_method="fork")
    with pytest.raises(ConfigError, match="stall_timeout_s"):
        DestinationConfig(stall_timeout_s=0).validate()
    with pytest.raises(ConfigError, match="start_method"):
        DestinationConfig(start_method="vfork").validate()


def _destination(config: object) -> DestinationMigration:
    return DestinationMigration("tcp://127.0.0.1:0", secret=b"k", config=config)  # type: ignore[arg-type]


def _close(destination: DestinationMigration) -> None:
    destination.close()
    destination.latch.close()


def test_a_destination_takes_only_what_applies_and_says_what_it_cannot_use(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="multifd.destination")
    given = MigrationConfig(channels=4, verify=True, downtime_limit_ms=50, stall_timeout_s=7.0)
    destination = _destination(given)
    try:
        assert destination.config == DestinationConfig(stall_timeout_s=7.0)
        warned = " ".join(r.getMessage() for r in caplog.records)
        assert "channels=4" in warned and "verify=True" in warned and "downtime_limit_ms=50" in warned
        assert "stall_timeout_s" not in warned  # that one it uses
    finally:
        _close(destination)
    caplog.clear()
    for config in (DestinationConfig(handshake_timeout_s=3.0), MigrationConfig(stall_timeout_s=2.0), None):
        destination = _destination(config)
        _close(destination)
    assert not caplog.records  # nothing it cannot use was given


def test_channel_processes_that_do_not_start_in_time_are_a_pool_error() -> None:
    """They are pool workers that did not start: PoolError, not the root MigrationError."""
    operation = Operation(MigrationConfig(start_method="fork"))
    ours, theirs = socket.socketpair()  # a channel that never says READY
    operation._links = [ChannelLink(0, ours, None, Future())]
    try:
        with pytest.raises(PoolError, match=r"^1 channel process\(es\) did not start within 0 s$"):
            operation._wait_channels_ready(0.05)
    finally:
        ours.close()
        theirs.close()
        operation.latch.close()
