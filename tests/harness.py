"""Helpers for tests that run real migrations: RAM, guests, a destination thread."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import psutil

from clients.guest import SyntheticGuest, fill_ram
from engine import DestinationMigration, GuestRAM, MigrationConfig, MigrationResult, SourceMigration
from engine.dirty import BlockDirtyMaps
from engine.errors import MigrationError
from engine.migration import Migration
from engine.shm import RamBlock
from engine.sync import wait_readable

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


def migrate(*args: Any, **kwargs: Any) -> tuple[MigrationResult, MigrationResult]:
    """:func:`migrate_pair` (its arguments), its two results only."""
    _, result, _, remote = migrate_pair(*args, **kwargs)
    return result, remote


def migrate_pair(
    src: GuestRAM,
    dst: GuestRAM,
    config: MigrationConfig,
    transport: str = "tcp",
    guest: SyntheticGuest | LockstepGuest | None = None,
    slow_link: bool = False,
    dirty_source: LockstepGuest | None = None,
) -> tuple[SourceMigration, MigrationResult, DestinationMigration, MigrationResult]:
    """Migrate src → dst (destination on a background thread): both operations (for
    what they hold afterwards) and both results.

    `slow_link`: the source connects through a :class:`SlowLink` (tcp only).
    `dirty_source`: a :class:`LockstepGuest` beside `guest` (a LockstepGuest
    given as `guest` is its own dirty source)."""
    if dirty_source is None and isinstance(guest, LockstepGuest):
        dirty_source = guest
    destination = DestinationMigration(address(transport), secret=SECRET, ram=dst, config=config)
    destination.start()
    link = SlowLink(destination.address) if slow_link else None
    try:
        source = SourceMigration(
            src, link.address if link else destination.address, secret=SECRET, config=config,
            pause_guest=guest.pause if guest else None,
            resume_guest=guest.resume if guest else None,
            dirty_source=dirty_source,
        )
        result = source.run()
    except BaseException:
        destination.cancel("the source failed")
        with contextlib.suppress(Exception):
            destination.wait(10)
        raise
    finally:
        if link is not None:
            link.close()
    return source, result, destination, destination.wait(10)


def same_memory(a: GuestRAM, b: GuestRAM) -> bool:
    return all(bytes(x.pages) == bytes(y.pages) for x, y in zip(a.blocks, b.blocks, strict=True))


def wait_until(condition: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    """Poll `condition` until it holds; fail the test with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def outcomes(*sides: Migration, timeout: float = 20.0) -> list[BaseException | None]:
    """Wait for each side in turn; its MigrationError, or None if it succeeded."""
    errors: list[BaseException | None] = []
    for side in sides:
        try:
            side.wait(timeout)
            errors.append(None)
        except MigrationError as exc:
            errors.append(exc)
    return errors


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


class SlowLink:
    """A TCP relay in front of a destination that makes one connection a slow link.

    Every connection the source opens is relayed to `target`; on the connection
    numbered `slow` (in accept order: 0 is the main channel, the first multifd
    channel connects next) the source's bytes go on in `piece`-byte pieces with
    a `pause` between them, so that channel's packets reach the destination
    well after its siblings' packets of the same epoch: the reorder the
    destination's sync barrier exists for.  The relay only delays bytes, never
    reorders or drops them within a connection; a correct migration through it
    is a correct migration.
    """

    def __init__(self, target: str, slow: int = 1, piece: int = 16384, pause: float = 0.002) -> None:
        host, port = target.removeprefix("tcp://").rsplit(":", 1)
        self._target = (host, int(port))
        self._slow, self._piece, self._pause = slow, piece, pause
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self._listener.getsockname()[1]}"
        self._stop_r, self._stop_w = socket.socketpair()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, name="test-slowlink-accept")]
        self._threads[0].start()

    def _accept(self) -> None:
        number = 0
        while True:
            ready = wait_readable([self._listener, self._stop_r], None)
            if self._stop_r in ready:
                return
            down, _ = self._listener.accept()
            up = socket.create_connection(self._target)
            with self._lock:
                self._socks += [down, up]
                for args in ((down, up, number == self._slow), (up, down, False)):
                    thread = threading.Thread(target=self._relay, args=args, name="test-slowlink")
                    self._threads.append(thread)
                    thread.start()
            number += 1

    def _relay(self, src: socket.socket, dst: socket.socket, slow: bool) -> None:
        try:
            while data := src.recv(self._piece if slow else 1 << 20):
                if slow:
                    time.sleep(self._pause)
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:  # one side reset or the relay is closing: end both ways
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop_w.send(b"x")
        self._threads[0].join()
        with self._lock:
            for sock in self._socks:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads[1:]:
            thread.join()
        for sock in [*self._socks, self._listener, self._stop_r, self._stop_w]:
            sock.close()


class LockstepGuest(BlockDirtyMaps):
    """A guest that writes `per_look` pages every time the migration looks at its dirty pages.

    Used as the source's dirty source (engine/dirty.py): before each ``count`` (the
    convergence check) and each ``take`` it writes the next `per_look` pages of a
    block (a counter in bytes 16..23 of the page, apart from what the synthetic
    guest's workloads write; the page written, then marked),
    as a running guest would, until paused.  Unlike a guest process, whose writes
    depend on the CPU it gets, it has always dirtied pages when the source asks:
    a migration with a 0 ms downtime limit never converges, whatever the load.
    """

    def __init__(self, ram: GuestRAM, per_look: int = 8) -> None:
        self.ram, self.per_look = ram, per_look
        self.paused = False
        self.written = 0
        self._cursor = 0

    def _write(self, block: RamBlock) -> None:
        if self.paused:
            return
        pages = block.array()
        for _ in range(self.per_look):
            self.written += 1
            page = self._cursor % block.n_pages
            pages[page, 16:24] = np.frombuffer(self.written.to_bytes(8, "little"), dtype=np.uint8)
            block.dirty.mark(page)
            self._cursor += 1
        del pages

    def take(self, block: RamBlock) -> np.ndarray:
        self._write(block)
        return super().take(block)

    def count(self, block: RamBlock) -> int:
        self._write(block)
        return super().count(block)

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False


def after_sending(side: Migration, kind: type, then: Callable[[], object]) -> None:
    """Make `side` call `then()` right after it sent a main-channel message of `kind`."""
    send = side._send_message

    def send_then(message: object) -> None:
        send(message)  # type: ignore[arg-type]
        if isinstance(message, kind):
            then()

    side._send_message = send_then  # type: ignore[method-assign]
