"""The saved state of a KVM machine: a tagged record stream (sans-IO).

Byte layout (header big-endian; each record's payload is the kernel's own
little-endian struct, exactly as the GET ioctl filled it)::

    0       4        6            8
    ├ "MKVM" ┼ version ┼ n_records ┤  then n_records times:
    ├ tag (4 ASCII) ┼ length u32 ┼ payload (length bytes) ┤

Tags, in the order :func:`encode_state` writes them and the vCPU loads them
(kvm.md's order: regs, xsave, xcrs, sregs, msrs, mp_state, events, debugregs)::

    REGS 144 · XSAV ≥ 4096 (or FPU_ 416) · XCRS 392 · SREG 312 · MSRS 8 + 16·n ·
    MPST 4 · EVTS 64 · DBGR 128 · UART (COM1 registers) · CONF (JSON: program, range)

Every record is optional to the codec; the loader says which it needs.  The
decoder never trusts a length: a wrong size, an unknown or repeated tag, or a
short buffer raise DeviceStateError, never ``struct.error``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

from engine.errors import DeviceStateError

__all__ = ["MAX_MSRS", "MAX_XSAVE", "TAGS", "decode_config", "decode_state", "encode_config",
           "encode_state"]

MAGIC = b"MKVM"
VERSION = 1
MAX_MSRS = 1024
MAX_XSAVE = 1 << 20
_HEADER = struct.Struct(">4sHH")
_RECORD = struct.Struct(">4sI")
_MSRS_HEADER = struct.Struct("<II")

#: tag -> (exact size, or None with a check in _check_size); order = load order.
TAGS: dict[bytes, int | None] = {
    b"REGS": 144, b"XSAV": None, b"FPU_": 416, b"XCRS": 392, b"SREG": 312, b"MSRS": None,
    b"MPST": 4, b"EVTS": 64, b"DBGR": 128, b"UART": None, b"CONF": None,
}
_MAX_OTHER = 64 << 10


def _check_size(tag: bytes, payload: bytes) -> None:
    size = len(payload)
    exact = TAGS[tag]
    if exact is not None:
        if size != exact:
            raise DeviceStateError(f"record {tag.decode()} is {size} bytes, not {exact}")
    elif tag == b"XSAV":
        if not 4096 <= size <= MAX_XSAVE or size % 4:
            raise DeviceStateError(f"record XSAV is {size} bytes; expected 4096..{MAX_XSAVE}")
    elif tag == b"MSRS":
        if size < _MSRS_HEADER.size:
            raise DeviceStateError(f"record MSRS is {size} bytes, shorter than its header")
        count, _ = _MSRS_HEADER.unpack_from(payload)
        if count > MAX_MSRS or size != _MSRS_HEADER.size + 16 * count:
            raise DeviceStateError(f"record MSRS says {count} MSRs but is {size} bytes")
    elif size > _MAX_OTHER:
        raise DeviceStateError(f"record {tag.decode()} is {size} bytes, over {_MAX_OTHER}")


def encode_state(records: Mapping[bytes, bytes]) -> bytes:
    """The stream for `records` (tag -> payload), in :data:`TAGS` order.
    DeviceStateError for an unknown tag or a payload of the wrong size."""
    parts = []
    for tag in records:
        if tag not in TAGS:
            raise DeviceStateError(f"unknown state record {tag!r}")
    ordered = [tag for tag in TAGS if tag in records]
    for tag in ordered:
        payload = bytes(records[tag])
        _check_size(tag, payload)
        parts.append(_RECORD.pack(tag, len(payload)) + payload)
    return _HEADER.pack(MAGIC, VERSION, len(ordered)) + b"".join(parts)


def decode_state(data: bytes | bytearray | memoryview) -> dict[bytes, bytes]:
    """The records of a stream made by :func:`encode_state` (tag -> payload).
    DeviceStateError for anything else."""
    data = bytes(data)
    if len(data) < _HEADER.size:
        raise DeviceStateError(f"KVM state is {len(data)} bytes, shorter than its header")
    magic, version, count = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise DeviceStateError(f"not KVM machine state (magic {magic!r})")
    if version != VERSION:
        raise DeviceStateError(f"KVM state version {version}; this VMM reads {VERSION}")
    if count > len(TAGS):
        raise DeviceStateError(f"KVM state says {count} records; at most {len(TAGS)} exist")
    records: dict[bytes, bytes] = {}
    offset = _HEADER.size
    for _ in range(count):
        if len(data) - offset < _RECORD.size:
            raise DeviceStateError("KVM state ends inside a record header")
        tag, length = _RECORD.unpack_from(data, offset)
        offset += _RECORD.size
        if tag not in TAGS:
            raise DeviceStateError(f"unknown state record {tag!r}")
        if tag in records:
            raise DeviceStateError(f"state record {tag.decode()} appears twice")
        if length > len(data) - offset:
            raise DeviceStateError(f"record {tag.decode()} says {length} bytes; "
                                   f"{len(data) - offset} are left")
        payload = data[offset:offset + length]
        offset += length
        _check_size(tag, payload)
        records[tag] = payload
    if offset != len(data):
        raise DeviceStateError(f"{len(data) - offset} bytes after the last state record")
    return records


def encode_config(config: Mapping[str, Any]) -> bytes:
    """The CONF payload: compact, sorted JSON."""
    return json.dumps(dict(config), sort_keys=True, separators=(",", ":")).encode()


def decode_config(payload: bytes) -> dict[str, Any]:
    """The mapping in a CONF payload; DeviceStateError if it is not a JSON object."""
    try:
        config = json.loads(payload.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DeviceStateError(f"KVM machine config is not JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise DeviceStateError("KVM machine config is not a JSON object")
    return config


def msr_entries(payload: bytes) -> list[tuple[int, int]]:
    """``[(index, value), ...]`` of an MSRS payload (already size-checked)."""
    count, _ = _MSRS_HEADER.unpack_from(payload)
    return [struct.unpack_from("<IIQ", payload, 8 + 16 * i)[::2] for i in range(count)]


def encode_msrs(entries: list[tuple[int, int]]) -> bytes:
    """An MSRS payload (a kvm_msrs with its entries) for `entries`."""
    return _MSRS_HEADER.pack(len(entries), 0) + b"".join(
        struct.pack("<IIQ", index, 0, value) for index, value in entries)
