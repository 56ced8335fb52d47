"""Helpers for tests that run real migrations: RAM, guests, a destination thread."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator

import psutil

from clients.guest import SyntheticGuest, fill_ram
from engine import DestinationMigration, GuestRAM, MigrationConfig, MigrationResult, SourceMigration
from engine.migration import Migration

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


def wait_until(condition: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    """Poll `condition` until it holds; fail the test with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def in_round(operation: Migration, round_: int = 2) -> None:
    """Wait until a running operation is in precopy round `round_` or later."""
    def reached() -> bool:
        stats = operation.stats()
        return stats is not None and stats.round >= round_
    wait_until(reached, f"round {round_}")


def kill_a_channel(operation: Migration) -> None:
    """SIGKILL one channel process of a running operation, once its channels serve."""
    wait_until(operation.channel_pids, "the channel processes")
    psutil.Process(operation.channel_pids()[0]).kill()


NIC = ("nic", 0)


class Recorder:
    """A device that records every load it is asked to do."""

    def __init__(self, idstr: str, instance_id: int = 0) -> None:
        self.idstr, self.instance_id = idstr, instance_id
        self.calls: list[str] = []

    def save_state(self) -> list[bytes]:
        return [b"state"]

    def save_config(self) -> bytes:
        return b"config"

    def load_state(self, chunk: bytes) -> None:
        self.calls.append("state")

    def load_config(self, config: bytes) -> None:
        self.calls.append("config")
