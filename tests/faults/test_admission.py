"""Admission that strangers cannot stall: a real migration completes while the
port is hit by silent connections, garbage and a connect flood."""

from __future__ import annotations

import socket
import threading
import time

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
