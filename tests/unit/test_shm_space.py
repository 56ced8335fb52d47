"""Shared memory is reserved when created, and a memory cgroup limit is checked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import shm, space
from engine.channel import channel_pool
from engine.errors import ConfigError
from engine.shm import PAGE_SIZE, GuestRAM, Segment

MiB = 1 << 20


def allocated(segment: Segment) -> int:
    return os.stat(f"{space.SHM_DIR}/{segment.name}").st_blocks * 512


def test_segment_create_reserves_every_page_before_any_touch() -> None:
    segment = Segment.create(4 * MiB)
    try:
        assert allocated(segment) >= 4 * MiB  # posix_fallocate: no page is left to fault in
    finally:
        segment.close()
        segment.unlink()


def test_guest_ram_reserves_every_block() -> None:
    with GuestRAM.create({"pc.ram": 4 * MiB, "vga": 16 * PAGE_SIZE}) as ram:
        for block in ram.blocks:
            assert allocated(block.segment) >= block.size + block.n_pages


@pytest.fixture
def cgroup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake cgroup mount (v1 and v2 files both) for this process's cgroup."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        pytest.skip("no /proc/self/cgroup")
    if not any(line.startswith("0::") or ":memory:" in line or ",memory" in line for line in lines):
        pytest.skip("this process is in no memory cgroup")
    monkeypatch.setattr(space, "_CGROUP_ROOT", str(tmp_path))
    (tmp_path / "memory").mkdir()
    return tmp_path


def set_cgroup(root: Path, limit: str, usage: int, cache: int, shmem: int) -> None:
    (root / "memory.max").write_text(f"{limit}\n")
    (root / "memory.current").write_text(f"{usage}\n")
    (root / "memory.stat").write_text(f"anon 1\nfile {cache}\nshmem {shmem}\n")
    v1 = root / "memory"
    (v1 / "memory.limit_in_bytes").write_text(f"{limit if limit != 'max' else 2**63 - 4096}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{usage}\n")
    (v1 / "memory.stat").write_text(f"cache 0\ntotal_cache {cache}\ntotal_shmem {shmem}\n")


LIMIT = 100 * MiB + space.CGROUP_HEADROOM


@pytest.mark.parametrize(("used", "need_and_room"), [
    # A 228 MiB limit (128 MiB of it the headroom for the engine's processes), 96 MiB
    # used of which 2 MiB page cache (1 MiB of it shared memory, which cannot be
    # dropped): 133 MiB of room, 5 MiB beyond the headroom.
    (96 * MiB, "need 136.0 MiB (8.0 MiB and 128.0 MiB for the engine's processes), "
               "the memory cgroup's limit of 228.0 MiB leaves 133.0 MiB"),
    # 8 MiB beyond the headroom for 8 MiB of RAM and a page for its dirty map: one
    # decimal of MiB would print the same figure twice, so the figures are bytes.
    (93 * MiB, "need 142610432 bytes (8.0 MiB and 128.0 MiB for the engine's processes), "
               "the memory cgroup's limit of 228.0 MiB leaves 142606336 bytes"),
], ids=["5-MiB-room", "need-about-the-room"])
def test_ram_over_the_memory_cgroup_limit_is_refused_up_front(cgroup: Path, used: int,
                                                              need_and_room: str) -> None:
    set_cgroup(cgroup, str(LIMIT), used, 2 * MiB, 1 * MiB)
    with pytest.raises(ConfigError) as caught:
        GuestRAM.create({"pc.ram": 8 * MiB})
    assert str(caught.value) == f"not enough memory for guest RAM: {need_and_room}"
    with GuestRAM.create({"pc.ram": 4 * MiB}):
        pass


def test_the_headroom_is_asked_of_guest_ram_only(cgroup: Path) -> None:
    # The processes it stands for start once RAM exists, and are then usage: a map
    # or slot table made after them needs its own size only (asking the headroom
    # again refused a save half-way that fitted).
    set_cgroup(cgroup, str(LIMIT), 96 * MiB + space.CGROUP_HEADROOM, 0, 0)  # 4 MiB of room
    segment = Segment.create(1 * MiB, what="the present map")
    segment.close()
    segment.unlink()
    with pytest.raises(ConfigError, match="not enough memory for the slot table: need 8.0 MiB, the "
                                          "memory cgroup's limit of 228.0 MiB leaves 4.0 MiB"):
        Segment.create(8 * MiB, what="the slot table")
    with pytest.raises(ConfigError, match=r"need 129.0 MiB \(1012.0 KiB and 128.0 MiB for the engine's"):
        GuestRAM.create({"pc.ram": 1 * MiB - 4 * PAGE_SIZE})


@pytest.mark.parametrize("v2", [True, False], ids=["v2", "v1"])
def test_a_parent_cgroups_limit_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, v2: bool) -> None:
    # The process's own cgroup sets no limit; its parent (a slice, a container's
    # outer cgroup) allows 100 MiB beyond the headroom, 96 MiB of it used.
    proc = tmp_path / "cgroup"
    proc.write_text("0::/outer/inner\n" if v2 else "4:memory:/outer/inner\n0::/\n")
    monkeypatch.setattr(space, "_PROC_CGROUP", str(proc))
    monkeypatch.setattr(space, "_CGROUP_ROOT", str(tmp_path))
    base = tmp_path if v2 else tmp_path / "memory"
    (base / "outer" / "inner").mkdir(parents=True)
    limit_file, usage_file = ("memory.max", "memory.current") if v2 else \
        ("memory.limit_in_bytes", "memory.usage_in_bytes")
    for directory, limit in ((base, "max" if v2 else str(2**63 - 4096)), (base / "outer", str(LIMIT)),
                             (base / "outer" / "inner", "max" if v2 else str(2**63 - 4096))):
        (directory / limit_file).write_text(f"{limit}\n")
        (directory / usage_file).write_text(f"{96 * MiB}\n")
    with pytest.raises(ConfigError, match="the memory cgroup's limit of 228.0 MiB leaves 132.0 MiB"):
        GuestRAM.create({"pc.ram": 8 * MiB})
    if not v2:  # an old kernel's v1 cgroup without use_hierarchy: a parent's limit does not bind it
        (base / "outer" / "inner" / "memory.use_hierarchy").write_text("0\n")
        with GuestRAM.create({"pc.ram": 8 * MiB}):
            pass


def test_no_memory_cgroup_limit_checks_nothing(cgroup: Path) -> None:
    set_cgroup(cgroup, "max", 96 * MiB, 0, 0)
    with GuestRAM.create({"pc.ram": 8 * MiB}):
        pass


def test_a_process_killed_while_it_reserves_ram_leaves_no_segment() -> None:
    # The memory cgroup's OOM killer strikes inside posix_fallocate, with no error to
    # catch: the segment must already be the resource tracker's to unlink.
    name = f"{shm.SEGMENT_PREFIX}killed-{os.getpid()}"
    child = subprocess.run(
        [sys.executable, "-c",
         "import os, signal, sys\n"
         "from engine import shm\n"
         "os.posix_fallocate = lambda *_: os.kill(os.getpid(), signal.SIGKILL)\n"
         f"shm.Segment.create(1 << 20, name={name!r})\n"],
        cwd=Path(__file__).parents[2], capture_output=True, timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    deadline = time.monotonic() + 10
    while os.path.exists(f"{space.SHM_DIR}/{name}") and time.monotonic() < deadline:
        time.sleep(0.05)
    leaked = os.path.exists(f"{space.SHM_DIR}/{name}")
    if leaked:
        os.unlink(f"{space.SHM_DIR}/{name}")
    assert not leaked, "the killed process's segment was left in /dev/shm"


def test_channel_processes_need_room_in_the_memory_cgroup(cgroup: Path) -> None:
    # Each channel process is charged to the cgroup too (CHANNEL_MEMORY): past the
    # limit the kernel would kill one silently, so the pool is refused up front.
    set_cgroup(cgroup, str(LIMIT), LIMIT - 40 * MiB, 0, 0)  # 40 MiB of room
    with pytest.raises(ConfigError, match=r"not enough memory for 4 channel process\(es\) \(12.0 MiB "
                                          r"each\): need 48.0 MiB, the memory cgroup's limit of 228.0 MiB "
                                          r"leaves 40.0 MiB"):
        channel_pool(4, "test-too-many")
    channel_pool(2, "test-room-for-two").shutdown()
