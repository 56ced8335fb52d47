"""Snapshots to a file and back: real channel processes, real files, a running guest."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from clients.devices import DemoDevice, demo_devices
from clients.guest import SyntheticGuest, check_incrementer, fill_ram
from engine import GuestRAM, MigrationConfig
from engine.errors import CancelledError, ConfigError, RemoteTraceback, SnapshotError, SnapshotFormatError
from engine.pool import WorkerPool
from engine.scrub import scrub_pages
from engine.snapshot import (
    Damage,
    SnapshotInfo,
    SnapshotRestore,
    SnapshotSave,
    _read_snapshot,
    inspect_snapshot,
)
from engine.transport import open_file
from engine.wire import snapshot_format as fmt
from tests.harness import MiB, guest_ram, same_memory, wait_until


def _images(ram: GuestRAM) -> list[bytes]:
    return [bytes(block.pages) for block in ram.blocks]


def _restore(path: Path, channels: int = 2, **kw: object) -> tuple[GuestRAM, object]:
    restore = SnapshotRestore(str(path), config=MigrationConfig(channels=channels), **kw)  # type: ignore[arg-type]
    result = restore.run()
    assert restore.ram is not None
    return restore.ram, result


def _restores_to(path: Path, ram: GuestRAM, **kw: object) -> None:
    """Restore `path` into RAM of its own: it holds exactly `ram`'s bytes."""
    restored, _ = _restore(path, **kw)  # type: ignore[arg-type]
    try:
        assert same_memory(ram, restored)
    finally:
        restored.close()
        restored.unlink()


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_live_save_with_a_dirtying_guest_restores_ram_at_pause(tmp_path: Path, channels: int) -> None:
    path = tmp_path / "guest.snap"
    config = MigrationConfig(channels=channels, packet_pages=256, compression="none")
    with guest_ram(24 * MiB, fill="text", blocks=2) as ram:
        with SyntheticGuest(ram, "incrementer", dirty_rate=24 * MiB) as guest:
            result = SnapshotSave(ram, str(path), config=config, live=True,
                                  pause_guest=guest.pause, resume_guest=guest.resume).run()
            assert guest.paused  # a save leaves the guest paused
            at_pause = _images(ram)
        assert result.rounds >= 2 and result.extra["live"] is True
        assert result.extra["path"] == str(path)
        restored, restore_result = _restore(path, channels)
        try:
            assert _images(restored) == at_pause
            assert check_incrementer(restored) == ""  # a consistent image: no stale page
            assert restore_result.pages_sent + restore_result.zero_pages == ram.n_pages
        finally:
            restored.close()
            restored.unlink()
    info = inspect_snapshot(str(path))
    assert info.live and info.layout == (("pc.ram", 12 * MiB), ("block1", 12 * MiB))
    # The file never grows past RAM + metadata: re-dirtied pages overwrote their place.
    assert info.file_size <= fmt.plan_layout(info.layout).device_area + 64 * 1024


def test_stopped_save_skips_zero_pages_and_keeps_devices(tmp_path: Path) -> None:
    path = tmp_path / "stopped.snap"
    with GuestRAM.create({"pc.ram": 16 * MiB}) as ram:
        fill_ram(ram, "text", zero_fraction=0.5, seed=3)
        sources = demo_devices(3, 700 * 1024 + 5, save_latency_s=0.01)
        result = SnapshotSave(ram, str(path), live=False, devices=sources,
                              vmm_config=b'{"machine": "q35"}').run()
        assert result.rounds == 1 and result.zero_pages > 0
        assert result.pages_sent + result.zero_pages == ram.n_pages
        # Zero pages are not written: the page area holds holes there.
        info = inspect_snapshot(str(path))
        assert info.metadata.blocks[0].present_pages == result.pages_sent
        assert info.metadata.vmm_config == b'{"machine": "q35"}'
        assert [(d.idstr, d.size) for d in info.metadata.devices] == \
               [(s.idstr, len(s.state) + len(s.save_config())) for s in sources]
        targets = demo_devices(3, 700 * 1024 + 5, load_latency_s=0.01, with_state=False)
        restored, restore_result = _restore(path, devices=targets)
        try:
            assert same_memory(ram, restored)
        finally:
            restored.close()
            restored.unlink()
    assert restore_result.extra["devices_verified"] is True  # type: ignore[attr-defined]
    assert all(t.state == s.state and t.intact() for s, t in zip(sources, targets))


def test_a_page_zeroed_between_rounds_restores_as_zero(tmp_path: Path) -> None:
    """Round 1 writes pages 10..19; the guest zeroes them before the last round:
    their bits must be cleared, or restore would bring round 1's bytes back."""
    path = tmp_path / "zeroed.snap"
    with guest_ram(8 * MiB, fill="random") as ram:
        block = ram.blocks[0]

        def pause() -> None:  # the guest's last writes before it stops
            block.array()[10:20] = 0
            block.dirty.mark(10, 10)

        config = MigrationConfig(max_rounds=1, on_max_rounds="switchover", downtime_limit_ms=0)
        SnapshotSave(ram, str(path), live=True, config=config, pause_guest=pause).run()
        restored, _ = _restore(path)
        try:
            assert same_memory(ram, restored)
            assert not restored.blocks[0].array()[10:20].any()
        finally:
            restored.close()
            restored.unlink()
    info = inspect_snapshot(str(path))
    assert info.metadata.blocks[0].present_pages == ram.blocks[0].n_pages - 10
    # The last round touched 10 pages of chunk 0: too few to hash it, so its word
    # went to 0 (its pages are checked by their own words); round 1 hashed the others.
    _, _, sums = _read_structure(path)
    chunk_words = sums[0][1]
    assert chunk_words[0] == 0 and chunk_words[1:].all() and chunk_words.size == 8


def test_restore_into_used_ram_zeroes_what_the_snapshot_lacks(tmp_path: Path) -> None:
    path = tmp_path / "sparse.snap"
    with GuestRAM.create({"pc.ram": 8 * MiB}) as ram:
        ram.blocks[0].array()[::3] = 7  # a third of the pages hold data, the rest zero
        SnapshotSave(ram, str(path), live=False).run()
        with guest_ram(8 * MiB, fill="random", seed=9) as used:
            SnapshotRestore(str(path), ram=used).run()
            assert same_memory(ram, used)


def test_a_new_save_replaces_the_old_only_when_durable(tmp_path: Path) -> None:
    path = tmp_path / "twice.snap"
    with guest_ram(4 * MiB, seed=1) as first, guest_ram(4 * MiB, seed=2) as second:
        SnapshotSave(first, str(path), live=False).run()
        old = inspect_snapshot(str(path)).superblock.snapshot_id
        SnapshotSave(second, str(path), live=False).run()
        assert inspect_snapshot(str(path)).superblock.snapshot_id != old
        _restores_to(path, second)
    assert os.listdir(tmp_path) == ["twice.snap"]  # no partial file left behind


def test_resume_after_save_is_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "cp.snap"
    with guest_ram(4 * MiB) as ram:
        with SyntheticGuest(ram, "incrementer", dirty_rate=16 * MiB) as guest:
            result = SnapshotSave(ram, str(path), live=True, resume_after=True,
                                  pause_guest=guest.pause, resume_guest=guest.resume).run()
            assert not guest.paused
            restored, _ = _restore(path)
            try:
                # The guest runs on past the checkpoint.
                wait_until(lambda: not same_memory(ram, restored), "the guest to run after the save", 10)
                assert check_incrementer(restored) == ""
            finally:
                restored.close()
                restored.unlink()
    assert result.downtime_ms > 0


def test_direct_io_save_and_restore(tmp_path: Path) -> None:
    path = tmp_path / "direct.snap"
    with guest_ram(8 * MiB, fill="text") as ram:
        try:
            SnapshotSave(ram, str(path), live=False, direct_io=True).run()
        except SnapshotError as exc:
            if "does not support O_DIRECT" in str(exc):
                pytest.skip(str(exc))
            raise
        _restores_to(path, ram, direct_io=True)
        # The channels themselves hold the file with O_DIRECT (a save that never
        # converges keeps them open long enough to look).
        never = MigrationConfig(max_bandwidth=16 * MiB, packet_pages=16, max_rounds=10_000)
        with SyntheticGuest(ram, "random", dirty_rate=64 * MiB) as guest:
            save = SnapshotSave(ram, str(tmp_path / "live.snap"), config=never, direct_io=True,
                                pause_guest=guest.pause, resume_guest=guest.resume)
            save.start()
            try:
                wait_until(save.channel_pids, "the channel processes")
                assert all(_opened_with_o_direct(pid, ".live.snap.partial") for pid in save.channel_pids())
            finally:
                save.cancel("seen enough")
                with pytest.raises(CancelledError):
                    save.wait(20)


def _opened_with_o_direct(pid: int, name_prefix: str) -> bool:
    """Whether process `pid` holds a file named `name_prefix`... open with O_DIRECT."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if os.path.basename(os.readlink(f"/proc/{pid}/fd/{fd}")).startswith(name_prefix):
            with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                flags = next(line for line in info if line.startswith("flags:")).split()[1]
            return bool(int(flags, 8) & os.O_DIRECT)
    raise AssertionError(f"process {pid} has no file {name_prefix}... open")


def test_compression_is_refused_for_a_snapshot(tmp_path: Path) -> None:
    from engine.errors import ConfigError

    with guest_ram(4 * MiB) as ram, pytest.raises(ConfigError, match="uncompressed"):
        SnapshotSave(ram, str(tmp_path / "x.snap"), config=MigrationConfig(compression="lz4"))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("devices, problem", [
    pytest.param(demo_devices(1025, 16), "1025 devices: at most 1024", id="1025-devices"),
    pytest.param([DemoDevice("dev", 1 << 32, 16)], "does not fit 32 bits", id="instance-id-2**32"),
    pytest.param([DemoDevice("dev", -1, 16)], "does not fit 32 bits", id="negative-instance-id"),
    pytest.param([DemoDevice("a\udcff", 0, 16)], "is not UTF-8", id="idstr-not-utf8"),
    pytest.param([DemoDevice("", 0, 16)], "1..255 UTF-8 bytes", id="empty-idstr"),
])
def test_devices_a_file_cannot_hold_are_refused_before_anything_is_written(
        tmp_path: Path, devices: list[DemoDevice], problem: str) -> None:
    """A save checks what a reader would refuse before it pauses or writes
    anything, so a good snapshot at the path is never replaced by a file that
    cannot be restored."""
    path = tmp_path / "vm.snap"
    path.write_bytes(b"the good snapshot")
    with guest_ram(1 * MiB) as ram, pytest.raises(ConfigError, match=problem):
        SnapshotSave(ram, str(path), devices=devices)
    assert [p.name for p in tmp_path.iterdir()] == ["vm.snap"] and path.read_bytes() == b"the good snapshot"


def test_present_map_matches_what_restore_reads(tmp_path: Path) -> None:
    """Every page is either in the file (bit set) or zero in the guest."""
    path = tmp_path / "bits.snap"
    with GuestRAM.create({"pc.ram": 4 * MiB}) as ram:
        fill_ram(ram, "text", zero_fraction=0.3, seed=5)
        SnapshotSave(ram, str(path), live=False).run()
        info = inspect_snapshot(str(path))
        block = info.metadata.blocks[0]
        with open(path, "rb") as raw:
            raw.seek(block.bitmap_offset)
            present = fmt.decode_bitmap(raw.read(block.bitmap_length(4096)), 1024)
        pages = ram.blocks[0].array()
        nonzero = np.flatnonzero(pages.any(axis=1))
        assert present.tolist() == nonzero.tolist()
        del pages


def test_live_save_of_a_rewriting_guest_checks_every_page_on_restore(tmp_path: Path) -> None:
    """The guest rewrites pages while channels checksum and write them: each page's
    last write (the last round is paused) carries its own checksum, so a restore
    checks every page and finds none damaged — and a changed byte is found."""
    path = tmp_path / "busy.snap"
    config = MigrationConfig(channels=2, packet_pages=32, max_rounds=5, on_max_rounds="switchover",
                             downtime_limit_ms=0)
    with guest_ram(8 * MiB, fill="text") as ram:
        with SyntheticGuest(ram, "incrementer", dirty_rate=48 * MiB) as guest:
            result = SnapshotSave(ram, str(path), config=config, live=True,
                                  pause_guest=guest.pause, resume_guest=guest.resume).run()
            at_pause = _images(ram)
        assert result.rounds >= 3 and result.pages_sent > ram.n_pages  # pages went again
    info = inspect_snapshot(str(path), verify=True)
    assert info.damage == () and info.to_dict()["verified"] is True
    restored, restore_result = _restore(path)
    try:
        assert _images(restored) == at_pause and check_incrementer(restored) == ""
        assert restore_result.pages_sent == info.metadata.blocks[0].present_pages  # each one checked
    finally:
        restored.close()
        restored.unlink()
    block = info.metadata.blocks[0]
    with open(path, "r+b") as f:
        f.seek(block.pages_offset + 77 * 4096 + 9)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x80]))
    with pytest.raises(SnapshotFormatError, match=f"block 'pc.ram' page 77 \\(file offset "
                                                  f"{block.pages_offset + 77 * 4096}\\) is damaged"):
        SnapshotRestore(str(path), config=MigrationConfig(channels=2)).run()


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x01]))


def test_inspect_verify_names_every_damaged_region(tmp_path: Path) -> None:
    path = tmp_path / "scrub.snap"
    with guest_ram(4 * MiB, fill="random", blocks=2) as ram:
        SnapshotSave(ram, str(path), live=False, devices=demo_devices(2, 300 * 1024)).run()
    info = inspect_snapshot(str(path), verify=True)
    assert info.damage == ()
    assert inspect_snapshot(str(path)).damage is None  # no scrub without verify
    ram0, ram1 = info.metadata.blocks
    _flip(path, ram0.pages_offset + 5 * 4096 + 4095)          # the last byte of page 5
    with open(path, "r+b") as f:                              # a 4 KiB range over pages 9 and 10
        f.seek(ram1.pages_offset + 9 * 4096 + 2048)
        f.write(bytes(4096))
    chunk_at, chunk_length = info.metadata.devices[1].chunks[1]
    _flip(path, chunk_at + 100)
    damage = inspect_snapshot(str(path), verify=True).damage
    assert damage is not None
    assert [(d.block, d.page, d.n_pages, d.offset) for d in damage if d.block] == [
        ("pc.ram", 5, 1, ram0.pages_offset + 5 * 4096),
        ("block1", 9, 2, ram1.pages_offset + 9 * 4096)]
    assert [(d.device, d.chunk, d.offset, d.length) for d in damage if d.device] == [
        ("'dev1'/0", 1, chunk_at, chunk_length)]
    assert "block 'block1' pages 9-10, file offset" in damage[1].describe()
    assert inspect_snapshot(str(path), verify=True).to_dict()["verified"] is False


def _scrub_file(tmp_path: Path) -> tuple[Path, fmt.Metadata]:
    """A 2-block snapshot with a device, some zero pages, and damage in several
    places: the first page, two pages across a chunk's edge (a scrub job's, with
    jobs of one chunk), the last page, and a device chunk."""
    path = tmp_path / "scrub-many.snap"
    with guest_ram(4 * MiB, fill="random", blocks=2) as ram:
        ram.blocks[0].array()[200:300] = 0  # absent pages: a hole in the runs
        SnapshotSave(ram, str(path), live=False, devices=demo_devices(1, 100 * 1024)).run()
    md = inspect_snapshot(str(path)).metadata
    ram0, ram1 = md.blocks
    for offset in (ram0.pages_offset + 17, ram1.pages_offset + 255 * 4096 + 4000,
                   ram1.pages_offset + 256 * 4096, ram1.pages_offset + 511 * 4096 + 4095,
                   md.devices[0].chunks[0][0] + 5):
        _flip(path, offset)
    return path, md


def test_parallel_scrub_over_a_pool_finds_every_damaged_region(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Jobs of one chunk over 2 worker processes find what one process finds."""
    monkeypatch.setattr("engine.scrub.JOB_PAGES", 64)  # under a chunk: each job holds one
    path, md = _scrub_file(tmp_path)
    ram0, ram1 = md.blocks
    expected = [("pc.ram", 0, 1, ram0.pages_offset), ("block1", 255, 2, ram1.pages_offset + 255 * 4096),
                ("block1", 511, 1, ram1.pages_offset + 511 * 4096)]
    sequential = inspect_snapshot(str(path), verify=True, channels=1).damage
    assert sequential is not None
    assert [(d.block, d.page, d.n_pages, d.offset) for d in sequential if d.block] == expected
    assert [(d.device, d.chunk) for d in sequential if d.device] == [("'dev0'/0", 0)]
    assert inspect_snapshot(str(path), verify=True, channels=2).damage == sequential
    with WorkerPool("process", 2, name="scrub-warm") as warm:
        assert inspect_snapshot(str(path), verify=True, pool=warm).damage == sequential
        stats = warm.statistics()
        assert stats.workers_started == 2 and stats.completed == 4  # 2 + 2 chunks, one a job
    with WorkerPool("process", 2, name="scrub-one") as shared:  # one job at a time: one worker
        assert inspect_snapshot(str(path), verify=True, channels=1, pool=shared).damage == sequential
        assert shared.statistics().workers_started == 1


def _read_structure(path: Path) -> tuple[SnapshotInfo, list[np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    file = open_file(str(path), "read")
    try:
        return _read_snapshot(file)
    finally:
        file.close()


def test_a_scrub_that_cannot_read_fails_clearly_and_leaves_a_shared_pool_working(tmp_path: Path) -> None:
    path, md = _scrub_file(tmp_path)
    info = inspect_snapshot(str(path))
    _, present, sums = _read_structure(path)
    with WorkerPool("process", 2, name="scrub-shared") as shared:
        with pytest.raises(SnapshotError) as failed:
            scrub_pages(str(tmp_path / "gone.snap"), [b.pages_offset for b in md.blocks], present, sums,
                        4096, pool=shared)
        assert shared.broken is None
        # The worker's frames come back with it, as a contained channel's do.
        cause = failed.value.__cause__
        assert isinstance(cause, RemoteTraceback) and "in check_job" in cause.tb
        assert inspect_snapshot(str(path), verify=True, pool=shared).damage == \
            inspect_snapshot(str(path), verify=True, channels=1).damage
    with pytest.raises(ConfigError, match="process pool"), \
            WorkerPool("thread", 1, name="scrub-thread") as threads:
        inspect_snapshot(str(path), verify=True, pool=threads)
    with pytest.raises(ConfigError, match="at least 1 channel"):
        inspect_snapshot(str(path), verify=True, channels=0)
    assert info.damage is None


def test_restore_checks_every_piece_up_to_the_last_page(tmp_path: Path) -> None:
    """A damaged page in the last piece read fails the restore: the last chunk is
    checked before FINISH is answered.  (A page mid-file: the rewriting-guest test.)"""
    path = tmp_path / "pieces.snap"
    with guest_ram(8 * MiB, fill="random") as ram:
        SnapshotSave(ram, str(path), live=False).run()
    block = inspect_snapshot(str(path)).metadata.blocks[0]
    _flip(path, block.pages_offset + 2047 * 4096 + 1234)
    restore = SnapshotRestore(str(path), config=MigrationConfig(channels=1))
    with pytest.raises(SnapshotFormatError, match=f"block 'pc.ram' page 2047 \\(file offset "
                                                  f"{block.pages_offset + 2047 * 4096}\\) is damaged"):
        restore.run()
    assert restore.ram is None  # the RAM it created is gone: no guest runs on it


def _resign_chunk_word(path: Path, block: fmt.BlockEntry, chunk: int, word: int) -> None:
    """Write `word` as `chunk`'s checksum and re-sign the checksum array and the
    block header, as a save that got the chunk's word wrong would have."""
    n_pages = block.n_pages(4096)
    with open(path, "r+b") as f:
        f.seek(block.sums_offset(4096))
        sums = bytearray(f.read(block.sums_length(4096)))
        sums[8 * (n_pages + chunk):8 * (n_pages + chunk + 1)] = word.to_bytes(8, "little")
        f.seek(block.sums_offset(4096))
        f.write(sums)
        f.seek(block.header_offset)
        header = bytearray(f.read(fmt.BLOCK_HEADER_SIZE))
        header[344:376] = hashlib.sha256(sums).digest()
        header[376:408] = hashlib.sha256(bytes(header[:376])).digest()
        f.seek(block.header_offset)
        f.write(header)


@pytest.mark.parametrize("packet_pages", [4096, 300], ids=["slot-16MiB", "slot-300-pages"])
def test_restore_checks_a_whole_chunk_by_its_chunk_checksum(tmp_path: Path, packet_pages: int) -> None:
    """A dense chunk is checked by its one chunk word, even when a slot is not a
    whole number of chunks (the restore's slots end on chunk boundaries): a wrong
    chunk word over intact pages is refused, naming the chunk's pages."""
    path = tmp_path / "chunks.snap"
    with guest_ram(8 * MiB, fill="random") as ram:
        SnapshotSave(ram, str(path), live=False).run()
    block = inspect_snapshot(str(path)).metadata.blocks[0]
    assert inspect_snapshot(str(path), verify=True).damage == ()
    _resign_chunk_word(path, block, 3, 12345)
    # Every page matches its own word; the scrub still reports the chunk the restore refuses.
    assert inspect_snapshot(str(path), verify=True).damage == (
        Damage(block.pages_offset + 768 * 4096, 256 * 4096, block="pc.ram", page=768, n_pages=256, chunk=3),)
    restore = SnapshotRestore(str(path), config=MigrationConfig(channels=2, packet_pages=packet_pages))
    with pytest.raises(SnapshotFormatError, match=f"block 'pc.ram' pages 768-1023 \\(file offset "
                                                  f"{block.pages_offset + 768 * 4096}\\) do not match "
                                                  f"their chunk checksum"):
        restore.run()
    assert restore.ram is None


def test_restore_into_ram_said_zeroed_that_is_not_is_refused(tmp_path: Path) -> None:
    """A chunk's word covers its absent pages as zeros: RAM handed over as zeroed
    (``ram_is_zeroed``) that holds data where the snapshot has no page fails the
    restore in a chunk checked by its word (chunk 1: 255 of 256 pages present).
    Only there: stray bytes in a sparser chunk, one without a word or one with no
    present page are never read (``ram_is_zeroed`` is the caller's promise)."""
    path = tmp_path / "holes.snap"
    with GuestRAM.create({"pc.ram": 4 * MiB}) as ram:
        fill_ram(ram, "random", seed=4)
        ram.blocks[0].array()[300] = 0  # chunk 1 (pages 256-511) lacks page 300
        SnapshotSave(ram, str(path), live=False).run()
        with guest_ram(4 * MiB, fill="random", seed=11) as used:
            with pytest.raises(SnapshotFormatError, match=r"pages 256-511 .* not zero where the snapshot "
                                                          r"holds no page \(ram_is_zeroed\?\)"):
                SnapshotRestore(str(path), ram=used, ram_is_zeroed=True).run()
            SnapshotRestore(str(path), ram=used).run()  # zeroed by the restore: intact
            assert same_memory(ram, used)


def test_a_chunk_split_over_two_channels_in_the_last_round_gets_its_final_word(tmp_path: Path) -> None:
    """The guest rewrites all of chunk 1 before the pause: the last round cuts it
    into two slots (two channels), each hashes the chunk from guest RAM after the
    round's take, so the word is the final contents' whichever lands last."""
    path = tmp_path / "split.snap"
    with guest_ram(4 * MiB, fill="random") as ram:
        block = ram.blocks[0]

        def pause() -> None:
            block.array()[256:512] ^= 0xFF
            block.dirty.mark(256, 256)

        config = MigrationConfig(channels=2, packet_pages=128, max_rounds=1, on_max_rounds="switchover",
                                 downtime_limit_ms=0)
        SnapshotSave(ram, str(path), live=True, config=config, pause_guest=pause).run()
        _, _, sums = _read_structure(path)
        assert sums[0][1][1] == fmt.chunk_sum(block.pages[256 * 4096:512 * 4096])
        _restores_to(path, ram)


def test_a_save_keeps_each_chunk_in_one_slot_so_every_dense_chunk_gets_its_word(tmp_path: Path) -> None:
    """Slots of 500 pages are no whole number of chunks: the save still ends each
    slot on a chunk boundary, so no dense chunk is cut into a large part (hashed)
    and a small fringe (its word set to 0, "check page by page") that, landing
    last on the one channel, would leave the chunk without its word."""
    path = tmp_path / "slots.snap"
    with guest_ram(4 * MiB, fill="random") as ram:
        SnapshotSave(ram, str(path), live=False, config=MigrationConfig(channels=1, packet_pages=500)).run()
        _, _, sums = _read_structure(path)
        pages = ram.blocks[0].pages
        assert sums[0][1].tolist() == [fmt.chunk_sum(pages[c * MiB:(c + 1) * MiB]) for c in range(4)]


def test_the_scrub_checks_every_chunk_word_sparse_chunks_too(tmp_path: Path) -> None:
    """A chunk word covers its absent pages as zeros: the scrub hashes every chunk
    that has a word, its present pages read into place and the rest zero, so a
    chunk with holes passes, and a wrong word over intact pages is the chunk's
    damage — in a chunk the restore checks page by page (96 of 256 pages present)
    as in a dense one."""
    path = tmp_path / "sparse.snap"
    with guest_ram(4 * MiB, fill="random") as ram:
        pages = ram.blocks[0].array()
        pages[200:300] = 0   # chunks 0 and 1 lack some pages
        pages[600:760] = 0   # chunk 2 keeps 96 pages
        del pages
        SnapshotSave(ram, str(path), live=False).run()
        block = inspect_snapshot(str(path)).metadata.blocks[0]
        assert inspect_snapshot(str(path), verify=True).damage == ()
        _resign_chunk_word(path, block, 2, 12345)
        assert inspect_snapshot(str(path), verify=True).damage == (
            Damage(block.pages_offset + 512 * 4096, 256 * 4096, block="pc.ram", page=512, n_pages=256,
                   chunk=2),)
        _restores_to(path, ram)  # the restore checks chunk 2's pages by their own words


@pytest.mark.parametrize("packet_pages", [4096, 128], ids=["slot-16MiB", "slot-half-chunk"])
def test_an_all_zero_chunk_gets_the_word_of_zeros(tmp_path: Path, packet_pages: int) -> None:
    """A chunk whose every page a slot found zero gets the xxh3-64 of that many zero
    pages without reading RAM again (a whole chunk, and a block's shorter last
    one); with slots of half a chunk, each slot sees only half, so the chunk is
    hashed from RAM: the same word.  The restore checks and restores them."""
    path = tmp_path / "zeros.snap"
    with GuestRAM.create({"pc.ram": 4 * MiB + 100 * 4096}) as ram:
        fill_ram(ram, "random", seed=5)
        pages = ram.blocks[0].array()
        pages[256:512] = 0   # chunk 1: all zero
        pages[1024:] = 0     # chunk 4: the block's last, 100 pages, all zero
        pages[512:768:2] = 0  # chunk 2: half zero
        del pages  # no view of the RAM outlives it, even in a failure's traceback
        config = MigrationConfig(channels=2, packet_pages=packet_pages)
        SnapshotSave(ram, str(path), live=False, config=config).run()
        _, _, sums = _read_structure(path)
        chunk_words = sums[0][1]
        assert chunk_words.tolist() == [fmt.chunk_sum(ram.blocks[0].pages[at * MiB:(at + 1) * MiB])
                                        for at in range(5)]
        assert chunk_words[1] == fmt.chunk_sum(bytes(MiB))
        assert chunk_words[4] == fmt.chunk_sum(bytes(100 * 4096))
        _restores_to(path, ram)
