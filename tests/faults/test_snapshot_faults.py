"""Bad snapshot files are refused before anything loads; failed saves leave no file.

Every case runs real channel processes under the leak check: nothing may be
left running, mapped or open, and a failed save must leave the guest running.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from clients.devices import DemoDevice
from clients.guest import SyntheticGuest, check_incrementer
from engine import GuestRAM, MigrationConfig, MigrationState
from engine.errors import (
    CancelledError,
    ConfigError,
    DeviceStateError,
    GuestControlError,
    MigrationError,
    SnapshotError,
    SnapshotFormatError,
)
from engine.snapshot import SnapshotRestore, SnapshotSave, inspect_snapshot
from engine.wire import snapshot_format as fmt
from tests.harness import NIC, MiB, Recorder, guest_ram, in_round, kill_a_channel, same_memory

# Rounds capped at 16 MiB/s over 4 MiB of RAM a guest dirties at 64 MiB/s: every
# round finds the whole RAM dirty again, so the save runs until stopped.
NEVER_CONVERGES = MigrationConfig(max_bandwidth=16 * MiB, packet_pages=16, max_rounds=10_000,
                                  downtime_limit_ms=1)


@pytest.fixture
def snapshot(tmp_path: Path) -> Path:
    """A good stopped snapshot: 4 MiB of text (some zero pages), device NIC."""
    path = tmp_path / "good.snap"
    with guest_ram(4 * MiB, fill="text") as ram:
        SnapshotSave(ram, str(path), live=False, devices=[Recorder(*NIC)]).run()
    return path


def _restore_refused(path: Path, error: type[MigrationError], match: str,
                     layout: dict[str, int] | None = None) -> None:
    """Restore into RAM holding a sentinel: refused, and nothing was loaded."""
    device = Recorder(*NIC)
    with GuestRAM.create(layout or {"pc.ram": 4 * MiB}) as ram:
        ram.blocks[0].array()[:] = 0x5A
        with pytest.raises(error, match=match):
            SnapshotRestore(str(path), ram=ram, devices=[device]).run()
        assert (ram.blocks[0].array() == 0x5A).all(), "guest RAM was written"
    assert device.calls == [], "a device was loaded"


def _rewrite(path: Path, metadata: Callable[[fmt.Metadata], fmt.Metadata]) -> None:
    """Change the metadata and sign it again, as a buggy or hostile writer would."""
    data = bytearray(path.read_bytes())
    sb = fmt.decode_superblock(bytes(data[:fmt.SUPERBLOCK_SIZE]), len(data))
    md = fmt.decode_metadata(bytes(data[sb.meta_offset:sb.meta_offset + sb.meta_length]), sb,
                             [_block(path, sb)])
    meta = fmt.encode_metadata(metadata(md))
    data = data[:sb.meta_offset] + meta
    sb = replace(sb, meta_length=len(meta), file_size=len(data), meta_digest=hashlib.sha256(meta).digest())
    data[:fmt.SUPERBLOCK_SIZE] = fmt.encode_superblock(sb)
    path.write_bytes(bytes(data))


def _block(path: Path, sb: fmt.Superblock) -> fmt.BlockEntry:
    """The header of the one block of these snapshots."""
    with open(path, "rb") as f:
        f.seek(fmt.SUPERBLOCK_SIZE)
        return fmt.decode_block_header(f.read(fmt.BLOCK_HEADER_SIZE), fmt.SUPERBLOCK_SIZE, 0, sb)


def _rewrite_block(path: Path, **changes: int) -> None:
    """Change fields of block 0's header and sign it again (a buggy or hostile writer)."""
    sb = fmt.decode_superblock(path.read_bytes()[:fmt.SUPERBLOCK_SIZE], path.stat().st_size)
    _patch(path, fmt.SUPERBLOCK_SIZE, fmt.encode_block_header(0, replace(_block(path, sb), **changes)))


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_good_snapshot_restores(snapshot: Path) -> None:
    device = Recorder(*NIC)
    with GuestRAM.create({"pc.ram": 4 * MiB}) as ram:
        SnapshotRestore(str(snapshot), ram=ram, devices=[device]).run()
    assert device.calls == ["state", "config"]


@pytest.mark.parametrize("keep", ["nothing", "100 bytes", "half the pages", "all but the last byte"])
def test_truncated_file(snapshot: Path, keep: str) -> None:
    size = snapshot.stat().st_size
    cut = {"nothing": 0, "100 bytes": 100, "half the pages": 3 * MiB, "all but the last byte": size - 1}
    os.truncate(snapshot, cut[keep])
    _restore_refused(snapshot, SnapshotFormatError, "too short|truncated")


def test_wrong_magic(snapshot: Path) -> None:
    _patch(snapshot, 0, b"QEVM\x00\x00\x00\x03")
    _restore_refused(snapshot, SnapshotFormatError, "not a multifd snapshot")


@pytest.mark.parametrize("version, match", [
    (4, r"version 4 is not supported by this multifd \(3\)$"),
    # Version 2 (no chunk checksums) and 1 (no checksums at all): refused, not read.
    (2, r"snapshot format version 2 is not supported by this multifd \(3\); re-save it"),
    (1, r"snapshot format version 1 is not supported by this multifd \(3\); re-save it"),
])
def test_other_version(snapshot: Path, version: int, match: str) -> None:
    header = bytearray(snapshot.read_bytes()[:fmt.SUPERBLOCK_USED])
    header[8:12] = version.to_bytes(4, "little")
    header[112:144] = hashlib.sha256(bytes(header[:112])).digest()
    _patch(snapshot, 0, bytes(header))
    _restore_refused(snapshot, SnapshotFormatError, match)


def test_damaged_header(snapshot: Path) -> None:
    _patch(snapshot, 40, b"\xff")  # meta_length, without re-signing
    _restore_refused(snapshot, SnapshotFormatError, "header is damaged")


def test_unfinished_save_has_no_header(snapshot: Path) -> None:
    _patch(snapshot, 0, bytes(fmt.SUPERBLOCK_SIZE))  # what a crash before publish leaves
    _restore_refused(snapshot, SnapshotFormatError, "a save that never finished")


def test_damaged_metadata(snapshot: Path) -> None:
    sb = fmt.decode_superblock(snapshot.read_bytes()[:fmt.SUPERBLOCK_SIZE], snapshot.stat().st_size)
    _patch(snapshot, sb.meta_offset + 3, b"\x00\x01")
    _restore_refused(snapshot, SnapshotFormatError, "metadata is damaged")


def test_damaged_block_header(snapshot: Path) -> None:
    _patch(snapshot, fmt.SUPERBLOCK_SIZE + 280, b"\x07")  # bitmap_offset, without re-signing
    _restore_refused(snapshot, SnapshotFormatError, "block 0: its header is damaged")


def test_damaged_bitmap(snapshot: Path) -> None:
    _patch(snapshot, fmt.SUPERBLOCK_SIZE + fmt.BLOCK_HEADER_SIZE, b"\x00")  # pages 0-7 "absent"
    _restore_refused(snapshot, SnapshotFormatError, "the bitmap of block 'pc.ram' is damaged")


def test_damaged_checksum_array(snapshot: Path) -> None:
    sb = fmt.decode_superblock(snapshot.read_bytes()[:fmt.SUPERBLOCK_SIZE], snapshot.stat().st_size)
    block = _block(snapshot, sb)
    _patch(snapshot, block.sums_offset(4096) + 8 * 5 + 3, b"\x5a")  # page 5's checksum
    _restore_refused(snapshot, SnapshotFormatError, "the page checksums of block 'pc.ram' are damaged")


def test_damaged_page_fails_the_restore_before_the_guest_runs(snapshot: Path) -> None:
    """A flipped bit in the page area is found by the channel that reads it: the
    restore fails naming block, page and offset, and never resumes the guest."""
    sb = fmt.decode_superblock(snapshot.read_bytes()[:fmt.SUPERBLOCK_SIZE], snapshot.stat().st_size)
    block = _block(snapshot, sb)
    with open(snapshot, "rb") as f:
        f.seek(block.bitmap_offset)
        present = fmt.decode_bitmap(f.read(block.bitmap_length(4096)), 1024)
        page = int(present[len(present) // 2])
        offset = block.pages_offset + page * 4096 + 1234
        f.seek(offset)
        byte = f.read(1)[0]
    _patch(snapshot, offset, bytes([byte ^ 0x10]))
    resumed: list[bool] = []
    with GuestRAM.create({"pc.ram": 4 * MiB}) as ram:
        restore = SnapshotRestore(str(snapshot), ram=ram, devices=[Recorder(*NIC)],
                                  resume_guest=lambda: resumed.append(True))
        with pytest.raises(SnapshotFormatError,
                           match=f"block 'pc.ram' page {page} \\(file offset "
                                 f"{block.pages_offset + page * 4096}\\) is damaged"):
            restore.run()
    assert resumed == []
    assert restore.state is MigrationState.FAILED and restore.result is None


def test_bitmap_outside_the_file(snapshot: Path) -> None:
    # A block of 1 TiB has a 32 MiB bitmap: far past the end of this file
    # (and 2 GiB of page checksums after it, before its pages).
    _rewrite_block(snapshot, size=1 << 40, pages_offset=3 << 30)
    _restore_refused(snapshot, SnapshotFormatError, "bitmap of block 'pc.ram' .* points outside")


def test_pages_outside_the_file(snapshot: Path) -> None:
    _rewrite_block(snapshot, pages_offset=1 << 30)
    _restore_refused(snapshot, SnapshotFormatError, "pages of block 'pc.ram' .* points outside")


def test_device_state_over_the_pages(snapshot: Path) -> None:
    def move(md: fmt.Metadata) -> fmt.Metadata:
        device = md.devices[0]
        return replace(md, devices=(replace(device, chunks=((2 * MiB, 5), device.chunks[1])),))
    _rewrite(snapshot, move)
    _restore_refused(snapshot, SnapshotFormatError,
                     "a chunk of device 'nic'/0 overlaps the pages of block 'pc.ram'")


def test_device_chunk_outside_the_file(snapshot: Path) -> None:
    def move(md: fmt.Metadata) -> fmt.Metadata:
        device = md.devices[0]
        return replace(md, devices=(replace(device, chunks=((1 << 33, 5), device.chunks[1])),))
    _rewrite(snapshot, move)
    _restore_refused(snapshot, SnapshotFormatError, "chunk of device 'nic'/0 .* points outside")


def test_bitmap_that_disagrees_with_its_block_header(snapshot: Path) -> None:
    _rewrite_block(snapshot, present_pages=1)
    _restore_refused(snapshot, SnapshotFormatError, "its block header says 1")


@pytest.mark.parametrize("layout", [{"pc.ram": 8 * MiB}, {"pc.ram": 4 * MiB, "vga": MiB},
                                    {"other": 4 * MiB}])
def test_size_that_does_not_match_the_guest(snapshot: Path, layout: dict[str, int]) -> None:
    _restore_refused(snapshot, ConfigError, "does not match the guest's", layout=layout)


def test_device_on_one_side_only(snapshot: Path) -> None:
    with pytest.raises(ConfigError, match="'nic'/0 is in the snapshot but was not given"):
        SnapshotRestore(str(snapshot)).run()
    with pytest.raises(ConfigError, match="'gpu'/0 is not in the snapshot"):
        SnapshotRestore(str(snapshot), devices=[Recorder(*NIC), Recorder("gpu")]).run()


def test_not_a_file_at_all(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="no snapshot at"):
        SnapshotRestore(str(tmp_path / "missing.snap")).run()
    garbage = tmp_path / "garbage.snap"
    garbage.write_bytes(os.urandom(10000))
    with pytest.raises(SnapshotFormatError, match="not a multifd snapshot"):
        SnapshotRestore(str(garbage)).run()


# ---------------------------------------------------------------------------
# Saves that fail: the guest runs on, and no file looks complete.


class FailingDevice(DemoDevice):
    def save_state(self):  # type: ignore[no-untyped-def]
        yield from list(super().save_state())[:2]
        raise OSError("firmware timed out")


def _assert_running(guest: SyntheticGuest, ram: GuestRAM) -> None:
    assert not guest.paused
    before = bytes(ram.blocks[0].pages)
    deadline = time.monotonic() + 10
    while bytes(ram.blocks[0].pages) == before:
        assert time.monotonic() < deadline, "the guest did not run after the failed save"
        time.sleep(0.02)


def test_failed_device_save_leaves_the_old_snapshot_and_a_running_guest(snapshot: Path) -> None:
    old = snapshot.read_bytes()
    with guest_ram(4 * MiB) as ram, SyntheticGuest(ram, "incrementer", dirty_rate=8 * MiB) as guest:
        save = SnapshotSave(ram, str(snapshot), live=True, pause_guest=guest.pause,
                            resume_guest=guest.resume,
                            devices=[FailingDevice("gpu", state_size=MiB)])
        with pytest.raises(DeviceStateError, match="'gpu'/0 failed to save: firmware timed out"):
            save.run()
        _assert_running(guest, ram)
        guest.pause()
        assert check_incrementer(ram) == ""
    assert snapshot.read_bytes() == old  # the old snapshot is untouched
    assert sorted(os.listdir(snapshot.parent)) == ["good.snap"]  # no partial file


def test_cancel_during_a_live_save(tmp_path: Path) -> None:
    path = tmp_path / "cancelled.snap"
    with guest_ram(4 * MiB) as ram, SyntheticGuest(ram, "random", dirty_rate=64 * MiB) as guest:
        save = SnapshotSave(ram, str(path), live=True, config=NEVER_CONVERGES,
                            pause_guest=guest.pause, resume_guest=guest.resume)
        save.start()
        in_round(save)
        save.cancel("operator changed their mind")
        with pytest.raises(CancelledError, match="changed their mind"):
            save.wait(20)
        _assert_running(guest, ram)
    assert os.listdir(tmp_path) == []


def test_channel_killed_during_save(tmp_path: Path) -> None:
    path = tmp_path / "killed.snap"
    with guest_ram(4 * MiB) as ram, SyntheticGuest(ram, "random", dirty_rate=64 * MiB) as guest:
        save = SnapshotSave(ram, str(path), live=True, config=NEVER_CONVERGES,
                            pause_guest=guest.pause, resume_guest=guest.resume)
        save.start()
        kill_a_channel(save)
        with pytest.raises(MigrationError, match="died|exit"):
            save.wait(20)
        _assert_running(guest, ram)
    assert os.listdir(tmp_path) == []


def test_save_into_a_missing_directory(tmp_path: Path) -> None:
    with guest_ram(4 * MiB) as ram, pytest.raises(SnapshotError, match="cannot open"):
        SnapshotSave(ram, str(tmp_path / "no" / "such" / "dir.snap"), live=False).run()


def test_restore_failure_leaves_no_ram_behind(snapshot: Path) -> None:
    """A restore that creates its RAM and fails (a device load raises) frees it."""
    class Broken(Recorder):
        def load_config(self, config: bytes) -> None:
            raise ValueError("no such PCI slot")

    restore = SnapshotRestore(str(snapshot), devices=[Broken(*NIC)])
    with pytest.raises(DeviceStateError, match="no such PCI slot"):
        restore.run()
    assert restore.ram is None  # unlinked (the leak check sees /dev/shm too)


def test_save_and_restore_in_threads_at_once(tmp_path: Path) -> None:
    """A save and a restore at once share nothing: separate files, segments, pools."""
    errors: list[BaseException] = []
    with guest_ram(4 * MiB, seed=1) as a, guest_ram(4 * MiB, seed=2) as b:
        SnapshotSave(a, str(tmp_path / "a.snap"), live=False).run()

        def run(job: Callable[[], object]) -> None:
            try:
                job()
            except BaseException as exc:
                errors.append(exc)

        with GuestRAM.create({"pc.ram": 4 * MiB}) as target:
            jobs = [lambda: SnapshotSave(b, str(tmp_path / "b.snap"), live=False).run(),
                    lambda: SnapshotRestore(str(tmp_path / "a.snap"), ram=target).run()]
            threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert not errors, errors
            assert same_memory(a, target)
        with GuestRAM.create({"pc.ram": 4 * MiB}) as target:
            SnapshotRestore(str(tmp_path / "b.snap"), ram=target).run()  # the other save is whole
            assert same_memory(b, target)


def test_a_resume_hook_that_raises_after_a_restore_keeps_the_restored_guest(snapshot: Path) -> None:
    """Past its point of no return a restore's resume_guest failing is a
    GuestControlError that says the guest is not running; the RAM it restored
    (made by the restore) and the devices stay in place for the VMM to retry."""
    def fail() -> None:
        raise ValueError("the vCPUs would not start")

    class Cancellable(Recorder):
        def cancel(self) -> None:
            self.calls.append("cancel")

    device = Cancellable(*NIC)
    restore = SnapshotRestore(str(snapshot), devices=[device], resume_guest=fail)
    with pytest.raises(GuestControlError, match="restored, but resume_guest raised ValueError: the vCPUs "
                                                "would not start: the guest is NOT running") as caught:
        restore.run()
    assert isinstance(caught.value.__cause__, ValueError)
    assert restore.ram is not None, "the restored RAM was freed"
    with restore.ram as ram, guest_ram(4 * MiB, fill="text") as saved:
        assert same_memory(saved, ram)
    assert device.calls == ["state", "config"], "a device in place was cancelled"


def test_a_dirty_source_that_raises_is_a_guest_control_error(tmp_path: Path) -> None:
    """The VMM's dirty log is a hook like pause_guest: its exception fails the
    save as a GuestControlError (in the one tree), the guest running on, no file."""
    class BrokenDirtyLog:
        def take(self, block: object) -> object:
            raise ValueError("the dirty log ioctl failed")

        def count(self, block: object) -> int:
            return 0

    resumed: list[bool] = []
    path = tmp_path / "vm.snap"
    with guest_ram(4 * MiB) as ram:
        save = SnapshotSave(ram, str(path), dirty_source=BrokenDirtyLog(), pause_guest=lambda: None,
                            resume_guest=lambda: resumed.append(True))
        with pytest.raises(GuestControlError,
                           match=r"dirty_source\.take\(\) raised ValueError: the dirty log ioctl failed"):
            save.run()
    assert resumed == [] and not path.exists()


@pytest.mark.parametrize("reader", ["restore", "scrub"])
def test_a_snapshot_renamed_over_while_read_is_not_called_damaged(
        snapshot: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reader: str) -> None:
    """Another good snapshot renamed over the file between the structure check and
    the channels' opens (a checkpoint save to the same path does that): the
    channels open by name, so they would read the other file against this one's
    checksums and blame a good snapshot ("page N is damaged").  They find it is not
    the file checked, and say it was replaced."""
    other = tmp_path / "other.snap"
    with guest_ram(4 * MiB, fill="random") as ram:
        SnapshotSave(ram, str(other), live=False, devices=[Recorder(*NIC)]).run()
    import engine.snapshot as snapshot_module

    def replaced_first(original: Callable[..., object]) -> Callable[..., object]:
        def call(*args: object, **kwargs: object) -> object:
            os.rename(other, snapshot)  # as a save publishes: rename over the target
            return original(*args, **kwargs)
        return call

    message = f"{snapshot} was replaced while in use: another file took its name"
    if reader == "restore":
        monkeypatch.setattr(SnapshotRestore, "_start_file_channels",
                            replaced_first(SnapshotRestore._start_file_channels))
        with GuestRAM.create({"pc.ram": 4 * MiB}) as ram, pytest.raises(SnapshotError, match=message):
            SnapshotRestore(str(snapshot), ram=ram, devices=[Recorder(*NIC)]).run()
    else:
        monkeypatch.setattr(snapshot_module, "scrub_pages", replaced_first(snapshot_module.scrub_pages))
        with pytest.raises(SnapshotError, match=message):
            inspect_snapshot(str(snapshot), verify=True, channels=2)
