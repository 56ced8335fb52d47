"""The operation layer's shape: one base, the networked migration and the
snapshots as siblings, one state enum.  (What they do is tested end to end in
tests/integration; this pins what the layering promises.)"""

from __future__ import annotations

import json

import pytest

import engine
from engine.errors import ConfigError
from engine.migration import Migration
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
    assert tracker.snapshot().state is MigrationState.SETUP
    tracker.state = MigrationState.ACTIVE
    assert tracker.snapshot().state == "active"
