"""The main-channel messages of the multifd wire format, with no I/O.

Byte layout (integers big-endian; docs/wire-format.md §3 is the specification)::

    message      type u16 | flags u16 (0) | body_length u32 (≤ 16 MiB) | body
    string       len u16 | UTF-8        ("string1": len u8 | bytes)

    CONFIG          page_size u32 | packet_pages u32 | channel_count u16 | n_blocks u16
                    | flags u32 | codec string1 | codec_level i16
                    | n_blocks × (name string1 | size u64)
                    | n_devices u16 | n_devices × (idstr string1 | instance_id u32)
                    | [flags bit 1 DEVICE_FLAGS: n_devices × device flags u8]
    CONFIG_ACK      status u16 | reason string
    CHANNELS_READY  (empty)
    SYNC_MARKER     epoch u32
    SWITCHOVER      (empty)
    COMPLETE        final_epoch u32 | flags u32 (bit 0: DIGESTS follows)
    DIGESTS         digest_chunk u32 | n_digests u32 | n × 16-byte XXH3-128
    DEVICES_DONE    n_devices u16 | n × (chunks u32 | bytes u64 | SHA-256 of the stream 32)
    RESUMED         downtime_us u64 | verify_us u64 | verified u8 | detail string
    ABORT           code u16 | message string
    PING, PONG      token u64
    LIVE_ROUND      flags u32 (bit 0: ACK_WANTED) | n_devices u16 | n × chunks u32
    DEVICES_LOADED  flags u32 (bit 0: SWITCHOVER_ACK) | n_devices u16
                    | n × (chunks u32 | bytes u64 | load_us u64)

:func:`encode_message` turns a record into bytes; :class:`MessageDecoder` turns
received bytes into records, checking every length, count and field (CONFIG in
full) before use.  Bytes from the peer that break a rule raise RemoteProtocolError;
an invalid record given to the encoder raises LocalProtocolError.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

from engine.errors import (
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)
from engine.wire.packet import (
    MAX_BLOCK_PAGES,
    MAX_BLOCKS,
    MAX_CHANNELS,
    MAX_DEVICES,
    MAX_MESSAGE_BODY,
    MAX_PACKET_PAGES,
    MESSAGE_HEADER_SIZE,
    NEED_DATA,
    PAGE_SIZE,
    Buffer,
    NeedData,
    PacketLimits,
    StreamBuffer,
    devices_problem,
    utf8_length,
)

DIGEST_SIZE: Final = 32  # SHA-256 of a device's stream (DEVICES_DONE)
RAM_DIGEST_SIZE: Final = 16  # XXH3-128 of a piece of guest RAM (DIGESTS)


class MessageType(enum.IntEnum):
    CONFIG = 1
    CONFIG_ACK = 2
    CHANNELS_READY = 3
    SYNC_MARKER = 4
    SWITCHOVER = 5
    COMPLETE = 6
    RESUMED = 7
    ABORT = 8
    PING = 9
    PONG = 10
    DIGESTS = 11
    DEVICES_DONE = 12
    PREPARED = 13
    COMMIT = 14
    LIVE_ROUND = 15
    DEVICES_LOADED = 16
    RAM_HANDOVER = 17


class ConfigFlags(enum.IntFlag):
    ZERO_PAGE_DETECTION = 1
    DEVICE_FLAGS = 2  # a flags byte per device follows the device list
    LOCAL = 4  # same-host mode: the RAM is handed over (RAM_HANDOVER), no page is sent
    PAGE_SUMS = 8  # tracked verification: both sides hash each page as it moves (DIGESTS)


class DeviceSpecFlags(enum.IntFlag):
    ITERATIVE = 1       # the device sends live state during precopy
    SWITCHOVER_ACK = 2  # the source waits for the destination to load its initial state


class LiveRoundFlags(enum.IntFlag):
    ACK_WANTED = 1  # answer with SWITCHOVER_ACK once these chunks are loaded


class LoadedFlags(enum.IntFlag):
    SWITCHOVER_ACK = 1  # the initial state of every device that asked is loaded


class AbortCode(enum.IntEnum):
    CANCELLED = 1
    FAILED = 2


class CompleteFlags(enum.IntFlag):
    DIGESTS_FOLLOW = 1


class Verification(enum.IntEnum):
    """RESUMED ``verified``: whether the destination compared its memory with the
    source's digests.  There is no "different": a destination whose memory differs
    fails with VerificationError before PREPARED and never commits, so no RESUMED
    can say so (2, once listed as DIFFERENT, is refused like any unknown value)."""

    NOT_CHECKED = 0
    EQUAL = 1


# A plain int: ~ of an IntFlag keeps only the defined bits, which would hide unknown ones.
_CONFIG_FLAGS: Final = int(ConfigFlags.ZERO_PAGE_DETECTION | ConfigFlags.DEVICE_FLAGS
                           | ConfigFlags.LOCAL | ConfigFlags.PAGE_SUMS)
_DEVICE_SPEC_FLAGS: Final = int(DeviceSpecFlags.ITERATIVE | DeviceSpecFlags.SWITCHOVER_ACK)
_LIVE_ROUND_FLAGS: Final = int(LiveRoundFlags.ACK_WANTED)
_LOADED_FLAGS: Final = int(LoadedFlags.SWITCHOVER_ACK)
_COMPLETE_FLAGS: Final = int(CompleteFlags.DIGESTS_FOLLOW)
_VERIFICATIONS: Final = frozenset(Verification)
_ABORT_CODES: Final = frozenset(AbortCode)

# ── fixed layouts ─────────────────────────────────────────────────────────────

# message header, 8 bytes
#  0 type u16 | 2 flags u16 | 4 body_length u32
_MESSAGE_HEADER = struct.Struct(">HHI")

# CONFIG body, fixed start, 16 bytes (codec name, level, blocks and devices follow)
#  0 page_size u32 | 4 packet_pages u32 | 8 channel_count u16 | 10 n_blocks u16 | 12 flags u32
_CONFIG = struct.Struct(">IIHHI")

# COMPLETE body, 8 bytes
#  0 final_epoch u32 | 4 flags u32
_COMPLETE = struct.Struct(">II")

# one device in DEVICES_DONE, 44 bytes
#  0 chunks u32 | 4 bytes u64 | 12 sha256 32s
_DEVICE_DONE = struct.Struct(">IQ32s")

# one device in DEVICES_LOADED, 20 bytes
#  0 chunks u32 | 4 bytes u64 | 12 load_us u64
_DEVICE_LOADED = struct.Struct(">IQQ")

# LIVE_ROUND and DEVICES_LOADED body, fixed start, 6 bytes (one entry per device follows)
#  0 flags u32 | 4 n_devices u16
_DEVICE_LIST = struct.Struct(">IH")

# DIGESTS body, fixed start, 8 bytes (n_digests × RAM_DIGEST_SIZE (16) bytes follow)
#  0 digest_chunk u32 | 4 n_digests u32
_DIGESTS = struct.Struct(">II")
# The most digest bytes one DIGESTS carries (§3.3): MAX_MESSAGE_BODY less its header.
MAX_DIGESTS_BYTES: Final = (MAX_MESSAGE_BODY - _DIGESTS.size) // RAM_DIGEST_SIZE * RAM_DIGEST_SIZE

# RESUMED body, fixed start, 18 bytes (the detail string follows)
#  0 downtime_us u64 | 8 verify_us u64 | 16 verified u8 | 17 running u8
_RESUMED = struct.Struct(">QQBB")

# Fields and length prefixes inside bodies.
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_I16 = struct.Struct(">h")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")

_STRING_MAX: Final = 0xFFFF
_STRING1_MAX: Final = 0xFF

# ── records ───────────────────────────────────────────────────────────────────


@dataclass(frozen=True, slots=True)
class BlockSpec:
    """A RAM block: a unique name of 1..255 UTF-8 bytes, a size in bytes."""

    name: str
    size: int


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """A device whose state migrates; ``(idstr, instance_id)`` is unique.
    ``iterative``: it sends live state during precopy; ``switchover_ack``: the
    source waits, before it pauses, until its initial state is loaded."""

    idstr: str
    instance_id: int
    iterative: bool = False
    switchover_ack: bool = False

    @property
    def flags(self) -> int:
        return ((DeviceSpecFlags.ITERATIVE if self.iterative else 0)
                | (DeviceSpecFlags.SWITCHOVER_ACK if self.switchover_ack else 0))


@dataclass(frozen=True, slots=True)
class Config:
    """CONFIG: the source's proposal of the migration's layout (wire-format §3.1)."""

    page_size: int
    packet_pages: int
    channel_count: int
    zero_page_detection: bool
    codec: str
    codec_level: int
    blocks: tuple[BlockSpec, ...]
    devices: tuple[DeviceSpec, ...] = ()
    local: bool = False  # same-host mode (flag LOCAL): RAM_HANDOVER instead of pages
    page_sums: bool = False  # flag PAGE_SUMS: DIGESTS hash the pages' words (wire-format §3.3)

    @property
    def block_pages(self) -> tuple[int, ...]:
        """Pages of each block, in CONFIG order."""
        return tuple(block.size // self.page_size for block in self.blocks)


@dataclass(frozen=True, slots=True)
class ConfigAck:
    """CONFIG_ACK: ``status`` 0 accepts the CONFIG; any other value refuses it."""

    status: int
    reason: str = ""

    @property
    def accepted(self) -> bool:
        return self.status == 0


@dataclass(frozen=True, slots=True)
class ChannelsReady:
    """CHANNELS_READY: all N channels joined and their processes run."""


@dataclass(frozen=True, slots=True)
class SyncMarker:
    """SYNC_MARKER: every channel has sent SYNC(``epoch``)."""

    epoch: int


@dataclass(frozen=True, slots=True)
class Switchover:
    """SWITCHOVER: the source guest is paused; the final round follows."""


@dataclass(frozen=True, slots=True)
class Complete:
    """COMPLETE: every page is sent (epochs up to ``final_epoch``); END is on every channel."""

    final_epoch: int
    digests_follow: bool = False


@dataclass(frozen=True, slots=True)
class Digests:
    """DIGESTS: XXH3-128 of each ``digest_chunk``-byte piece of each block, in order,
    joined: one ``bytes`` of RAM_DIGEST_SIZE per piece (compared whole; split per
    piece only to name where two differ)."""

    digest_chunk: int
    digests: bytes


@dataclass(frozen=True, slots=True)
class DeviceDone:
    """How one device's saved stream ended: chunk count (END included), bytes, SHA-256."""

    chunks: int
    size: int
    digest: bytes


@dataclass(frozen=True, slots=True)
class DevicesDone:
    """DEVICES_DONE: every device's stream is saved; one entry per CONFIG device, in order."""

    devices: tuple[DeviceDone, ...]


@dataclass(frozen=True, slots=True)
class LiveRound:
    """LIVE_ROUND: a precopy round's sync is done; ``chunks`` per CONFIG device:
    how many chunks its live state has had so far (all sent before the round's
    SYNC).  ``ack_wanted``: every device that asked for a switchover ack has
    handed out its initial state; answer SWITCHOVER_ACK once it is loaded."""

    chunks: tuple[int, ...]
    ack_wanted: bool = False


@dataclass(frozen=True, slots=True)
class DeviceLoaded:
    """How far one device's loading got on the destination: chunks and bytes
    loaded, and the microseconds its load_state calls took."""

    chunks: int
    size: int
    load_us: int


@dataclass(frozen=True, slots=True)
class DevicesLoaded:
    """DEVICES_LOADED (destination → source): every device loaded the chunks the
    last LIVE_ROUND counted; one entry per CONFIG device.  ``switchover_ack``:
    this answers a LIVE_ROUND that wanted the ack (QEMU's switchover-ack)."""

    devices: tuple[DeviceLoaded, ...]
    switchover_ack: bool = False


@dataclass(frozen=True, slots=True)
class Prepared:
    """PREPARED: every page and device is in place (and verified, if asked); the
    destination guest has not run and waits for COMMIT."""


@dataclass(frozen=True, slots=True)
class Commit:
    """COMMIT: the commit point.  From the moment the source hands it to its
    socket, the destination owns the VM and the source never resumes its guest."""


@dataclass(frozen=True, slots=True)
class RamHandover:
    """RAM_HANDOVER (local mode): the guest is paused and its RAM comes with this
    message as one open descriptor per CONFIG block (SCM_RIGHTS, in block order);
    ``segments`` are the names the source knows them by (the destination unlinks
    by name once it owns them, and only while the name still is that file)."""

    segments: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Resumed:
    """RESUMED: the destination committed; downtime (SWITCHOVER → resume), verification
    result, and whether the guest runs (``running`` 0: held paused for the VMM)."""

    downtime_us: int
    verify_us: int
    verified: Verification
    detail: str = ""
    running: bool = True


@dataclass(frozen=True, slots=True)
class Abort:
    """ABORT, either direction; ``error`` names the failure's class in engine.errors,
    so the other side raises the same type."""

    code: int
    message: str = ""
    error: str = "MigrationError"


@dataclass(frozen=True, slots=True)
class Ping:
    token: int


@dataclass(frozen=True, slots=True)
class Pong:
    token: int


Message: TypeAlias = (
    Config | ConfigAck | ChannelsReady | SyncMarker | Switchover | Complete | Digests
    | DevicesDone | Prepared | Commit | Resumed | Abort | Ping | Pong | LiveRound | DevicesLoaded
    | RamHandover
)


def packet_limits(
    config: Config, codec: int, codec_bound: Callable[[int], int] | None = None
) -> PacketLimits:
    """The PacketLimits a channel receiver enforces for an accepted ``config``
    (the destination builds them here and hands them to its channels).

    ``codec`` is the id the codec registry gives ``config.codec``.  In local mode
    (``config.local``) the RAM is handed over, never sent: the limits name no
    block, so a RAM_PAGES packet is refused.
    """
    return PacketLimits(config.page_size, config.packet_pages,
                        () if config.local else config.block_pages, codec, codec_bound)


# ── validation shared by the encoder and the decoder ──────────────────────────


def _config_problem(config: Config) -> str | None:
    """What is wrong with ``config`` as wire-format §3.1 states it, or None."""
    if config.page_size != PAGE_SIZE:
        return f"page_size {config.page_size} is not {PAGE_SIZE}"
    if not 1 <= config.packet_pages <= MAX_PACKET_PAGES:
        return f"packet_pages {config.packet_pages} is outside 1..{MAX_PACKET_PAGES}"
    if not 1 <= config.channel_count <= MAX_CHANNELS:
        return f"channel_count {config.channel_count} is outside 1..{MAX_CHANNELS}"
    if not (1 <= len(config.codec) <= _STRING1_MAX and config.codec.isascii()):
        return "the codec name must be 1..255 ASCII characters"
    if not -0x8000 <= config.codec_level <= 0x7FFF:
        return f"codec_level {config.codec_level} does not fit 16 bits"
    if config.local and config.page_sums:
        return "PAGE_SUMS with LOCAL: a handed-over RAM moves no page to hash"
    if not 1 <= len(config.blocks) <= MAX_BLOCKS:
        return f"{len(config.blocks)} blocks, not 1..{MAX_BLOCKS}"
    for block in config.blocks:
        if not 1 <= utf8_length(block.name) <= _STRING1_MAX:
            return f"block name {block.name!r} is not 1..255 UTF-8 bytes"
        pages, rest = divmod(block.size, config.page_size)
        if rest or not 1 <= pages <= MAX_BLOCK_PAGES:
            return (f"block {block.name!r} size {block.size} is not a positive multiple "
                    f"of the page size, at most {MAX_BLOCK_PAGES} pages")
    if len({block.name for block in config.blocks}) != len(config.blocks):
        return "block names are not unique"
    return devices_problem([(d.idstr, d.instance_id) for d in config.devices], min_idstr=0)


def _digests_problem(digests: Digests) -> str | None:
    """What is wrong with ``digests`` as wire-format §3.3 states it, or None."""
    if not 1 <= digests.digest_chunk <= 0xFFFF_FFFF:
        return f"digest_chunk {digests.digest_chunk} is outside 1..2**32-1"
    if not digests.digests:
        return "there are no digests"
    if len(digests.digests) % RAM_DIGEST_SIZE:
        return f"the digests are not a whole number of {RAM_DIGEST_SIZE}-byte digests"
    return None


# ── encoding ──────────────────────────────────────────────────────────────────


def _string(text: str, length: struct.Struct, encoding: str = "utf-8") -> bytes:
    data = text.encode(encoding)
    return length.pack(len(data)) + data


def _encode_config(config: Config) -> bytes:
    problem = _config_problem(config)
    if problem is not None:
        raise LocalProtocolError(f"invalid CONFIG: {problem}")
    flags = (ConfigFlags.ZERO_PAGE_DETECTION if config.zero_page_detection else 0) \
        | (ConfigFlags.LOCAL if config.local else 0) \
        | (ConfigFlags.PAGE_SUMS if config.page_sums else 0)
    device_flags = [device.flags for device in config.devices]
    if any(device_flags):  # only then: a CONFIG without iterative devices reads as before
        flags |= ConfigFlags.DEVICE_FLAGS
    parts = [
        _CONFIG.pack(config.page_size, config.packet_pages, config.channel_count,
                     len(config.blocks), flags),
        _string(config.codec, _U8, "ascii"),
        _I16.pack(config.codec_level),
    ]
    for block in config.blocks:
        parts += (_string(block.name, _U8), _U64.pack(block.size))
    parts.append(_U16.pack(len(config.devices)))
    for device in config.devices:
        parts += (_string(device.idstr, _U8), _U32.pack(device.instance_id))
    if flags & ConfigFlags.DEVICE_FLAGS:
        parts.append(bytes(device_flags))
    return b"".join(parts)


def _encode_complete(complete: Complete) -> bytes:
    flags = CompleteFlags.DIGESTS_FOLLOW if complete.digests_follow else 0
    return _COMPLETE.pack(complete.final_epoch, flags)


def _encode_digests(digests: Digests) -> bytes:
    problem = _digests_problem(digests)
    if problem is not None:
        raise LocalProtocolError(f"invalid DIGESTS: {problem}")
    return (_DIGESTS.pack(digests.digest_chunk, len(digests.digests) // RAM_DIGEST_SIZE)
            + digests.digests)


def _encode_devices_done(done: DevicesDone) -> bytes:
    if len(done.devices) > MAX_DEVICES:
        raise LocalProtocolError(f"{len(done.devices)} devices exceed {MAX_DEVICES}")
    for device in done.devices:
        if device.chunks < 1 or len(device.digest) != DIGEST_SIZE:
            raise LocalProtocolError("a device stream has at least its END chunk and a 32-byte digest")
    return _U16.pack(len(done.devices)) + b"".join(
        _DEVICE_DONE.pack(d.chunks, d.size, d.digest) for d in done.devices)


def _encode_live_round(live: LiveRound) -> bytes:
    if len(live.chunks) > MAX_DEVICES:
        raise LocalProtocolError(f"{len(live.chunks)} devices exceed {MAX_DEVICES}")
    flags = LiveRoundFlags.ACK_WANTED if live.ack_wanted else 0
    return _DEVICE_LIST.pack(flags, len(live.chunks)) + b"".join(map(_U32.pack, live.chunks))


def _encode_devices_loaded(loaded: DevicesLoaded) -> bytes:
    if len(loaded.devices) > MAX_DEVICES:
        raise LocalProtocolError(f"{len(loaded.devices)} devices exceed {MAX_DEVICES}")
    flags = LoadedFlags.SWITCHOVER_ACK if loaded.switchover_ack else 0
    return _DEVICE_LIST.pack(flags, len(loaded.devices)) + b"".join(
        _DEVICE_LOADED.pack(d.chunks, d.size, d.load_us) for d in loaded.devices)


def _encode_ram_handover(handover: RamHandover) -> bytes:
    if not 1 <= len(handover.segments) <= MAX_BLOCKS:
        raise LocalProtocolError(f"RAM_HANDOVER names {len(handover.segments)} segments, "
                                 f"not 1..{MAX_BLOCKS}")
    if not all(1 <= utf8_length(name) <= _STRING1_MAX for name in handover.segments):
        raise LocalProtocolError("a RAM_HANDOVER segment name must be 1..255 UTF-8 bytes")
    return _U16.pack(len(handover.segments)) + b"".join(
        _string(name, _U8) for name in handover.segments)


def _encode_resumed(resumed: Resumed) -> bytes:
    if resumed.verified not in _VERIFICATIONS:
        raise LocalProtocolError(f"RESUMED verified {resumed.verified} is not 0 or 1")
    return (_RESUMED.pack(resumed.downtime_us, resumed.verify_us, resumed.verified,
                          int(resumed.running))
            + _string(resumed.detail, _U16))


def _encode_abort(abort: Abort) -> bytes:
    if abort.code not in _ABORT_CODES:
        raise LocalProtocolError(f"unknown ABORT code {abort.code}")
    if not (1 <= len(abort.error) <= _STRING1_MAX and abort.error.isascii()):
        raise LocalProtocolError("the ABORT error class must be 1..255 ASCII characters")
    return _U16.pack(abort.code) + _string(abort.error, _U8, "ascii") + _string(abort.message, _U16)


_ENCODERS: Final[dict[type, tuple[MessageType, Callable[..., bytes]]]] = {
    Config: (MessageType.CONFIG, _encode_config),
    ConfigAck: (MessageType.CONFIG_ACK,
                lambda ack: _U16.pack(ack.status) + _string(ack.reason, _U16)),
    ChannelsReady: (MessageType.CHANNELS_READY, lambda _: b""),
    SyncMarker: (MessageType.SYNC_MARKER, lambda marker: _U32.pack(marker.epoch)),
    Switchover: (MessageType.SWITCHOVER, lambda _: b""),
    Complete: (MessageType.COMPLETE, _encode_complete),
    Digests: (MessageType.DIGESTS, _encode_digests),
    DevicesDone: (MessageType.DEVICES_DONE, _encode_devices_done),
    Prepared: (MessageType.PREPARED, lambda _: b""),
    Commit: (MessageType.COMMIT, lambda _: b""),
    Resumed: (MessageType.RESUMED, _encode_resumed),
    Abort: (MessageType.ABORT, _encode_abort),
    Ping: (MessageType.PING, lambda ping: _U64.pack(ping.token)),
    Pong: (MessageType.PONG, lambda pong: _U64.pack(pong.token)),
    LiveRound: (MessageType.LIVE_ROUND, _encode_live_round),
    DevicesLoaded: (MessageType.DEVICES_LOADED, _encode_devices_loaded),
    RamHandover: (MessageType.RAM_HANDOVER, _encode_ram_handover),
}


def message_type(record: type) -> MessageType:
    """The type (and name: ``.name``) of a message record class.  Raises
    LocalProtocolError for a class that is not a message."""
    try:
        return _ENCODERS[record][0]
    except KeyError:
        raise LocalProtocolError(f"{record.__name__} is not a message") from None


def encode_message(message: Message) -> bytes:
    """Header and body of ``message``.

    Raises LocalProtocolError for a record that is not a message, a field out of
    range, a string too long or not encodable, a body over 16 MiB, or a CONFIG,
    DIGESTS, RESUMED or ABORT that breaks a rule of wire-format §3.
    """
    try:
        message_type, encoder = _ENCODERS[type(message)]
    except KeyError:
        raise LocalProtocolError(f"{type(message).__name__} is not a message") from None
    try:
        body = encoder(message)
    except (struct.error, UnicodeEncodeError) as error:
        raise LocalProtocolError(f"cannot encode {message_type.name}: {error}") from error
    if len(body) > MAX_MESSAGE_BODY:
        raise LocalProtocolError(f"{message_type.name} body exceeds {MAX_MESSAGE_BODY} bytes")
    return _MESSAGE_HEADER.pack(message_type, 0, len(body)) + body


# ── decoding ──────────────────────────────────────────────────────────────────


class _Reader:
    """Reads a body front to back; running past its end is a RemoteProtocolError."""

    __slots__ = ("_data", "_offset", "_what")

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._offset = 0
        self._what = what

    def take(self, size: int) -> bytes:
        end = self._offset + size
        if end > len(self._data):
            raise RemoteProtocolError(f"{self._what} body is truncated")
        chunk = self._data[self._offset:end]
        self._offset = end
        return chunk

    def unpack(self, layout: struct.Struct) -> tuple[int, ...]:
        return layout.unpack(self.take(layout.size))

    @property
    def remaining(self) -> int:
        return len(self._data) - self._offset

    def number(self, layout: struct.Struct) -> int:
        (value,) = self.unpack(layout)
        return value

    def string(self, length: struct.Struct, field: str, encoding: str = "utf-8") -> str:
        raw = self.take(self.number(length))
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError as error:
            raise RemoteProtocolError(
                f"{self._what} {field} is not valid {encoding}"
            ) from error

    def finish(self) -> None:
        if self.remaining:
            raise RemoteProtocolError(f"{self._what} body has {self.remaining} trailing bytes")


def _decode_config(body: _Reader) -> Config:
    page_size, packet_pages, channel_count, n_blocks, flags = body.unpack(_CONFIG)
    if flags & ~_CONFIG_FLAGS:
        raise RemoteProtocolError(f"unknown CONFIG flags 0x{flags:08x}")
    if not 1 <= n_blocks <= MAX_BLOCKS:
        raise RemoteProtocolError(f"CONFIG n_blocks {n_blocks} is outside 1..{MAX_BLOCKS}")
    codec = body.string(_U8, "codec name", "ascii")
    codec_level = body.number(_I16)
    blocks = tuple(BlockSpec(body.string(_U8, "block name"), body.number(_U64))
                   for _ in range(n_blocks))
    n_devices = body.number(_U16)
    if n_devices > MAX_DEVICES:
        raise RemoteProtocolError(f"CONFIG n_devices {n_devices} exceeds {MAX_DEVICES}")
    devices = tuple(DeviceSpec(body.string(_U8, "device idstr"), body.number(_U32))
                    for _ in range(n_devices))
    if flags & ConfigFlags.DEVICE_FLAGS:
        device_flags = body.take(n_devices)
        if any(flag & ~_DEVICE_SPEC_FLAGS for flag in device_flags):
            raise RemoteProtocolError("unknown CONFIG device flags")
        if not any(device_flags):  # one encoding per CONFIG: the flag only with a flag set
            raise RemoteProtocolError("CONFIG flag DEVICE_FLAGS with no device flag set")
        devices = tuple(DeviceSpec(d.idstr, d.instance_id, bool(f & DeviceSpecFlags.ITERATIVE),
                                   bool(f & DeviceSpecFlags.SWITCHOVER_ACK))
                        for d, f in zip(devices, device_flags))
    config = Config(page_size, packet_pages, channel_count,
                    bool(flags & ConfigFlags.ZERO_PAGE_DETECTION), codec, codec_level,
                    blocks, devices, bool(flags & ConfigFlags.LOCAL),
                    bool(flags & ConfigFlags.PAGE_SUMS))
    problem = _config_problem(config)
    if problem is not None:
        raise RemoteProtocolError(f"invalid CONFIG: {problem}")
    return config


def _decode_complete(body: _Reader) -> Complete:
    final_epoch, flags = body.unpack(_COMPLETE)
    if flags & ~_COMPLETE_FLAGS:
        raise RemoteProtocolError(f"unknown COMPLETE flags 0x{flags:08x}")
    return Complete(final_epoch, bool(flags & _COMPLETE_FLAGS))


def _decode_digests(body: _Reader) -> Digests:
    digest_chunk, n_digests = body.unpack(_DIGESTS)
    # body_length is capped by the header check, so this caps n_digests before the loop.
    if n_digests * RAM_DIGEST_SIZE != body.remaining:
        raise RemoteProtocolError(f"DIGESTS n_digests {n_digests} disagrees with body_length")
    digests = Digests(digest_chunk, body.take(n_digests * RAM_DIGEST_SIZE))
    problem = _digests_problem(digests)
    if problem is not None:
        raise RemoteProtocolError(f"invalid DIGESTS: {problem}")
    return digests


def _decode_devices_done(body: _Reader) -> DevicesDone:
    n_devices = body.number(_U16)
    if n_devices > MAX_DEVICES or n_devices * _DEVICE_DONE.size != body.remaining:
        raise RemoteProtocolError(f"DEVICES_DONE n_devices {n_devices} disagrees with body_length")
    devices = tuple(DeviceDone(*_DEVICE_DONE.unpack(body.take(_DEVICE_DONE.size)))
                    for _ in range(n_devices))
    if any(device.chunks < 1 for device in devices):
        raise RemoteProtocolError("a DEVICES_DONE entry counts no chunk (not even END)")
    return DevicesDone(devices)


def _device_list(body: _Reader, entry: struct.Struct, known: int, what: str) -> tuple[int, int]:
    """The flags and device count of a LIVE_ROUND or DEVICES_LOADED body."""
    flags, n_devices = body.unpack(_DEVICE_LIST)
    if flags & ~known:
        raise RemoteProtocolError(f"unknown {what} flags 0x{flags:08x}")
    if n_devices > MAX_DEVICES or n_devices * entry.size != body.remaining:
        raise RemoteProtocolError(f"{what} n_devices {n_devices} disagrees with body_length")
    return flags, n_devices


def _decode_live_round(body: _Reader) -> LiveRound:
    flags, n_devices = _device_list(body, _U32, _LIVE_ROUND_FLAGS, "LIVE_ROUND")
    return LiveRound(tuple(body.number(_U32) for _ in range(n_devices)),
                     bool(flags & LiveRoundFlags.ACK_WANTED))


def _decode_devices_loaded(body: _Reader) -> DevicesLoaded:
    flags, n_devices = _device_list(body, _DEVICE_LOADED, _LOADED_FLAGS, "DEVICES_LOADED")
    return DevicesLoaded(tuple(DeviceLoaded(*body.unpack(_DEVICE_LOADED)) for _ in range(n_devices)),
                         bool(flags & LoadedFlags.SWITCHOVER_ACK))


def _decode_ram_handover(body: _Reader) -> RamHandover:
    n_segments = body.number(_U16)
    if not 1 <= n_segments <= MAX_BLOCKS:
        raise RemoteProtocolError(f"RAM_HANDOVER n_segments {n_segments} is outside 1..{MAX_BLOCKS}")
    names = tuple(body.string(_U8, "segment name") for _ in range(n_segments))
    if not all(names):
        raise RemoteProtocolError("RAM_HANDOVER names an empty segment")
    return RamHandover(names)


def _decode_resumed(body: _Reader) -> Resumed:
    downtime_us, verify_us, verified, running = body.unpack(_RESUMED)
    if verified not in _VERIFICATIONS:
        raise RemoteProtocolError(f"RESUMED verified {verified} is not 0 (not checked) or 1 (equal)")
    if running not in (0, 1):
        raise RemoteProtocolError(f"RESUMED running {running} is not 0 or 1")
    return Resumed(downtime_us, verify_us, Verification(verified),
                   body.string(_U16, "detail"), bool(running))


def _decode_abort(body: _Reader) -> Abort:
    code = body.number(_U16)
    if code not in _ABORT_CODES:
        raise RemoteProtocolError(f"unknown ABORT code {code}")
    error = body.string(_U8, "error class", "ascii")
    if not error:
        raise RemoteProtocolError("ABORT names no error class")
    return Abort(AbortCode(code), body.string(_U16, "message"), error)


_Decoder: TypeAlias = Callable[[_Reader], Message]
_DECODERS: Final[dict[int, _Decoder]] = {
    MessageType.CONFIG: _decode_config,
    MessageType.CONFIG_ACK: lambda body: ConfigAck(body.number(_U16), body.string(_U16, "reason")),
    MessageType.CHANNELS_READY: lambda body: ChannelsReady(),
    MessageType.SYNC_MARKER: lambda body: SyncMarker(body.number(_U32)),
    MessageType.SWITCHOVER: lambda body: Switchover(),
    MessageType.COMPLETE: _decode_complete,
    MessageType.DIGESTS: _decode_digests,
    MessageType.DEVICES_DONE: _decode_devices_done,
    MessageType.PREPARED: lambda body: Prepared(),
    MessageType.COMMIT: lambda body: Commit(),
    MessageType.RESUMED: _decode_resumed,
    MessageType.ABORT: _decode_abort,
    MessageType.PING: lambda body: Ping(body.number(_U64)),
    MessageType.PONG: lambda body: Pong(body.number(_U64)),
    MessageType.LIVE_ROUND: _decode_live_round,
    MessageType.DEVICES_LOADED: _decode_devices_loaded,
    MessageType.RAM_HANDOVER: _decode_ram_handover,
}

_STRING1_FIELD: Final = 1 + _STRING1_MAX
_STRING_FIELD: Final = _U16.size + _STRING_MAX
# (smallest, largest) body of each type, checked from the header before the body is
# waited for; the exact size is checked when the body is parsed.
_BODY_SIZES: Final[dict[int, tuple[int, int]]] = {
    MessageType.CONFIG: (
        _CONFIG.size + 1 + 1 + _I16.size + (1 + 1 + _U64.size) + _U16.size,
        _CONFIG.size + _STRING1_FIELD + _I16.size + MAX_BLOCKS * (_STRING1_FIELD + _U64.size)
        + _U16.size + MAX_DEVICES * (_STRING1_FIELD + _U32.size + 1),
    ),
    MessageType.CONFIG_ACK: (_U16.size + _U16.size, _U16.size + _STRING_FIELD),
    MessageType.CHANNELS_READY: (0, 0),
    MessageType.SYNC_MARKER: (_U32.size, _U32.size),
    MessageType.SWITCHOVER: (0, 0),
    MessageType.COMPLETE: (_COMPLETE.size, _COMPLETE.size),
    MessageType.DIGESTS: (_DIGESTS.size + RAM_DIGEST_SIZE, MAX_MESSAGE_BODY),
    MessageType.DEVICES_DONE: (_U16.size, _U16.size + MAX_DEVICES * _DEVICE_DONE.size),
    MessageType.PREPARED: (0, 0),
    MessageType.COMMIT: (0, 0),
    MessageType.RESUMED: (_RESUMED.size + _U16.size, _RESUMED.size + _STRING_FIELD),
    MessageType.ABORT: (_U16.size + 1 + 1 + _U16.size, _U16.size + _STRING1_FIELD + _STRING_FIELD),
    MessageType.PING: (_U64.size, _U64.size),
    MessageType.PONG: (_U64.size, _U64.size),
    MessageType.LIVE_ROUND: (_DEVICE_LIST.size, _DEVICE_LIST.size + MAX_DEVICES * _U32.size),
    MessageType.DEVICES_LOADED: (_DEVICE_LIST.size, _DEVICE_LIST.size + MAX_DEVICES * _DEVICE_LOADED.size),
    MessageType.RAM_HANDOVER: (_U16.size + 1 + 1, _U16.size + MAX_BLOCKS * _STRING1_FIELD),
}

class MessageDecoder(StreamBuffer):
    """Incremental decoder of one direction of the main channel (after the hellos).

    Feed bytes with :meth:`receive_data` (``b""`` means the peer closed the
    connection) and call :meth:`next_message` until it answers :data:`NEED_DATA`.
    A header is checked as soon as it arrives (known type, flags 0, a body_length
    the type can have, at most 16 MiB), before its body is waited for.  Once it
    has raised a ProtocolError, every later call raises again.
    """

    def __init__(self) -> None:
        super().__init__()
        self._header: tuple[MessageType, int] | None = None
        self._error: ProtocolError | None = None

    def next_message(self) -> Message | Literal[NeedData.NEED_DATA]:
        """The next whole message, or NEED_DATA.

        Raises RemoteProtocolError for an invalid message or a stream that ended
        inside one.  A stream that ended between messages is no protocol error:
        it answers NEED_DATA and :attr:`ended` is True (its driver, which fed the
        end, reports the closed connection).
        """
        if self._error is not None:
            raise RemoteProtocolError("the main channel already failed") from self._error
        try:
            return self._next_message()
        except RemoteProtocolError as error:
            self._error = error
            raise

    def _next_message(self) -> Message | Literal[NeedData.NEED_DATA]:
        buffer = self._buffer
        if self._header is None:
            if len(buffer) < MESSAGE_HEADER_SIZE:
                return self._need_data()
            self._header = _decode_header(buffer[:MESSAGE_HEADER_SIZE])
        message_type, body_length = self._header
        end = MESSAGE_HEADER_SIZE + body_length
        if len(buffer) < end:
            return self._need_data()
        with memoryview(buffer) as view:  # one copy of the body, not two
            body = _Reader(view[MESSAGE_HEADER_SIZE:end].tobytes(), message_type.name)
        del buffer[:end]
        self._header = None
        message = _DECODERS[message_type](body)
        body.finish()
        return message

    @property
    def ended(self) -> bool:
        """The stream ended (``receive_data(b"")``) with no message left in it."""
        return self._closed and not self._buffer

    def _need_data(self) -> Literal[NeedData.NEED_DATA]:
        if self._closed and self._buffer:
            raise RemoteProtocolError("the main channel closed inside a message")
        return NEED_DATA


def _decode_header(data: Buffer) -> tuple[MessageType, int]:
    type_id, flags, body_length = _MESSAGE_HEADER.unpack(data)
    if type_id not in _DECODERS:
        raise RemoteProtocolError(f"unknown message type {type_id}")
    message_type = MessageType(type_id)
    if flags:
        raise RemoteProtocolError(f"{message_type.name} flags must be 0, got 0x{flags:04x}")
    if body_length > MAX_MESSAGE_BODY:
        raise RemoteProtocolError(f"body_length {body_length} exceeds {MAX_MESSAGE_BODY}")
    smallest, largest = _BODY_SIZES[message_type]
    if not smallest <= body_length <= largest:
        raise RemoteProtocolError(
            f"{message_type.name} body_length {body_length} is outside {smallest}..{largest}"
        )
    return message_type, body_length
