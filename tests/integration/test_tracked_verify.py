"""Tracked verification: each piece of guest RAM is hashed by the channel that moves
it, as it moves, so at the end only the digests are compared (engine/verify.py).

The digests each side compared must be those of its memory as it ended: a guest
that keeps writing pages makes the migration send them again, and their pieces
must be hashed again, on both sides.  A stale digest on both sides would still
compare equal, so the digests are checked against the memory itself.
"""

from __future__ import annotations

import contextlib

import pytest

from clients.guest import SyntheticGuest, fill_ram
from engine import DestinationMigration, MigrationConfig, SourceMigration
from engine.verify import ram_piece_digests, tracked_piece_pages
from tests.harness import SECRET, LockstepGuest, MiB, guest_ram, same_memory


@pytest.mark.parametrize("packet_pages,channels", [(64, 2), (24, 3)])
def test_digests_compared_are_those_of_the_memory_at_the_end(packet_pages: int, channels: int) -> None:
    """Pages written again in every round (the lockstep guest: 8 per look, and a
    guest process writing at random): both sides' digests equal fresh digests of
    both memories, piece for piece."""
    config = MigrationConfig(channels=channels, packet_pages=packet_pages, verify=True,
                             downtime_limit_ms=0, max_rounds=4)
    with guest_ram(8 * MiB) as src, guest_ram(8 * MiB, fill="zero") as dst:
        lockstep = LockstepGuest(src)
        with SyntheticGuest(src, "random", dirty_rate=16 * MiB) as guest:
            destination = DestinationMigration("tcp://127.0.0.1:0", secret=SECRET, ram=dst, config=config)
            destination.start()
            try:
                source = SourceMigration(src, destination.address, secret=SECRET, config=config,
                                         pause_guest=guest.pause, resume_guest=guest.resume,
                                         dirty_source=lockstep)
                result = source.run()
            except BaseException:
                destination.cancel("the source failed")
                with contextlib.suppress(Exception):
                    destination.wait(10)
                raise
            remote = destination.wait(10)
            assert guest.paused  # the source's memory is final
            piece = tracked_piece_pages(packet_pages)
            fresh = ram_piece_digests(src, piece)
        assert result.verified is True and remote.verified is True
        assert result.rounds == 5 and result.pages_sent > src.n_pages  # pages went again
        assert same_memory(src, dst)
        assert source.ram_digests is not None and destination.ram_digests is not None
        stale = [i for i, (a, b) in enumerate(zip(source.ram_digests, fresh)) if a != b]
        assert not stale, f"source digests of {len(stale)} pieces are not of its memory: {stale[:5]}"
        assert destination.ram_digests == tuple(ram_piece_digests(dst, piece))
        assert len(fresh) == src.n_pages // piece


def test_zero_pages_over_stale_destination_memory_are_hashed_once_placed() -> None:
    """Half the source's pages are zero and the destination's RAM holds other data:
    a piece with ZERO runs is hashed after they were written, so the migration
    verifies, and each side's digests are of its memory."""
    config = MigrationConfig(channels=2, packet_pages=256, verify=True)
    with guest_ram(8 * MiB) as src, guest_ram(8 * MiB, seed=2) as dst:
        fill_ram(src, "random", zero_fraction=0.5, seed=3)
        destination = DestinationMigration("tcp://127.0.0.1:0", secret=SECRET, ram=dst, config=config)
        destination.start()
        try:
            source = SourceMigration(src, destination.address, secret=SECRET, config=config)
            result = source.run()
        except BaseException:
            destination.cancel("the source failed")
            with contextlib.suppress(Exception):
                destination.wait(10)
            raise
        remote = destination.wait(10)
        assert result.verified is True and remote.verified is True
        assert result.zero_pages > 0
        assert same_memory(src, dst)
        piece = tracked_piece_pages(256)
        assert destination.ram_digests == tuple(ram_piece_digests(dst, piece)) == source.ram_digests
