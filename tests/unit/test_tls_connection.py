"""TLS pieces: TlsConnection over a real TLS session on a socket pair (certificates
made fresh), and the destination's check of its source's certificate name."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.link import TlsConnection, _same_name
from tests.certs import NoOpenssl, make_pki


@pytest.fixture
def tls_pair(tmp_path: Path) -> Iterator[tuple[ssl.SSLSocket, ssl.SSLSocket]]:
    """(server, client): a finished TLS 1.3 handshake over a socket pair."""
    try:
        pki = make_pki(tmp_path)
    except NoOpenssl as exc:
        pytest.skip(str(exc))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki.dir / "dest.pem", pki.dir / "dest.key")
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(pki.dir / "ca.pem")
    a, b = socket.socketpair()
    server = server_ctx.wrap_socket(a, server_side=True, do_handshake_on_connect=False)
    client = client_ctx.wrap_socket(b, server_hostname="localhost", do_handshake_on_connect=False)
    with server, client:
        handshake = threading.Thread(target=client.do_handshake)
        handshake.start()
        server.do_handshake()
        handshake.join(10)
        yield server, client


def test_peek_at_part_of_a_record_is_no_byte_yet(tls_pair: tuple[ssl.SSLSocket, ssl.SSLSocket]) -> None:
    # A destination channel peeks after END for bytes the source should not have
    # sent; the first bytes of a record (its header) are not a byte of data yet.
    server, client = tls_pair
    client.sendall(b"x")
    assert server.recv(1) == b"x"
    socket.socket.send(client, b"\x17\x03\x03")  # a record's header, raw, and no more
    assert TlsConnection(server, "peer", "source").peek() is False


IP, DNS = "IP Address", "DNS"


@pytest.mark.parametrize(("name", "wanted", "same"), [
    ((IP, "10.77.0.2"), "10.77.0.2", True),
    ((IP, "fd00:0:0::2"), "fd00::2", True),          # an address in any spelling
    ((DNS, "10.77.0.2"), "10.77.0.2", False),         # an address only in an IP name,
    ((IP, "10.77.0.2"), "host.test", False),          # as OpenSSL checks a server's
    ((DNS, "Source.Test"), "source.test", True),      # a DNS name in any case
    ((DNS, "*.example"), "src.example", True),        # a wildcard: one label
    ((DNS, "*.example"), "a.src.example", False),
    ((DNS, "*.example"), "example", False),
    ((DNS, "src.*.example"), "src.x.example", False),
], ids=lambda v: v if isinstance(v, str) else None)
def test_the_destination_finds_a_name_as_openssl_does(name: tuple[str, str], wanted: str, same: bool) -> None:
    assert _same_name(name, wanted) is same
