"""The multifd wire codec for hellos and multifd-channel packets, with no I/O.

Byte layout (integers big-endian; docs/wire-format.md is the specification, field
by field; the main-channel messages live in :mod:`engine.wire.message`)::

    every connection   challenge (listener → connector), 24 bytes, then hello, 80 bytes
                       magic "MFDH" | version | role | flags | migration_id (16)
                       | channel_id | channel_count | reserved | nonce (16) | auth (32)
                       then, as the hello's flags say: TLS 1.3, MAC records
                       (engine/wire/record.py), or the bare stream

    multifd channel    hello, then packets until END, each:
                       common header, 16 bytes
                           magic "MFDP" | kind | flags | header_length | payload_length
                           | sequence
                       kind header, header_length bytes
                           RAM_PAGES  block_index | codec | 0 | epoch | n_runs | 0
                                      | n_runs × (first_page | n_pages | run flags)
                           SYNC, END  epoch | 0
                       payload, payload_length bytes
                           RAM_PAGES only: the non-zero pages, run after run
                           (with a codec: as frames, engine/wire/frames.py)

A channel is read with :class:`PacketDecoder`, the sans-IO decoder that keeps the
channel's state (sequence, epoch, END):

* payload in place, the way every destination channel reads (through
  ``engine.channel.PacketReader``): feed exactly the header bytes it wants
  (``want``); on :class:`PacketStart` claim the payload for views
  (``payload_into``) and fill them straight from the socket;
* whole packets, the h11 way, for tests and tools (no channel reads so): feed
  whatever arrives (``receive_data``) and take each packet with its payload, or
  :data:`NEED_DATA` (``next_packet``).

:func:`decode_packet_header` and :func:`decode_packet` are its steps, usable alone.
The run table of a RAM_PAGES header is :mod:`engine.wire.runs`; the frames of a
compressed RAM_PAGES payload are :mod:`engine.wire.frames`.

Every header field is validated against hard caps and the negotiated
:class:`PacketLimits` before a byte of payload is read.  Bytes from the peer that
break a rule raise :class:`~engine.errors.RemoteProtocolError`
(:class:`~engine.errors.HandshakeError` for hellos); asking to encode something
invalid raises :class:`~engine.errors.LocalProtocolError`.  Nothing here raises a
transport error: the end of a stream is its I/O driver's to report.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import struct
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import add, le, mul
from typing import Final, Literal, TypeAlias

from engine.errors import HandshakeError, LocalProtocolError, RemoteProtocolError
from engine.wire.runs import RUN_SIZE, Columns, decode_runs, encode_runs, page_runs
from engine.wire.runs import PageRun as PageRun  # re-exported: the run table's
from engine.wire.runs import RunFlags as RunFlags  # records live in engine.wire.runs

Buffer: TypeAlias = bytes | bytearray | memoryview

HELLO_MAGIC: Final = 0x4D464448  # "MFDH"
PACKET_MAGIC: Final = 0x4D464450  # "MFDP"
VERSION: Final = 3
HELLO_SIZE: Final = 80
NONCE_SIZE: Final = 16
AUTH_SIZE: Final = 32
CHALLENGE_MAGIC: Final = 0x4D464443  # "MFDC"
CHALLENGE_SIZE: Final = 24
PACKET_HEADER_SIZE: Final = 16
MESSAGE_HEADER_SIZE: Final = 8
PAGE_SIZE: Final = 4096
MAX_PACKET_PAGES: Final = 4096
MAX_CHANNELS: Final = 256
MAX_BLOCKS: Final = 256
MAX_BLOCK_PAGES: Final = 1 << 32  # first_page is 32 bits
MAX_DEVICES: Final = 1024
MAX_MESSAGE_BODY: Final = 16 * 1024 * 1024
CODEC_NONE: Final = 0
# A compressed payload may exceed its raw size by this much when the codec names
# no bound of its own (PacketLimits.codec_bound is None).
COMPRESSED_SLACK: Final = 1024


class HelloRole(enum.IntEnum):
    MAIN = 1  # main channel, source → destination
    CHANNEL = 2  # multifd channel
    MAIN_REPLY = 3  # destination's reply on the main channel


class HelloFlags(enum.IntFlag):
    """What protects the bytes after the hello on this connection (at most one bit;
    none: nothing, which a destination accepts only when told to)."""

    TLS = 1  # a TLS 1.3 handshake follows the hello; everything after it is TLS
    MAC = 2  # every byte after the hellos travels in MAC records (engine/wire/record.py)


_HELLO_FLAGS: Final = (0, int(HelloFlags.TLS), int(HelloFlags.MAC))
NO_PROTECTION: Final = HelloFlags(0)


class PacketKind(enum.IntEnum):
    RAM_PAGES = 1
    SYNC = 2
    DEVICE_STATE = 3
    END = 4


class DeviceFlags(enum.IntFlag):
    END = 1  # the device's last chunk: its config part, loaded after every other
    LIVE = 2  # sent during precopy (an iterative device's live state); never with END


class NeedData(enum.Enum):
    """Type of :data:`NEED_DATA`."""

    NEED_DATA = "NEED_DATA"


#: Answer of ``next_packet()`` / ``next_message()``: feed more bytes first.
NEED_DATA: Final = NeedData.NEED_DATA

# ── fixed layouts ─────────────────────────────────────────────────────────────

# challenge, 24 bytes: what the listener sends first on every connection
#  0 magic u32 | 4 version u16 | 6 reserved u16 | 8 nonce 16s
_CHALLENGE = struct.Struct(">IHH16s")

# hello, 80 bytes; auth is the HMAC of bytes 0..47 and the nonce it answers
# (the listener's challenge; for role 3 the source's hello nonce)
#  0 magic u32 | 4 version u16 | 6 role u8 | 7 flags u8 | 8 migration_id 16s
# 24 channel_id u16 | 26 channel_count u16 | 28 reserved u32 | 32 nonce 16s | 48 auth 32s
_HELLO = struct.Struct(">IHBB16sHHI16s32s")
_HELLO_SIGNED = 48

# common packet header, 16 bytes
#  0 magic u32 | 4 kind u8 | 5 flags u8 | 6 header_length u16 | 8 payload_length u32
# 12 sequence u32
_PACKET_HEADER = struct.Struct(">IBBHII")

# RAM_PAGES kind header, fixed part, 12 bytes (n_runs runs follow)
#  0 block_index u16 | 2 codec u8 | 3 reserved u8 | 4 epoch u32 | 8 n_runs u16 | 10 reserved u16
_RAM_PAGES = struct.Struct(">HBBIHH")

# then n_runs page runs, 8 bytes each: engine.wire.runs (the one run-table codec)

# SYNC and END kind header, 8 bytes
#  0 epoch u32 | 4 reserved u32
_EPOCH = struct.Struct(">II")

# The common header and the RAM_PAGES fixed part back to back (28 bytes), so that
# encode_ram_pages packs its fixed fields in one call: it runs once per packet.
_RAM_PAGES_PREFIX = struct.Struct(_PACKET_HEADER.format + _RAM_PAGES.format[1:])

_RAM_PAGES_MIN_HEADER: Final = _RAM_PAGES.size + RUN_SIZE
_RAM_PAGES_MAX_HEADER: Final = _RAM_PAGES.size + RUN_SIZE * MAX_PACKET_PAGES
_ROLES: Final = {role.value: role for role in HelloRole}
_KINDS: Final = {kind.value: kind for kind in PacketKind}
# Common-header flag bits each kind may carry: DEVICE_STATE's END and LIVE, no other.
_PACKET_FLAGS: Final = {PacketKind.RAM_PAGES: 0, PacketKind.SYNC: 0, PacketKind.END: 0,
                        PacketKind.DEVICE_STATE: int(DeviceFlags.END | DeviceFlags.LIVE)}
#: The largest chunk of device state one packet carries; longer chunks are split.
MAX_DEVICE_CHUNK: Final = 1 << 20

# DEVICE_STATE kind header, fixed part, 12 bytes (the idstr follows)
#  0 instance_id u32 | 4 chunk_index u32 | 8 reserved u16 | 10 reserved u8 | 11 idstr_length u8
_DEVICE_STATE = struct.Struct(">IIHBB")


# ── hello ─────────────────────────────────────────────────────────────────────


@dataclass(frozen=True, slots=True)
class ChannelHello:
    """An authenticated hello.  ``channel_id`` is 0 for the main roles."""

    role: HelloRole
    migration_id: uuid.UUID
    channel_id: int
    channel_count: int
    nonce: bytes
    flags: HelloFlags = NO_PROTECTION


def encode_challenge(nonce: bytes | None = None) -> bytes:
    """The 24-byte challenge a listener sends first on every connection: a fresh
    nonce the connector's hello must answer, so no recorded hello is accepted.
    ``nonce`` defaults to 16 fresh random bytes (pass one only for test vectors)."""
    if nonce is None:
        nonce = os.urandom(NONCE_SIZE)
    elif len(nonce) != NONCE_SIZE:
        raise LocalProtocolError(f"nonce must be {NONCE_SIZE} bytes")
    return _CHALLENGE.pack(CHALLENGE_MAGIC, VERSION, 0, nonce)


def decode_challenge(data: Buffer) -> bytes:
    """The nonce of a listener's 24-byte challenge.  Raises HandshakeError for a
    wrong length, magic, version or nonzero reserved bytes."""
    if len(data) != CHALLENGE_SIZE:
        raise HandshakeError(f"a challenge is {CHALLENGE_SIZE} bytes, got {len(data)}")
    magic, version, reserved, nonce = _CHALLENGE.unpack(data)
    if magic != CHALLENGE_MAGIC:
        raise HandshakeError(f"wrong challenge magic 0x{magic:08x} (expected 0x{CHALLENGE_MAGIC:08x})")
    if version != VERSION:
        raise HandshakeError(f"unsupported challenge version {version} (this side speaks {VERSION})")
    if reserved:
        raise HandshakeError(f"challenge reserved bytes must be 0, got 0x{reserved:04x}")
    return bytes(nonce)


def session_key(secret: bytes, migration_id: uuid.UUID, source_nonce: bytes, challenge: bytes) -> bytes:
    """The key of one migration's session, from its main channel's handshake: the
    source's hello nonce and the listener's challenge make it fresh, so channel
    hellos (authenticated with it) belong to this migration and no other."""
    return hmac.new(secret, b"multifd session " + migration_id.bytes + source_nonce + challenge,
                    hashlib.sha256).digest()


def _hello_auth(key: bytes, signed: Buffer, answers: bytes) -> bytes:
    mac = hmac.new(key, signed, hashlib.sha256)
    mac.update(answers)
    return mac.digest()


def _check_answers(answers: bytes) -> None:
    if len(answers) != NONCE_SIZE:
        raise LocalProtocolError(f"the nonce a hello answers must be {NONCE_SIZE} bytes")


def encode_hello(
    role: HelloRole,
    migration_id: uuid.UUID,
    channel_id: int,
    channel_count: int,
    key: bytes,
    answers: bytes,
    nonce: bytes | None = None,
    flags: HelloFlags = NO_PROTECTION,
) -> bytes:
    """The 80-byte hello for ``role``, authenticated with ``key`` over the nonce it
    ``answers``: the listener's challenge for MAIN (key: the shared secret) and
    CHANNEL (key: the :func:`session_key`); the source's hello nonce for
    MAIN_REPLY (key: the shared secret).  ``flags`` says what protects the bytes
    after it (:class:`HelloFlags`); the reply echoes the main hello's.

    ``nonce`` defaults to 16 fresh random bytes (pass one only for test vectors).
    Raises LocalProtocolError for an unknown role, a channel id or count out of
    range, or a nonce of the wrong size.
    """
    if role not in _ROLES:
        raise LocalProtocolError(f"unknown hello role {role!r}")
    _check_answers(answers)
    problem = _hello_ids_problem(role, channel_id, channel_count)
    if problem:
        raise LocalProtocolError(problem)
    if int(flags) not in _HELLO_FLAGS:
        raise LocalProtocolError(f"hello flags {int(flags):#x}: at most one of TLS, MAC")
    if nonce is None:
        nonce = os.urandom(NONCE_SIZE)
    elif len(nonce) != NONCE_SIZE:
        raise LocalProtocolError(f"nonce must be {NONCE_SIZE} bytes")
    unsigned = _HELLO.pack(
        HELLO_MAGIC, VERSION, role, int(flags), migration_id.bytes,
        channel_id, channel_count, 0, nonce, bytes(AUTH_SIZE),
    )[:_HELLO_SIGNED]
    return unsigned + _hello_auth(key, unsigned, answers)


def _hello_ids_problem(role: int, channel_id: int, channel_count: int) -> str | None:
    """What is wrong with a hello's channel id and count, if anything (the rule
    both the encoder and the decoder apply)."""
    if not 1 <= channel_count <= MAX_CHANNELS:
        return f"hello channel count {channel_count} is outside 1..{MAX_CHANNELS}"
    if role == HelloRole.CHANNEL:
        if not 0 <= channel_id < channel_count:
            return f"hello channel id {channel_id} is outside 0..{channel_count - 1}"
    elif channel_id != 0:
        return f"main-channel hello has channel id {channel_id}, not 0"
    return None


_HELLO_MAGIC_BYTES: Final = HELLO_MAGIC.to_bytes(4, "big")


def looks_like_hello(data: Buffer) -> bool:
    """Whether `data` (what came where a hello was due) starts as a hello does,
    with its magic: a peer that answers with something else (an ABORT, say) does
    not.  A hint for which decoder to try, never a check: :func:`decode_hello` is."""
    return bytes(data[:len(_HELLO_MAGIC_BYTES)]) == _HELLO_MAGIC_BYTES


def decode_hello(data: Buffer, key: bytes, answers: bytes,
                 roles: frozenset[HelloRole] | tuple[HelloRole, ...]) -> ChannelHello:
    """Check and decode an 80-byte hello that must have one of ``roles`` and be
    authenticated with ``key`` over the nonce it ``answers`` (see :func:`encode_hello`).

    The role is checked before the authenticator, so a hello cannot be reflected
    back at its sender or used in another place of the handshake.  Raises
    HandshakeError naming the first problem: length, magic, version, role, flags,
    reserved bytes, authenticator, channel count, channel id.  Checks that need
    the migration (same UUID and count as the main channel, duplicate channel id)
    are the caller's.
    """
    _check_answers(answers)
    if len(data) != HELLO_SIZE:
        raise HandshakeError(f"a hello is {HELLO_SIZE} bytes, got {len(data)}")
    (magic, version, role, flags, migration_id, channel_id, channel_count,
     reserved, nonce, auth) = _HELLO.unpack(data)
    if magic != HELLO_MAGIC:
        raise HandshakeError(f"wrong hello magic 0x{magic:08x} (expected 0x{HELLO_MAGIC:08x})")
    if version != VERSION:
        raise HandshakeError(f"unsupported hello version {version} (this side speaks {VERSION})")
    if role not in _ROLES:
        raise HandshakeError(f"unknown hello role {role}")
    if _ROLES[role] not in roles:
        raise HandshakeError(f"a {_ROLES[role].name} hello where "
                             f"{' or '.join(r.name for r in roles)} was expected")
    if flags not in _HELLO_FLAGS:
        raise HandshakeError(f"hello flags 0x{flags:02x}: unknown bits, or both TLS and MAC")
    if reserved:
        raise HandshakeError(f"hello reserved bytes must be 0, got 0x{reserved:08x}")
    expected = _hello_auth(key, data[:_HELLO_SIGNED], answers)
    if not hmac.compare_digest(auth, expected):
        raise HandshakeError("bad hello authenticator (wrong secret, another session, "
                             "or a recorded hello)")
    problem = _hello_ids_problem(role, channel_id, channel_count)
    if problem:
        raise HandshakeError(problem)
    return ChannelHello(_ROLES[role], uuid.UUID(bytes=migration_id), channel_id,
                        channel_count, bytes(nonce), HelloFlags(flags))


# ── packet records ────────────────────────────────────────────────────────────


@dataclass(frozen=True, slots=True)
class PacketHeader:
    """A checked common packet header (from :func:`decode_packet_header`).

    ``kind`` is a :class:`PacketKind`, or the number of a kind registered with
    :func:`register_kind`."""

    kind: PacketKind | int
    flags: int
    header_length: int
    payload_length: int
    sequence: int


@dataclass(frozen=True, slots=True)
class RamPagesHeader:
    """A RAM_PAGES packet without its payload (``payload_length`` bytes follow).

    The run table is kept as decoded, in columns (first pages, page counts,
    flags): what a receiver turns into arrays; :attr:`runs` makes PageRun
    records of it only when asked (a packet may carry 4096 runs)."""

    sequence: int
    block_index: int
    codec: int
    epoch: int
    columns: Columns
    payload_length: int

    @property
    def runs(self) -> tuple[PageRun, ...]:
        return page_runs(self.columns)

    @property
    def n_pages(self) -> int:
        """Pages in all runs."""
        return sum(self.columns[1])

    @property
    def normal_pages(self) -> int:
        """Pages that travel in the payload (those of non-ZERO runs)."""
        _, counts, flags = self.columns
        return sum(count for count, flag in zip(counts, flags) if not flag & RunFlags.ZERO)


@dataclass(frozen=True, slots=True)
class SyncPacket:
    """Every packet of ``epoch`` on this channel came before this one."""

    sequence: int
    epoch: int


@dataclass(frozen=True, slots=True)
class EndPacket:
    """The last packet of a channel; ``epoch`` is the last completed (0: none)."""

    sequence: int
    epoch: int


@dataclass(frozen=True, slots=True)
class DeviceChunkHeader:
    """One chunk of a device's state stream: chunk ``index`` of (idstr, instance_id).

    Chunks 0, 1, … carry the state in order; the one with ``end`` set is the
    device's config part and comes last.  ``live``: sent during precopy (an
    iterative device), before every chunk sent at switchover.
    """

    sequence: int
    idstr: str
    instance_id: int
    index: int
    end: bool
    payload_length: int
    live: bool = False


@dataclass(frozen=True, slots=True)
class KindPacket:
    """A packet of a kind registered with :func:`register_kind`: its common header
    (checked by the kind's :class:`KindRule`) and sequence are checked here, its
    kind header (``body``) is its own codec's to check and decode."""

    sequence: int
    header: PacketHeader
    body: bytes
    payload_length: int


Packet: TypeAlias = RamPagesHeader | SyncPacket | EndPacket | DeviceChunkHeader | KindPacket


@dataclass(frozen=True, slots=True)
class PacketLimits:
    """What the receiver of a channel accepts, from the negotiated CONFIG.

    ``block_pages`` holds the pages of each RAM block in CONFIG order; ``codec`` is
    the negotiated codec id (0: none).  A compressed payload of a packet whose
    non-zero pages make ``raw`` bytes may be at most ``codec_bound(raw)`` bytes, or
    ``raw + COMPRESSED_SLACK`` when ``codec_bound`` is None.  (Give a module-level
    function as ``codec_bound`` if the limits must be pickled.)  Raises
    LocalProtocolError for values the wire format cannot carry.
    """

    page_size: int
    packet_pages: int
    block_pages: tuple[int, ...]
    codec: int = CODEC_NONE
    codec_bound: Callable[[int], int] | None = None

    def __post_init__(self) -> None:
        if self.page_size != PAGE_SIZE:
            raise LocalProtocolError(f"page_size must be {PAGE_SIZE}")
        if not 1 <= self.packet_pages <= MAX_PACKET_PAGES:
            raise LocalProtocolError(f"packet_pages must be 1..{MAX_PACKET_PAGES}")
        # No block at all: a channel that takes no pages (local mode hands the RAM over).
        if not 0 <= len(self.block_pages) <= MAX_BLOCKS:
            raise LocalProtocolError(f"there must be 0..{MAX_BLOCKS} blocks")
        if not all(1 <= pages <= MAX_BLOCK_PAGES for pages in self.block_pages):
            raise LocalProtocolError(f"a block must have 1..{MAX_BLOCK_PAGES} pages")
        if not 0 <= self.codec <= 0xFF:
            raise LocalProtocolError("codec id must be 0..255")

    def max_payload(self, raw_size: int) -> int:
        """The largest compressed payload accepted for ``raw_size`` bytes of pages."""
        if self.codec_bound is None:
            return raw_size + COMPRESSED_SLACK
        return self.codec_bound(raw_size)


# ── encoding ──────────────────────────────────────────────────────────────────


def encode_ram_pages(
    sequence: int,
    block_index: int,
    codec: int,
    epoch: int,
    runs: Sequence[tuple[int, int, bool]],
    payload_length: int,
) -> bytes:
    """Common header and RAM_PAGES header; the caller sends the payload after it.

    ``runs`` is any sequence of ``(first_page, n_pages, zero)`` triples.  Checks what
    it can without the negotiated limits: 1..4096 runs of ≥ 1 page, sorted and not
    overlapping, at most 4096 pages, and for codec 0 a payload of exactly the
    non-zero pages.  Raises LocalProtocolError otherwise or for a field out of range.
    """
    n_runs = len(runs)
    if not 1 <= n_runs <= MAX_PACKET_PAGES:
        raise LocalProtocolError(f"a RAM_PAGES packet has 1..{MAX_PACKET_PAGES} runs")
    firsts, counts, zeros = zip(*runs)
    if min(counts) < 1:
        raise LocalProtocolError("a page run has at least one page")
    if not all(map(le, map(add, firsts, counts), firsts[1:])):
        raise LocalProtocolError("page runs must be sorted and must not overlap")
    n_pages = sum(counts)
    if n_pages > MAX_PACKET_PAGES:
        raise LocalProtocolError(f"{n_pages} pages exceed {MAX_PACKET_PAGES} per packet")
    zero_flags = tuple(map(bool, zeros))
    if codec == CODEC_NONE:
        raw = (n_pages - sum(map(mul, counts, zero_flags))) * PAGE_SIZE
        if payload_length != raw:
            raise LocalProtocolError(f"payload_length {payload_length}, expected {raw} for codec 0")
    try:
        prefix = _RAM_PAGES_PREFIX.pack(
            PACKET_MAGIC, PacketKind.RAM_PAGES, 0, _RAM_PAGES.size + RUN_SIZE * n_runs,
            payload_length, sequence, block_index, codec, 0, epoch, n_runs, 0,
        )
        return prefix + encode_runs(firsts, counts, zero_flags)
    except struct.error as error:
        raise LocalProtocolError(f"RAM_PAGES field out of range: {error}") from error


def _encode_epoch_packet(kind: PacketKind, sequence: int, epoch: int) -> bytes:
    try:
        return (_PACKET_HEADER.pack(PACKET_MAGIC, kind, 0, _EPOCH.size, 0, sequence)
                + _EPOCH.pack(epoch, 0))
    except struct.error as error:
        raise LocalProtocolError(f"{kind.name} field out of range: {error}") from error


def encode_sync(sequence: int, epoch: int) -> bytes:
    """A SYNC packet closing ``epoch``; LocalProtocolError for a field out of range."""
    return _encode_epoch_packet(PacketKind.SYNC, sequence, epoch)


def encode_end(sequence: int, epoch: int) -> bytes:
    """An END packet; ``epoch`` is the last completed one (0 if none)."""
    return _encode_epoch_packet(PacketKind.END, sequence, epoch)


def utf8_length(text: str) -> int:
    """Length of ``text`` in UTF-8; -1 if it cannot be encoded (lone surrogates)."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return -1


def devices_problem(keys: Sequence[tuple[str, int]], *, min_idstr: int) -> str | None:
    """Why devices of these ``(idstr, instance_id)`` keys cannot be named (None: they
    can): at most MAX_DEVICES, an idstr of `min_idstr`..255 UTF-8 bytes, a 32-bit
    instance_id, each key once.  CONFIG takes an empty idstr (`min_idstr` 0); a
    device chunk and a snapshot's metadata do not (1)."""
    if len(keys) > MAX_DEVICES:
        return f"{len(keys)} devices: at most {MAX_DEVICES}"
    for idstr, instance_id in keys:
        length = utf8_length(idstr)
        if length < 0:
            return f"device idstr {idstr!r} is not UTF-8"
        if not min_idstr <= length <= 255:
            return f"device idstr {idstr!r} must be {min_idstr}..255 UTF-8 bytes"
        if not 0 <= instance_id <= 0xFFFF_FFFF:
            return f"device {idstr!r} instance_id {instance_id} does not fit 32 bits"
    if len(set(keys)) != len(keys):
        return "two devices share an (idstr, instance_id)"
    return None


def encode_device_state(
    sequence: int, idstr: str, instance_id: int, index: int, end: bool, payload_length: int,
    live: bool = False,
) -> bytes:
    """The header of one device-state chunk (the caller sends the chunk after it).

    Raises LocalProtocolError for an idstr that is not 1..255 UTF-8 bytes, numbers
    out of range, a chunk over MAX_DEVICE_CHUNK, an empty chunk without END, or a
    chunk both LIVE and END.
    """
    try:
        name = idstr.encode("utf-8")
    except UnicodeEncodeError as error:
        raise LocalProtocolError(f"device idstr {idstr!r} is not UTF-8") from error
    if not 1 <= len(name) <= 255:
        raise LocalProtocolError(f"device idstr {idstr!r} is not 1..255 bytes")
    if not 0 <= payload_length <= MAX_DEVICE_CHUNK or (payload_length == 0 and not end):
        raise LocalProtocolError(f"device chunk of {payload_length} bytes (END {end})")
    if live and end:
        raise LocalProtocolError("a live-phase device chunk cannot be the END chunk")
    flags = (DeviceFlags.END if end else 0) | (DeviceFlags.LIVE if live else 0)
    try:
        kind_header = _DEVICE_STATE.pack(instance_id, index, 0, 0, len(name)) + name
        return _PACKET_HEADER.pack(PACKET_MAGIC, PacketKind.DEVICE_STATE, flags, len(kind_header),
                                   payload_length, sequence) + kind_header
    except struct.error as error:
        raise LocalProtocolError(f"cannot encode a device chunk: {error}") from error


# ── kinds registered from outside ─────────────────────────────────────────────


@dataclass(frozen=True, slots=True)
class KindRule:
    """What the common header decoder checks of a registered kind's packets
    (before its kind header is read): the flag bits it defines, its kind
    header's length bounds and its largest payload."""

    name: str
    flags: int = 0
    min_header: int = 0
    max_header: int = 0
    max_payload: int = 0

    def check(self, flags: int, header_length: int, payload_length: int) -> None:
        if flags & ~self.flags:
            raise RemoteProtocolError(f"unknown {self.name} flags 0x{flags:02x}")
        if not self.min_header <= header_length <= self.max_header:
            raise RemoteProtocolError(f"{self.name} header_length {header_length} is not "
                                      f"{self.min_header}..{self.max_header}")
        if payload_length > self.max_payload:
            raise RemoteProtocolError(f"{self.name} payload of {payload_length} bytes exceeds "
                                      f"{self.max_payload}")


_REGISTERED: dict[int, KindRule] = {}


def register_kind(kind: int, rule: KindRule) -> None:
    """Let the decoder accept packets of `kind` (a payload kind registered outside
    this module: engine/payload.py).  LocalProtocolError for a built-in kind's
    number, or one outside 16..255."""
    if kind in _KINDS or not 16 <= kind <= 255:
        raise LocalProtocolError(f"packet kind {kind} cannot be registered (16..255, not built in)")
    _REGISTERED[kind] = rule


def encode_header(kind: int, flags: int, kind_header: bytes, payload_length: int, sequence: int) -> bytes:
    """The common header followed by `kind_header` (a registered kind's codec uses this)."""
    try:
        return _PACKET_HEADER.pack(PACKET_MAGIC, kind, flags, len(kind_header), payload_length,
                                   sequence) + kind_header
    except struct.error as error:
        raise LocalProtocolError(f"cannot encode a packet header of kind {kind}: {error}") from error


# ── decoding ──────────────────────────────────────────────────────────────────


def decode_packet_header(data: Buffer) -> PacketHeader:
    """Check and decode the 16-byte common header.

    Raises RemoteProtocolError for a wrong magic, an unknown kind, flag bits the kind does not define, or a
    ``header_length`` (and for SYNC/END a ``payload_length``) the kind cannot have.
    Sequence and payload bounds need the channel's state: see :func:`decode_packet`.
    Raises LocalProtocolError if ``data`` is not 16 bytes.
    """
    if len(data) != PACKET_HEADER_SIZE:
        raise LocalProtocolError(f"a packet header is {PACKET_HEADER_SIZE} bytes")
    magic, kind_id, flags, header_length, payload_length, sequence = _PACKET_HEADER.unpack(data)
    if magic != PACKET_MAGIC:
        raise RemoteProtocolError(f"wrong packet magic 0x{magic:08x}")
    kind = _KINDS.get(kind_id)
    if kind is None:
        rule = _REGISTERED.get(kind_id)
        if rule is None:
            raise RemoteProtocolError(f"unknown packet kind {kind_id}")
        rule.check(flags, header_length, payload_length)
        return PacketHeader(kind_id, flags, header_length, payload_length, sequence)
    if flags & ~_PACKET_FLAGS[kind]:
        raise RemoteProtocolError(f"unknown {kind.name} flags 0x{flags:02x}")
    if kind is PacketKind.RAM_PAGES:
        if (not _RAM_PAGES_MIN_HEADER <= header_length <= _RAM_PAGES_MAX_HEADER
                or (header_length - _RAM_PAGES.size) % RUN_SIZE):
            raise RemoteProtocolError(f"RAM_PAGES header_length {header_length} is not 12 + 8 × n_runs")
    elif kind is PacketKind.DEVICE_STATE:
        if not _DEVICE_STATE.size + 1 <= header_length <= _DEVICE_STATE.size + 255:
            raise RemoteProtocolError(f"DEVICE_STATE header_length {header_length} is not 12 + idstr")
        if payload_length > MAX_DEVICE_CHUNK:
            raise RemoteProtocolError(f"device chunk of {payload_length} bytes exceeds {MAX_DEVICE_CHUNK}")
    else:
        if header_length != _EPOCH.size:
            raise RemoteProtocolError(f"{kind.name} header_length {header_length} is not 8")
        if payload_length:
            raise RemoteProtocolError(f"{kind.name} carries no payload, got {payload_length}")
    return PacketHeader(kind, flags, header_length, payload_length, sequence)


def _kind_name(kind: PacketKind | int) -> str:
    return kind.name if isinstance(kind, PacketKind) else f"kind {kind}"


def _check_kind_header(
    header: PacketHeader, body: Buffer, kind: PacketKind, expected_sequence: int
) -> None:
    if header.kind is not kind:
        raise LocalProtocolError(f"a {_kind_name(header.kind)} header given to the {kind.name} decoder")
    _check_body(header, body, expected_sequence)


def _check_body(header: PacketHeader, body: Buffer, expected_sequence: int) -> None:
    """What every kind's header is checked for: its length, and its place in the stream."""
    if len(body) != header.header_length:
        raise LocalProtocolError(f"kind header is {header.header_length} bytes, got {len(body)}")
    if header.sequence != expected_sequence:
        raise RemoteProtocolError(f"packet sequence {header.sequence}, expected {expected_sequence}")


def decode_ram_pages(
    header: PacketHeader,
    body: Buffer,
    limits: PacketLimits,
    expected_sequence: int,
    current_epoch: int,
) -> RamPagesHeader:
    """Check and decode a RAM_PAGES kind header (``header.header_length`` bytes).

    Raises RemoteProtocolError unless the sequence is ``expected_sequence``, the
    epoch is ``current_epoch``, the block exists, the codec is 0 or the negotiated
    one, reserved fields are 0, ``n_runs`` matches ``header_length``, every run has
    ≥ 1 page and only known flags, runs are sorted, disjoint and inside the block,
    there are at most ``packet_pages`` pages, and ``payload_length`` is exactly the
    non-zero pages (codec 0) or within the codec's bound.
    """
    _check_kind_header(header, body, PacketKind.RAM_PAGES, expected_sequence)
    block_index, codec, reserved, epoch, n_runs, reserved2 = _RAM_PAGES.unpack_from(body)
    if n_runs != (header.header_length - _RAM_PAGES.size) // RUN_SIZE:
        raise RemoteProtocolError(f"n_runs {n_runs} disagrees with header_length {header.header_length}")
    if n_runs > limits.packet_pages:
        raise RemoteProtocolError(f"{n_runs} runs exceed packet_pages {limits.packet_pages}")
    if reserved or reserved2:
        raise RemoteProtocolError("RAM_PAGES reserved fields must be 0")
    if epoch != current_epoch:
        raise RemoteProtocolError(f"RAM_PAGES of epoch {epoch} in epoch {current_epoch}")
    if block_index >= len(limits.block_pages):
        raise RemoteProtocolError(f"block index {block_index} out of range")
    if codec != CODEC_NONE and codec != limits.codec:
        raise RemoteProtocolError(f"codec {codec} was not negotiated")
    # Checked column-wise with builtins rather than run by run: a packet may
    # carry 4096 runs and this runs for every packet.
    with memoryview(body) as view:
        columns = decode_runs(view[_RAM_PAGES.size:])
    firsts, counts, flags = columns
    if min(counts) < 1:
        raise RemoteProtocolError("a page run of 0 pages")
    if max(flags) > RunFlags.ZERO:
        raise RemoteProtocolError("unknown page run flags")
    ends = list(map(add, firsts, counts))
    if not all(map(le, ends, firsts[1:])):
        raise RemoteProtocolError("page runs are not sorted or overlap")
    if ends[-1] > limits.block_pages[block_index]:
        raise RemoteProtocolError(f"page run ends past block {block_index}")
    n_pages = sum(counts)
    if n_pages > limits.packet_pages:
        raise RemoteProtocolError(f"{n_pages} pages exceed packet_pages {limits.packet_pages}")
    raw = (n_pages - sum(map(mul, counts, flags))) * limits.page_size
    payload_length = header.payload_length
    if codec == CODEC_NONE:
        if payload_length != raw:
            raise RemoteProtocolError(f"payload_length {payload_length}, expected {raw}")
    elif payload_length > limits.max_payload(raw):
        raise RemoteProtocolError(f"compressed payload_length {payload_length} over the bound")
    return RamPagesHeader(header.sequence, block_index, codec, epoch, columns, payload_length)


def _decode_epoch(
    header: PacketHeader, body: Buffer, kind: PacketKind, expected_sequence: int
) -> int:
    _check_kind_header(header, body, kind, expected_sequence)
    epoch, reserved = _EPOCH.unpack(body)
    if reserved:
        raise RemoteProtocolError(f"{kind.name} reserved field must be 0")
    return int(epoch)


def decode_sync(
    header: PacketHeader, body: Buffer, expected_sequence: int, current_epoch: int
) -> SyncPacket:
    """Check and decode a SYNC kind header: its epoch must be ``current_epoch``."""
    epoch = _decode_epoch(header, body, PacketKind.SYNC, expected_sequence)
    if epoch != current_epoch:
        raise RemoteProtocolError(f"SYNC of epoch {epoch} in epoch {current_epoch}")
    return SyncPacket(header.sequence, epoch)


def decode_end(
    header: PacketHeader, body: Buffer, expected_sequence: int, current_epoch: int
) -> EndPacket:
    """Check and decode an END kind header: its epoch must be ``current_epoch - 1``."""
    epoch = _decode_epoch(header, body, PacketKind.END, expected_sequence)
    if epoch != current_epoch - 1:
        raise RemoteProtocolError(f"END names epoch {epoch}, expected {current_epoch - 1}")
    return EndPacket(header.sequence, epoch)


def decode_device_state(
    header: PacketHeader, body: Buffer, expected_sequence: int
) -> DeviceChunkHeader:
    """Check and decode a DEVICE_STATE kind header.

    Raises RemoteProtocolError for a wrong sequence, nonzero reserved bytes, an
    idstr whose length disagrees with ``header_length`` or that is not UTF-8, or
    an empty chunk that is not the END chunk.  Whether the device exists, and
    whether its index is new, is the receiver's to check.
    """
    _check_kind_header(header, body, PacketKind.DEVICE_STATE, expected_sequence)
    instance_id, index, reserved, reserved2, name_length = _DEVICE_STATE.unpack_from(body)
    if reserved or reserved2:
        raise RemoteProtocolError("DEVICE_STATE reserved fields must be 0")
    if name_length != header.header_length - _DEVICE_STATE.size:
        raise RemoteProtocolError(f"idstr length {name_length} disagrees with header_length")
    try:
        idstr = bytes(body[_DEVICE_STATE.size:]).decode("utf-8")
    except UnicodeDecodeError as error:
        raise RemoteProtocolError("device idstr is not valid UTF-8") from error
    end = bool(header.flags & DeviceFlags.END)
    live = bool(header.flags & DeviceFlags.LIVE)
    if header.payload_length == 0 and not end:
        raise RemoteProtocolError(f"empty chunk {index} of device {idstr!r} is not its END chunk")
    if live and end:
        raise RemoteProtocolError(f"chunk {index} of device {idstr!r} is both LIVE and END: the END "
                                  f"chunk is sent at switchover")
    return DeviceChunkHeader(header.sequence, idstr, instance_id, index, end, header.payload_length,
                             live)


def decode_packet(
    header: PacketHeader,
    body: Buffer,
    limits: PacketLimits,
    expected_sequence: int,
    current_epoch: int,
) -> Packet:
    """Check and decode the kind header that follows ``header`` (see the decode_* above).

    The caller tracks the channel's state: ``expected_sequence`` starts at 0 and
    grows by one per packet; ``current_epoch`` starts at 1 and grows by one after
    each SYNC.  After END nothing may follow.
    """
    if header.kind is PacketKind.RAM_PAGES:
        return decode_ram_pages(header, body, limits, expected_sequence, current_epoch)
    if header.kind is PacketKind.SYNC:
        return decode_sync(header, body, expected_sequence, current_epoch)
    if header.kind is PacketKind.DEVICE_STATE:
        return decode_device_state(header, body, expected_sequence)
    if header.kind is PacketKind.END:
        return decode_end(header, body, expected_sequence, current_epoch)
    # a registered kind: decode_packet_header checked it against its rule
    _check_body(header, body, expected_sequence)
    return KindPacket(header.sequence, header, bytes(body), header.payload_length)


class StreamBuffer:
    """The receive side both incremental decoders share: bytes in, and the end mark."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._closed = False

    def receive_data(self, data: Buffer) -> None:
        """Append received bytes; ``b""`` marks the end of the stream.

        Raises LocalProtocolError for data after the end of the stream.
        """
        if self._closed:
            raise LocalProtocolError("receive_data() after the end of the stream")
        if data:
            self._buffer += data
        else:
            self._closed = True


@dataclass(frozen=True, slots=True)
class PacketStart:
    """Event of :meth:`PacketDecoder.next_event`: a packet's headers arrived and
    were checked; ``payload_length`` bytes of payload follow on the stream.

    A packet without payload (SYNC, END, an empty END chunk) is complete with this
    event.  Otherwise its consumer says which views the payload goes into, in
    order, with :meth:`PacketDecoder.payload_into` (as many calls as it likes:
    compressed frames are read header by header), reads what that leaves into
    them straight from the stream, and ends with :meth:`PacketDecoder.payload_done`.
    """

    kind: PacketKind | int  # a PacketKind, or a kind registered with register_kind()
    packet: Packet
    header_bytes: int     # common header and kind header, as they were on the stream
    payload_length: int


class PacketDecoder(StreamBuffer):
    """Sans-IO decoder of the packets of one multifd channel (after its hello).

    It checks every packet as :func:`decode_packet` does and keeps the channel's
    state: sequences count from 0; the epoch starts at 1; RAM_PAGES must carry the
    current epoch; SYNC must carry the current epoch and moves it to epoch + 1; END
    must carry the last completed epoch (current - 1).  Any byte after END, or the
    stream ending (``receive_data(b"")``) before END, is a RemoteProtocolError.
    Headers are checked as soon as they arrive, before the payload is waited for.
    It raises protocol errors only (what the transport did is its driver's to
    say); once it has raised a RemoteProtocolError, every later call raises again.

    Two ways to drive it:

    * **payload in place** (what channel processes do): feed exactly :attr:`want`
      bytes while :meth:`next_event` answers NEED_DATA; on :class:`PacketStart`
      hand the payload's destination views to :meth:`payload_into`, fill the
      views it answers from the stream (``recv_into``: no copy), then call
      :meth:`payload_done`.  Bytes fed beyond ``want`` are not lost: they are
      copied into the views first.
    * **whole packets**, the h11 way: feed whatever arrives and call
      :meth:`next_packet` until it answers NEED_DATA; it answers each packet
      with its payload as bytes.
    """

    def __init__(self, limits: PacketLimits) -> None:
        super().__init__()
        self.limits = limits
        self._sequence = 0
        self._epoch = 1
        self._header: PacketHeader | None = None
        self._start: PacketStart | None = None     # the packet whose payload is being read
        self._payload_left = 0                     # ... and its bytes not yet claimed
        self._ended = False
        self._error: RemoteProtocolError | None = None

    @property
    def sequence(self) -> int:
        """The sequence number the next packet must carry."""
        return self._sequence

    @property
    def epoch(self) -> int:
        """The channel's current epoch."""
        return self._epoch

    @property
    def ended(self) -> bool:
        """True once END has been answered."""
        return self._ended

    @property
    def want(self) -> int:
        """How many more bytes the headers in progress need (16 for a new packet):
        feed this many and no byte of the next payload is buffered here.  After END:
        1 (any byte at all is an error)."""
        if self._ended:
            return 1
        if self._header is None:
            return max(PACKET_HEADER_SIZE - len(self._buffer), 0)
        return max(PACKET_HEADER_SIZE + self._header.header_length - len(self._buffer), 0)

    @property
    def payload_left(self) -> int:
        """Bytes of the current packet's payload not yet claimed by payload_into()."""
        return self._payload_left

    def _checked(self) -> None:
        if self._error is not None:
            raise RemoteProtocolError("the channel already failed") from self._error

    def next_event(self) -> PacketStart | Literal[NeedData.NEED_DATA]:
        """The next packet's checked headers, or NEED_DATA (feed :attr:`want` bytes).

        After END it answers NEED_DATA while no further byte arrives.  Raises
        RemoteProtocolError for an invalid packet, bytes after END, or a stream that
        ended before END or inside a packet; LocalProtocolError if the payload of
        the previous packet is not done.
        """
        self._checked()
        if self._start is not None:
            raise LocalProtocolError("next_event() before the payload_done() of the last packet")
        try:
            return self._next_event()
        except RemoteProtocolError as error:
            self._error = error
            raise

    def _next_event(self) -> PacketStart | Literal[NeedData.NEED_DATA]:
        buffer = self._buffer
        if self._ended:
            if buffer:
                raise RemoteProtocolError(f"{len(buffer)} bytes after END")
            return NEED_DATA
        if self._header is None:
            if len(buffer) < PACKET_HEADER_SIZE:
                return self._need_data()
            self._header = decode_packet_header(buffer[:PACKET_HEADER_SIZE])
        header = self._header
        body_end = PACKET_HEADER_SIZE + header.header_length
        if len(buffer) < body_end:
            return self._need_data()
        record = decode_packet(header, buffer[PACKET_HEADER_SIZE:body_end],
                               self.limits, self._sequence, self._epoch)
        del buffer[:body_end]
        self._header = None
        self._sequence += 1
        if header.kind is PacketKind.SYNC:
            self._epoch += 1
        elif header.kind is PacketKind.END:
            self._ended = True
        event = PacketStart(header.kind, record, body_end, header.payload_length)
        if header.payload_length:
            self._start, self._payload_left = event, header.payload_length
        return event

    def payload_into(self, views: Sequence[memoryview]) -> list[memoryview]:
        """Claim the next ``sum(nbytes)`` bytes of the payload for ``views`` (writable,
        in order).  Bytes already fed are copied into their front; the answer is
        what is left of them, for the caller to fill from the stream (in production
        all of them: nothing of a payload is fed).

        Raises RemoteProtocolError if that reads past the payload (its consumer
        follows lengths the peer sent, such as compressed frame headers).
        """
        self._checked()
        wanted = sum(view.nbytes for view in views)
        if not wanted:
            return []  # (a packet without payload may still be handed its no views)
        start = self._start
        if start is None:
            raise LocalProtocolError("payload_into() without a payload in progress")
        if wanted > self._payload_left:
            self._error = RemoteProtocolError(
                f"{_kind_name(start.kind)} content would overrun payload_length {start.payload_length} "
                f"({wanted} more bytes wanted, {self._payload_left} left)")
            raise self._error
        self._payload_left -= wanted
        buffer = self._buffer
        if not buffer:
            return list(views)
        left: list[memoryview] = []
        for view in views:
            take = min(len(buffer), view.nbytes)
            if take:
                view[:take] = buffer[:take]
                del buffer[:take]
            if take < view.nbytes:
                left.append(view[take:])
        return left

    def payload_done(self) -> None:
        """The consumer of the current payload is done (no-op for a packet without one).

        Raises RemoteProtocolError if it took less than the whole payload.
        """
        self._checked()
        start = self._start
        if start is None:
            return
        if self._payload_left:
            self._error = RemoteProtocolError(
                f"{_kind_name(start.kind)} payload_length {start.payload_length}, but its content "
                f"ends after {start.payload_length - self._payload_left} bytes")
            raise self._error
        self._start = None

    def next_packet(self) -> tuple[Packet, bytes] | Literal[NeedData.NEED_DATA]:
        """The next whole packet and its payload, or NEED_DATA (for tests and tools:
        channels read payloads in place).

        After END it answers NEED_DATA while no further byte arrives.  Raises
        RemoteProtocolError for an invalid packet, bytes after END, or a stream that
        ended before END or inside a packet.  (The payload in place path, above,
        with a bytearray as the one view.)
        """
        self._checked()
        start = self._start
        if start is None:
            event = self.next_event()
            if event is NEED_DATA:
                return NEED_DATA
            if not event.payload_length:
                return event.packet, b""
            start = event
        if len(self._buffer) < self._payload_left:
            if self._closed:
                self._error = RemoteProtocolError("the connection closed inside a packet")
                raise self._error
            return NEED_DATA
        payload = bytearray(start.payload_length)
        self.payload_into([memoryview(payload)])
        self.payload_done()
        return start.packet, bytes(payload)

    def _need_data(self) -> Literal[NeedData.NEED_DATA]:
        if self._closed:
            if self._buffer:
                raise RemoteProtocolError("the connection closed inside a packet")
            raise RemoteProtocolError("the connection closed before END")
        return NEED_DATA
