"""The embedding API as the README shows it, and its live statistics."""

from __future__ import annotations

import time

from clients.guest import SyntheticGuest, fill_ram
from engine import DestinationMigration, GuestRAM, MigrationConfig, MigrationStats, SourceMigration
from engine.sync import MigrationState
from tests.harness import SECRET, MiB, same_memory


def test_the_readme_example_with_live_stats() -> None:
    key = SECRET
    with GuestRAM.create({"pc.ram": 64 * MiB}, prealloc=True) as dest_ram, \
            GuestRAM.create({"pc.ram": 64 * MiB}) as ram:
        fill_ram(ram, "text")
        resumed: list[bool] = []
        incoming = DestinationMigration("tcp://127.0.0.1:0", secret=key, ram=dest_ram,
                                        resume_guest=lambda: resumed.append(True))
        incoming.start()
        with SyntheticGuest(ram, "random", dirty_rate=48 * MiB) as vm:
            outgoing = SourceMigration(
                ram, incoming.address, secret=key,
                config=MigrationConfig(channels=4, packet_pages=256, downtime_limit_ms=5),
                pause_guest=vm.pause, resume_guest=vm.resume,
            )
            outgoing.start()
            seen: list[MigrationStats] = []
            while not outgoing.done():
                stats = outgoing.stats()
                if stats is not None:
                    seen.append(stats)
                time.sleep(0.005)
            result = outgoing.wait()
            assert vm.paused
        remote = incoming.wait(10)
        assert result.status == remote.status == "completed"
        assert resumed == [True]
        assert same_memory(ram, dest_ram)
        assert outgoing.state is MigrationState.COMPLETED
        # Live stats moved forward while it ran.
        active = [s for s in seen if s.state == "active"]
        assert active, "no live stats were seen during precopy"
        assert all(b.bytes_on_wire >= a.bytes_on_wire for a, b in zip(seen, seen[1:]))
        assert max(s.round for s in seen) >= 1
        assert any(s.throughput_bytes_per_s > 0 for s in active)
        # Round 1 counts its pages down as they go (it said "0 B left" throughout).
        assert any(s.round == 1 and 0 < s.remaining_bytes < 64 * MiB for s in active)
        final = outgoing.stats()
        assert final is not None and final.state == "completed"
        assert final.bytes_on_wire == result.bytes_on_wire
        assert result.pages_sent >= ram.n_pages
        assert result.downtime_ms > 0 and result.setup_time_ms > 0
        # The set-up breakdown: each step the source marks, in order, within the set-up;
        # the first packet went out after it (orders, not timings).
        steps = result.extra["setup_steps_ms"]
        assert list(steps) == ["main_channel", "channel_handshakes", "channel_processes"]
        assert all(ms >= 0 for ms in steps.values())
        assert sum(steps.values()) <= result.setup_time_ms + 0.01
        assert result.setup_time_ms <= result.extra["first_packet_ms"] <= result.total_time_s * 1000
        assert list(remote.extra["setup_steps_ms"]) == ["main_channel", "channel_handshakes",
                                                        "slots", "channel_processes"]
        assert result.extra["channel_attach_ms"] >= 0
        assert 0 < result.rtt_ms < 100
