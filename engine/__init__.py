"""multifd: live migration of guest RAM over parallel channel processes.

The API a VMM embeds::

    from engine import GuestRAM, MigrationConfig, SourceMigration, DestinationMigration
    from engine import DestinationConfig, MigrationState, TlsConfig
    from engine import SnapshotSave, SnapshotRestore, inspect_snapshot, WorkerPool

Every error is an :class:`engine.errors.MigrationError`.

The names below are imported on first use: a channel process imports only the
modules it runs (engine.channel and what it needs), not the orchestration, so
it starts in about half the time.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_PUBLIC = {
    "DestinationConfig": "engine.config",
    "DestinationMigration": "engine.destination",
    "GuestRAM": "engine.shm",
    "MigrationConfig": "engine.config",
    "MigrationError": "engine.errors",
    "MigrationResult": "engine.stats",
    "MigrationState": "engine.sync",
    "MigrationStats": "engine.stats",
    "Operation": "engine.operation",
    "OutcomeUnknownError": "engine.errors",
    "SnapshotRestore": "engine.snapshot",
    "SnapshotSave": "engine.snapshot",
    "SourceMigration": "engine.source",
    "TlsConfig": "engine.link",
    "WorkerPool": "engine.pool",
    "inspect_snapshot": "engine.snapshot",
}

__all__ = [
    "DestinationConfig",
    "DestinationMigration",
    "GuestRAM",
    "MigrationConfig",
    "MigrationError",
    "MigrationResult",
    "MigrationState",
    "MigrationStats",
    "Operation",
    "OutcomeUnknownError",
    "SnapshotRestore",
    "SnapshotSave",
    "SourceMigration",
    "TlsConfig",
    "WorkerPool",
    "inspect_snapshot",
]

if TYPE_CHECKING:
    from engine.config import DestinationConfig, MigrationConfig
    from engine.destination import DestinationMigration
    from engine.errors import MigrationError, OutcomeUnknownError
    from engine.link import TlsConfig
    from engine.operation import Operation
    from engine.pool import WorkerPool
    from engine.shm import GuestRAM
    from engine.snapshot import SnapshotRestore, SnapshotSave, inspect_snapshot
    from engine.source import SourceMigration
    from engine.stats import MigrationResult, MigrationStats
    from engine.sync import MigrationState


def __getattr__(name: str) -> Any:
    try:
        module = _PUBLIC[name]
    except KeyError:
        raise AttributeError(f"module 'engine' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
