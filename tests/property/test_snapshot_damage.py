"""Nothing silently wrong: a damaged snapshot is refused, or restores exactly.

One small snapshot (two RAM blocks with zero pages, two devices) is saved once;
each example damages a copy of it — a flipped bit, a zeroed 4 KiB range, or a
truncation — somewhere in one of its regions (superblock, a block header,
bitmap, checksum array — its chunk words drawn on their own too — or page area,
a device chunk, the metadata) and
restores it with real channel processes.  Every outcome is a SnapshotError
(the file is refused, by its structure's digests or a page's checksum) or a
restore identical to the saved guest, RAM and devices: never a silently
different one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from clients.devices import DemoDevice, demo_devices
from clients.guest import fill_ram
from engine import GuestRAM, MigrationConfig
from engine.errors import SnapshotError
from engine.pool import WorkerPool
from engine.snapshot import SnapshotRestore, SnapshotSave, inspect_snapshot
from engine.wire import snapshot_format as fmt

KiB, MiB = 1 << 10, 1 << 20
LAYOUT = {"pc.ram": MiB + 512 * KiB, "vga": 256 * KiB}
DEVICE_STATE = 300 * KiB   # two chunks of state and the config part, per device


@dataclass(frozen=True)
class Saved:
    path: Path
    data: bytes
    images: list[bytes]
    states: list[bytes]
    regions: dict[str, list[tuple[int, int]]]   # region kind → (offset, length) in the file

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """How hypothesis prints it with a failing example: not 3 MiB of bytes."""
        printer.text(f"Saved({self.path.name}, {len(self.data)} bytes)")


def _regions(path: Path) -> dict[str, list[tuple[int, int]]]:
    info = inspect_snapshot(str(path))
    sb, md = info.superblock, info.metadata
    regions: dict[str, list[tuple[int, int]]] = {
        "superblock": [(0, fmt.SUPERBLOCK_USED)],
        "metadata": [(sb.meta_offset, sb.meta_length)],
        "device chunk": [chunk for device in md.devices for chunk in device.chunks if chunk[1]],
        "anywhere": [(0, info.file_size)],
    }
    raw = path.read_bytes()
    for block in md.blocks:
        regions.setdefault("block header", []).append((block.header_offset, fmt.BLOCK_HEADER_SIZE))
        regions.setdefault("bitmap", []).append((block.bitmap_offset, block.bitmap_length(4096)))
        regions.setdefault("checksums", []).append((block.sums_offset(4096), block.sums_length(4096)))
        page_words = block.n_pages(4096) * fmt.PAGE_SUM_SIZE  # then the chunk words
        regions.setdefault("chunk checksums", []).append((block.sums_offset(4096) + page_words,
                                                          block.sums_length(4096) - page_words))
        regions.setdefault("page area", []).append((block.pages_offset, block.size))  # holes too
        bitmap = raw[block.bitmap_offset:block.bitmap_offset + block.bitmap_length(4096)]
        present = fmt.decode_bitmap(bitmap, block.n_pages(4096)).tolist()
        regions.setdefault("present page", []).extend((block.pages_offset + p * 4096, 4096) for p in present)
    return regions


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    path = tmp_path_factory.mktemp("damage") / "small.snap"
    with GuestRAM.create(LAYOUT) as ram:
        fill_ram(ram, "text", zero_fraction=0.25, seed=11)
        devices = demo_devices(2, DEVICE_STATE)
        SnapshotSave(ram, str(path), live=False, devices=devices).run()
        images = [bytes(block.pages) for block in ram.blocks]
    return Saved(path, path.read_bytes(), images, [bytes(d.state) for d in devices], _regions(path))


@pytest.fixture(scope="module")
def pool() -> Iterator[WorkerPool]:
    """Warm channel processes for every restore (as a VMM keeps them)."""
    with WorkerPool("process", 2, name="damage-warm") as warm:
        yield warm


DAMAGES = ("bit flip", "zeroed 4 KiB", "truncated")
REGIONS = ("superblock", "block header", "bitmap", "checksums", "chunk checksums", "page area",
           "present page", "device chunk", "metadata", "anywhere")


def _damaged(saved: Saved, kind: str, which: int, offset: int, damage: str, bit: int) -> bytes:
    """A copy of the file with one damage in one span of region `kind` (the span and
    the offset in it taken modulo)."""
    start, length = saved.regions[kind][which % len(saved.regions[kind])]
    at = start + offset % length
    raw = bytearray(saved.data)
    if damage == "bit flip":
        raw[at] ^= 1 << bit
    elif damage == "zeroed 4 KiB":
        raw[at:at + 4096] = bytes(len(raw[at:at + 4096]))
    else:
        del raw[at:]
    return bytes(raw)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(REGIONS), which=st.integers(0, 2**32 - 1), offset=st.integers(0, 2**32 - 1),
       damage=st.sampled_from(DAMAGES), bit=st.integers(0, 7))
def test_damage_is_refused_or_harmless(saved: Saved, pool: WorkerPool, tmp_path: Path, kind: str,
                                       which: int, offset: int, damage: str, bit: int) -> None:
    raw = _damaged(saved, kind, which, offset, damage, bit)
    what = f"{damage} in {kind}"
    path = tmp_path / "damaged.snap"
    path.write_bytes(raw)
    targets = [DemoDevice(f"dev{i}", 0, DEVICE_STATE, with_state=False) for i in range(2)]
    restore = SnapshotRestore(str(path), config=MigrationConfig(channels=2), devices=targets, pool=pool)
    try:
        restore.run()
    except SnapshotError as exc:
        event(f"{what}: refused")
        assert str(exc), "a refusal says why"
        assert restore.ram is None  # the RAM it made is gone: nothing to run
        return
    finally:
        os.unlink(path)
    assert restore.ram is not None
    try:
        images = [bytes(block.pages) for block in restore.ram.blocks]
    finally:
        restore.ram.close()
        restore.ram.unlink()
    event(f"{what}: restored {'identical' if raw != saved.data else 'unchanged'}")
    assert images == saved.images, f"{what}: restored RAM differs from the saved guest"
    assert [bytes(t.state) for t in targets] == saved.states, f"{what}: device state differs"
    assert all(t.intact() for t in targets)


def test_every_region_is_covered(saved: Saved) -> None:
    """The regions the damage is drawn from tile the whole file but its padding."""
    covered = np.zeros(len(saved.data), dtype=bool)
    for kind, spans in saved.regions.items():
        if kind != "anywhere":
            for start, length in spans:
                covered[start:start + length] = True
    assert covered[:fmt.SUPERBLOCK_USED].all() and covered[-1]
    assert set(saved.regions) == set(REGIONS)
    assert 0 < len(saved.regions["present page"]) < (LAYOUT["pc.ram"] + LAYOUT["vga"]) // 4096
