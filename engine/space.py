"""Room for shared memory: /dev/shm's free space and the memory cgroup's limit.

Checked before a segment is created (:meth:`engine.shm.Segment.create`, all of
guest RAM at once in :meth:`engine.shm.GuestRAM.create`): a tmpfs page is
allocated when first written, and a write that finds /dev/shm full is a SIGBUS;
a charge over the memory cgroup's limit is an OOM kill.  Either way the process
dies without a word, so :func:`check_space` refuses up front with a ConfigError
that names the size needed and the room there is::

    need ≤ free space of SHM_DIR                      (statvfs)
    need ≤ min room of every cgroup                   (this process's and each parent's:
                                                       limit - usage + droppable page cache;
                                                       guest RAM: need + CGROUP_HEADROOM)
"""

from __future__ import annotations

import os

from engine.errors import ConfigError
from engine.units import size_text, sizes_text

SHM_DIR = "/dev/shm"  # the filesystem shm_open creates segments in (glibc, Linux)
_CGROUP_ROOT = "/sys/fs/cgroup"
_PROC_CGROUP = "/proc/self/cgroup"  # which cgroup of each hierarchy this process is in
_NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a huge number
#: What a memory cgroup must keep free beyond guest RAM when it is created: the
#: processes an operation starts after its RAM exists (channels, a fork server, the
#: CLI's synthetic guest; a 16 MiB `multifd save` peaked at 167 MiB in its cgroup
#: here, page cache included) are charged to the same cgroup, and a charge over its
#: limit is an OOM kill, not an error.
CGROUP_HEADROOM = 128 << 20
#: What one channel process adds to its memory cgroup: its own heap, buffers and page
#: tables (~8 MiB here: a 64 MiB save's cgroup peaked at 280, 332 and 395 MiB with 2, 8 and
#: 16 channels), and half as much again.
CHANNEL_MEMORY = 12 << 20


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _read_stat(path: str) -> dict[str, int]:
    try:
        with open(path) as f:
            return {k: int(v) for k, v in (line.split() for line in f if line.count(" ") == 1)}
    except (OSError, ValueError):
        return {}


def _cgroup_memory_room() -> tuple[int, int] | None:
    """``(room, limit)``: bytes this process's memory cgroup can still charge, and
    the limit that leaves the least; None without a limit.  Every cgroup from this
    process's up to the mount's root counts (a limit is often a parent's: a slice,
    a container's outer cgroup).  Page cache the kernel can drop counts as room;
    shared memory cannot be dropped (without swap), so it does not.
    """
    try:
        with open(_PROC_CGROUP) as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    for hierarchy, controllers, path in lines:
        v2 = hierarchy == "0" and controllers == ""
        if not v2 and "memory" not in controllers.split(","):
            continue
        base = _CGROUP_ROOT if v2 else os.path.join(_CGROUP_ROOT, "memory")
        names = (("memory.max", "memory.current", "file", "shmem") if v2 else
                 ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_cache", "total_shmem"))
        rooms = [room for directory in _up_to(base, path, v2)
                 if (room := _cgroup_room_in(directory, names)) is not None]
        if rooms:
            return min(rooms)
    return None


def _up_to(base: str, path: str, v2: bool) -> list[str]:
    """The cgroup directories whose limits bind this process: its own, each parent
    within the mount, and the mount's root (where a container sees only its own).
    cgroup v1 without use_hierarchy (old kernels): its own and the root only."""
    own = os.path.normpath(os.path.join(base, path.lstrip("/")))
    chain = [own]
    if v2 or _read_int(os.path.join(own, "memory.use_hierarchy")) != 0:
        directory = own
        while directory.startswith(base + os.sep):
            directory = os.path.dirname(directory)
            chain.append(directory)
    return chain if base in chain else [*chain, base]


def _cgroup_room_in(directory: str, names: tuple[str, str, str, str]) -> tuple[int, int] | None:
    """``(room, limit)`` of one cgroup directory; None if it sets no limit (or is unreadable)."""
    limit = _read_int(os.path.join(directory, names[0]))
    usage = _read_int(os.path.join(directory, names[1]))
    if limit is None or usage is None or limit >= _NO_LIMIT:
        return None
    stat = _read_stat(os.path.join(directory, "memory.stat"))
    droppable = max(0, stat.get(names[2], 0) - stat.get(names[3], 0))
    return max(0, limit - usage + droppable), limit


def _shm_free() -> int | None:
    try:
        status = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return status.f_bavail * status.f_frsize


def no_space(what: str, need: int) -> ConfigError:
    free = _shm_free()
    need_text, have = size_text(need), f"{SHM_DIR} is full"
    if free is not None:
        need_text, free_text = sizes_text(need, free)
        have = f"{SHM_DIR} has {free_text} free"
    return ConfigError(f"not enough shared memory for {what}: need {need_text}, {have}")


def check_space(need: int, what: str, headroom: int = 0) -> None:
    """Raise ConfigError unless /dev/shm has room for `need` more bytes of shared
    memory, and this process's memory cgroup for those and `headroom` more (guest
    RAM's CGROUP_HEADROOM: the processes still to start; `what` names it in the
    message).  A check only: :meth:`Segment.create` reserves."""
    free = _shm_free()
    if free is not None and need > free:
        raise no_space(what, need)
    check_memory(need, what, headroom)


def check_memory(need: int, what: str, headroom: int = 0) -> None:
    """Raise ConfigError unless this process's memory cgroup (and every parent) has
    room for `need` + `headroom` more bytes: before RAM, or processes, are made."""
    room = _cgroup_memory_room()
    if room is not None and need + headroom > room[0]:
        need_text, room_text = sizes_text(need + headroom, room[0])
        if headroom:
            need_text += f" ({size_text(need)} and {size_text(headroom)} for the engine's processes)"
        raise ConfigError(f"not enough memory for {what}: need {need_text}, the memory "
                          f"cgroup's limit of {size_text(room[1])} leaves {room_text}")
