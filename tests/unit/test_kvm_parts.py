"""KVM VMM parts that need no /dev/kvm: the state codec, the port devices, the loop oracle."""

from __future__ import annotations

import struct

import pytest

from clients.kvm import guests
from clients.kvm.devices import COM1, MAX_LINE, A20Gate, PortBus, Serial
from clients.kvm.ioctl import KvmError, UnknownPortError
from clients.kvm.state import (
    decode_config,
    decode_state,
    encode_config,
    encode_msrs,
    encode_state,
    msr_entries,
)
from engine.errors import ConfigError, DeviceStateError
from engine.shm import PAGE_SIZE, GuestRAM

pytestmark = pytest.mark.usefixtures("no_leaks")


def _records() -> dict[bytes, bytes]:
    return {b"REGS": bytes(range(144)), b"SREG": b"\1" * 312, b"XSAV": b"\2" * 4096,
            b"MSRS": encode_msrs([(0x10, 12345), (0xC0000080, 0x500)]), b"MPST": b"\0" * 4,
            b"UART": b"UART\0\0\0\0\0\0", b"CONF": encode_config({"program": "boot"})}


# ---------------------------------------------------------------------------
# State codec


def test_state_round_trips_in_load_order() -> None:
    records = _records()
    decoded = decode_state(encode_state(records))
    assert decoded == records
    assert list(decoded) == [b"REGS", b"XSAV", b"SREG", b"MSRS", b"MPST", b"UART", b"CONF"]
    assert msr_entries(decoded[b"MSRS"]) == [(0x10, 12345), (0xC0000080, 0x500)]
    assert decode_config(decoded[b"CONF"]) == {"program": "boot"}


@pytest.mark.parametrize("cut", [0, 3, 8, 11, 20, 200])
def test_truncated_state_is_refused(cut: int) -> None:
    data = encode_state(_records())
    with pytest.raises(DeviceStateError):
        decode_state(data[:cut])


@pytest.mark.parametrize(("data", "match"), [
    (b"XXXX\0\1\0\0", "magic"),
    (b"MKVM\0\2\0\0", "version"),
    (b"MKVM\0\1\0\x20", "records"),
    (b"MKVM\0\1\0\1NOPE\0\0\0\0", "unknown"),
    (b"MKVM\0\1\0\1REGS\0\0\0\4abcd", "REGS is 4 bytes"),
    (b"MKVM\0\1\0\1MSRS\0\0\0\x08" + struct.pack("<II", 5, 0), "5 MSRs"),
    (b"MKVM\0\1\0\2MPST\0\0\0\4abcdMPST\0\0\0\4abcd", "twice"),
    (b"MKVM\0\1\0\1MPST\0\0\0\4abcdEXTRA", "after the last"),
    (b"MKVM\0\1\0\1MPST\xff\xff\xff\xffab", "left"),
])
def test_garbage_state_is_a_device_state_error(data: bytes, match: str) -> None:
    with pytest.raises(DeviceStateError, match=match):
        decode_state(data)


def test_encoding_checks_sizes_and_tags() -> None:
    with pytest.raises(DeviceStateError):
        encode_state({b"REGS": b"short"})
    with pytest.raises(DeviceStateError):
        encode_state({b"ZZZZ": b""})
    with pytest.raises(DeviceStateError, match="not JSON"):
        decode_config(b"\xff")
    with pytest.raises(DeviceStateError, match="object"):
        decode_config(b"[1]")


# ---------------------------------------------------------------------------
# Port devices


def _out(bus: PortBus, port: int, value: int, size: int = 1) -> None:
    bus.write(port, size, value)


def _in(bus: PortBus, port: int, size: int = 1) -> int:
    return bus.read(port, size)


def test_com1_captures_lines_with_timestamps() -> None:
    seen = []
    com1 = Serial(on_line=seen.append)
    bus = PortBus([com1])
    for char in "hello\r\nwor":
        _out(bus, COM1, ord(char))
    assert [line.text for line in com1.lines()] == ["hello"]
    assert com1.lines()[0].time > 0 and seen == com1.lines()
    assert com1.partial() == "wor"
    assert com1.text() == "hello\nwor"
    assert com1.count("l") == 2 and com1.count("\n") == 1
    for _ in range(MAX_LINE):
        _out(bus, COM1, ord("x"))
    assert len(com1.lines()) == 2 and len(com1.lines()[1].text) == MAX_LINE


def test_com1_registers_lsr_and_state() -> None:
    com1 = Serial()
    bus = PortBus([com1])
    assert _in(bus, COM1 + 5) & 0x60 == 0x60  # transmitter empty, always
    _out(bus, COM1 + 7, 0x5A)
    _out(bus, COM1 + 3, 0x80)                 # DLAB: ports 0/1 are the divisor
    _out(bus, COM1, 0x0C)
    _out(bus, COM1 + 3, 0x03)
    _out(bus, COM1 + 1, 0x01)
    assert (_in(bus, COM1 + 7), _in(bus, COM1 + 3), _in(bus, COM1 + 1)) == (0x5A, 0x03, 0x01)
    assert com1.count(chr(0x0C)) == 0         # a divisor write is not output
    other = Serial()
    other.load_state(com1.save_state())
    assert (other.scr, other.lcr, other.ier, other.dll) == (0x5A, 0x03, 0x01, 0x0C)
    with pytest.raises(DeviceStateError):
        other.load_state(b"junk")


def test_unknown_port_names_port_and_direction() -> None:
    bus = PortBus([Serial(), A20Gate()])
    with pytest.raises(UnknownPortError, match=r"write to unknown I/O port 0x80 \(1 byte\)"):
        _out(bus, 0x80, 1)
    with pytest.raises(UnknownPortError, match=r"read from unknown I/O port 0x61 \(2 bytes\)"):
        _in(bus, 0x61, 2)
    with pytest.raises(KvmError, match="claimed twice"):
        bus.add(Serial())


def test_a20_gate_remembers_and_refuses_reset() -> None:
    bus = PortBus([A20Gate()])
    assert _in(bus, 0x92) == 0x02
    _out(bus, 0x92, 0x00)
    assert _in(bus, 0x92) == 0x00
    with pytest.raises(KvmError, match="reset"):
        _out(bus, 0x92, 0x03)


# ---------------------------------------------------------------------------
# The loop oracle


@pytest.fixture
def ram():
    guest = GuestRAM.create({"low": 16 * PAGE_SIZE, "high": 16 * PAGE_SIZE})
    yield guest
    guest.close()
    guest.unlink()


def _set_firsts(ram: GuestRAM, values: list[int]) -> None:
    pages = [(block, i) for block in ram.blocks for i in range(block.n_pages)]
    for (block, index), value in zip(pages, values):
        block.pages[index * PAGE_SIZE] = value


def test_invariant_holds_for_a_pass_in_progress_across_blocks(ram: GuestRAM) -> None:
    _set_firsts(ram, [8] * 20 + [7] * 12)          # the pass stopped at page 20 (in "high")
    assert guests.check_invariant(ram, 0, 32 * PAGE_SIZE) == ""
    _set_firsts(ram, [0] * 5 + [255] * 27)          # and across the wrap of a byte
    assert guests.check_invariant(ram, 0, 32 * PAGE_SIZE) == ""
    assert guests.check_invariant(ram, 4 * PAGE_SIZE, 4 * PAGE_SIZE) == ""


def test_invariant_catches_stale_pages_and_two_stops(ram: GuestRAM) -> None:
    _set_firsts(ram, [8] * 10 + [6] + [8] * 21)
    assert "stale or lost page" in guests.check_invariant(ram, 0, 32 * PAGE_SIZE)
    _set_firsts(ram, [8] * 10 + [7] * 10 + [6] * 12)
    assert "2 places" in guests.check_invariant(ram, 0, 32 * PAGE_SIZE)
    _set_firsts(ram, [7] * 10 + [8] * 22)          # the wrong direction
    assert guests.check_invariant(ram, 0, 32 * PAGE_SIZE)
    with pytest.raises(ConfigError):
        guests.check_invariant(ram, 0, 33 * PAGE_SIZE)
