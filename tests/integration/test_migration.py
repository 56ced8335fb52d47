"""Live migrations between real channel processes over real sockets.

A synthetic guest keeps writing the source RAM during the whole migration;
afterwards (the source guest stays paused at switchover) the destination must
equal the source byte for byte, and the incrementer oracle must hold.
"""

from __future__ import annotations

import pytest

from clients.guest import SyntheticGuest, check_incrementer
from engine import DestinationMigration, MigrationConfig, SourceMigration
from engine.errors import ConvergenceError
from tests.harness import SECRET, LockstepGuest, MiB, SlowLink, guest_ram, migrate, same_memory


@pytest.mark.parametrize("channels", [1, 2, 4])
@pytest.mark.parametrize("transport", ["tcp", "unix"])
@pytest.mark.parametrize("workload", ["random", "incrementer"])
def test_live_migration_is_exact(channels: int, transport: str, workload: str) -> None:
    # Small packets, so a round is many packets spread over every channel.
    config = MigrationConfig(channels=channels, packet_pages=64, verify=True)
    with guest_ram(16 * MiB) as src, guest_ram(16 * MiB, fill="zero") as dst:
        guest = SyntheticGuest(src, workload, dirty_rate=32 * MiB)
        guest.start()
        try:
            result, remote = migrate(src, dst, config, transport, guest)
            assert guest.paused  # a successful migration leaves the source paused
        finally:
            guest.stop()
        assert result.status == "completed" and remote.status == "completed"
        assert result.verified is True
        assert result.rounds >= 2
        # Every page at least once; how many went again depends on how much CPU the guest
        # got meanwhile (load), so the exact memory below is what shows they went.
        assert result.pages_sent >= src.n_pages
        assert same_memory(src, dst)
        if workload == "incrementer":
            assert check_incrementer(dst) == ""


def test_pages_dirtied_during_the_migration_are_resent() -> None:
    """The incrementer rewrites every page all the time: only an exact copy passes."""
    config = MigrationConfig(channels=2, packet_pages=32, downtime_limit_ms=5, max_rounds=8)
    with guest_ram(8 * MiB) as src, guest_ram(8 * MiB, fill="zero") as dst:
        guest = SyntheticGuest(src, "incrementer", dirty_rate=64 * MiB)
        guest.start()
        try:
            result, _ = migrate(src, dst, config, "tcp", guest)
        finally:
            guest.stop()
        assert result.pages_sent > src.n_pages  # pages were sent again in later rounds
        assert check_incrementer(dst) == ""
        assert same_memory(src, dst)


def test_a_slow_channel_never_lands_a_stale_page_last() -> None:
    """The reorder the destination's sync barrier exists for, from a real source.

    One channel's link is slow (tests/harness.py SlowLink) and the guest keeps
    rewriting a small hot set, so every round sends the same pages again on
    whichever channel is idle: a page's older copy is often still on the slow
    link when its newer copy arrives on the fast one.  Only the barrier (no
    channel reads past SYNC(e) until every channel reached it) keeps the newer
    copy last.  Memory must match exactly: without the barrier it does not.
    """
    config = MigrationConfig(channels=2, packet_pages=4, downtime_limit_ms=0, max_rounds=6)
    with guest_ram(4 * MiB) as src, guest_ram(4 * MiB, fill="zero") as dst:
        guest = SyntheticGuest(src, "random", dirty_rate=32 * MiB, hot_fraction=1 / 32)
        guest.start()
        try:
            result, remote = migrate(src, dst, config, "tcp", guest, slow_link=True)
        finally:
            guest.stop()
        assert result.status == "completed" and remote.status == "completed"
        assert result.rounds >= 2  # how many resent the hot set depends on the guest's CPU share
        assert same_memory(src, dst)


def test_several_blocks_and_an_idle_guest() -> None:
    config = MigrationConfig(channels=2, packet_pages=128)
    with guest_ram(12 * MiB, blocks=3) as src, guest_ram(12 * MiB, blocks=3, fill="zero") as dst:
        result, remote = migrate(src, dst, config)
        assert result.rounds == 2  # everything, then a final round with nothing left
        assert remote.rounds == 2  # the same count, the empty final round included
        assert result.pages_sent == src.n_pages
        assert same_memory(src, dst)


def test_forced_switchover_after_max_rounds() -> None:
    # A downtime limit of 0 is never met while the guest writes: the lockstep guest has
    # always written pages when the source looks, so this holds under any load.
    config = MigrationConfig(channels=2, packet_pages=64, downtime_limit_ms=0, max_rounds=3)
    with guest_ram(8 * MiB) as src, guest_ram(8 * MiB, fill="zero") as dst:
        guest = LockstepGuest(src)
        result, _ = migrate(src, dst, config, "tcp", guest)
        assert guest.paused
        assert result.rounds == 4  # three precopy rounds, then the final one
        assert same_memory(src, dst)


def test_the_commits_round_trips_count_in_the_expected_downtime() -> None:
    """A main channel 40 ms long: the paused guest waits 1.5 round trips for the
    commit whatever its RAM, so a 20 ms limit is never met; the source says so
    (switchover forced) instead of expecting a few ms and measuring 60+."""
    config = MigrationConfig(channels=2, packet_pages=64, downtime_limit_ms=20, max_rounds=2)
    with guest_ram(8 * MiB) as src, guest_ram(8 * MiB, fill="zero") as dst:
        destination = DestinationMigration("tcp://127.0.0.1:0", secret=SECRET, ram=dst, config=config)
        destination.start()
        link = SlowLink(destination.address, slow=0, pause=0.04)  # the main channel's bytes
        try:
            result = SourceMigration(src, link.address, secret=SECRET, config=config).run()
        finally:
            link.close()
            destination.wait(10)
        assert result.rtt_ms >= 40
        assert result.expected_downtime_ms >= 1.5 * result.rtt_ms
        assert result.extra["switchover_forced"] == {"after_rounds": 2, "downtime_limit_ms": 20}
        assert same_memory(src, dst)


def test_no_convergence_fails_and_leaves_the_guest_running() -> None:
    config = MigrationConfig(channels=2, packet_pages=64, downtime_limit_ms=0, max_rounds=2,
                             on_max_rounds="fail")
    with guest_ram(8 * MiB) as src, guest_ram(8 * MiB, fill="zero") as dst:
        lockstep = LockstepGuest(src)  # never lets it converge, whatever the load
        with SyntheticGuest(src, "incrementer", dirty_rate=0) as guest:
            with pytest.raises(ConvergenceError, match="not converged after 2 rounds"):
                migrate(src, dst, config, "tcp", guest, dirty_source=lockstep)
            assert not guest.paused
            guest.pause()  # it answers: it was running all along
            assert check_incrementer(src) == ""  # and its memory is intact


@pytest.mark.heavy
@pytest.mark.parametrize("transport", ["tcp", "unix"])
@pytest.mark.parametrize("workload", ["random", "incrementer"])
def test_large_live_migration_with_default_packets(transport: str, workload: str) -> None:
    """The CI-sized tests above at 512 MiB, 4 channels and the default 16 MiB packets."""
    config = MigrationConfig(channels=4, verify=True)
    with guest_ram(512 * MiB) as src, guest_ram(512 * MiB, fill="zero", prealloc=True) as dst:
        guest = SyntheticGuest(src, workload, dirty_rate=256 * MiB, hot_fraction=0.25)
        guest.start()
        try:
            result, _ = migrate(src, dst, config, transport, guest)
        finally:
            guest.stop()
        assert result.verified is True and result.rounds >= 2
        assert same_memory(src, dst)
        if workload == "incrementer":
            assert check_incrementer(dst) == ""
