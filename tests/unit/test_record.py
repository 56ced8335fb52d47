"""MAC records (engine/wire/record.py, docs/wire-format.md §1.1): golden values
from the specification, and the record stream over a real socket pair
(engine/link.py RecordConnection): a flipped bit, a dropped, repeated or
reordered record, and a record moved to another connection all fail their tag."""

from __future__ import annotations

import hashlib
import hmac
import os
import signal
import socket
import struct
import threading
import time

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from engine.errors import IntegrityError, LocalProtocolError, TransportClosedError, TransportError
from engine.link import RecordConnection
from engine.wire import record

SESSION = bytes(range(32))
# `printf "\0\0\0\0\0\0\0\5\0\0\0\4MFDP" | openssl mac -cipher AES-256-GCM -macopt hexkey:<key> -macopt
# hexiv:000000000000000000000005 GMAC`, key = key(3, TO_DESTINATION)
GOLDEN_TAG = "4efff5cab3cddc3646651f139aa310a0"


def key(connection: int, direction: record.Direction) -> bytes:
    return record.record_key(SESSION, connection, direction)


def gmac(key: bytes, sequence: int, data: bytes) -> bytes:
    """AES-256-GMAC as the specification says, from the `cryptography` primitives
    (not the codec): GCM, nonce 0 u32 ‖ sequence u64, no plaintext, the associated
    data sequence u64 ‖ length u32 ‖ data."""
    encryptor = Cipher(algorithms.AES(key), modes.GCM(bytes(4) + sequence.to_bytes(8, "big"))).encryptor()
    encryptor.authenticate_additional_data(sequence.to_bytes(8, "big") + len(data).to_bytes(4, "big") + data)
    encryptor.finalize()
    return encryptor.tag


def test_key_and_tag_are_what_the_specification_says() -> None:
    label = b"multifd record " + (3).to_bytes(2, "big") + b"\x01"
    assert key(3, record.Direction.TO_DESTINATION) == hmac.new(SESSION, label, hashlib.sha256).digest()
    k = key(3, record.Direction.TO_DESTINATION)
    assert record.TAG_SIZE == 16
    # small records (gathered, tagged in one call) and large ones (streamed), fed in
    # pieces, on either side of the size where the receiver switches
    sizes = (4, 32 << 10, (32 << 10) + 1, 256 << 10)
    for sequence, size in zip((5, 1, 2, 1 << 40), sizes):
        data = (bytes(range(256)) * (size // 256 + 1))[:size]
        tag = record.start_tag(record.RecordKey(k), sequence, len(data))
        for at in range(0, len(data), 10000):
            tag.update(memoryview(data)[at:at + 10000])
        assert tag.digest() == gmac(k, sequence, data)
        one_call = record.RecordKey(k).tag(sequence, record.encode_prefix(sequence, len(data)) + data)
        assert one_call == gmac(k, sequence, data)
    # a fixed vector, so a change in the primitives' use would show too
    assert gmac(k, 5, b"MFDP").hex() == GOLDEN_TAG
    assert record.start_tag(record.RecordKey(k), 5, 4).digest() != bytes.fromhex(GOLDEN_TAG)  # no data fed
    # every connection and direction has its own key
    keys = {key(c, d) for c in (0, 1, record.MAIN_CONNECTION) for d in record.Direction}
    assert len(keys) == 6
    with pytest.raises(LocalProtocolError):
        record.record_key(SESSION, 1 << 16, record.Direction.TO_SOURCE)
    with pytest.raises(LocalProtocolError, match="32 bytes"):
        record.RecordKey(bytes(16))  # AES-128 would run, and be a different tag


def test_header_lengths() -> None:
    assert record.encode_header(1) == b"\0\0\0\1"
    assert record.decode_header(record.encode_header(record.MAX_RECORD)) == record.MAX_RECORD
    for bad in (0, record.MAX_RECORD + 1):
        with pytest.raises(IntegrityError, match="outside"):
            record.decode_header(struct.pack(">I", bad))
        with pytest.raises(LocalProtocolError):
            record.encode_header(bad)


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    out, back = key(1, record.Direction.TO_DESTINATION), key(1, record.Direction.TO_SOURCE)
    sender, receiver = RecordConnection(a, "dst", out, back), RecordConnection(b, "src", back, out)
    yield sender, receiver, a, b
    a.close()
    b.close()


def test_round_trip_scatters_into_the_views(pair) -> None:
    sender, receiver, _, _ = pair
    pages = bytes(range(256)) * 16 * 300  # 1.2 MB: two data records after the header's
    writer = threading.Thread(target=sender.send_buffers,
                              args=([b"HEADER", memoryview(pages)[:4096], memoryview(pages)[4096:]],))
    writer.start()
    assert receiver.recv_exact_or_eof(6) == b"HEADER"
    into = bytearray(len(pages))
    receiver.recv_into_buffers([memoryview(into)[:100], memoryview(into)[100:]])
    writer.join()
    assert into == pages
    sender.send_all(b"bye")
    assert receiver.recv_some() == b"bye"
    sender.sock.shutdown(socket.SHUT_WR)
    assert receiver.recv_exact_or_eof(4) is None
    assert receiver.recv_some() == b""


def raw_records(sender: RecordConnection, peer: socket.socket, *datas: bytes) -> list[bytes]:
    """The records `sender` writes for each of `datas`, as bytes on the wire."""
    out = []
    for data in datas:
        sender.send_all(data)
        size = record.HEADER_SIZE + len(data) + record.TAG_SIZE
        out.append(peer.recv(size, socket.MSG_WAITALL))
    return out


@pytest.mark.parametrize("change", ["flip-data", "flip-tag", "flip-length", "drop", "repeat", "reorder",
                                    "other-connection"])
def test_a_changed_stream_fails_its_tag(change: str) -> None:
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    try:
        out, back = key(1, record.Direction.TO_DESTINATION), key(1, record.Direction.TO_SOURCE)
        sender = RecordConnection(a, "dst", out, back)
        other = RecordConnection(c, "dst", key(2, record.Direction.TO_DESTINATION), back)
        first, second = raw_records(sender, b, b"first record", b"second record")
        wire = first + second
        if change == "flip-data":
            wire = wire[:6] + bytes([wire[6] ^ 1]) + wire[7:]
        elif change == "flip-tag":
            wire = first[:-1] + bytes([first[-1] ^ 0x80]) + second
        elif change == "flip-length":
            wire = bytes([0, 0, 0, first[3] ^ 1]) + first[4:] + second
        elif change == "drop":
            wire = second
        elif change == "repeat":
            wire = first + first
        elif change == "reorder":
            wire = second + first
        else:
            (moved,) = raw_records(other, d, b"first record")
            wire = moved + second
        feed, receiver_sock = socket.socketpair()
        with feed, receiver_sock:
            feed.sendall(wire)
            feed.shutdown(socket.SHUT_WR)
            receiver = RecordConnection(receiver_sock, "src", back, out)
            with pytest.raises((IntegrityError, TransportClosedError)) as caught:
                receiver.recv_some()
                receiver.recv_some()
            if change != "flip-length":  # a longer length may leave the stream short
                assert caught.type is IntegrityError
    finally:
        for sock in (a, b, c, d):
            sock.close()


def test_a_short_read_hands_on_nothing_before_its_record_checked() -> None:
    """A packet's headers are read in two steps (the common header, then the
    kind's): the first bytes of a record are handed on only once the whole
    record's tag checked (docs/wire-format.md §1.1), so a flipped header byte is
    an IntegrityError, not a malformed packet; the record's rest comes next."""
    out, back = key(1, record.Direction.TO_DESTINATION), key(1, record.Direction.TO_SOURCE)
    a, b = socket.socketpair()
    try:
        sender = RecordConnection(a, "dst", out, back)
        (headers,) = raw_records(sender, b, b"COMMON16BYTES!!!" + b"kind header")
        for wire, intact in ((headers, True), (headers[:5] + bytes([headers[5] ^ 1]) + headers[6:], False)):
            feed, receiver_sock = socket.socketpair()
            with feed, receiver_sock:
                feed.sendall(wire)
                feed.shutdown(socket.SHUT_WR)
                receiver = RecordConnection(receiver_sock, "src", back, out)
                if not intact:
                    with pytest.raises(IntegrityError):
                        receiver.recv_exact_or_eof(16)
                    continue
                assert receiver.recv_exact_or_eof(16) == b"COMMON16BYTES!!!"
                assert receiver.pending() == len(b"kind header")  # checked, kept for the next read
                into = bytearray(4)
                receiver.recv_into_buffers([memoryview(into)])
                assert into == b"kind" and receiver.recv_exact_or_eof(7) == b" header"
                assert receiver.pending() == 0 and receiver.recv_exact_or_eof(1) is None
    finally:
        a.close()
        b.close()


def test_a_read_across_records_hands_on_each_only_once_checked(pair) -> None:
    """Headers that straddle two records: the rest of the first, kept from an earlier
    read, then the whole second record, tag checked, before any of it is handed on,
    in order."""
    sender, receiver, _, b = pair
    b.settimeout(10)  # a read that never ends fails instead
    sender.send_all(b"ABCDE")
    sender.send_all(b"FGHIJKLMNOPQ")
    assert receiver.recv_exact_or_eof(3) == b"ABC"
    assert receiver.recv_exact_or_eof(4) == b"DEFG"
    assert receiver.pending() == len(b"HIJKLMNOPQ")  # the second record, whole and checked
    assert receiver.recv_exact_or_eof(10) == b"HIJKLMNOPQ"


# -- the staging buffer, kept for the process's next connection (engine/link.py) --


def test_a_closed_connection_hands_its_staging_buffer_to_the_next_one() -> None:
    import engine.link as link

    out, back = key(1, record.Direction.TO_DESTINATION), key(1, record.Direction.TO_SOURCE)
    link.warm_up_records()  # as a channel process's preload does: one buffer ready
    with link._spare_lock:
        ready = list(link._spare_stages)
    assert ready
    a, b = socket.socketpair()
    first = RecordConnection(a, "dst", out, back)
    assert any(first._stage is stage for stage in ready)  # the warm-up's buffer, not a new one
    used = first._stage
    first.send_all(b"one")
    first.close()
    c, d = socket.socketpair()
    second = RecordConnection(c, "dst", out, back)
    receiver = RecordConnection(d, "src", back, out)
    try:
        assert id(second._stage) == id(used)  # the closed connection's buffer serves again
        second.send_all(b"again")  # ... and tags right: a fresh stream from sequence 0
        assert receiver.recv_exact_or_eof(5) == b"again"
        # The closed one no longer holds it: a send there fails as a closed socket's
        # would, and writes nothing into a buffer that is another connection's now.
        with pytest.raises(TransportError):
            first.send_all(b"late")
        assert bytes(used[record.PREFIX_SIZE:record.PREFIX_SIZE + 5]) == b"again"
    finally:
        second.close()
        receiver.close()
        b.close()


def test_a_child_forked_while_a_thread_holds_the_buffer_pool_starts_with_its_own() -> None:
    """A fork copies the pool's lock as it is: held by another thread, it would stay
    held in the child for ever.  The child gets a fresh lock and no spares (its
    parent's are shared copy-on-write), and takes and gives buffers as usual."""
    import engine.link as link

    link.warm_up_records()
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with link._spare_lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        pid = os.fork()
        if pid == 0:  # the child: any failure or hang shows in its exit status
            try:
                inherited = len(link._spare_stages)
                stage = link._take_stage()
                link._give_stage(stage)
                os._exit(0 if inherited == 0 and len(stage) == link._STAGE_SIZE
                         and link._take_stage() is stage else 1)
            except BaseException:
                os._exit(2)
    finally:
        release.set()
        holder.join()
    deadline = time.monotonic() + 10
    while (status := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    if status[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung on the buffer pool's lock")
    assert os.waitstatus_to_exitcode(status[1]) == 0
