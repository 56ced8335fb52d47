"""Admission that strangers cannot stall: a real migration completes while the
port is hit by silent connections, garbage and a connect flood."""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest

from engine import DestinationMigration, MigrationConfig, SourceMigration
from tests.harness import SECRET, MiB, guest_ram, same_memory
from tests.protocol import port_of

CONFIG = MigrationConfig(channels=2, packet_pages=64, handshake_timeout_s=10.0)
SILENT, GARBAGE, FLOOD = 50, 500, 500


def _hammer(addr: tuple[str, int], stop: threading.Event, counts: dict[str, int]) -> None:
    """Garbage hellos and bare connects, interleaved, until `stop` or done (bounded)."""
    deadline = time.monotonic() + 30
    for i in range(max(GARBAGE, FLOOD)):
        if stop.is_set() or time.monotonic() > deadline:
            return
        try:
            with socket.create_connection(addr, timeout=2) as s:
                if i < GARBAGE:
                    s.sendall(b"\x00\xffGARBAGE" * 10)
                    counts["garbage"] += 1
                else:
                    counts["flood"] += 1
        except OSError:
            counts["failed"] += 1


def test_a_migration_completes_while_strangers_hit_the_port() -> None:
    with guest_ram(8 * MiB) as src, guest_ram(8 * MiB, fill="zero") as dst:
        destination = DestinationMigration("tcp://127.0.0.1:0", secret=SECRET, ram=dst, config=CONFIG)
        addr = port_of(destination)
        destination.start()
        silent = [socket.create_connection(addr, timeout=5) for _ in range(SILENT)]
        stop = threading.Event()
        counts = {"garbage": 0, "flood": 0, "failed": 0}
        hammer = threading.Thread(target=_hammer, args=(addr, stop, counts), name="test-hammer")
        hammer.start()
        try:
            while counts["garbage"] < 50:  # the storm is on before the source connects
                time.sleep(0.005)
            result = SourceMigration(src, destination.address, secret=SECRET, config=CONFIG).run()
            remote = destination.wait(30)
            # Nobody waited for the silent ones: their 10 s to say hello had not run out.
            assert not any("sent no hello" in why for why in destination.refused)
        finally:
            stop.set()
            hammer.join(30)
            for s in silent:
                s.close()
        assert result.status == "completed" and remote.status == "completed"
        assert same_memory(src, dst)
        assert counts["garbage"] >= 50 and destination.refused  # strangers were there, and refused


def test_a_flood_of_refusals_is_logged_in_bounded_lines(caplog) -> None:
    """Each refusal is a log line only up to REFUSALS_LOGGED a window; the rest are
    counted, and said in one line at the latest when the destination stops (a
    listener's stderr that nobody reads would otherwise fill and block it)."""
    from engine.destination import REFUSALS_LOGGED
    from engine.errors import CancelledError

    caplog.set_level(logging.WARNING, logger="multifd.destination")
    destination = DestinationMigration("tcp://127.0.0.1:0", secret=SECRET, config=CONFIG)
    destination.start()
    addr = port_of(destination)
    for _ in range(60):
        with socket.create_connection(addr, timeout=2) as s:
            s.sendall(b"\x00\xffGARBAGE" * 10)
    deadline = time.monotonic() + 30
    while len(destination.refused) < 60:
        assert time.monotonic() < deadline, f"{len(destination.refused)} refused"
        time.sleep(0.01)
    destination.cancel("test over")
    with pytest.raises(CancelledError):
        destination.wait(30)
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    one_by_one = [line for line in lines if line.startswith("refused a connection from")]
    assert len(one_by_one) == REFUSALS_LOGGED
    assert lines[-1] == f"refused {60 - REFUSALS_LOGGED} more connection(s) in 10 s " \
                        f"(after {REFUSALS_LOGGED} logged one by one)"
