"""Tracked verification: each piece of guest RAM is hashed by the channel that moves
it, as it moves, so at the end only the digests are compared (engine/verify.py).

The digests each side compared must be those of its memory as it ended: a guest
that keeps writing pages makes the migration send them again, and their pieces
must be hashed again, on both sides.  A stale digest on both sides would still
compare equal, so the digests are checked against the memory itself.
"""

from __future__ import annotations

import pytest

from clients.guest import SyntheticGuest, fill_ram
from engine import MigrationConfig, verify
from engine.errors import VerificationError
from engine.operation import Operation
from engine.shm import PAGE_SIZE, GuestRAM, Segment
from engine.verify import tracked_piece_pages
from engine.wire.message import RAM_DIGEST_SIZE
from tests.harness import LockstepGuest, MiB, guest_ram, migrate_pair, same_memory


def _fresh(ram: GuestRAM, piece_pages: int) -> bytes:
    """What the digest map holds once a migration is done, from `ram` as it is now."""
    return verify.ram_digests(ram, piece_pages * PAGE_SIZE)


@pytest.mark.parametrize("packet_pages,channels,compression",
                         [(64, 2, "none"), (24, 3, "none"), (64, 2, "zstd")])
def test_digests_compared_are_those_of_the_memory_at_the_end(packet_pages: int, channels: int,
                                                             compression: str) -> None:
    """Pages written again in every round (the lockstep guest: 8 per look, and a
    guest process writing at random): both sides' digests equal fresh digests of
    both memories, piece for piece (compressed packets: each side hashes its
    pieces from RAM, the sender before compressing, the receiver once placed)."""
    config = MigrationConfig(channels=channels, packet_pages=packet_pages, verify=True,
                             downtime_limit_ms=0, max_rounds=4, compression=compression)
    with guest_ram(8 * MiB) as src, guest_ram(8 * MiB, fill="zero") as dst:
        lockstep = LockstepGuest(src)
        with SyntheticGuest(src, "random", dirty_rate=16 * MiB) as guest:
            source, result, destination, remote = migrate_pair(src, dst, config, guest=guest,
                                                               dirty_source=lockstep)
            assert guest.paused  # the source's memory is final
            piece = tracked_piece_pages(packet_pages, src)
            fresh = _fresh(src, piece)
        assert result.verified is True and remote.verified is True
        assert result.rounds == 5 and result.pages_sent > src.n_pages  # pages went again
        assert same_memory(src, dst)
        assert source.ram_digests is not None and destination.ram_digests is not None
        size = RAM_DIGEST_SIZE
        stale = [i for i in range(len(fresh) // size)
                 if source.ram_digests[i * size:(i + 1) * size] != fresh[i * size:(i + 1) * size]]
        assert not stale, f"source digests of {len(stale)} pieces are not of its memory: {stale[:5]}"
        assert destination.ram_digests == _fresh(dst, piece)
        assert len(fresh) == src.n_pages // piece * size
        # Each side's channels counted their hashing (the downtime's share of it
        # is in verify_time_ms).
        assert source.tracker.totals()["hash_ns"] > 0 and destination.tracker.totals()["hash_ns"] > 0


def test_zero_pages_over_stale_destination_memory_are_hashed_once_placed() -> None:
    """Half the source's pages are zero and the destination's RAM holds other data:
    a piece with ZERO runs is hashed after they were written, so the migration
    verifies, and each side's digests are of its memory."""
    config = MigrationConfig(channels=2, packet_pages=256, verify=True)
    with guest_ram(8 * MiB) as src, guest_ram(8 * MiB, seed=2) as dst:
        fill_ram(src, "random", zero_fraction=0.5, seed=3)
        source, result, destination, remote = migrate_pair(src, dst, config)
        assert result.verified is True and remote.verified is True
        assert result.zero_pages > 0
        assert same_memory(src, dst)
        piece = tracked_piece_pages(256, src)
        assert destination.ram_digests == _fresh(dst, piece) == source.ram_digests



@pytest.mark.parametrize("side", ["source", "destination"])
def test_verify_time_includes_the_channels_hashing_after_the_pause(monkeypatch: pytest.MonkeyPatch,
                                                                    side: str) -> None:
    """The final round's pieces are hashed with the guest paused: each side's
    verify_time_ms adds its busiest channel's hashing since the pause (SWITCHOVER)
    to the digests' compare (here made to read 250 ms on one side, 0 on the other;
    the source reports the larger of the two sides')."""
    monkeypatch.setattr(Operation, "_hashing_since", lambda self, mark: 0.25 if self.role == side else 0.0)
    config = MigrationConfig(channels=2, packet_pages=64, verify=True)
    with guest_ram(4 * MiB) as src, guest_ram(4 * MiB, fill="zero") as dst:
        _, result, _, remote = migrate_pair(src, dst, config)
    assert result.extra["verification"] == remote.extra["verification"] == "tracked"
    assert result.verify_time_ms >= 250
    assert (remote.verify_time_ms >= 250) == (side == "destination")


def test_digest_map_over_one_digests_is_verified_after_the_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    """A digest map larger than one DIGESTS may carry (1M digests: 256 GiB of RAM
    at default packets; here the limit is lowered below an 8 MiB RAM's 128
    pieces of 64 pages, the largest) is not tracked: the migration hashes after the
    pause and verifies, instead of failing at DIGESTS with the guest paused."""
    piece = 64  # the largest: smaller pieces are tried first, and need more digests
    monkeypatch.setattr(verify, "MAX_DIGESTS_BYTES", (8 * MiB // (piece * PAGE_SIZE) - 1) * RAM_DIGEST_SIZE)
    config = MigrationConfig(channels=2, packet_pages=64, verify=True)
    with guest_ram(8 * MiB) as src, guest_ram(8 * MiB, fill="zero") as dst:
        source, result, destination, remote = migrate_pair(src, dst, config)
        assert result.verified is True
        assert result.extra["verification"] == remote.extra["verification"] == "after pause"
        assert source.ram_digests == destination.ram_digests == verify.ram_digests(src)
        # One digest more than the limit: the same RAM at the limit is tracked.
        monkeypatch.setattr(verify, "MAX_DIGESTS_BYTES", 8 * MiB // (piece * PAGE_SIZE) * RAM_DIGEST_SIZE)
        assert tracked_piece_pages(64, src) == piece
        source, result, destination, remote = migrate_pair(src, dst, config)
        assert result.verified is True
        assert result.extra["verification"] == remote.extra["verification"] == "tracked"
        assert source.ram_digests == destination.ram_digests == _fresh(dst, piece)


def test_a_piece_never_hashed_is_an_error_not_a_pass() -> None:
    """Both digest maps start as zeros: a piece neither side hashed would compare
    equal.  The map refuses to hand out a digest it never got."""
    with guest_ram(1 * MiB) as ram:
        digests = verify.PieceDigests(ram, 64)
        try:
            shared = Segment.attach(digests.name)  # as a channel process writes it
            try:
                for index in range(digests.n_pieces):
                    if index != 2:
                        shared.buf[index * RAM_DIGEST_SIZE] = 1
            finally:
                shared.close()
            with pytest.raises(VerificationError, match="piece 2 of the digest map never hashed"):
                digests.digests()
        finally:
            digests.close()


def test_digests_that_differ_name_the_pieces() -> None:
    """The destination compares the two byte strings whole; where they differ it
    names the pieces (block and byte range), and a count that disagrees."""
    with guest_ram(1 * MiB) as ram:
        chunk = 64 * PAGE_SIZE
        ours = verify.ram_digests(ram, chunk)
        assert verify.compare_digests(ram, chunk, ours, bytes(ours)) == ""
        theirs = bytearray(ours)
        theirs[2 * RAM_DIGEST_SIZE] ^= 1
        assert verify.compare_digests(ram, chunk, ours, bytes(theirs)) == \
            "memory differs in 1 of 4 pieces: pc.ram[0x80000:0xc0000]"
        assert verify.compare_digests(ram, chunk, ours, ours[:-RAM_DIGEST_SIZE]) == \
            "expected 4 digests, got 3"
