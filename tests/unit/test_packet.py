"""Golden vectors and validation rules of the wire codec (docs/wire-format.md).

Every expected byte string is written out in hex from the specification; hello
authenticators were computed independently with
``openssl dgst -sha256 -mac HMAC -macopt key:multifd-test-secret``.  Malformed
inputs are built here with ``struct``, never with the encoder under test.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import struct
import uuid

import pytest

from engine.errors import (
    HandshakeError,
    LocalProtocolError,
    RemoteProtocolError,
)
from engine.wire.message import (
    MAX_DIGESTS_BYTES,
    Abort,
    AbortCode,
    BlockSpec,
    ChannelsReady,
    Commit,
    Complete,
    Config,
    ConfigAck,
    DeviceDone,
    DeviceLoaded,
    DevicesDone,
    DevicesLoaded,
    DeviceSpec,
    Digests,
    LiveRound,
    Message,
    MessageDecoder,
    Ping,
    Pong,
    Prepared,
    RamHandover,
    Resumed,
    Switchover,
    SyncMarker,
    Verification,
    encode_message,
    packet_limits,
)
from engine.wire.packet import (
    HELLO_SIZE,
    MAX_MESSAGE_BODY,
    NEED_DATA,
    ChannelHello,
    DeviceChunkHeader,
    EndPacket,
    HelloFlags,
    HelloRole,
    Packet,
    PacketDecoder,
    PacketHeader,
    PacketKind,
    PacketLimits,
    PageRun,
    RamPagesHeader,
    SyncPacket,
    decode_challenge,
    decode_device_state,
    decode_end,
    decode_hello,
    decode_packet,
    decode_packet_header,
    decode_ram_pages,
    decode_sync,
    encode_challenge,
    encode_device_state,
    encode_end,
    encode_hello,
    encode_ram_pages,
    encode_sync,
    looks_like_hello,
    session_key,
)
from engine.wire.runs import run_columns

h = bytes.fromhex

# ── hello ─────────────────────────────────────────────────────────────────────

SECRET = b"multifd-test-secret"
MIGRATION_ID = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")
MAIN_NONCE = bytes(range(16))
REPLY_NONCE = bytes(range(16, 32))
CHANNEL_NONCE = bytes(range(32, 48))
CHALLENGE = bytes(range(48, 64))          # the listener's, on the main connection
CHANNEL_CHALLENGE = bytes(range(64, 80))  # the listener's, on channel 3's connection
# The session key, as wire-format §1 defines it (computed here without the codec).
SESSION = hmac.new(SECRET, b"multifd session " + MIGRATION_ID.bytes + MAIN_NONCE + CHALLENGE,
                   hashlib.sha256).digest()

CHALLENGE_WIRE = h("4d464443" "0003" "0000" "303132333435363738393a3b3c3d3e3f")
# role 1: answers CHALLENGE, with the shared secret; flags 0x02: MAC records follow
MAIN_HELLO = h(
    "4d464448" "0003" "01" "02" "00112233445566778899aabbccddeeff" "0000" "0004" "00000000"
    "000102030405060708090a0b0c0d0e0f"
    "7936f993a8f5feb76e334812077a59030affb70f47435fc802323d7828e776db"
)
# role 2: answers CHANNEL_CHALLENGE, with the session key
CHANNEL_HELLO = h(
    "4d464448" "0003" "02" "02" "00112233445566778899aabbccddeeff" "0003" "0004" "00000000"
    "202122232425262728292a2b2c2d2e2f"
    "de1cdbd3d26f154bed612343fe320c80346c00ffb9e6e7fb1f034b2828c4890f"
)
# role 3: answers the nonce of MAIN_HELLO, with the shared secret
REPLY_HELLO = h(
    "4d464448" "0003" "03" "02" "00112233445566778899aabbccddeeff" "0000" "0004" "00000000"
    "101112131415161718191a1b1c1d1e1f"
    "95d32cd35bf2e3a298e618da4fb417f3e4e1be16b5230d317d9e2356e9a918ae"
)
MAIN, CHANNEL, REPLY = HelloRole.MAIN, HelloRole.CHANNEL, HelloRole.MAIN_REPLY

HELLO_VECTORS = [
    pytest.param(MAIN, 0, MAIN_NONCE, SECRET, CHALLENGE, MAIN_HELLO, id="main"),
    pytest.param(CHANNEL, 3, CHANNEL_NONCE, SESSION, CHANNEL_CHALLENGE, CHANNEL_HELLO, id="channel"),
    pytest.param(REPLY, 0, REPLY_NONCE, SECRET, MAIN_NONCE, REPLY_HELLO, id="reply"),
]


@pytest.mark.parametrize(("role", "channel_id", "nonce", "key", "answers", "wire"), HELLO_VECTORS)
def test_hello_golden(
    role: HelloRole, channel_id: int, nonce: bytes, key: bytes, answers: bytes, wire: bytes
) -> None:
    assert len(wire) == HELLO_SIZE
    # The vector's authenticator is what the spec says it is.
    assert wire[48:] == hmac.new(key, wire[:48] + answers, hashlib.sha256).digest()
    assert encode_hello(role, MIGRATION_ID, channel_id, 4, key, answers, nonce, HelloFlags.MAC) == wire
    assert decode_hello(wire, key, answers, (role,)) == ChannelHello(
        role, MIGRATION_ID, channel_id, 4, nonce, HelloFlags.MAC
    )


def test_session_key_and_challenge_golden() -> None:
    assert session_key(SECRET, MIGRATION_ID, MAIN_NONCE, CHALLENGE) == SESSION
    assert encode_challenge(CHALLENGE) == CHALLENGE_WIRE
    assert decode_challenge(CHALLENGE_WIRE) == CHALLENGE
    assert encode_challenge()[8:] != encode_challenge()[8:]  # fresh by default


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        pytest.param(CHALLENGE_WIRE[:23], "24 bytes, got 23", id="short"),
        pytest.param(h("4d464448") + CHALLENGE_WIRE[4:], "wrong challenge magic", id="magic"),
        pytest.param(CHALLENGE_WIRE[:4] + h("0001") + CHALLENGE_WIRE[6:], "challenge version 1",
                     id="version"),
        # a version-2 listener's challenge: a version-3 source stops there
        pytest.param(CHALLENGE_WIRE[:4] + h("0002") + CHALLENGE_WIRE[6:],
                     r"unsupported challenge version 2 \(this side speaks 3\)", id="version-2"),
        pytest.param(CHALLENGE_WIRE[:6] + h("0001") + CHALLENGE_WIRE[8:], "reserved", id="reserved"),
    ],
)
def test_challenge_refused(wire: bytes, match: str) -> None:
    with pytest.raises(HandshakeError, match=match):
        decode_challenge(wire)


def test_hello_default_nonce_is_fresh() -> None:
    first = encode_hello(MAIN, MIGRATION_ID, 0, 1, SECRET, CHALLENGE)
    second = encode_hello(MAIN, MIGRATION_ID, 0, 1, SECRET, CHALLENGE)
    assert first[32:48] != second[32:48]
    assert decode_hello(first, SECRET, CHALLENGE, (MAIN,)).nonce == first[32:48]


def forge_hello(
    *,
    magic: int = 0x4D464448,
    version: int = 3,
    role: int = 2,
    flags: int = 2,
    channel_id: int = 0,
    channel_count: int = 4,
    reserved: int = 0,
    key: bytes = SESSION,
    answers: bytes = CHANNEL_CHALLENGE,
) -> bytes:
    """A hello with any field values and a valid authenticator."""
    signed = struct.pack(">IHBB16sHHI16s", magic, version, role, flags, MIGRATION_ID.bytes,
                         channel_id, channel_count, reserved, CHANNEL_NONCE)
    return signed + hmac.new(key, signed + answers, hashlib.sha256).digest()


def test_forge_hello_matches_golden() -> None:
    assert forge_hello(channel_id=3) == CHANNEL_HELLO


CHANNEL_CHECK = (SESSION, CHANNEL_CHALLENGE, (CHANNEL,))


@pytest.mark.parametrize(
    ("wire", "check", "match"),
    [
        pytest.param(CHANNEL_HELLO[:79], CHANNEL_CHECK, "80 bytes, got 79", id="short"),
        pytest.param(CHANNEL_HELLO + b"\0", CHANNEL_CHECK, "80 bytes, got 81", id="long"),
        pytest.param(forge_hello(magic=0x4D464450), CHANNEL_CHECK, "wrong hello magic", id="magic"),
        pytest.param(forge_hello(version=1), CHANNEL_CHECK, "unsupported hello version 1", id="version"),
        # A version-2 peer (no protection after the hello) is refused at its first hello.
        pytest.param(forge_hello(version=2, flags=0), CHANNEL_CHECK,
                     r"unsupported hello version 2 \(this side speaks 3\)", id="version-2"),
        pytest.param(forge_hello(role=0), CHANNEL_CHECK, "unknown hello role 0", id="role-0"),
        pytest.param(forge_hello(role=4), CHANNEL_CHECK, "unknown hello role 4", id="role-4"),
        pytest.param(forge_hello(flags=3), CHANNEL_CHECK, "both TLS and MAC", id="flags-tls-and-mac"),
        pytest.param(forge_hello(flags=4), CHANNEL_CHECK, "unknown bits", id="flags-unknown"),
        pytest.param(forge_hello(reserved=1), CHANNEL_CHECK, "reserved bytes must be 0", id="reserved"),
        pytest.param(CHANNEL_HELLO[:79] + b"\0", CHANNEL_CHECK, "bad hello authenticator", id="auth"),
        pytest.param(CHANNEL_HELLO[:24] + h("0002") + CHANNEL_HELLO[26:], CHANNEL_CHECK,
                     "bad hello authenticator", id="tampered-field"),
        # Replays: a hello answers one challenge, of one session, and nothing else.
        pytest.param(CHANNEL_HELLO, (SESSION, CHALLENGE, (CHANNEL,)), "bad hello authenticator",
                     id="replayed-channel-hello"),
        pytest.param(MAIN_HELLO, (SECRET, CHANNEL_CHALLENGE, (MAIN,)), "bad hello authenticator",
                     id="replayed-main-hello"),
        pytest.param(CHANNEL_HELLO, (SECRET, CHANNEL_CHALLENGE, (CHANNEL,)), "bad hello authenticator",
                     id="channel-hello-of-another-session"),
        pytest.param(REPLY_HELLO, (SECRET, REPLY_NONCE, (REPLY,)), "bad hello authenticator",
                     id="reply-nonce"),
        pytest.param(MAIN_HELLO, (SECRET, MAIN_NONCE, (REPLY,)), "a MAIN hello where MAIN_REPLY",
                     id="reflected"),
        pytest.param(REPLY_HELLO, (SECRET, CHALLENGE, (MAIN,)), "a MAIN_REPLY hello where MAIN",
                     id="unasked-reply"),
        pytest.param(forge_hello(channel_count=0), CHANNEL_CHECK, "count 0 is outside 1..256",
                     id="count-0"),
        pytest.param(forge_hello(channel_count=257), CHANNEL_CHECK, "count 257 is outside 1..256",
                     id="count-257"),
        pytest.param(forge_hello(channel_id=4), CHANNEL_CHECK, "channel id 4 is outside 0..3",
                     id="channel-id"),
        pytest.param(forge_hello(role=1, channel_id=1), (SESSION, CHANNEL_CHALLENGE, (MAIN,)),
                     "channel id 1, not 0", id="main-channel-id"),
        pytest.param(forge_hello(role=3, channel_id=1, key=SECRET, answers=MAIN_NONCE),
                     (SECRET, MAIN_NONCE, (REPLY,)), "channel id 1, not 0", id="reply-channel-id"),
    ],
)
def test_hello_refused(wire: bytes, check: tuple, match: str) -> None:
    with pytest.raises(HandshakeError, match=match):
        decode_hello(wire, *check)


def test_looks_like_hello() -> None:
    """What a source reads where the reply hello was due: a hello, or (an ABORT, say) not."""
    assert looks_like_hello(MAIN_HELLO) and looks_like_hello(memoryview(MAIN_HELLO)[:4])
    assert not looks_like_hello(encode_message(Abort(AbortCode.FAILED, "no")))
    assert not looks_like_hello(b"MFD") and not looks_like_hello(b"")


def test_hello_wrong_secret() -> None:
    with pytest.raises(HandshakeError, match="bad hello authenticator"):
        decode_hello(MAIN_HELLO, b"another secret", CHALLENGE, (MAIN,))


@pytest.mark.parametrize(
    ("role", "channel_id", "channel_count", "nonce", "answers"),
    [
        pytest.param(7, 0, 4, None, CHALLENGE, id="role"),
        pytest.param(CHANNEL, 4, 4, None, CHALLENGE, id="channel-id"),
        pytest.param(MAIN, 1, 4, None, CHALLENGE, id="main-channel-id"),
        pytest.param(MAIN, 0, 0, None, CHALLENGE, id="count-0"),
        pytest.param(MAIN, 0, 257, None, CHALLENGE, id="count-257"),
        pytest.param(MAIN, 0, 4, b"short", CHALLENGE, id="nonce"),
        pytest.param(MAIN, 0, 4, None, b"", id="answers-nothing"),
        pytest.param(REPLY, 0, 4, None, b"123", id="answers-size"),
    ],
)
def test_encode_hello_refuses(
    role: HelloRole, channel_id: int, channel_count: int, nonce: bytes | None, answers: bytes,
) -> None:
    with pytest.raises(LocalProtocolError):
        encode_hello(role, MIGRATION_ID, channel_id, channel_count, SECRET, answers, nonce)


# ── packets ───────────────────────────────────────────────────────────────────

LIMITS = PacketLimits(page_size=4096, packet_pages=4096, block_pages=(4096, 256), codec=9)

# RAM_PAGES, sequence 7, block 1, raw, epoch 3, runs 16+2, 20+1 (zero), 100+3:
# payload = 5 non-zero pages = 20480 bytes; header_length = 12 + 3 × 8 = 36
RAM_PAGES_RAW = h(
    "4d464450" "01" "00" "0024" "00005000" "00000007"
    "0001" "00" "00" "00000003" "0003" "0000"
    "00000010" "0002" "0000"
    "00000014" "0001" "0001"
    "00000064" "0003" "0000"
)
RAM_PAGES_RAW_RECORD = RamPagesHeader(
    sequence=7, block_index=1, codec=0, epoch=3,
    columns=run_columns((PageRun(16, 2, False), PageRun(20, 1, True), PageRun(100, 3, False))),
    payload_length=20480,
)
# RAM_PAGES, sequence 0, block 0, codec 9, epoch 1, one run of 4096 pages, 1234 bytes
RAM_PAGES_COMPRESSED = h(
    "4d464450" "01" "00" "0014" "000004d2" "00000000"
    "0000" "09" "00" "00000001" "0001" "0000"
    "00000000" "1000" "0000"
)
RAM_PAGES_COMPRESSED_RECORD = RamPagesHeader(0, 0, 9, 1, run_columns((PageRun(0, 4096, False),)), 1234)
SYNC = h("4d464450" "02" "00" "0008" "00000000" "00000008" "00000003" "00000000")
END = h("4d464450" "04" "00" "0008" "00000000" "00000009" "00000003" "00000000")


def test_ram_pages_golden() -> None:
    record = RAM_PAGES_RAW_RECORD
    assert encode_ram_pages(7, 1, 0, 3, record.runs, 20480) == RAM_PAGES_RAW
    # plain triples are accepted too
    assert encode_ram_pages(7, 1, 0, 3, [(16, 2, False), (20, 1, True), (100, 3, False)],
                            20480) == RAM_PAGES_RAW
    header = decode_packet_header(RAM_PAGES_RAW[:16])
    assert header == PacketHeader(PacketKind.RAM_PAGES, 0, 36, 20480, 7)
    decoded = decode_ram_pages(header, RAM_PAGES_RAW[16:], LIMITS, 7, 3)
    assert decoded == record
    assert (decoded.n_pages, decoded.normal_pages) == (6, 5)
    assert decode_packet(header, RAM_PAGES_RAW[16:], LIMITS, 7, 3) == record


def test_ram_pages_compressed_golden() -> None:
    record = RAM_PAGES_COMPRESSED_RECORD
    assert encode_ram_pages(0, 0, 9, 1, record.runs, 1234) == RAM_PAGES_COMPRESSED
    header = decode_packet_header(RAM_PAGES_COMPRESSED[:16])
    assert decode_ram_pages(header, RAM_PAGES_COMPRESSED[16:], LIMITS, 0, 1) == record


def test_sync_golden() -> None:
    assert encode_sync(8, 3) == SYNC
    header = decode_packet_header(SYNC[:16])
    assert header == PacketHeader(PacketKind.SYNC, 0, 8, 0, 8)
    assert decode_sync(header, SYNC[16:], 8, 3) == SyncPacket(8, 3)
    assert decode_packet(header, SYNC[16:], LIMITS, 8, 3) == SyncPacket(8, 3)


def test_end_golden() -> None:
    assert encode_end(9, 3) == END
    header = decode_packet_header(END[:16])
    assert header == PacketHeader(PacketKind.END, 0, 8, 0, 9)
    # END names the last completed epoch: the channel is in epoch 4 after SYNC(3)
    assert decode_end(header, END[16:], 9, 4) == EndPacket(9, 3)
    assert decode_packet(header, END[16:], LIMITS, 9, 4) == EndPacket(9, 3)


# DEVICE_STATE chunk 7 of ("nic", 2), 1000 bytes of state, sequence 5:
#  common: magic, kind 3, flags 0, header_length 15, payload_length 1000, sequence 5
#  kind:   instance_id 2, chunk_index 7, reserved 0, reserved 0, idstr length 3, "nic"
DEVICE_CHUNK = h("4d464450" "03" "00" "000f" "000003e8" "00000005"
                 "00000002" "00000007" "0000" "00" "03" "6e6963")
# The END chunk (the config part, here empty) of ("vga", 0), index 12:
DEVICE_END = h("4d464450" "03" "01" "000f" "00000000" "00000006"
               "00000000" "0000000c" "0000" "00" "03" "766761")


def common_header_device(payload_length: int) -> bytes:
    return struct.pack(">IBBHII", 0x4D464450, 3, 0, 15, payload_length, 5)


def test_device_state_golden() -> None:
    assert encode_device_state(5, "nic", 2, 7, False, 1000) == DEVICE_CHUNK
    header = decode_packet_header(DEVICE_CHUNK[:16])
    assert header == PacketHeader(PacketKind.DEVICE_STATE, 0, 15, 1000, 5)
    chunk = DeviceChunkHeader(5, "nic", 2, 7, False, 1000)
    assert decode_device_state(header, DEVICE_CHUNK[16:], 5) == chunk
    assert decode_packet(header, DEVICE_CHUNK[16:], LIMITS, 5, 1) == chunk
    assert encode_device_state(6, "vga", 0, 12, True, 0) == DEVICE_END
    header = decode_packet_header(DEVICE_END[:16])
    assert decode_device_state(header, DEVICE_END[16:], 6) == DeviceChunkHeader(6, "vga", 0, 12, True, 0)


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        pytest.param(DEVICE_CHUNK[:16] + h("00000002" "00000007" "0001" "00" "03") + b"nic",
                     "reserved", id="reserved"),
        pytest.param(DEVICE_CHUNK[:16] + h("00000002" "00000007" "0000" "00" "02") + b"nic",
                     "idstr length 2", id="idstr-length"),
        pytest.param(DEVICE_CHUNK[:16] + h("00000002" "00000007" "0000" "00" "03") + b"\xff\xfeA",
                     "not valid UTF-8", id="idstr-utf8"),
        pytest.param(common_header_device(payload_length=0) + h("00000002" "00000007" "0000" "00" "03")
                     + b"nic", "is not its END chunk", id="empty-not-end"),
    ],
)
def test_device_state_refused(wire: bytes, match: str) -> None:
    header = decode_packet_header(wire[:16])
    with pytest.raises(RemoteProtocolError, match=match):
        decode_device_state(header, wire[16:], 5)


@pytest.mark.parametrize(("args", "match"), [
    (("", 0, 0, False, 10), "1..255"),
    (("x" * 256, 0, 0, False, 10), "1..255"),
    (("nic", 0, 0, False, 0), "END False"),
    (("nic", 0, 0, True, (1 << 20) + 1), "bytes"),
    (("nic", -1, 0, False, 10), "cannot encode"),
])
def test_device_state_encoder_refuses(args: tuple, match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        encode_device_state(0, *args)


def test_live_device_chunk_golden() -> None:
    """A live-phase chunk (issue 16) is DEVICE_CHUNK with flag LIVE (2)."""
    live = DEVICE_CHUNK[:5] + b"\x02" + DEVICE_CHUNK[6:]
    assert encode_device_state(5, "nic", 2, 7, False, 1000, live=True) == live
    header = decode_packet_header(live[:16])
    assert decode_device_state(header, live[16:], 5) == DeviceChunkHeader(5, "nic", 2, 7, False, 1000, True)
    both = DEVICE_CHUNK[:5] + b"\x03" + DEVICE_CHUNK[6:]
    with pytest.raises(RemoteProtocolError, match="both LIVE and END"):
        decode_device_state(decode_packet_header(both[:16]), both[16:], 5)
    with pytest.raises(LocalProtocolError, match="live-phase"):
        encode_device_state(5, "nic", 2, 7, True, 10, live=True)


@pytest.mark.parametrize(("body_hex", "match"), [
    ("000f" "0000" "00000006" "00000002" "0000", "unknown LIVE_ROUND flags"),
    ("000f" "0000" "0000000a" "00000000" "0002" "00000001", "disagrees with body_length"),
    ("0010" "0000" "00000006" "00000004" "0000", "unknown DEVICES_LOADED flags"),
])
def test_live_messages_refused(body_hex: str, match: str) -> None:
    decoder = MessageDecoder()
    decoder.receive_data(h(body_hex))
    with pytest.raises(RemoteProtocolError, match=match):
        decoder.next_message()


def test_config_device_flags_refused() -> None:
    wire = bytearray(encode_message(ITERATIVE_CONFIG))
    wire[-1] = 4  # no such device flag
    decoder = MessageDecoder()
    decoder.receive_data(bytes(wire))
    with pytest.raises(RemoteProtocolError, match="unknown CONFIG device flags"):
        decoder.next_message()


def test_config_device_flags_without_a_flag_set_refused() -> None:
    """One encoding per CONFIG: DEVICE_FLAGS only when some device has a flag
    (found by the corrupted-stream fuzz: decoded, it re-encoded one byte shorter)."""
    wire = bytearray(encode_message(ITERATIVE_CONFIG))
    wire[-2] = 0  # "gpu" loses its flags; "nic" had none
    decoder = MessageDecoder()
    decoder.receive_data(bytes(wire))
    with pytest.raises(RemoteProtocolError, match="DEVICE_FLAGS with no device flag set"):
        decoder.next_message()


def test_device_chunks_in_the_stream_decoder() -> None:
    decoder = PacketDecoder(LIMITS)
    decoder.receive_data(encode_device_state(0, "nic", 2, 7, False, 3) + b"abc"
                         + encode_device_state(1, "nic", 2, 8, True, 0) + encode_end(2, 0))
    assert decoder.next_packet() == (DeviceChunkHeader(0, "nic", 2, 7, False, 3), b"abc")
    assert decoder.next_packet() == (DeviceChunkHeader(1, "nic", 2, 8, True, 0), b"")
    assert decoder.next_packet() == (EndPacket(2, 0), b"")


def common_header(kind: int = 1, flags: int = 0, header_length: int = 20,
                  payload_length: int = 0, sequence: int = 0,
                  magic: int = 0x4D464450) -> bytes:
    return struct.pack(">IBBHII", magic, kind, flags, header_length, payload_length, sequence)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        pytest.param(common_header(magic=0x4D464448), "wrong packet magic", id="magic"),
        pytest.param(common_header(kind=3, header_length=12), "DEVICE_STATE header_length 12",
                     id="device-no-idstr"),
        pytest.param(common_header(kind=3, header_length=12 + 256), "DEVICE_STATE header_length 268",
                     id="device-idstr-too-long"),
        pytest.param(common_header(kind=3, header_length=15, payload_length=(1 << 20) + 1),
                     "exceeds 1048576", id="device-chunk-too-big"),
        pytest.param(common_header(kind=3, header_length=15, flags=4), "unknown DEVICE_STATE flags",
                     id="device-flags"),
        pytest.param(common_header(kind=0), "unknown packet kind 0", id="kind-0"),
        pytest.param(common_header(kind=5), "unknown packet kind 5", id="kind-5"),
        pytest.param(common_header(flags=1), "unknown RAM_PAGES flags", id="ram-flags"),
        pytest.param(common_header(kind=2, header_length=8, flags=0x80),
                     "unknown SYNC flags", id="sync-flags"),
        pytest.param(common_header(header_length=12), "header_length 12", id="no-runs"),
        pytest.param(common_header(header_length=24), "header_length 24", id="partial-run"),
        pytest.param(common_header(header_length=12 + 8 * 4097), "header_length 32788",
                     id="too-many-runs"),
        pytest.param(common_header(kind=2, header_length=12), "SYNC header_length 12",
                     id="sync-length"),
        pytest.param(common_header(kind=4, header_length=0), "END header_length 0",
                     id="end-length"),
        pytest.param(common_header(kind=2, header_length=8, payload_length=1),
                     "SYNC carries no payload", id="sync-payload"),
        pytest.param(common_header(kind=4, header_length=8, payload_length=4096),
                     "END carries no payload", id="end-payload"),
    ],
)
def test_packet_header_refused(data: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        decode_packet_header(data)


def test_packet_header_size_is_the_callers_job() -> None:
    with pytest.raises(LocalProtocolError):
        decode_packet_header(SYNC[:15])


def ram_pages_body(*, block_index: int = 0, codec: int = 0, reserved: int = 0, epoch: int = 1,
                   n_runs: int | None = None, reserved2: int = 0,
                   runs: tuple[tuple[int, int, int], ...] = ((0, 1, 0),)) -> bytes:
    count = len(runs) if n_runs is None else n_runs
    return struct.pack(">HBBIHH", block_index, codec, reserved, epoch, count, reserved2) + b"".join(
        struct.pack(">IHH", *run) for run in runs
    )


def decode_ram(body: bytes, payload_length: int, sequence: int = 0,
               limits: PacketLimits = LIMITS, expected_sequence: int = 0,
               current_epoch: int = 1) -> RamPagesHeader:
    header = decode_packet_header(common_header(1, 0, len(body), payload_length, sequence))
    return decode_ram_pages(header, body, limits, expected_sequence, current_epoch)


SMALL = PacketLimits(4096, packet_pages=4, block_pages=(8,), codec=0)


@pytest.mark.parametrize(
    ("body", "payload_length", "limits", "match"),
    [
        pytest.param(ram_pages_body(n_runs=2), 4096, LIMITS, "n_runs 2 disagrees",
                     id="n-runs"),
        pytest.param(ram_pages_body(runs=((0, 1, 0),) * 5), 4096, SMALL,
                     "5 runs exceed packet_pages 4", id="runs-over-packet-pages"),
        pytest.param(ram_pages_body(reserved=1), 4096, LIMITS, "reserved", id="reserved"),
        pytest.param(ram_pages_body(reserved2=1), 4096, LIMITS, "reserved", id="reserved2"),
        pytest.param(ram_pages_body(epoch=2), 4096, LIMITS, "epoch 2 in epoch 1", id="epoch"),
        pytest.param(ram_pages_body(block_index=2), 4096, LIMITS, "block index 2",
                     id="block-index"),
        # Local mode's channels take no page at all: limits without a block.
        pytest.param(ram_pages_body(block_index=0), 4096, PacketLimits(4096, 64, ()), "block index 0",
                     id="no-block-local-mode"),
        pytest.param(ram_pages_body(codec=3), 4096, LIMITS, "codec 3 was not negotiated",
                     id="codec"),
        pytest.param(ram_pages_body(codec=9), 4096, SMALL, "codec 9 was not negotiated",
                     id="codec-none-negotiated"),
        pytest.param(ram_pages_body(runs=((0, 0, 0),)), 0, LIMITS, "0 pages", id="empty-run"),
        pytest.param(ram_pages_body(runs=((0, 1, 2),)), 4096, LIMITS, "unknown page run flags",
                     id="run-flags"),
        pytest.param(ram_pages_body(runs=((5, 1, 0), (2, 1, 0))), 8192, LIMITS,
                     "not sorted or overlap", id="unsorted"),
        pytest.param(ram_pages_body(runs=((2, 2, 0), (3, 1, 0))), 12288, LIMITS,
                     "not sorted or overlap", id="overlap"),
        pytest.param(ram_pages_body(runs=((2, 1, 0), (2, 1, 1))), 4096, LIMITS,
                     "not sorted or overlap", id="duplicate"),
        pytest.param(ram_pages_body(runs=((4092, 5, 0),)), 5 * 4096, LIMITS,
                     "ends past block 0", id="past-block"),
        pytest.param(ram_pages_body(runs=((0xFFFFFFFF, 2, 1),)), 0, LIMITS,
                     "ends past block 0", id="past-block-huge"),
        pytest.param(ram_pages_body(runs=((0, 3, 0), (4, 2, 1))), 3 * 4096, SMALL,
                     "5 pages exceed packet_pages 4", id="pages-over-packet-pages"),
        pytest.param(ram_pages_body(runs=((0, 2, 0), (2, 1, 1))), 3 * 4096, LIMITS,
                     "payload_length 12288, expected 8192", id="raw-payload-long"),
        pytest.param(ram_pages_body(runs=((0, 2, 0),)), 4096, LIMITS,
                     "payload_length 4096, expected 8192", id="raw-payload-short"),
        pytest.param(ram_pages_body(codec=9, runs=((0, 2, 0),)), 8192 + 1025, LIMITS,
                     "over the bound", id="compressed-over-slack"),
    ],
)
def test_ram_pages_refused(body: bytes, payload_length: int, limits: PacketLimits,
                           match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        decode_ram(body, payload_length, limits=limits)


def test_ram_pages_sequence() -> None:
    with pytest.raises(RemoteProtocolError, match="sequence 1, expected 0"):
        decode_ram(ram_pages_body(), 4096, sequence=1)


def test_ram_pages_compressed_bounds() -> None:
    body = ram_pages_body(codec=9, runs=((0, 2, 0), (2, 6, 1)))
    # no bound given: up to raw size + 1024
    assert decode_ram(body, 8192 + 1024).payload_length == 8192 + 1024
    bounded = PacketLimits(4096, 4096, (1024,), codec=9, codec_bound=lambda raw: raw // 2)
    assert decode_ram(body, 4096, limits=bounded).payload_length == 4096
    with pytest.raises(RemoteProtocolError, match="over the bound"):
        decode_ram(body, 4097, limits=bounded)


def test_ram_pages_adjacent_runs_accepted() -> None:
    # runs may touch (a zero run next to a non-zero one); they only must not overlap
    record = decode_ram(ram_pages_body(runs=((0, 2, 0), (2, 1, 1), (3, 1, 0))), 3 * 4096)
    assert record.runs == ((0, 2, False), (2, 1, True), (3, 1, False))
    assert (record.n_pages, record.normal_pages) == (4, 3)


def test_ram_pages_cap_of_4096_runs() -> None:
    runs = tuple((2 * i, 1, i % 2) for i in range(4096))
    limits = PacketLimits(4096, 4096, (8192,))
    record = decode_ram(ram_pages_body(runs=runs), 2048 * 4096, limits=limits)
    assert len(record.runs) == 4096 and record.normal_pages == 2048
    assert encode_ram_pages(0, 0, 0, 1, record.runs, 2048 * 4096) == (
        common_header(1, 0, 12 + 8 * 4096, 2048 * 4096, 0) + ram_pages_body(runs=runs)
    )


def test_decoders_check_the_kind() -> None:
    header = decode_packet_header(SYNC[:16])
    with pytest.raises(LocalProtocolError):
        decode_ram_pages(header, SYNC[16:], LIMITS, 8, 3)
    with pytest.raises(LocalProtocolError):
        decode_sync(header, SYNC[16:20], 8, 3)


@pytest.mark.parametrize(
    ("kind", "body", "sequence", "epoch", "match"),
    [
        pytest.param(2, h("00000003" "00000000"), 9, 3, "sequence 8, expected 9", id="sync-seq"),
        pytest.param(2, h("00000003" "00000001"), 8, 3, "reserved", id="sync-reserved"),
        pytest.param(2, h("00000003" "00000000"), 8, 4, "SYNC of epoch 3 in epoch 4",
                     id="sync-old-epoch"),
        pytest.param(2, h("00000003" "00000000"), 8, 2, "SYNC of epoch 3 in epoch 2",
                     id="sync-future-epoch"),
        pytest.param(4, h("00000003" "00000000"), 7, 4, "sequence 8, expected 7", id="end-seq"),
        pytest.param(4, h("00000003" "00000001"), 8, 4, "reserved", id="end-reserved"),
        pytest.param(4, h("00000003" "00000000"), 8, 3, "END names epoch 3, expected 2",
                     id="end-current-epoch"),
    ],
)
def test_sync_end_refused(kind: int, body: bytes, sequence: int, epoch: int,
                          match: str) -> None:
    header = decode_packet_header(common_header(kind, 0, 8, 0, 8))
    with pytest.raises(RemoteProtocolError, match=match):
        decode_packet(header, body, LIMITS, sequence, epoch)


@pytest.mark.parametrize(
    ("runs", "payload_length", "kwargs"),
    [
        pytest.param([], 0, {}, id="no-runs"),
        pytest.param([(0, 1, False)] * 4097, 0, {}, id="too-many-runs"),
        pytest.param([(0, 0, False)], 0, {}, id="empty-run"),
        pytest.param([(4, 1, False), (0, 1, False)], 8192, {}, id="unsorted"),
        pytest.param([(0, 2, False), (1, 1, False)], 12288, {}, id="overlap"),
        pytest.param([(0, 4097, True)], 0, {}, id="too-many-pages"),
        pytest.param([(0, 2, False)], 4096, {}, id="payload-mismatch"),
        pytest.param([(0, 1, False)], 4096, {"block_index": 65536}, id="block-index"),
        pytest.param([(0, 1, False)], 4096, {"sequence": -1}, id="sequence"),
        pytest.param([(0, 1, False)], 4096, {"epoch": 1 << 32}, id="epoch"),
        pytest.param([(1 << 32, 1, False)], 4096, {}, id="first-page"),
        pytest.param([(0, 1, False)], 1 << 32, {"codec": 9}, id="payload-length"),
    ],
)
def test_encode_ram_pages_refuses(runs: list[tuple[int, int, bool]], payload_length: int,
                                  kwargs: dict[str, int]) -> None:
    args = {"sequence": 0, "block_index": 0, "codec": 0, "epoch": 1} | kwargs
    with pytest.raises(LocalProtocolError):
        encode_ram_pages(args["sequence"], args["block_index"], args["codec"], args["epoch"],
                         runs, payload_length)


@pytest.mark.parametrize(("sequence", "epoch"), [(-1, 1), (1 << 32, 1), (0, 1 << 32)])
def test_encode_sync_end_refuse(sequence: int, epoch: int) -> None:
    with pytest.raises(LocalProtocolError):
        encode_sync(sequence, epoch)
    with pytest.raises(LocalProtocolError):
        encode_end(sequence, epoch)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"page_size": 8192},
        {"packet_pages": 0},
        {"packet_pages": 4097},
        {"block_pages": (0,)},
        {"block_pages": (1,) * 257},
        {"codec": 256},
    ],
)
def test_packet_limits_refuse(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"page_size": 4096, "packet_pages": 64, "block_pages": (8,)}
    with pytest.raises(LocalProtocolError):
        PacketLimits(**(args | kwargs))  # type: ignore[arg-type]


# ── the streaming packet decoder ──────────────────────────────────────────────

STREAM_LIMITS = PacketLimits(4096, 64, (16, 4), codec=9)
PAGE_A = b"A" * 4096
STREAM = [
    (encode_ram_pages(0, 0, 0, 1, [(0, 1, False), (1, 3, True)], 4096), PAGE_A),
    (encode_ram_pages(1, 1, 9, 1, [(0, 4, False)], 5), b"zzzzz"),
    (encode_sync(2, 1), b""),
    (encode_ram_pages(3, 0, 0, 2, [(15, 1, True)], 0), b""),
    (encode_sync(4, 2), b""),
    (encode_end(5, 2), b""),
]
STREAM_RECORDS = [
    RamPagesHeader(0, 0, 0, 1, run_columns((PageRun(0, 1, False), PageRun(1, 3, True))), 4096),
    RamPagesHeader(1, 1, 9, 1, run_columns((PageRun(0, 4, False),)), 5),
    SyncPacket(2, 1),
    RamPagesHeader(3, 0, 0, 2, run_columns((PageRun(15, 1, True),)), 0),
    SyncPacket(4, 2),
    EndPacket(5, 2),
]
STREAM_BYTES = b"".join(header + payload for header, payload in STREAM)


def drain(decoder: PacketDecoder) -> list[tuple[Packet, bytes]]:
    out = []
    while (item := decoder.next_packet()) is not NEED_DATA:
        out.append(item)
    return out


def test_packet_decoder_whole() -> None:
    decoder = PacketDecoder(STREAM_LIMITS)
    assert decoder.next_packet() is NEED_DATA
    decoder.receive_data(STREAM_BYTES)
    got = drain(decoder)
    assert got == [(record, payload) for record, (_, payload) in zip(STREAM_RECORDS, STREAM)]
    assert decoder.ended and decoder.sequence == 6 and decoder.epoch == 3
    decoder.receive_data(b"")
    assert decoder.next_packet() is NEED_DATA


def test_packet_decoder_byte_by_byte() -> None:
    decoder = PacketDecoder(STREAM_LIMITS)
    got = []
    for i in range(len(STREAM_BYTES)):
        decoder.receive_data(STREAM_BYTES[i:i + 1])
        got += drain(decoder)
    assert [record for record, _ in got] == STREAM_RECORDS
    assert got == [(record, payload) for record, (_, payload) in zip(STREAM_RECORDS, STREAM)]


def test_packet_decoder_end_without_sync() -> None:
    decoder = PacketDecoder(STREAM_LIMITS)
    decoder.receive_data(encode_end(0, 0))
    assert decoder.next_packet() == (EndPacket(0, 0), b"")


def test_packet_decoder_checks_header_before_payload() -> None:
    decoder = PacketDecoder(STREAM_LIMITS)
    # codec 0 with a payload of 1 GiB for one page: refused from the header alone
    decoder.receive_data(common_header(1, 0, 20, 1 << 30, 0) + ram_pages_body())
    with pytest.raises(RemoteProtocolError, match="payload_length"):
        decoder.next_packet()


def test_packet_decoder_epoch_rules() -> None:
    decoder = PacketDecoder(STREAM_LIMITS)
    decoder.receive_data(encode_sync(0, 1) + encode_ram_pages(1, 0, 0, 1, [(0, 1, True)], 0))
    assert decoder.next_packet() == (SyncPacket(0, 1), b"")
    with pytest.raises(RemoteProtocolError, match="epoch 1 in epoch 2"):
        decoder.next_packet()


def test_packet_decoder_sequence() -> None:
    decoder = PacketDecoder(STREAM_LIMITS)
    decoder.receive_data(encode_sync(0, 1) + encode_sync(0, 2))
    decoder.next_packet()
    with pytest.raises(RemoteProtocolError, match="sequence 0, expected 1"):
        decoder.next_packet()


def test_packet_decoder_bytes_after_end() -> None:
    decoder = PacketDecoder(STREAM_LIMITS)
    decoder.receive_data(encode_end(0, 0) + b"\0")
    decoder.next_packet()
    with pytest.raises(RemoteProtocolError, match="1 bytes after END"):
        decoder.next_packet()


def test_packet_decoder_closed_before_end() -> None:
    decoder = PacketDecoder(STREAM_LIMITS)
    decoder.receive_data(encode_sync(0, 1))
    decoder.receive_data(b"")
    decoder.next_packet()
    with pytest.raises(RemoteProtocolError, match="closed before END"):
        decoder.next_packet()


def test_packet_decoder_closed_inside_packet() -> None:
    decoder = PacketDecoder(STREAM_LIMITS)
    decoder.receive_data(STREAM_BYTES[:30])
    decoder.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="closed inside a packet"):
        decoder.next_packet()


def test_packet_decoder_no_data_after_close() -> None:
    decoder = PacketDecoder(STREAM_LIMITS)
    decoder.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        decoder.receive_data(b"x")


def test_packet_decoder_error_is_sticky() -> None:
    decoder = PacketDecoder(STREAM_LIMITS)
    decoder.receive_data(b"\0" * 16)
    with pytest.raises(RemoteProtocolError, match="magic"):
        decoder.next_packet()
    with pytest.raises(RemoteProtocolError, match="already failed"):
        decoder.next_packet()


# ── main-channel messages ─────────────────────────────────────────────────────

CONFIG = Config(
    page_size=4096, packet_pages=128, channel_count=4, zero_page_detection=True,
    codec="zstd", codec_level=-3,
    blocks=(BlockSpec("pc.ram", 1 << 30), BlockSpec("vga.vram", 16 << 20)),
    devices=(DeviceSpec("cpu", 0), DeviceSpec("virtio-net", 1)),
)
CONFIG_BODY = h(
    "00001000" "00000080" "0004" "0002" "00000001"      # page_size .. flags
    "04" "7a737464" "fffd"                              # "zstd", level -3
    "06" "70632e72616d" "0000000040000000"              # "pc.ram", 1 GiB
    "08" "7667612e7672616d" "0000000001000000"          # "vga.vram", 16 MiB
    "0002"                                              # n_devices
    "03" "637075" "00000000"                            # "cpu", 0
    "0a" "76697274696f2d6e6574" "00000001"         # "virtio-net", 1
)
MINIMAL_CONFIG = Config(4096, 1, 1, False, "none", 0, (BlockSpec("é", 4096),))
# Issue 16: a flags byte per device follows the list when CONFIG flag bit 1 is set
# ("gpu" iterative and asking for the switchover ack, "nic" not iterative).
ITERATIVE_CONFIG = Config(4096, 1, 1, False, "none", 0, (BlockSpec("é", 4096),),
                          (DeviceSpec("gpu", 0, True, True), DeviceSpec("nic", 1)))
LOCAL_CONFIG = Config(4096, 1, 1, True, "none", 0, (BlockSpec("a", 4096),), local=True)
# Issue 12: tracked verification (flag bit 3, PAGE_SUMS).
TRACKED_CONFIG = Config(4096, 1, 1, True, "none", 0, (BlockSpec("a", 4096),), page_sums=True)

MESSAGE_VECTORS = [
    pytest.param(CONFIG, "0001" "0000" "00000050" + CONFIG_BODY.hex(), id="config"),
    pytest.param(MINIMAL_CONFIG,
                 "0001" "0000" "00000024" "00001000" "00000001" "0001" "0001" "00000000"
                 "04" "6e6f6e65" "0000" "02" "c3a9" "0000000000001000" "0000",
                 id="config-minimal"),
    pytest.param(LOCAL_CONFIG,
                 "0001" "0000" "00000023" "00001000" "00000001" "0001" "0001" "00000005"
                 "04" "6e6f6e65" "0000" "01" "61" "0000000000001000" "0000",
                 id="config-local"),
    pytest.param(TRACKED_CONFIG,
                 "0001" "0000" "00000023" "00001000" "00000001" "0001" "0001" "00000009"
                 "04" "6e6f6e65" "0000" "01" "61" "0000000000001000" "0000",
                 id="config-page-sums"),
    pytest.param(RamHandover(("mfd-ab", "é")),
                 "0011" "0000" "0000000c" "0002" "06" "6d66642d6162" "02" "c3a9",
                 id="ram-handover"),
    pytest.param(ConfigAck(0, ""), "0002" "0000" "00000004" "0000" "0000", id="config-ack"),
    pytest.param(ConfigAck(1, "no"), "0002" "0000" "00000006" "0001" "0002" "6e6f",
                 id="config-ack-refused"),
    pytest.param(ChannelsReady(), "0003" "0000" "00000000", id="channels-ready"),
    pytest.param(SyncMarker(3), "0004" "0000" "00000004" "00000003", id="sync-marker"),
    pytest.param(Switchover(), "0005" "0000" "00000000", id="switchover"),
    pytest.param(Complete(5, False),
                 "0006" "0000" "00000008" "00000005" "00000000", id="complete"),
    pytest.param(Complete(5, True),
                 "0006" "0000" "00000008" "00000005" "00000001", id="complete-digests-follow"),
    pytest.param(Digests(1 << 20, b"\x11" * 16 + b"\x22" * 16),
                 "000b" "0000" "00000028" "00100000" "00000002"
                 + "11" * 16 + "22" * 16, id="digests"),
    pytest.param(DevicesDone((DeviceDone(3, 1000, b"\x33" * 32),)),
                 "000c" "0000" "0000002e" "0001" "00000003" "00000000000003e8" + "33" * 32,
                 id="devices-done"),
    pytest.param(DevicesDone(()), "000c" "0000" "00000002" "0000", id="devices-done-none"),
    pytest.param(Resumed(1500, 250000, Verification.EQUAL, ""),
                 "0007" "0000" "00000014" "00000000000005dc" "000000000003d090" "01" "01" "0000",
                 id="resumed"),
    pytest.param(Resumed(7, 0, Verification.NOT_CHECKED, "ré", running=False),
                 "0007" "0000" "00000017" "0000000000000007" "0000000000000000" "00" "00"
                 "0003" "72c3a9", id="resumed-detail-not-running"),
    pytest.param(Abort(AbortCode.FAILED, "disk full"),
                 "0008" "0000" "0000001c" "0002" "0e" "4d6967726174696f6e4572726f72"
                 "0009" "6469736b2066756c6c", id="abort"),
    pytest.param(Abort(1, "", "CancelledError"),
                 "0008" "0000" "00000013" "0001" "0e" "43616e63656c6c65644572726f72" "0000",
                 id="abort-cancelled"),
    pytest.param(Prepared(), "000d" "0000" "00000000", id="prepared"),
    pytest.param(Commit(), "000e" "0000" "00000000", id="commit"),
    pytest.param(Ping(0x0123456789ABCDEF), "0009" "0000" "00000008" "0123456789abcdef",
                 id="ping"),
    pytest.param(Pong(0x0123456789ABCDEF), "000a" "0000" "00000008" "0123456789abcdef",
                 id="pong"),
    pytest.param(ITERATIVE_CONFIG, "0001" "0000" "00000036" "00001000" "00000001" "0001" "0001"
                 "00000002" "04" "6e6f6e65" "0000" "02" "c3a9" "0000000000001000"
                 "0002" "03" "677075" "00000000" "03" "6e6963" "00000001" "03" "00",
                 id="config-iterative-devices"),
    pytest.param(LiveRound((3, 0), True), "000f" "0000" "0000000e" "00000001" "0002"
                 "00000003" "00000000", id="live-round"),
    pytest.param(DevicesLoaded((DeviceLoaded(3, 1000, 250),), True),
                 "0010" "0000" "0000001a" "00000001" "0001"
                 "00000003" "00000000000003e8" "00000000000000fa", id="devices-loaded-ack"),
]


@pytest.mark.parametrize(("message", "wire_hex"), MESSAGE_VECTORS)
def test_message_golden(message: Message, wire_hex: str) -> None:
    wire = h(wire_hex)
    assert encode_message(message) == wire
    decoder = MessageDecoder()
    decoder.receive_data(wire)
    assert decoder.next_message() == message
    assert decoder.next_message() is NEED_DATA


def test_message_decoder_byte_by_byte() -> None:
    wire = b"".join(h(param.values[1]) for param in MESSAGE_VECTORS)  # type: ignore[arg-type]
    decoder = MessageDecoder()
    got = []
    for i in range(len(wire)):
        decoder.receive_data(wire[i:i + 1])
        while (message := decoder.next_message()) is not NEED_DATA:
            got.append(message)
    assert got == [param.values[0] for param in MESSAGE_VECTORS]


def test_decoded_enums() -> None:
    decoder = MessageDecoder()
    decoder.receive_data(encode_message(Abort(2, "x")) + encode_message(Resumed(0, 0, 1)))
    abort, resumed = decoder.next_message(), decoder.next_message()
    assert isinstance(abort, Abort) and abort.code is AbortCode.FAILED
    assert isinstance(resumed, Resumed) and resumed.verified is Verification.EQUAL


def test_config_helpers() -> None:
    assert CONFIG.block_pages == (262144, 4096)
    assert ConfigAck(0).accepted and not ConfigAck(3, "why").accepted
    limits = packet_limits(CONFIG, codec=9)
    assert limits == PacketLimits(4096, 128, (262144, 4096), 9, None)
    # Local mode hands the RAM over: its channels' limits name no block, so no page is accepted.
    assert packet_limits(dataclasses.replace(CONFIG, local=True), codec=0).block_pages == ()


def message(type_: int, body: bytes, flags: int = 0, length: int | None = None) -> bytes:
    return struct.pack(">HHI", type_, flags, len(body) if length is None else length) + body


def decode_one(wire: bytes) -> object:
    decoder = MessageDecoder()
    decoder.receive_data(wire)
    return decoder.next_message()


def config_body(*, page_size: int = 4096, packet_pages: int = 128, channel_count: int = 4,
                n_blocks: int | None = None, flags: int = 1, codec: bytes = b"zstd",
                level: int = -3, blocks: tuple[tuple[bytes, int], ...] = ((b"pc.ram", 1 << 30),),
                n_devices: int | None = None,
                devices: tuple[tuple[bytes, int], ...] = ((b"cpu", 0),)) -> bytes:
    parts = [struct.pack(">IIHHI", page_size, packet_pages, channel_count,
                         len(blocks) if n_blocks is None else n_blocks, flags),
             struct.pack(">B", len(codec)), codec, struct.pack(">h", level)]
    for name, size in blocks:
        parts += [struct.pack(">B", len(name)), name, struct.pack(">Q", size)]
    parts.append(struct.pack(">H", len(devices) if n_devices is None else n_devices))
    for idstr, instance in devices:
        parts += [struct.pack(">B", len(idstr)), idstr, struct.pack(">I", instance)]
    return b"".join(parts)


def test_config_body_helper_matches_golden() -> None:
    assert config_body(blocks=((b"pc.ram", 1 << 30), (b"vga.vram", 16 << 20)),
                       devices=((b"cpu", 0), (b"virtio-net", 1))) == CONFIG_BODY


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        # header
        pytest.param(message(0, b""), "unknown message type 0", id="type-0"),
        pytest.param(message(18, b""), "unknown message type 18", id="type-18"),
        pytest.param(message(12, h("0002") + bytes(44)), "n_devices 2 disagrees", id="devices-done-short"),
        pytest.param(message(12, h("0001") + bytes(44)), "counts no chunk", id="devices-done-zero"),
        pytest.param(message(3, b"", flags=1), "flags must be 0", id="flags"),
        pytest.param(message(6, b"", length=MAX_MESSAGE_BODY + 1), "exceeds", id="over-16MiB"),
        pytest.param(message(9, b"\0" * 7), "PING body_length 7", id="short-fixed"),
        pytest.param(message(3, b"\0"), "CHANNELS_READY body_length 1", id="long-fixed"),
        pytest.param(message(2, b"\0" * 3), "CONFIG_ACK body_length 3", id="short-variable"),
        # bodies parsed exactly
        pytest.param(message(2, h("0000" "0001" "61" "62")), "1 trailing bytes",
                     id="trailing"),
        pytest.param(message(2, h("0000" "0005" "6162")), "truncated", id="truncated"),
        pytest.param(message(8, h("0002" "01" "41" "0002" "c328")), "not valid utf-8", id="utf-8"),
        pytest.param(message(2, h("0000" "0002" "eda080")), "not valid utf-8",
                     id="utf-8-surrogate"),
        # ABORT, RESUMED, COMPLETE, DIGESTS
        pytest.param(message(8, h("0000" "01" "41" "0000")), "unknown ABORT code 0", id="abort-code-0"),
        pytest.param(message(8, h("0003" "01" "41" "0000")), "unknown ABORT code 3", id="abort-code-3"),
        pytest.param(message(8, h("0002" "00" "000000")), "ABORT names no error class",
                     id="abort-no-class"),
        pytest.param(message(7, h("00" * 16 + "01" "02" "0000")), "RESUMED running 2",
                     id="resumed-running-2"),
        pytest.param(message(7, bytes(16) + h("03" "01" "0000")), "verified 3", id="verified"),
        # 2 was "different", never sent: a destination whose memory differs aborts
        # before PREPARED, so a committed migration is never reported unverified.
        pytest.param(message(7, bytes(16) + h("02" "01" "0000")), "verified 2", id="verified-2"),
        pytest.param(message(6, h("00000001" "00000002")), "unknown COMPLETE flags",
                     id="complete-flags"),
        pytest.param(message(6, h("00000001" "00000000" "00")), "COMPLETE body_length 9",
                     id="complete-long"),
        pytest.param(message(11, h("00000400" "00000002") + bytes(16)),
                     "n_digests 2 disagrees", id="digests-missing"),
        pytest.param(message(11, h("00000400" "ffffffff") + bytes(32)),
                     "n_digests 4294967295 disagrees", id="digests-huge"),
        pytest.param(message(11, h("00000000" "00000001") + bytes(16)),
                     "digest_chunk 0", id="digest-chunk-0"),
        pytest.param(message(11, h("00000400" "00000000")), "DIGESTS body_length 8",
                     id="no-digests"),
        # CONFIG
        pytest.param(message(1, config_body(page_size=8192)), "page_size 8192",
                     id="page-size"),
        pytest.param(message(1, config_body(packet_pages=0)), "packet_pages 0",
                     id="packet-pages-0"),
        pytest.param(message(1, config_body(packet_pages=4097)), "packet_pages 4097",
                     id="packet-pages-4097"),
        pytest.param(message(1, config_body(channel_count=0)), "channel_count 0",
                     id="channel-count-0"),
        pytest.param(message(1, config_body(channel_count=257)), "channel_count 257",
                     id="channel-count-257"),
        pytest.param(message(1, config_body(flags=16)), "unknown CONFIG flags", id="flags-16"),
        pytest.param(message(1, config_body(flags=4 | 8)), "PAGE_SUMS with LOCAL",
                     id="page-sums-local"),
        pytest.param(message(1, config_body(flags=0x80000001)), "unknown CONFIG flags",
                     id="flags-high"),
        pytest.param(message(1, config_body(codec=b"")), "codec name", id="codec-empty"),
        pytest.param(message(1, config_body(codec=b"zst\xc3\xa9")), "not valid ascii",
                     id="codec-ascii"),
        pytest.param(message(1, config_body(n_blocks=0, blocks=())), "n_blocks 0",
                     id="no-blocks"),
        pytest.param(message(1, config_body(n_blocks=257)), "n_blocks 257",
                     id="too-many-blocks"),
        pytest.param(message(1, config_body(n_blocks=2)), "truncated", id="missing-block"),
        pytest.param(message(1, config_body(blocks=((b"", 4096),))), "block name",
                     id="block-name-empty"),
        pytest.param(message(1, config_body(blocks=((b"\xff", 4096),))), "not valid utf-8",
                     id="block-name-utf-8"),
        pytest.param(message(1, config_body(blocks=((b"a", 0),))), "size 0", id="block-size-0"),
        pytest.param(message(1, config_body(blocks=((b"a", 4097),))), "size 4097",
                     id="block-size-unaligned"),
        pytest.param(message(1, config_body(blocks=((b"a", 1 << 63),))), "at most",
                     id="block-size-huge"),
        pytest.param(message(1, config_body(blocks=((b"a", 4096), (b"a", 8192)))),
                     "block names are not unique", id="block-names"),
        pytest.param(message(1, config_body(n_devices=1025)), "n_devices 1025",
                     id="too-many-devices"),
        pytest.param(message(1, config_body(devices=((b"cpu", 0), (b"cpu", 0)))),
                     "two devices share an", id="devices"),
        pytest.param(message(1, config_body(n_devices=2)), "truncated", id="missing-device"),
        pytest.param(message(1, config_body() + b"\0"), "1 trailing bytes",
                     id="config-trailing"),
        # RAM_HANDOVER
        pytest.param(message(17, h("0000" "0000")), "n_segments 0", id="handover-none"),
        pytest.param(message(17, h("0101") + bytes(257)), "n_segments 257", id="handover-too-many"),
        pytest.param(message(17, h("0002" "01" "61")), "truncated", id="handover-missing-name"),
        pytest.param(message(17, h("0002" "00" "01" "61")), "empty segment", id="handover-empty-name"),
        pytest.param(message(17, h("0001" "01" "ff")), "not valid utf-8", id="handover-utf-8"),
    ],
)
def test_message_refused(wire: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        decode_one(wire)


def test_message_header_checked_before_body() -> None:
    decoder = MessageDecoder()
    decoder.receive_data(message(6, b"", length=MAX_MESSAGE_BODY + 1))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        decoder.next_message()


def test_message_devices_may_share_idstr() -> None:
    config = decode_one(message(1, config_body(devices=((b"cpu", 0), (b"cpu", 1), (b"", 0)))))
    assert isinstance(config, Config)
    assert config.devices == (DeviceSpec("cpu", 0), DeviceSpec("cpu", 1), DeviceSpec("", 0))


def test_message_decoder_close() -> None:
    decoder = MessageDecoder()
    decoder.receive_data(encode_message(Switchover()) + b"\0")
    decoder.receive_data(b"")
    assert decoder.next_message() == Switchover()
    with pytest.raises(RemoteProtocolError, match="closed inside a message"):
        decoder.next_message()
    assert not decoder.ended
    clean = MessageDecoder()
    assert not clean.ended
    clean.receive_data(b"")
    # The end between messages is no protocol error, and a codec raises no other:
    # it says the stream ended; its driver reports the closed connection.
    assert clean.next_message() is NEED_DATA and clean.ended
    with pytest.raises(LocalProtocolError):
        clean.receive_data(b"x")


def test_message_decoder_error_is_sticky() -> None:
    decoder = MessageDecoder()
    decoder.receive_data(message(99, b"") + encode_message(Switchover()))
    with pytest.raises(RemoteProtocolError, match="unknown message type"):
        decoder.next_message()
    with pytest.raises(RemoteProtocolError, match="already failed"):
        decoder.next_message()


def _config(**changes: object) -> Config:
    fields = {name: getattr(CONFIG, name) for name in CONFIG.__dataclass_fields__}
    return Config(**(fields | changes))


@pytest.mark.parametrize(
    "record",
    [
        pytest.param(object(), id="not-a-message"),
        pytest.param(_config(page_size=8192), id="config-page-size"),
        pytest.param(_config(packet_pages=0), id="config-packet-pages"),
        pytest.param(_config(channel_count=300), id="config-channels"),
        pytest.param(_config(codec="zstdé"), id="config-codec-ascii"),
        pytest.param(_config(codec="z" * 256), id="config-codec-long"),
        pytest.param(_config(codec_level=40000), id="config-level"),
        pytest.param(_config(blocks=()), id="config-no-blocks"),
        pytest.param(_config(blocks=(BlockSpec("a", 4096),) * 2), id="config-block-names"),
        pytest.param(_config(blocks=(BlockSpec("a", 100),)), id="config-block-size"),
        pytest.param(_config(blocks=(BlockSpec("é" * 128, 4096),)), id="config-block-name-long"),
        pytest.param(_config(blocks=(BlockSpec("\udc80", 4096),)), id="config-surrogate"),
        pytest.param(_config(devices=(DeviceSpec("x", 0),) * 2), id="config-devices"),
        pytest.param(_config(devices=(DeviceSpec("x", -1),)), id="config-instance"),
        pytest.param(_config(devices=(DeviceSpec("x" * 256, 0),)), id="config-idstr"),
        pytest.param(_config(devices=(DeviceSpec("\udc80", 0),)), id="config-idstr-surrogate"),
        pytest.param(_config(devices=tuple(DeviceSpec("d", i) for i in range(1025))),
                     id="config-too-many-devices"),
        pytest.param(ConfigAck(70000, ""), id="ack-status"),
        pytest.param(ConfigAck(1, "x" * 65536), id="ack-reason-long"),
        pytest.param(ConfigAck(1, "\ud800"), id="ack-surrogate"),
        pytest.param(SyncMarker(-1), id="sync-marker"),
        pytest.param(Complete(-1), id="complete-epoch"),
        pytest.param(Digests(0, bytes(16)), id="digests-chunk-0"),
        pytest.param(Digests(4096, b""), id="digests-none"),
        pytest.param(Digests(4096, bytes(31)), id="digests-digest-size"),
        pytest.param(Resumed(0, 0, 3), id="resumed-verified"),
        pytest.param(Resumed(0, 0, 2), id="resumed-verified-2"),
        pytest.param(Resumed(-1, 0, 0), id="resumed-downtime"),
        pytest.param(Abort(0, "x"), id="abort-code"),
        pytest.param(Ping(1 << 64), id="ping"),
        pytest.param(Pong(-1), id="pong"),
    ],
)
def test_encode_message_refuses(record: Message) -> None:
    with pytest.raises(LocalProtocolError):
        encode_message(record)


def test_encode_message_refuses_body_over_16MiB() -> None:
    digests = bytes(MAX_MESSAGE_BODY // 16 * 16)  # 8 bytes of fields tip it over
    with pytest.raises(LocalProtocolError, match="exceeds"):
        encode_message(Digests(4096, digests))
    # MAX_DIGESTS_BYTES, the most a migration sends (engine/verify.py falls back
    # above it), does fit.
    encode_message(Digests(4096, bytes(MAX_DIGESTS_BYTES)))
