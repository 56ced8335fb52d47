"""Snapshots: save a guest to a file and restore it, over N file channels.

The layout (engine/wire/snapshot_format.py, docs/snapshot-format.md) gives every
guest page a fixed place, so the multifd core drives file channels exactly as
it drives socket channels — the RAM client's slots, the same rounds and syncs —
and only the channels' send op differs: positional writes and reads
(transports/file.py) instead of packets::

    save     plan the layout; create a partial file; N file channels
             live: precopy rounds until what is left fits the downtime limit
                   (a page saved again overwrites its own place)
             pause → final round; devices save at once, chunks appended after the pages
             (each channel checksums a page right before writing it, into a shared map,
             and each 1 MiB chunk of RAM its slot touched, into another: §8 of the doc)
             every channel done → block headers, bitmaps and checksum arrays, metadata
             → fsync → superblock → fsync → rename over the target → fsync the directory:
             only now "saved"
    restore  read and check superblock, metadata, bitmaps and checksum arrays — before
             anything loads; N file channels read runs of present pages straight into
             guest RAM and check each chunk's checksum (a sparse chunk's: each page's)
             right after its pages are read, while every device loads at once on the
             pool; then (every page checked) resume

A save that fails or is cancelled removes its partial file and resumes the
guest; the target path is untouched until the new snapshot is durable.  A
restore that meets a damaged page fails before the guest runs.
``inspect_snapshot(path, verify=True)`` scrubs a whole file, in parallel over
channels (engine/scrub.py), and names every damaged region.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from engine.channel import ChannelSpec, FileTarget, run_file_channel
from engine.config import MigrationConfig, check_argument, check_hooks, check_path, source_config
from engine.device import DeviceLoading, MigratableDevice, checked_devices, loading_devices
from engine.dirty import DirtySource
from engine.errors import ConfigError, GuestControlError, LocalProtocolError, SnapshotFormatError
from engine.multifd import MultifdSender
from engine.operation import Operation, check_ram
from engine.pages import pages_to_runs
from engine.payload import PrecopyClient, payload_entry
from engine.pool import WorkerPool
from engine.saving import RAM_CLIENT, SavingOperation
from engine.scrub import scrub_pages
from engine.shm import PAGE_SIZE, GuestRAM, Segment
from engine.slots import SlotTable
from engine.stats import MigrationResult, StatsTracker
from engine.sync import MigrationEvent
from engine.transport import PositionalFile, open_file
from engine.verify import check_dump_dir, dump_ram
from engine.wire import message as wire
from engine.wire import packet
from engine.wire import snapshot_format as fmt

log = logging.getLogger("multifd.snapshot")

def _check_config(config: MigrationConfig) -> MigrationConfig:
    if config.compression != "none":
        raise ConfigError("a snapshot keeps every page at a fixed place, uncompressed: "
                          "compression is for the wire (use compression='none')")
    if config.local:
        raise ConfigError("local mode hands guest RAM to a destination process on this host; "
                          "a snapshot writes the pages to a file (use local=False)")
    return config


# ---------------------------------------------------------------------------
# Reading and checking a snapshot (inspect, restore).


@dataclass(frozen=True)
class Damage:
    """A damaged region a scrub found: pages of a RAM block whose checksums do not
    match, a chunk of RAM whose chunk checksum does not (its pages' do), or a
    device-state chunk whose checksum does not (or a device stream whose SHA-256
    does not)."""

    offset: int                 # file offset of its first byte
    length: int                 # bytes
    block: str | None = None    # pages: the block, the first page, how many
    page: int = 0
    n_pages: int = 0
    device: str | None = None   # device state: "'idstr'/instance_id", and the chunk
    chunk: int | None = None    #   (None: every chunk matches, the stream's SHA-256 does not);
                                # RAM (with `block`): the chunk whose word does not match

    def describe(self) -> str:
        if self.block is not None and self.chunk is not None:
            return (f"block {self.block!r} chunk {self.chunk} (pages {self.page}-"
                    f"{self.page + self.n_pages - 1}), file offset {self.offset} (+{self.length}): "
                    f"its chunk checksum does not match, though every page matches its own")
        if self.block is not None:
            pages = (f"page {self.page}" if self.n_pages == 1
                     else f"pages {self.page}-{self.page + self.n_pages - 1}")
            return f"block {self.block!r} {pages}, file offset {self.offset} (+{self.length})"
        if self.chunk is not None:
            return f"device {self.device} chunk {self.chunk}, file offset {self.offset} (+{self.length})"
        return (f"device {self.device} state from file offset {self.offset} ({self.length} bytes): "
                f"its SHA-256 does not match")


@dataclass(frozen=True)
class SnapshotInfo:
    """Everything a snapshot's header and metadata say, checked against the file.

    `damage`: after a scrub (``inspect_snapshot(verify=True)``), every damaged
    region, in file order (empty: the whole file is intact); None without one.
    """

    path: str
    file_size: int
    superblock: fmt.Superblock
    metadata: fmt.Metadata
    damage: tuple[Damage, ...] | None = None

    @property
    def live(self) -> bool:
        return bool(self.superblock.flags & fmt.SnapshotFlags.LIVE)

    @property
    def layout(self) -> tuple[tuple[str, int], ...]:
        return tuple((block.name, block.size) for block in self.metadata.blocks)

    def to_dict(self) -> dict[str, Any]:
        sb, md = self.superblock, self.metadata
        checked: dict[str, Any] = {} if self.damage is None else {
            "verified": not self.damage,
            "damage": [{**dataclasses.asdict(d), "description": d.describe()} for d in self.damage],
        }
        return {
            "path": self.path,
            "format_version": sb.version,
            "snapshot_id": str(sb.snapshot_id),
            "saved_at_ns": sb.saved_at_ns,
            "live": self.live,
            "page_size": sb.page_size,
            "file_size": self.file_size,
            "ram_bytes": sum(block.size for block in md.blocks),
            "blocks": [{"name": b.name, "size": b.size, "pages": b.n_pages(sb.page_size),
                        "present_pages": b.present_pages, "pages_offset": b.pages_offset}
                       for b in md.blocks],
            "devices": [{"idstr": d.idstr, "instance_id": d.instance_id, "bytes": d.size,
                         "chunks": len(d.chunks), "sha256": d.digest.hex()} for d in md.devices],
            "info": md.info,
            "vmm_config_bytes": len(md.vmm_config),
            **checked,
        }


_Sums = tuple[np.ndarray, np.ndarray]  # a block's page checksums and chunk checksums


def _read_snapshot(file: PositionalFile) -> tuple[SnapshotInfo, list[np.ndarray], list[_Sums]]:
    """Check the whole snapshot's structure; returns it, each block's present pages
    and each block's page and chunk checksums (uint64 per page, per chunk).

    Raises SnapshotFormatError (truncated, wrong magic or version, damaged
    header or metadata, regions outside the file, bad bitmaps or checksum
    arrays) before any page or device state is read.
    """
    size = file.size()
    head = file.read_at(0, min(size, fmt.SUPERBLOCK_SIZE))
    sb = fmt.decode_superblock(head, size)
    blocks, at = [], fmt.SUPERBLOCK_SIZE
    for index in range(sb.n_blocks):  # each header says where the next one is
        header = file.read_at(at, fmt.BLOCK_HEADER_SIZE) if at + fmt.BLOCK_HEADER_SIZE <= size else b""
        blocks.append(fmt.decode_block_header(header, at, index, sb))
        at = blocks[-1].end
    md = fmt.decode_metadata(file.read_at(sb.meta_offset, sb.meta_length), sb, blocks)
    present = [fmt.check_bitmap(b, file.read_at(b.bitmap_offset, b.bitmap_length(sb.page_size)),
                                sb.page_size)
               for b in md.blocks]
    sums = [fmt.check_sums(b, file.read_at(b.sums_offset(sb.page_size), b.sums_length(sb.page_size)),
                           pages, sb.page_size)
            for b, pages in zip(md.blocks, present)]
    return SnapshotInfo(file.path, size, sb, md), present, sums


def inspect_snapshot(path: str, *, verify: bool = False, channels: int = 2,
                     pool: WorkerPool | None = None) -> SnapshotInfo:
    """Read and check a snapshot's header, metadata, bitmaps and checksum arrays.

    ``verify=True`` also scrubs the whole file: every chunk of RAM that has a
    chunk word against it, every other present page (and those of a chunk that
    does not match) against its page word, in parallel over `channels` worker
    processes (engine/scrub.py; those of `pool`, a process pool such as the
    VMM's warm one, when given; one channel and no pool: sequentially in this
    process), then every device chunk against its checksum and each device
    stream against its SHA-256; the result's ``damage`` lists every damaged
    region (a file the restore would refuse is never reported intact).
    Raises SnapshotError (a damaged structure is refused, not scrubbed);
    ConfigError for a bad `channels` or pool.
    """
    file = open_file(path, "read")
    try:
        info, present, sums = _read_snapshot(file)
        if verify:
            info = replace(info, damage=_scrub(file, info, present, sums, channels, pool))
        return info
    finally:
        file.close()


def _scrub(file: PositionalFile, info: SnapshotInfo, present: Sequence[np.ndarray],
           sums: Sequence[_Sums], channels: int, pool: WorkerPool | None) -> tuple[Damage, ...]:
    """Every damaged region of a structurally sound snapshot, in file order."""
    page_size = info.superblock.page_size
    blocks = info.metadata.blocks
    damaged = scrub_pages(file.path, [b.pages_offset for b in blocks], present, sums, page_size,
                          channels=channels, pool=pool, identity=file.identity())
    damage: list[Damage] = []
    for block, (pages, chunks) in zip(blocks, damaged):
        # One region per run of consecutive damaged pages.
        bad_firsts, bad_counts = pages_to_runs(pages)
        for first, n in zip(bad_firsts.tolist(), bad_counts.tolist()):
            damage.append(Damage(block.pages_offset + first * page_size, n * page_size,
                                 block=block.name, page=first, n_pages=n))
        # One per chunk whose word does not match, though every page matches its own.
        for chunk in chunks.tolist():
            first = chunk * fmt.CHUNK_PAGES
            n = min(fmt.CHUNK_PAGES, block.n_pages(page_size) - first)
            damage.append(Damage(block.pages_offset + first * page_size, n * page_size,
                                 block=block.name, page=first, n_pages=n, chunk=chunk))
    for device in info.metadata.devices:
        digest, name = hashlib.sha256(), f"{device.idstr!r}/{device.instance_id}"
        bad_chunks = 0
        for index, ((offset, length), chunk_sum) in enumerate(zip(device.chunks, device.chunk_sums)):
            data = file.read_at(offset, length)
            digest.update(data)
            if fmt.chunk_sum(data) != chunk_sum:
                bad_chunks += 1
                damage.append(Damage(offset, length, device=name, chunk=index))
        if not bad_chunks and digest.digest() != device.digest:  # every chunk intact: the table is not
            damage.append(Damage(device.chunks[0][0], device.size, device=name))
    return tuple(sorted(damage, key=lambda d: d.offset))


# ---------------------------------------------------------------------------
# Save.


class _DeviceArea:
    """Device chunks, appended after the page areas by the save jobs (any thread)."""

    def __init__(self, file: PositionalFile, start: int, n_devices: int) -> None:
        self._file = file
        self._lock = threading.Lock()
        self.end = start
        self._chunks: list[dict[int, tuple[int, int, int]]] = [{} for _ in range(n_devices)]

    def append(self, device: int, index: int, data: bytes | memoryview, end: bool) -> None:
        length = memoryview(data).nbytes
        with self._lock:
            offset = self.end
            self.end += length
        chunk_sum = fmt.chunk_sum(data)  # from the bytes written: a chunk is immutable
        self._file.write_at(offset, [data])
        with self._lock:
            self._chunks[device][index] = (offset, length, chunk_sum)

    def entries(self, devices: Sequence[MigratableDevice],
                done: Sequence[wire.DeviceDone]) -> tuple[fmt.DeviceEntry, ...]:
        entries = []
        for chunks, device, saved in zip(self._chunks, devices, done):
            if sorted(chunks) != list(range(saved.chunks)):
                raise LocalProtocolError(f"device {device.idstr!r}: {len(chunks)} chunks in the "
                                         f"file, {saved.chunks} saved")
            placed = [chunks[i] for i in range(saved.chunks)]
            entries.append(fmt.DeviceEntry(device.idstr, device.instance_id,
                                           tuple((offset, length) for offset, length, _ in placed),
                                           saved.digest, tuple(chunk_sum for _, _, chunk_sum in placed)))
        return tuple(entries)


class _FileChannels(Operation):
    """What a save and a restore share: maps their channels attach, and N file
    channels on the snapshot driven by a multifd core."""

    def _shared_map(self, size: int, what: str) -> Segment:
        """A zero-filled shared segment of `size` bytes that the channels attach by
        name (`what` names it in errors), closed and unlinked at teardown."""
        segment = Segment.create(size, what=what)
        self._defer(f"unlink {what}", _free_segment, segment)
        return segment

    def _start_file_channels(self, cfg: MigrationConfig, ram: GuestRAM, target: FileTarget, *,
                             zero_page_detection: bool = False,
                             max_bandwidth: float | None = None) -> MultifdSender:
        """N file channels on `target`, serving; the multifd core that drives them
        with RAM slots (no payload: a slot only names pages)."""
        slots = self._own_slots(SlotTable.create(n_slots=cfg.channels + 1, max_items=cfg.packet_pages,
                                                 payload_capacity=0, n_channels=cfg.channels))
        spec = ChannelSpec(channel_id=0, ram=ram.handle, slots=slots.handle, packet_pages=cfg.packet_pages,
                           zero_page_detection=zero_page_detection,
                           payload_kinds=(packet.PacketKind.RAM_PAGES,), file=target)
        self._start_channels(run_file_channel, [None] * cfg.channels, spec)
        return MultifdSender(self._links, slots, n_clients=1, latch=self.latch,
                             marker=lambda epoch: None, stall_timeout=cfg.stall_timeout_s,
                             max_bandwidth=max_bandwidth)


class SnapshotSave(SavingOperation, _FileChannels):
    """Save `ram` and `devices` to the snapshot file `path`.

    ``live=True``: the guest keeps running through precopy rounds until what is
    left fits ``config.downtime_limit_ms``, then it is paused for the last round
    and the devices.  ``live=False``: paused first, every page written once.
    :meth:`run` returns only once the file is durable under `path`; the guest
    is left paused, unless ``resume_after`` (a checkpoint).  If the save fails
    or is cancelled, the guest is resumed and no file is left at `path` (an
    older snapshot there is untouched).
    `pool`: the VMM's warm process pool for the channels (:class:`~engine.operation.Operation`).
    """

    role = "save"
    noun = "snapshot save"
    # Internal, for bench/snapshot.py's "without checksums" column only: a file
    # saved without them has all-zero checksums and fails a checking restore.
    _page_checksums = True

    def __init__(
        self,
        ram: GuestRAM,
        path: str,
        *,
        config: MigrationConfig | None = None,
        live: bool = True,
        pause_guest: Callable[[], None] | None = None,
        resume_guest: Callable[[], None] | None = None,
        resume_after: bool = False,
        devices: Sequence[MigratableDevice] = (),
        vmm_config: bytes = b"",
        direct_io: bool = False,
        dump_dir: str | None = None,
        pool: WorkerPool | None = None,
        dirty_source: DirtySource | None = None,
        throttle_guest: Callable[[int], None] | None = None,
    ) -> None:
        check_path("path", path)
        check_argument("vmm_config", vmm_config, isinstance(vmm_config, (bytes, bytearray, memoryview)),
                       "bytes")
        devices = checked_devices(devices)  # and what the file's metadata could not name
        super().__init__(ram, _check_config(source_config(config)), pause_guest=pause_guest,
                         resume_guest=resume_guest, dump_dir=dump_dir, devices=devices, pool=pool,
                         dirty_source=dirty_source, throttle_guest=throttle_guest)
        self.path = path
        self.live = live
        self.resume_after = resume_after
        self.vmm_config = bytes(vmm_config)
        self.direct_io = direct_io
        self.layout = fmt.plan_layout(ram.layout, PAGE_SIZE)
        self._file: PositionalFile | None = None
        self._present: Segment | None = None
        self._sums: Segment | None = None
        self._devices_area: _DeviceArea | None = None
        self.published: str | None = None

    def _run(self) -> MigrationResult:
        t_start, t_setup, client, expected_s = self._until_switchover(self.live)
        assert client is not None  # a snapshot writes every page
        t_pause = self._pause()
        self._final_round(client)
        t_durable = time.perf_counter()
        if self.dump_dir:
            dump_ram(self.ram, os.path.join(self.dump_dir, "source.ram"))
        if self.resume_after:
            self._paused = False
            if self._resume_guest is not None:
                self._resume_guest()
        t_end = time.perf_counter()
        self._machine.fire(MigrationEvent.COMPLETE)
        assert self.tracker is not None
        return self._result(
            t_start, t_setup, t_durable, t_end,
            # Paused until durable (and resumed, if asked): what a checkpoint costs the guest.
            downtime_ms=((t_end if self.resume_after else t_durable) - t_pause) * 1000,
            rounds=self.tracker.round,
            expected_downtime_ms=expected_s * 1000,
            dirty_rate_bytes_per_s=self.tracker.dirty_rate,
            extra={"path": self.published, "live": self.live},
        )

    def _setup(self) -> None:
        cfg = self.config
        self._file = open_file(self.path, "create")
        self._defer("remove or close the snapshot file", self._release_file)
        if self.direct_io:
            open_file(self._file.path, "write", direct_io=True).close()  # fails here if unsupported
        self._present = self._shared_map(self.ram.n_pages, "the present map")  # fresh: all absent
        if self._page_checksums:
            # The channels put each page's checksum here as they write the page: a
            # page written again (a later round) gets its new checksum in place; then
            # each chunk's, recomputed by every channel that writes its pages.
            _, chunk_words, _ = _sum_words(self.ram)
            self._sums = self._shared_map(chunk_words.stop * fmt.PAGE_SUM_SIZE, "the checksum map")
        target = FileTarget(self._file.path, "write", tuple(b.pages_offset for b in self.layout.blocks),
                            present=self._present.name,
                            sums=self._sums.name if self._sums is not None else None,
                            direct_io=self.direct_io, identity=self._file.identity())
        self._core = self._start_file_channels(cfg, self.ram, target,
                                          zero_page_detection=cfg.zero_page_detection,
                                          max_bandwidth=cfg.max_bandwidth)
        self._start_device_pool()
        self._devices_area = _DeviceArea(self._file, self.layout.device_area, len(self.devices))

    def _piece_pages(self) -> int:
        return _chunk_piece_pages(self._packet_pages())  # packet_pages, or a cap's

    def _final_round(self, client: PrecopyClient) -> None:
        """Guest paused: the last pages and every device, then make the file durable."""
        assert self.tracker is not None and self._devices_area is not None
        saver = self._start_device_saves(emit=self._devices_area.append)
        self.tracker.round += 1
        if self.live:
            client.queue_dirty()
        else:
            client.queue_all()
        client.flush()
        done: list[wire.DeviceDone] = []
        if saver is not None:
            done, self.device_reports = saver.wait(self.latch)
        self.tracker.remaining_pages = 0
        self.core.finish()
        self.core.wait_finished()  # every page is written
        self._write_metadata(done)

    def _write_metadata(self, done: Sequence[wire.DeviceDone]) -> None:
        """Block headers, bitmaps, checksum arrays and metadata, durable; then the
        superblock; then publish.  Every channel is done: the present and checksum
        maps hold each page's last write."""
        file, area, present_map = self._file, self._devices_area, self._present
        assert file is not None and area is not None and present_map is not None
        n_pages = self.ram.n_pages
        present = np.frombuffer(bytes(present_map.buf[:n_pages]), dtype=np.uint8)
        page_words, chunk_words, _ = _sum_words(self.ram)
        words = (np.frombuffer(bytes(self._sums.buf[:chunk_words.stop * fmt.PAGE_SUM_SIZE]), dtype="<u8")
                 if self._sums is not None else np.zeros(chunk_words.stop, dtype="<u8"))
        all_sums, all_chunk_sums = words[page_words], words[chunk_words]
        blocks: list[fmt.BlockEntry] = []
        first = first_chunk = 0
        for entry, block in zip(self.layout.blocks, self.ram.blocks):
            pages = present[first:first + block.n_pages]
            block_chunks = fmt.n_chunks(block.n_pages)
            sums = fmt.encode_sums(all_sums[first:first + block.n_pages],
                                   all_chunk_sums[first_chunk:first_chunk + block_chunks])
            first += block.n_pages
            first_chunk += block_chunks
            bitmap = fmt.encode_bitmap(pages)
            written = replace(entry, present_pages=int(np.count_nonzero(pages)),
                              bitmap_digest=hashlib.sha256(bitmap).digest(),
                              sums_digest=hashlib.sha256(sums).digest())
            # Header, bitmap and checksums lie back to back.
            file.write_at(written.header_offset,
                          [fmt.encode_block_header(len(blocks), written, PAGE_SIZE), bitmap, sums])
            blocks.append(written)
        assert self.tracker is not None
        info = {"engine": "multifd", "live": self.live, "rounds": self.tracker.round,
                "channels": self.config.channels, "zero_page_detection": self.config.zero_page_detection,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        metadata = fmt.encode_metadata(fmt.Metadata(tuple(blocks), area.entries(self.devices, done),
                                                    info, self.vmm_config))
        file.write_at(area.end, [metadata])
        file.sync()  # everything the superblock vouches for is on disk before it is
        flags = fmt.SnapshotFlags.LIVE if self.live else fmt.SnapshotFlags(0)
        superblock = fmt.Superblock(
            flags, PAGE_SIZE, len(blocks), len(self.devices), area.end, len(metadata),
            area.end + len(metadata), time.time_ns(), self.migration_id,
            hashlib.sha256(metadata).digest(),
        )
        file.write_at(0, [fmt.encode_superblock(superblock)])
        self._pass_point_of_no_return()  # a cancel from here on is refused: the file stands
        self.published = file.publish()

    def _release_file(self) -> None:
        """Teardown: an unpublished (failed) save leaves no file; an older one stays."""
        file, self._file = self._file, None
        if file is None:
            return
        if self.published is None:
            file.discard()
        file.close()


def _free_segment(segment: Segment) -> None:
    segment.close()
    segment.unlink()


def _chunk_piece_pages(packet_pages: int) -> int:
    """The RAM client's piece for a snapshot's slots: a slot holds whole chunks, so
    one channel writes a chunk's pages in a round and hashes the chunk once after
    them (save, docs/snapshot-format.md §8), or reads and checks it whole (restore);
    unless a chunk does not fit a packet of `packet_pages`."""
    return fmt.CHUNK_PAGES if packet_pages >= fmt.CHUNK_PAGES else 1


def _sum_words(ram: GuestRAM) -> tuple[slice, slice, slice]:
    """The checksum map's parts for `ram` (snapshot_format.sum_words)."""
    return fmt.sum_words([block.n_pages for block in ram.blocks])


# ---------------------------------------------------------------------------
# Restore.


class SnapshotRestore(_FileChannels):
    """Restore the snapshot at `path` into guest RAM and `devices`.

    Without `ram` the restore creates RAM of the snapshot's layout
    (:attr:`ram`, owned by the caller afterwards).  With `ram`, its layout must
    be the snapshot's; pages the snapshot does not hold are zeroed unless
    ``ram_is_zeroed``: then they must be zero, the caller's promise, checked only
    in part — a chunk checked by its chunk word (all its present pages in one
    slot, at least 128, and a word) covers its absent pages, and one that does
    not match fails the restore; stray bytes in a sparser chunk, a chunk without
    a word or a chunk with no present page are never read, and stay.  The same devices, by
    (idstr, instance_id), as were saved must be given.  The file's structure is
    checked before anything is loaded, and every page against its checksum (a
    dense chunk's pages against the chunk's) as it lands (a damaged page
    fails the restore with a SnapshotFormatError naming it); ``resume_guest``
    is called once every page is checked and every device is in place.
    `pool`: the VMM's warm process pool for the channels (:class:`~engine.operation.Operation`).
    """

    role = "restore"
    noun = "snapshot restore"
    config: MigrationConfig
    _page_checksums = True  # internal: off only for bench/snapshot.py's "without" column

    def __init__(
        self,
        path: str,
        *,
        ram: GuestRAM | None = None,
        config: MigrationConfig | None = None,
        devices: Sequence[MigratableDevice] = (),
        device_load: Literal["parallel", "serial"] = "parallel",
        ram_is_zeroed: bool = False,
        resume_guest: Callable[[], None] | None = None,
        direct_io: bool = False,
        dump_dir: str | None = None,
        pool: WorkerPool | None = None,
    ) -> None:
        check_path("path", path)
        check_ram(ram, optional=True)
        keyed_devices = loading_devices(devices, device_load)
        check_dump_dir(dump_dir)
        check_hooks(resume_guest=resume_guest)
        super().__init__(_check_config(source_config(config)), pool=pool)
        self.path = path
        self.ram = ram
        self._ram_is_zeroed = ram_is_zeroed or ram is None
        self.devices = keyed_devices
        self.device_load = device_load
        self.resume_guest = resume_guest
        self.direct_io = direct_io
        self.dump_dir = dump_dir
        self._file: PositionalFile | None = None
        self._core: MultifdSender | None = None
        self._sums: Segment | None = None

    def _run(self) -> MigrationResult:
        self._machine.fire(MigrationEvent.START)
        t_start = time.perf_counter()
        info, present, sums = self._open()
        self._setup(info, present, sums)
        t_setup = time.perf_counter()
        self._machine.fire(MigrationEvent.SETUP_DONE)
        assert self.ram is not None and self._core is not None and self.tracker is not None
        loader, expected = self._start_device_loads(info)
        make_client = payload_entry(packet.PacketKind.RAM_PAGES).client
        assert make_client is not None
        client: PrecopyClient = make_client(self.ram, self._core, RAM_CLIENT, self.config.packet_pages,
                                            piece_pages=_chunk_piece_pages(self.config.packet_pages))
        self.tracker.round = 1
        for block, pages in zip(self.ram.blocks, present):
            if pages.size:
                client.queue_pages(block, pages)
        client.flush()
        self._core.finish()
        self._core.wait_finished()  # every present page is in guest RAM, checked
        t_ram = time.perf_counter()
        reports = loader.wait_loaded(expected) if loader is not None else []
        self._machine.fire(MigrationEvent.SWITCHOVER)
        if self.dump_dir:
            dump_ram(self.ram, os.path.join(self.dump_dir, "dest.ram"))
        self._pass_point_of_no_return()  # a cancel from here on is refused: the guest starts
        if self.resume_guest is not None:
            try:
                self.resume_guest()
            except Exception as exc:
                raise GuestControlError(
                    f"restored, but resume_guest raised {type(exc).__name__}: {exc}: the guest is NOT "
                    f"running; its RAM and devices are in place (the RAM is kept: restore.ram)") from exc
        t_end = time.perf_counter()
        self._machine.fire(MigrationEvent.COMPLETE)
        self.device_reports = reports
        return self._result(
            t_start, t_setup, t_ram, t_end,
            migration_id=str(info.superblock.snapshot_id),
            downtime_ms=0.0,
            rounds=1,
            extra={"path": info.path, "live": info.live},
        )

    def _traffic(self, transfer_s: float) -> dict[str, Any]:
        """What moved: the pages read, and the absent ones, zero without any I/O."""
        assert self.tracker is not None and self.ram is not None
        traffic = self.tracker.traffic(transfer_s)
        traffic["zero_pages"] = self.ram.n_pages - traffic["pages_sent"]
        traffic["guest_bytes"] = self.ram.size
        traffic["guest_throughput_bytes_per_s"] = self.ram.size / max(transfer_s, 1e-9)
        return traffic

    def _open(self) -> tuple[SnapshotInfo, list[np.ndarray], list[_Sums]]:
        """Open and check the file, then match it to the guest: nothing loads before."""
        self._file = open_file(self.path, "read")
        self._defer("close the snapshot file", self._close_file)
        info, present, sums = _read_snapshot(self._file)
        saved = {(d.idstr, d.instance_id) for d in info.metadata.devices}
        for idstr, instance in sorted(saved - set(self.devices)):
            raise ConfigError(f"device {idstr!r}/{instance} is in the snapshot but was not given")
        for idstr, instance in sorted(set(self.devices) - saved):
            raise ConfigError(f"device {idstr!r}/{instance} is not in the snapshot: it would get no state")
        if self.ram is None:
            self.ram = GuestRAM.create(info.layout)
            self._defer("free the RAM it created", self._free_created_ram)
        elif self.ram.layout != info.layout:
            raise ConfigError(f"the snapshot's RAM {_describe(info.layout)} does not match the "
                              f"guest's {_describe(self.ram.layout)}")
        else:  # the VMM's RAM: nothing else of this process moves it while the snapshot lands
            self._lease_dirty_marks()
        return info, present, sums

    def _setup(self, info: SnapshotInfo, present: list[np.ndarray], sums: list[_Sums]) -> None:
        ram = self.ram
        assert ram is not None
        if not self._ram_is_zeroed:
            self._zero_absent(present)
        self.tracker = StatsTracker(ram.size, PAGE_SIZE)
        if self._page_checksums:
            # What each channel checks the pages it reads against (checked against
            # the block headers already, in _read_snapshot), in one map: each page's
            # checksum, each chunk's, then each chunk's present pages (a channel
            # holding them all checks the chunk by its word: ChannelContext.chunk_sums).
            layout = _sum_words(ram)
            self._sums = self._shared_map(layout[-1].stop * fmt.PAGE_SUM_SIZE, "the checksum map")
            words = np.frombuffer(self._sums.buf, dtype="<u8", count=layout[-1].stop)
            page_words, chunk_words, present_words = (words[part] for part in layout)
            page_at = chunk_at = 0
            for block, pages, (page_sums, chunk_sums) in zip(ram.blocks, present, sums):
                block_chunks = fmt.n_chunks(block.n_pages)
                page_words[page_at:page_at + block.n_pages] = page_sums
                chunk_words[chunk_at:chunk_at + block_chunks] = chunk_sums
                # present pages per chunk: the pages are sorted, so where each chunk starts
                bounds = np.searchsorted(pages, np.arange(block_chunks + 1) * fmt.CHUNK_PAGES)
                present_words[chunk_at:chunk_at + block_chunks] = np.diff(bounds)
                page_at, chunk_at = page_at + block.n_pages, chunk_at + block_chunks
            # No view of the map outlives this block: a failure below keeps this frame
            # (in its traceback), and its views would keep the map mapped after teardown.
            del words, page_words, chunk_words, present_words
        assert self._file is not None
        target = FileTarget(info.path, "read", tuple(b.pages_offset for b in info.metadata.blocks),
                            sums=self._sums.name if self._sums is not None else None,
                            direct_io=self.direct_io, identity=self._file.identity())
        self._core = self._start_file_channels(self.config, ram, target)

    def _zero_absent(self, present: list[np.ndarray]) -> None:
        """RAM that held something: zero the pages the snapshot does not hold."""
        assert self.ram is not None
        for block, pages_present in zip(self.ram.blocks, present):
            absent = np.ones(block.n_pages, dtype=bool)
            absent[pages_present] = False
            if absent.any():
                pages = block.array()
                pages[absent] = 0
                del pages

    def _start_device_loads(self, info: SnapshotInfo) -> tuple[DeviceLoading | None, list[wire.DeviceDone]]:
        """Every device loads at once on the device pool, beside the RAM reads."""
        entries = info.metadata.devices
        if not entries:
            return None, []
        devices = [self.devices[(e.idstr, e.instance_id)] for e in entries]
        loader = self._device_loader(devices, self.device_load, None)
        loader.load_saved([self._chunks(entry) for entry in entries], [len(e.chunks) for e in entries])
        expected = [wire.DeviceDone(len(e.chunks), e.size, e.digest) for e in entries]
        return loader, expected

    def _chunks(self, entry: fmt.DeviceEntry) -> Iterator[bytes]:
        """The device's chunks in order, each checked before the device sees it."""
        file = self._file
        assert file is not None
        for index, ((offset, length), chunk_sum) in enumerate(zip(entry.chunks, entry.chunk_sums)):
            data = file.read_at(offset, length)
            if fmt.chunk_sum(data) != chunk_sum:
                raise SnapshotFormatError(f"device {entry.idstr!r}/{entry.instance_id} chunk {index} "
                                          f"(file offset {offset}, {length} bytes) is damaged: its "
                                          f"checksum does not match")
            yield data

    def _close_file(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.close()

    def _free_created_ram(self) -> None:
        """Teardown: RAM this restore created, and nobody will get (it failed before
        its point of no return: past it, the RAM holds the restored guest), goes."""
        if self.result is None and not self._past_return and self.ram is not None:
            ram, self.ram = self.ram, None
            ram.close()
            ram.unlink()


def _describe(layout: Sequence[tuple[str, int]]) -> str:
    return ", ".join(f"{name} ({size} bytes)" for name, size in layout)


__all__ = ["Damage", "SnapshotInfo", "SnapshotRestore", "SnapshotSave", "inspect_snapshot"]
