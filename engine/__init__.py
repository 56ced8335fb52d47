"""multifd: live migration of guest RAM over parallel channel processes.

The API a VMM embeds::

    from engine import GuestRAM, MigrationConfig, SourceMigration, DestinationMigration

Every error is an :class:`engine.errors.MigrationError`.
"""

from engine.destination import DestinationMigration
from engine.errors import MigrationError
from engine.migration import MigrationConfig
from engine.shm import GuestRAM
from engine.source import SourceMigration
from engine.stats import MigrationResult, MigrationStats

__all__ = [
    "DestinationMigration",
    "GuestRAM",
    "MigrationConfig",
    "MigrationError",
    "MigrationResult",
    "MigrationStats",
    "SourceMigration",
]
