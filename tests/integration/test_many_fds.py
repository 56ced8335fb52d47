"""A live migration in a process that holds thousands of descriptors.

A VMM may hold far more than 1023 descriptors, and ``select()`` refuses any fd
numbered above that.  Here the test process holds 4000 extra fds before the
migration starts, so every socket the engine opens on either side (both run in
this process: listener, main connection, channel and control sockets, the
guest's control socket) is numbered above 1023.  The channel processes are
forked from the fork server (spawned with its own few descriptors only; its
waits in this process use poll() too), so theirs are small; their waits use the same helper, which
tests/unit/test_sync.py checks with a descriptor numbered above 2000.  (The
"fork" start method would carry the 4000 fds into them, but forking this
multi-threaded process can deadlock, and Python 3.12 warns about it.)
"""

from __future__ import annotations

import contextlib
import os
import resource
from collections.abc import Iterator

import pytest

from clients.devices import demo_devices
from clients.guest import SyntheticGuest
from engine import DestinationMigration, MigrationConfig, SourceMigration
from tests.harness import SECRET, MiB, address, guest_ram, same_memory

EXTRA_FDS = 4000
NEEDED_LIMIT = 8192  # the extra fds, the ones already open, and the engine's


@contextlib.contextmanager
def holding_fds(count: int) -> Iterator[None]:
    """Raise RLIMIT_NOFILE's soft limit and hold `count` open fds; undo both after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = NEEDED_LIMIT if hard == resource.RLIM_INFINITY else min(NEEDED_LIMIT, hard)
    if wanted < count + 200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low to hold {count} extra fds")
    fds: list[int] = []
    try:
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        for _ in range(count):
            fds.append(os.open(os.devnull, os.O_RDONLY))
        probe = os.open(os.devnull, os.O_RDONLY)  # the number the engine's next fd gets
        os.close(probe)
        assert probe > 1023
        yield
    finally:
        for fd in fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_migration_with_4000_extra_fds_open(transport: str) -> None:
    config = MigrationConfig(channels=2, packet_pages=128, verify=True)
    sources = demo_devices(1, MiB + 123)
    targets = demo_devices(1, MiB + 123, with_state=False)
    with guest_ram(8 * MiB) as src, guest_ram(8 * MiB, fill="zero") as dst, holding_fds(EXTRA_FDS):
        destination = DestinationMigration(address(transport), secret=SECRET, ram=dst,
                                           config=config, devices=targets)
        destination.start()
        try:
            with SyntheticGuest(src, "random", dirty_rate=16 * MiB) as guest:
                result = SourceMigration(src, destination.address, secret=SECRET, config=config,
                                         pause_guest=guest.pause, resume_guest=guest.resume,
                                         devices=sources).run()
                assert guest.paused
        except BaseException:
            destination.cancel("the source failed")
            with contextlib.suppress(Exception):
                destination.wait(10)
            raise
        remote = destination.wait(10)
        assert result.status == "completed" and remote.status == "completed"
        assert result.verified is True
        assert same_memory(src, dst)
    assert targets[0].state == sources[0].state and targets[0].intact()
