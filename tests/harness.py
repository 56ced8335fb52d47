"""Helpers for tests that run real migrations: RAM, guests, a destination thread."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

from clients.guest import SyntheticGuest, fill_ram
from engine import DestinationMigration, GuestRAM, MigrationConfig, MigrationResult, SourceMigration

SECRET = b"multifd-test-secret"
MiB = 1 << 20


@contextlib.contextmanager
def guest_ram(size: int = 16 * MiB, fill: str = "random", blocks: int = 1,
              prealloc: bool = False, seed: int = 1) -> Iterator[GuestRAM]:
    """Owner RAM of `blocks` blocks totalling `size` bytes, unlinked afterwards."""
    layout = [(f"block{i}" if i else "pc.ram", size // blocks) for i in range(blocks)]
    with GuestRAM.create(layout, prealloc=prealloc) as ram:
        if fill != "zero":
            fill_ram(ram, fill, seed=seed)
        yield ram


def address(transport: str) -> str:
    if transport == "unix":
        return f"unix://{tempfile.gettempdir()}/mfd-test-{os.getpid()}-{os.urandom(4).hex()}.sock"
    return "tcp://127.0.0.1:0"


def migrate(
    src: GuestRAM,
    dst: GuestRAM,
    config: MigrationConfig,
    transport: str = "tcp",
    guest: SyntheticGuest | None = None,
) -> tuple[MigrationResult, MigrationResult]:
    """Migrate src → dst (destination on a background thread); both results."""
    destination = DestinationMigration(address(transport), secret=SECRET, ram=dst, config=config)
    destination.start()
    try:
        source = SourceMigration(
            src, destination.address, secret=SECRET, config=config,
            pause_guest=guest.pause if guest else None,
            resume_guest=guest.resume if guest else None,
        )
        result = source.run()
    except BaseException:
        destination.cancel("the source failed")
        with contextlib.suppress(Exception):
            destination.wait(10)
        raise
    return result, destination.wait(10)


def same_memory(a: GuestRAM, b: GuestRAM) -> bool:
    return all(bytes(x.pages) == bytes(y.pages) for x, y in zip(a.blocks, b.blocks, strict=True))
