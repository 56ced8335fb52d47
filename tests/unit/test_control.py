"""Control messages between a main process and its channels (engine/channel.py).

Real SOCK_SEQPACKET socket pairs from :func:`control_pair`; the raw-byte cases
are packed here with ``struct``, not with :func:`post`.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest

from engine.channel import CONTROL_SIZE, ControlMessage, ControlOp, control_pair, post, read_control
from engine.errors import LocalProtocolError, TransportClosedError

pytestmark = pytest.mark.usefixtures("no_leaks")

U8_MAX = 2**8 - 1
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    main, channel = control_pair()
    yield main, channel
    main.close()
    channel.close()


def test_control_pair_is_seqpacket_unix(pair: tuple[socket.socket, socket.socket]) -> None:
    for sock in pair:
        assert sock.family == socket.AF_UNIX
        assert sock.type == socket.SOCK_SEQPACKET


def test_control_size_and_byte_layout(pair: tuple[socket.socket, socket.socket]) -> None:
    """op (1) | kind (1) | reserved (2) | a (4, big-endian) | b (8, big-endian)."""
    assert CONTROL_SIZE == 16
    main, channel = pair
    post(main, ControlOp.DELIVERED, a=0x01020304, b=0x05060708090A0B0C, kind=0x0D)
    assert channel.recv(64) == bytes.fromhex("080d0000" "01020304" "05060708090a0b0c")


@pytest.mark.parametrize("op", list(ControlOp), ids=[op.name for op in ControlOp])
@pytest.mark.parametrize(
    ("a", "b", "kind"),
    [(0, 0, 0), (U32_MAX, U64_MAX, U8_MAX), (1, 2**63, 1)],
    ids=["zero", "max", "mixed"],
)
def test_every_op_round_trips(
    pair: tuple[socket.socket, socket.socket], op: ControlOp, a: int, b: int, kind: int
) -> None:
    main, channel = pair
    post(main, op, a, b, kind)
    message = read_control(channel)
    assert message == ControlMessage(op, a, b, kind)
    assert message is not None and message.op is op
    # and the other way
    post(channel, op, a=a, b=b, kind=kind)
    assert read_control(main, wait=False) == ControlMessage(op, a, b, kind)


def test_defaults_are_zero(pair: tuple[socket.socket, socket.socket]) -> None:
    main, channel = pair
    post(main, ControlOp.QUIT)
    assert read_control(channel) == ControlMessage(ControlOp.QUIT, 0, 0, 0)


def test_op_values_are_the_protocol_numbers() -> None:
    assert {op.name: op.value for op in ControlOp} == {
        "JOB": 1, "SYNC": 2, "FINISH": 3, "IDLE": 4, "SYNCED": 5, "FINISHED": 6, "AT_SYNC": 7,
        "DELIVERED": 8, "ENDED": 9, "RELEASE": 10, "RETURN": 11, "QUIT": 12, "READY": 13, "BYE": 14,
    }


def test_messages_keep_their_boundaries(pair: tuple[socket.socket, socket.socket]) -> None:
    main, channel = pair
    post(main, ControlOp.JOB, 1)
    post(main, ControlOp.JOB, 2, kind=3)
    post(main, ControlOp.SYNC, 7, b=9)
    assert [read_control(channel) for _ in range(3)] == [
        ControlMessage(ControlOp.JOB, 1),
        ControlMessage(ControlOp.JOB, 2, kind=3),
        ControlMessage(ControlOp.SYNC, 7, 9),
    ]
    with pytest.raises(BlockingIOError):
        read_control(channel, wait=False)


def test_read_nowait_with_nothing_queued_raises_blocking_io_error(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    main, channel = pair
    with pytest.raises(BlockingIOError):
        read_control(channel, wait=False)
    assert channel.getblocking()  # the socket itself stays blocking
    post(main, ControlOp.READY)
    assert read_control(channel, wait=False) == ControlMessage(ControlOp.READY)


def test_read_returns_none_after_the_peer_closes() -> None:
    main, channel = control_pair()
    try:
        post(main, ControlOp.FINISHED)
        main.close()
        # queued messages are still delivered, then the close reads as None
        assert read_control(channel) == ControlMessage(ControlOp.FINISHED)
        assert read_control(channel) is None
        assert read_control(channel, wait=False) is None
    finally:
        main.close()
        channel.close()


def test_post_to_a_closed_peer_raises_transport_closed() -> None:
    main, channel = control_pair()
    try:
        channel.close()
        with pytest.raises(TransportClosedError) as info:
            post(main, ControlOp.JOB, 1)
        assert isinstance(info.value.__cause__, OSError)
    finally:
        main.close()
        channel.close()


def test_post_on_own_closed_socket_raises_transport_closed(pair: tuple[socket.socket, socket.socket]) -> None:
    main, _ = pair
    main.close()
    with pytest.raises(TransportClosedError):
        post(main, ControlOp.JOB, 1)


def test_read_on_own_closed_socket_raises_transport_closed(pair: tuple[socket.socket, socket.socket]) -> None:
    _, channel = pair
    channel.close()
    with pytest.raises(TransportClosedError):
        read_control(channel)


def test_unknown_op_raises_local_protocol_error(pair: tuple[socket.socket, socket.socket]) -> None:
    main, channel = pair
    for op in (0, 15, 255):
        main.send(struct.pack(">BBHIQ", op, 0, 0, 1, 2))
        with pytest.raises(LocalProtocolError, match=str(op)):
            read_control(channel)


def test_short_message_raises_local_protocol_error(pair: tuple[socket.socket, socket.socket]) -> None:
    main, channel = pair
    main.send(bytes([ControlOp.JOB]) * (CONTROL_SIZE - 1))
    with pytest.raises(LocalProtocolError, match="15 bytes"):
        read_control(channel)
    # the bad message is consumed; the next one reads normally
    post(main, ControlOp.JOB, 5)
    assert read_control(channel) == ControlMessage(ControlOp.JOB, 5)


def test_long_message_raises_local_protocol_error(pair: tuple[socket.socket, socket.socket]) -> None:
    main, channel = pair
    main.send(struct.pack(">BBHIQ", ControlOp.JOB, 0, 0, 1, 2) + b"\xff" * 8)
    with pytest.raises(LocalProtocolError):
        read_control(channel)
