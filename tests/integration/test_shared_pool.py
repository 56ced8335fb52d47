"""A VMM's warm process pool, shared by its migrations, saves and restores.

The channel processes are the pool's workers: the same pids serve operation
after operation, an operation that fails leaves the pool as it found it, and
a pool that cannot serve (broken, too small, threads) is refused up front.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clients.guest import SyntheticGuest
from engine import DestinationMigration, GuestRAM, MigrationConfig, SourceMigration, operation
from engine.channel import keep_ram_mapped
from engine.errors import CancelledError, ConfigError, DeviceStateError, MigrationError
from engine.pool import WorkerPool
from engine.snapshot import SnapshotRestore, SnapshotSave
from tests.harness import (
    NIC,
    SECRET,
    MiB,
    Recorder,
    address,
    guest_ram,
    in_round,
    kill_a_channel,
    same_memory,
)

TWO = MigrationConfig(channels=2, packet_pages=64)


@contextlib.contextmanager
def warm_pool(workers: int = 4) -> Iterator[WorkerPool]:
    pool = WorkerPool("process", workers, name="vmm-pool")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel=True)


def _pids(pool: WorkerPool) -> tuple[int, ...]:
    return tuple(sorted(pool.statistics().worker_pids))


def _assert_idle(pool: WorkerPool) -> None:
    stats = pool.statistics()
    assert pool.broken is None and stats.busy == 0 and stats.pending == 0, stats


def _migrate(src: GuestRAM, dst: GuestRAM, pool: WorkerPool, config: MigrationConfig = TWO) -> None:
    """Both sides' channels on the one pool (2 + 2 workers)."""
    destination = DestinationMigration(address("unix"), secret=SECRET, ram=dst, config=config, pool=pool)
    destination.start()
    try:
        SourceMigration(src, destination.address, secret=SECRET, config=config, pool=pool).run()
    finally:
        destination.wait(20)


def test_one_pool_serves_saves_restores_and_migrations(tmp_path: Path) -> None:
    path = tmp_path / "vm.snap"
    with warm_pool() as pool, guest_ram(8 * MiB, fill="text") as ram:
        SnapshotSave(ram, str(path), config=TWO, live=False, pool=pool).run()
        workers = _pids(pool)
        assert len(workers) == 2
        for _ in range(2):
            restore = SnapshotRestore(str(path), config=TWO, pool=pool)
            restore.run()
            assert restore.ram is not None
            try:
                assert same_memory(ram, restore.ram)
                assert _pids(pool) == workers  # no process was started for it
            finally:
                restore.ram.close()
                restore.ram.unlink()
        with GuestRAM.create({"pc.ram": 8 * MiB}) as dst:
            _migrate(ram, dst, pool)
            assert same_memory(ram, dst)
        assert set(workers) <= set(_pids(pool)) and len(_pids(pool)) == 4
        _assert_idle(pool)


def test_failed_operations_leave_the_pool_usable(tmp_path: Path) -> None:
    path = tmp_path / "vm.snap"
    with warm_pool() as pool, guest_ram(8 * MiB) as ram:
        SnapshotSave(ram, str(path), config=TWO, live=False, devices=[Recorder(*NIC)], pool=pool).run()
        saved = bytes(ram.blocks[0].pages)
        workers = _pids(pool)

        # A restore whose device fails after its channels started.
        class Broken(Recorder):
            def load_config(self, config: bytes) -> None:
                raise ValueError("no such PCI slot")

        with pytest.raises(DeviceStateError, match="no such PCI slot"):
            SnapshotRestore(str(path), config=TWO, devices=[Broken(*NIC)], pool=pool).run()
        _assert_idle(pool)

        # A migration whose destination goes away mid-precopy: the source's
        # channels fail on their sockets, and that failure stays in the migration.
        with GuestRAM.create({"pc.ram": 8 * MiB}) as dst, \
                SyntheticGuest(ram, "random", dirty_rate=64 * MiB) as guest:
            never = MigrationConfig(channels=2, packet_pages=16, max_bandwidth=16 * MiB,
                                    max_rounds=10_000, downtime_limit_ms=0.001)
            destination = DestinationMigration(address("tcp"), secret=SECRET, ram=dst, config=never)
            destination.start()
            source = SourceMigration(ram, destination.address, secret=SECRET, config=never,
                                     pause_guest=guest.pause, resume_guest=guest.resume, pool=pool)
            source.start()
            in_round(source)
            destination.cancel("the destination host is going down")
            with pytest.raises(CancelledError):
                destination.wait(20)
            with pytest.raises(MigrationError):
                source.wait(20)
            assert not guest.paused
        _assert_idle(pool)
        assert _pids(pool) == workers

        restore = SnapshotRestore(str(path), config=TWO, devices=[Recorder(*NIC)], pool=pool)
        restore.run()
        assert restore.ram is not None
        try:
            assert bytes(restore.ram.blocks[0].pages) == saved
        finally:
            restore.ram.close()
            restore.ram.unlink()
        assert _pids(pool) == workers


def test_a_killed_channel_breaks_the_pool_and_the_next_operation_says_so(tmp_path: Path) -> None:
    never = MigrationConfig(channels=2, packet_pages=16, max_bandwidth=16 * MiB, max_rounds=10_000,
                            compression="none")
    with warm_pool() as pool, guest_ram(4 * MiB) as ram, \
            SyntheticGuest(ram, "random", dirty_rate=64 * MiB) as guest:
        save = SnapshotSave(ram, str(tmp_path / "a.snap"), config=never, live=True,
                            pause_guest=guest.pause, resume_guest=guest.resume, pool=pool)
        save.start()
        kill_a_channel(save)
        with pytest.raises(MigrationError, match="died|exit"):
            save.wait(20)
        assert not guest.paused
        assert pool.broken is not None
        with pytest.raises(ConfigError, match="broken by an earlier failure"):
            SnapshotSave(ram, str(tmp_path / "b.snap"), config=TWO, live=False, pool=pool).run()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_pool_that_cannot_serve_is_refused(tmp_path: Path) -> None:
    with guest_ram(4 * MiB) as ram:
        with warm_pool(1) as small, pytest.raises(ConfigError, match="1 free workers of 1; 2 channels"):
            SnapshotSave(ram, str(tmp_path / "a.snap"), config=TWO, live=False, pool=small).run()
        with WorkerPool("thread", 4) as threads, pytest.raises(ConfigError, match="process backend"):
            SnapshotSave(ram, str(tmp_path / "a.snap"), config=TWO, live=False, pool=threads)  # no run()
        with warm_pool(2) as gone:
            pass
        with pytest.raises(ConfigError, match="a running WorkerPool"):  # shut down: refused as made
            SourceMigration(ram, "tcp://127.0.0.1:1", secret=SECRET, config=TWO, pool=gone)
    assert list(tmp_path.iterdir()) == []


def test_two_operations_starting_at_once_never_count_the_same_free_workers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two saves of 3 channels each start together on 4 warm workers: each either gets
    its workers or a ConfigError at once (both complete if the first is done before the
    second counts).  Never both counted the same workers: their 6 jobs queued on 4
    workers hung until the channels' start-up timeout.  Several rounds: it was a race."""
    three = MigrationConfig(channels=3, packet_pages=64)
    count = operation._free_workers
    counted: list[int] = []

    def slow_count(pool: WorkerPool) -> int:  # the race's window, held open
        free = count(pool)
        counted.append(free)
        time.sleep(0.05)
        return free

    monkeypatch.setattr(operation, "_free_workers", slow_count)
    with warm_pool(4) as pool, guest_ram(4 * MiB) as first, guest_ram(4 * MiB, seed=2) as second:
        _migrate(first, second, pool, TWO)  # every worker up
        for round_ in range(4):
            counted.clear()
            saves = [SnapshotSave(ram, str(tmp_path / f"{round_}-{i}.snap"), config=three, live=False,
                                  pool=pool) for i, ram in enumerate((first, second))]
            for save in saves:
                save.start()
            outcomes = []
            for save in saves:
                try:
                    save.wait(60)
                    outcomes.append("completed")
                except ConfigError as refused:
                    assert "free workers of 4; 3 channels need one each" in str(refused)
                    outcomes.append("refused")
            assert "completed" in outcomes, outcomes
            assert counted.count(4) == 1, counted  # the second count saw the first's workers taken
            _assert_idle(pool)


def _maps(pid: int, ram: GuestRAM) -> bool:
    """Whether process `pid` maps the segment of `ram`'s (one) block."""
    return f"/{ram.blocks[0].segment.name}" in Path(f"/proc/{pid}/maps").read_text()


def _minor_faults(pids: tuple[int, ...]) -> int:
    """Minor page faults of `pids` so far (field 10 of /proc/PID/stat)."""
    return sum(int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7]) for pid in pids)


def test_kept_ram_is_mapped_in_every_worker_and_its_channels_build_no_page_tables() -> None:
    """keep_ram_mapped: every worker maps the RAM for the block, and gives it up at
    its end; the channels of a migration inside use those mappings, where a channel
    that maps the RAM itself faults its page tables in (~one fault per 10 pages)."""
    size, config = 64 * MiB, MigrationConfig(channels=2, packet_pages=1024)
    with warm_pool() as pool, guest_ram(size, fill="random") as src, \
            GuestRAM.create({"pc.ram": size}) as dst:

        def faults_of_a_migration() -> int:
            before = _minor_faults(workers)
            _migrate(src, dst, pool, config)
            assert same_memory(src, dst)
            assert _pids(pool) == workers
            return _minor_faults(workers) - before

        _migrate(src, dst, pool, config)  # every worker started, its buffers made
        workers = _pids(pool)
        assert len(workers) == 4
        mapping_itself = faults_of_a_migration()
        with keep_ram_mapped(pool, src), keep_ram_mapped(pool, dst):
            assert all(_maps(pid, src) and _maps(pid, dst) for pid in workers)
            kept = faults_of_a_migration()
        assert not any(_maps(pid, src) or _maps(pid, dst) for pid in workers)
        _assert_idle(pool)
    pages_moved = 2 * size // 4096  # read on one side, written on the other
    assert kept + pages_moved // 32 < mapping_itself, (kept, mapping_itself)


def test_kept_ram_is_released_when_the_block_fails() -> None:
    """The block's own error comes out, and the workers have unmapped the RAM."""
    with warm_pool(2) as pool, guest_ram(4 * MiB) as ram:
        with pytest.raises(RuntimeError, match="the VM stopped"), keep_ram_mapped(pool, ram):
            workers = _pids(pool)
            assert all(_maps(pid, ram) for pid in workers)
            raise RuntimeError("the VM stopped")
        assert not any(_maps(pid, ram) for pid in workers)
        _assert_idle(pool)


def test_keep_ram_mapped_needs_a_process_pool() -> None:
    with WorkerPool("thread", 2, name="threads") as pool, guest_ram(MiB) as ram:
        with pytest.raises(ConfigError, match="process backend"), keep_ram_mapped(pool, ram):
            pass
