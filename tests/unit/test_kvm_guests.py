"""The guest programs: committed bytes equal their sources, and the range patch point."""

from __future__ import annotations

import pytest

from clients.kvm import guests
from clients.kvm.guests import build
from engine.errors import ConfigError


@pytest.mark.parametrize("name", guests.PROGRAMS)
def test_committed_bytes_match_the_source(name: str) -> None:
    missing = build.tools_missing()
    if missing:
        pytest.skip(f"cannot rebuild the guests here: {', '.join(missing)} not found")
    assert build.assemble(name) == guests.image(name), \
        f"{name}.bin differs from {name}.S: run python -m clients.kvm.guests.build"


@pytest.mark.parametrize("name", guests.PROGRAMS)
def test_images_are_512_bytes_with_a_patchable_range(name: str) -> None:
    data = guests.image(name)
    assert len(data) == 512
    assert guests.range_of(data) == (0x100000, 0x8000000)
    patched = guests.with_range(data, 0x200000, 0x300000)
    assert guests.range_of(patched) == (0x200000, 0x300000)
    assert patched[:guests.RANGE_OFFSET] == data[:guests.RANGE_OFFSET]
    assert patched[guests.RANGE_OFFSET + 8:] == data[guests.RANGE_OFFSET + 8:]


def test_boot_sector_has_the_signature() -> None:
    assert guests.image("boot")[510:] == b"\x55\xaa"


def test_bad_names_and_ranges_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown guest program"):
        guests.image("dos")
    for start, end in [(1, 4096), (8192, 4096), (0, 1 << 32)]:
        with pytest.raises(ConfigError):
            guests.with_range(guests.image("boot"), start, end)
