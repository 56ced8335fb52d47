"""Every codec, both transports, three kinds of guest memory, live and exact."""

from __future__ import annotations

import pytest

from clients.guest import SyntheticGuest, fill_ram
from engine import DestinationMigration, GuestRAM, MigrationConfig, SourceMigration
from tests.harness import SECRET, MiB, address, guest_ram, migrate, same_memory

CONTENTS = {
    "random": ("random", 0.0),
    "text": ("text", 0.0),
    "text-30%-zero": ("text", 0.3),
}


def _codec_cases() -> list:
    """Every codec with every content; CI runs each pair over one transport (tcp and
    unix taking turns), the heavy run over the other as well."""
    cases = []
    for i, (codec, content) in enumerate((c, t) for t in CONTENTS for c in ("none", "lz4", "zstd", "zlib")):
        ci, heavy = ("tcp", "unix") if i % 2 == 0 else ("unix", "tcp")
        cases.append(pytest.param(codec, ci, content, id=f"{content}-{ci}-{codec}"))
        cases.append(pytest.param(codec, heavy, content, id=f"{content}-{heavy}-{codec}",
                                  marks=pytest.mark.heavy))
    return cases


@pytest.mark.parametrize(("codec", "transport", "content"), _codec_cases())
def test_codec_migrates_live_and_exact(codec: str, transport: str, content: str) -> None:
    fill, zero_fraction = CONTENTS[content]
    config = MigrationConfig(channels=2, packet_pages=512, compression=codec, verify=True)
    with GuestRAM.create({"pc.ram": 16 * MiB}) as src, guest_ram(16 * MiB, fill="zero") as dst:
        fill_ram(src, fill, zero_fraction)
        zero_at_start = sum(int((block.array() == 0).all(axis=1).sum()) for block in src.blocks)
        guest = SyntheticGuest(src, "random", dirty_rate=16 * MiB)
        guest.start()
        try:
            result, remote = migrate(src, dst, config, transport, guest)
        finally:
            report = guest.stop()
        assert result.verified is True and same_memory(src, dst)
        assert result.compression == remote.compression == codec
        if zero_fraction:
            # Every page zero at the start goes as a zero run, unless the guest wrote
            # it first (a page written after it went zero is sent again, not less).
            assert report is not None and zero_at_start >= 0.25 * src.n_pages
            assert result.zero_pages >= zero_at_start - report.pages_written
        if codec != "none" and fill == "text":
            assert result.compression_ratio > 2.0
            assert result.bytes_on_wire < 0.5 * result.guest_bytes
        if fill == "random":
            # Incompressible frames go RAW: barely more than the pages themselves.
            assert result.bytes_on_wire < 1.02 * result.pages_sent * 4096 + (1 << 20)


def test_zero_pages_overwrite_old_data_on_a_used_destination() -> None:
    """Destination RAM that is not known to be zero gets its zero pages written."""
    config = MigrationConfig(channels=2, packet_pages=256, compression="lz4")
    with guest_ram(8 * MiB, fill="zero") as src, guest_ram(8 * MiB, fill="random") as dst:
        fill_ram(src, "text", zero_fraction=0.5)
        result, _ = migrate(src, dst, config)  # DestinationMigration defaults: not zeroed
        assert result.zero_pages >= 0.4 * src.n_pages
        assert same_memory(src, dst)


def test_a_page_zeroed_between_rounds_is_cleared() -> None:
    """Round 1 sends a page with data; the guest zeroes it; round 2 sends it as ZERO."""
    config = MigrationConfig(channels=1, packet_pages=64, downtime_limit_ms=0, max_rounds=2)
    with guest_ram(4 * MiB, fill="text") as src, guest_ram(4 * MiB, fill="zero") as dst:
        destination = DestinationMigration(address("tcp"), secret=SECRET, ram=dst, config=config,
                                           ram_is_zeroed=True)
        destination.start()
        zeroed = [False]

        def pause() -> None:  # runs after the precopy rounds: zero half the pages first
            block = src.blocks[0]
            block.array()[::2] = 0
            block.dirty.mark_pages(range(0, block.n_pages, 2))
            zeroed[0] = True

        result = SourceMigration(src, destination.address, secret=SECRET, config=config,
                                 pause_guest=pause).run()
        destination.wait(10)
        assert zeroed[0] and result.zero_pages >= src.n_pages // 2
        assert same_memory(src, dst)


def test_detection_off_sends_zero_pages_as_data() -> None:
    config = MigrationConfig(channels=2, zero_page_detection=False)
    with guest_ram(8 * MiB, fill="zero") as src, guest_ram(8 * MiB, fill="zero") as dst:
        result, _ = migrate(src, dst, config)
        assert result.zero_pages == 0 and result.pages_sent == src.n_pages
        assert result.bytes_on_wire > 8 * MiB
    config = config.with_(zero_page_detection=True)
    with guest_ram(8 * MiB, fill="zero") as src, guest_ram(8 * MiB, fill="zero") as dst:
        result, _ = migrate(src, dst, config)
        assert result.pages_sent == 0 and result.zero_pages == src.n_pages
        assert result.bytes_on_wire < 256 * 1024  # headers only


def test_bandwidth_cap_holds_over_all_channels() -> None:
    cap = 40 * MiB
    config = MigrationConfig(channels=3, packet_pages=64, max_bandwidth=cap)
    with guest_ram(24 * MiB) as src, guest_ram(24 * MiB, fill="zero") as dst:
        result, _ = migrate(src, dst, config)
        assert same_memory(src, dst)
        # 24 MiB at 40 MiB/s takes at least ~0.55 s whatever the channel count.
        assert result.transfer_time_s > 0.5
        assert result.throughput_bytes_per_s < 1.15 * cap
