"""What protects the bytes after the hellos: MAC records (the default) and TLS 1.3.

Real migrations over real sockets, with certificates made for the test
(tests/certs.py).  A relay flips one bit of a channel's stream after its
handshake: every protection mode must fail the migration before PREPARED,
leaving the source guest's RAM as it was and the destination uncommitted.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import subprocess
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from clients.guest import SyntheticGuest, check_incrementer
from engine import DestinationMigration, MigrationConfig, SourceMigration
from engine.config import DestinationConfig
from engine.errors import (
    ConfigError,
    IntegrityError,
    MigrationError,
    TlsError,
)
from engine.link import TlsConfig
from engine.sync import MigrationState, wait_readable
from engine.wire import packet, record
from tests.certs import NoOpenssl, Pki, make_pki
from tests.harness import SECRET, MiB, SlowLink, guest_ram, outcomes, same_memory
from tests.integration.test_cli import MULTIFD, _one_error_line

CONFIG = MigrationConfig(channels=2, packet_pages=256, verify=True, handshake_timeout_s=5.0)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    try:
        return make_pki(tmp_path_factory.mktemp("pki"))
    except NoOpenssl as exc:
        pytest.skip(str(exc))


def pair(pki: Pki | None, src_ram, dst_ram, *, source: str = "source", dest: str = "dest",
         source_ca: str = "ca", dest_ca: str = "ca", peer_name: str | None = None,
         dest_peer_name: str | None = "source.test", dest_any_peer: bool = False,
         config: MigrationConfig = CONFIG,
         dest_config: DestinationConfig | None = None, via: type[SlowLink] | None = None,
         guest: SyntheticGuest | None = None,
         **via_args) -> tuple[BaseException | None, BaseException | None, DestinationMigration]:
    """Run a migration src_ram → dst_ram (TLS when `pki` is given); both outcomes."""
    src_tls = pki.config(source, source_ca, peer_name) if pki else None
    dst_tls = replace(pki.config(dest, dest_ca, dest_peer_name), any_peer=dest_any_peer) if pki else None
    scheme = "tls" if pki else "tcp"
    destination = DestinationMigration(f"{scheme}://127.0.0.1:0", secret=SECRET, ram=dst_ram,
                                       config=dest_config or config.for_destination(), tls=dst_tls)
    destination.start()
    relay = via(destination.address.replace("tls://", "tcp://"), **via_args) if via else None
    try:
        to = relay.address.replace("tcp://", f"{scheme}://") if relay else destination.address
        source = SourceMigration(src_ram, to, secret=SECRET, config=config, tls=src_tls,
                                 pause_guest=guest.pause if guest else None,
                                 resume_guest=guest.resume if guest else None)
        source.start()
        src_error, dst_error = outcomes(source, destination)
    finally:
        destination.cancel("test over")
        with contextlib.suppress(MigrationError):
            destination.wait(10)
        if relay is not None:
            relay.close()
    return src_error, dst_error, destination


@pytest.mark.parametrize(("channels", "admits"), [
    pytest.param(1, "source.test", marks=pytest.mark.heavy), (2, "source.test"), (2, "any")])
def test_tls_migration_is_exact(pki: Pki, channels: int, admits: str) -> None:
    """A live guest: rounds, syncs and small packets cross TLS on every channel.
    The destination admits the source by its certificate's name, or (`any_peer`)
    any certificate the CA signed."""
    with guest_ram(8 * MiB) as src, guest_ram(8 * MiB, fill="zero") as dst:
        guest = SyntheticGuest(src, "incrementer", dirty_rate=16 * MiB)
        guest.start()
        try:
            src_error, dst_error, destination = pair(
                pki, src, dst, config=CONFIG.with_(channels=channels, packet_pages=64),
                dest_peer_name=None if admits == "any" else admits, dest_any_peer=admits == "any",
                guest=guest)
        finally:
            guest.stop()
        assert (src_error, dst_error) == (None, None)
        assert destination.result is not None and destination.result.rounds >= 1  # a sync crossed TLS
        assert check_incrementer(dst) == ""
        assert destination.state is MigrationState.COMPLETED
        assert same_memory(src, dst)


def test_a_bare_source_needs_the_destinations_consent() -> None:
    """MAC records are the default (every other migration test runs them); a bare
    source is refused unless the destination says integrity 'none' too (then it
    goes through: test_a_flipped_bit_after_the_handshake[none])."""
    with guest_ram(4 * MiB) as src, guest_ram(4 * MiB, fill="zero") as dst:
        src_error, dst_error, _ = pair(None, src, dst, config=CONFIG.with_(integrity="none"),
                                       dest_config=DestinationConfig())
        assert isinstance(dst_error, ConfigError) and "without integrity protection" in str(dst_error)
        assert isinstance(src_error, ConfigError) and "without integrity protection" in str(src_error)
        assert not dst.blocks[0].array().any()


def test_a_destination_that_allows_bare_links_still_speaks_mac_records_with_a_mac_source() -> None:
    """integrity 'none' on the destination allows a bare source; a source in MAC
    records (the default) gets MAC records back, on every channel."""
    with guest_ram(4 * MiB) as src, guest_ram(4 * MiB, fill="zero") as dst:
        src_error, dst_error, destination = pair(
            None, src, dst, dest_config=DestinationConfig(integrity="none"))
        assert (src_error, dst_error) == (None, None)
        assert destination.state is MigrationState.COMPLETED
        assert same_memory(src, dst)


def test_tls_and_bare_sides_refuse_each_other(pki: Pki) -> None:
    with guest_ram(4 * MiB) as src, guest_ram(4 * MiB, fill="zero") as dst:
        destination = DestinationMigration("tcp://127.0.0.1:0", secret=SECRET, ram=dst,
                                           config=CONFIG.for_destination())
        destination.start()
        to = destination.address.replace("tcp://", "tls://")
        source = SourceMigration(src, to, secret=SECRET, config=CONFIG, tls=pki.config("source"))
        source.start()
        src_error, dst_error = outcomes(source, destination)
        assert isinstance(dst_error, ConfigError) and "asks for TLS" in str(dst_error)
        assert isinstance(src_error, MigrationError)
    with pytest.raises(ConfigError, match="asks for TLS: give the certificate"):
        DestinationMigration("tls://127.0.0.1:0", secret=SECRET)


# Which side refuses, and what each side says (one line each).
REFUSALS = [
    pytest.param(dict(source="stranger"), "source's certificate was refused: unable to get local issuer",
                 "destination refused the handshake or this side's certificate", id="wrong-CA-source"),
    pytest.param(dict(dest_ca="other-ca"), "source's certificate was refused",
                 "destination refused", id="destination-trusts-another-CA"),
    pytest.param(dict(peer_name="elsewhere.test"), "refused the handshake",
                 "destination's certificate was refused: Hostname mismatch", id="wrong-destination-name"),
    pytest.param(dict(dest_peer_name="other.test"),
                 "source's certificate is for DNS:source.test, not other.test",
                 "source's certificate is for DNS:source.test, not other.test", id="wrong-source-name"),
    # a DNS name in another case is the same name, as the source's own check takes it
    pytest.param(dict(dest_peer_name="Source.TEST"), None, None, id="source-name-in-another-case"),
    pytest.param(dict(dest="expired"), "refused the handshake or this side's certificate",
                 "destination's certificate was refused: certificate has expired", id="expired"),
]


@pytest.mark.parametrize(("setup", "dst_says", "src_says"), REFUSALS)
def test_tls_refusals_are_one_line_on_both_sides(pki: Pki, setup: dict, dst_says: str | None,
                                                 src_says: str | None) -> None:
    with guest_ram(4 * MiB) as src, guest_ram(4 * MiB, fill="zero") as dst:
        src_error, dst_error, destination = pair(pki, src, dst, **setup)
        if dst_says is None:  # not a refusal
            assert src_error is None and dst_error is None and destination.committed, (src_error, dst_error)
            return
        assert isinstance(dst_error, MigrationError), dst_error
        assert isinstance(src_error, MigrationError), src_error
        assert dst_says in str(dst_error) and src_says in str(src_error), (dst_error, src_error)
        assert "\n" not in str(dst_error) and "\n" not in str(src_error)
        # a refused certificate is a TlsError on both sides (README, "Security")
        assert isinstance(dst_error, TlsError) and isinstance(src_error, TlsError), (dst_error, src_error)
        assert not destination.committed and not dst.blocks[0].array().any()


def test_a_client_without_a_certificate_is_refused(pki: Pki) -> None:
    """A peer that knows the secret but has no certificate: the destination says so,
    even one that admits any certificate its CA signed."""
    with guest_ram(4 * MiB, fill="zero") as dst:
        destination = DestinationMigration("tls://127.0.0.1:0", secret=SECRET, ram=dst,
                                           config=CONFIG.for_destination(),
                                           tls=replace(pki.config("dest"), any_peer=True))
        destination.start()
        port = int(destination.address.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            challenge = packet.decode_challenge(sock.recv(packet.CHALLENGE_SIZE, socket.MSG_WAITALL))
            sock.sendall(packet.encode_hello(packet.HelloRole.MAIN, uuid.uuid4(), 0, 1, SECRET,
                                             challenge, flags=packet.HelloFlags.TLS))
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.load_verify_locations(str(pki.dir / "ca.pem"))
            with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
                with pytest.raises((ssl.SSLError, OSError)):
                    tls.recv(80)  # TLS 1.3: the refusal comes after the client's handshake
        (dst_error,) = outcomes(destination)
        assert isinstance(dst_error, TlsError)
        assert "source sent no certificate" in str(dst_error)


class FlipLink(SlowLink):
    """A relay that flips bit 0 of byte `offset` of the source's stream on
    connection `number` (0 the main channel, 1 the first multifd channel)."""

    def __init__(self, target: str, number: int = 1, offset: int = 0) -> None:
        self.offset = offset
        self.flipped = False
        super().__init__(target, slow=number, piece=1 << 20, pause=0.0)

    def _relay(self, src: socket.socket, dst: socket.socket, slow: bool) -> None:
        if not slow:
            return super()._relay(src, dst, False)
        seen = 0
        try:
            while data := src.recv(1 << 20):
                if seen <= self.offset < seen + len(data):
                    data = bytearray(data)
                    data[self.offset - seen] ^= 1
                    self.flipped = True
                seen += len(data)
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


# In a page's bytes, well after the channel's hello (80) and any TLS handshake.
FLIP_AT = 3 * MiB + 12345


@pytest.mark.parametrize(("mode", "number", "offset"), [
    pytest.param("mac", 1, FLIP_AT, id="mac"),
    pytest.param("mac", 0, packet.HELLO_SIZE + 20, id="mac-main-channel"),  # inside CONFIG
    # the first packet's magic: its headers' record is checked before they are read
    pytest.param("mac", 1, packet.HELLO_SIZE + record.HEADER_SIZE, id="mac-packet-header"),
    pytest.param("tls", 1, FLIP_AT, id="tls"),
    pytest.param("none", 1, FLIP_AT, id="none"),
])
def test_a_flipped_bit_after_the_handshake(pki: Pki, mode: str, number: int, offset: int) -> None:
    """MAC and TLS: the migration fails before PREPARED, nothing committed, the
    source's RAM untouched.  Bare ("none"): it goes through, and only the
    digest check catches it: what the modes exist for."""
    config = CONFIG.with_(channels=1, integrity="mac" if mode == "tls" else mode)
    with guest_ram(8 * MiB) as src, guest_ram(8 * MiB, fill="zero") as dst:
        before = src.blocks[0].array().tobytes()
        src_error, dst_error, destination = pair(
            pki if mode == "tls" else None, src, dst, config=config, via=FlipLink, number=number,
            offset=offset)
        assert src.blocks[0].array().tobytes() == before
        assert not destination.committed
        if mode == "mac":
            assert isinstance(dst_error, IntegrityError), dst_error
            assert "failed its MAC" in str(dst_error)
        elif mode == "tls":
            assert isinstance(dst_error, TlsError), dst_error
            # Tampering, named as such on both sides: no certificate to blame.
            assert "certificate" not in f"{src_error} {dst_error}", (src_error, dst_error)
        else:
            assert "destination memory differs" in str(dst_error), dst_error
        assert isinstance(src_error, MigrationError)
        assert type(src_error) is type(dst_error) or "destination" in str(src_error)


def test_tls_settings_that_cannot_work_are_refused_up_front(pki: Pki, tmp_path: Path) -> None:
    """Before anything is made (the leak check holds): a missing file, tls:// without
    files, TLS over unix:// without a name to check, a destination told neither
    which source to admit nor to admit any, any_peer on a source, a name and any_peer
    together (on either side: the same message)."""
    missing = TlsConfig(str(tmp_path / "none.pem"), str(tmp_path / "none.key"), str(tmp_path / "ca.pem"))
    with guest_ram(1 * MiB) as src:
        with pytest.raises(ConfigError, match="certificate file"):
            SourceMigration(src, "tcp://127.0.0.1:1", secret=SECRET, tls=missing)
        with pytest.raises(ConfigError, match="asks for TLS: give the certificate"):
            SourceMigration(src, "tls://127.0.0.1:1", secret=SECRET)
        with pytest.raises(ConfigError, match="no host name to check"):
            SourceMigration(src, "unix:///tmp/x.sock", secret=SECRET, tls=pki.config("source"))
        with pytest.raises(ConfigError, match="any_peer .--tls-any-peer. is for the destination"):
            SourceMigration(src, "tls://127.0.0.1:1", secret=SECRET,
                            tls=replace(pki.config("source"), any_peer=True))
        with pytest.raises(ConfigError, match=r"TLS: give either .* not both"):
            SourceMigration(src, "tls://127.0.0.1:1", secret=SECRET,
                            tls=replace(pki.config("source", peer_name="dest.test"), any_peer=True))
    with pytest.raises(ConfigError, match="certificate file"):
        DestinationMigration("tcp://127.0.0.1:0", secret=SECRET, tls=missing)
    # A key with a passphrase: one line, never OpenSSL's prompt on the terminal.
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(["openssl", "pkey", "-in", pki.dir / "dest.key", "-out", encrypted, "-aes256",
                    "-passout", "pass:hunter2"], check=True, capture_output=True, timeout=30)
    with pytest.raises(ConfigError, match=f"TLS key file '{encrypted}' is encrypted: give it unencrypted"):
        DestinationMigration("tls://127.0.0.1:0", secret=SECRET,
                             tls=replace(pki.config("dest", peer_name="source.test"), key=str(encrypted)))
    with pytest.raises(ConfigError, match=r"name the source whose certificate it admits .* --tls-any-peer"):
        DestinationMigration("tls://127.0.0.1:0", secret=SECRET, tls=pki.config("dest"))
    with pytest.raises(ConfigError, match=r"TLS: give either .* not both"):
        DestinationMigration("tls://127.0.0.1:0", secret=SECRET,
                             tls=replace(pki.config("dest", peer_name="source.test"), any_peer=True))


def test_cli_name_flags_need_tls_and_any_peer_is_listen_only(pki: Pki) -> None:
    """A certificate-name flag without the TLS files would be no check at all: one
    line, not a silent plain link.  --tls-any-peer is not offered on `migrate`."""
    env = {**os.environ, "MULTIFD_SECRET": "s3cret"}
    for flags in (["--tls-peer-name", "source.test"], ["--tls-any-peer"]):
        listen = subprocess.run([*MULTIFD, "listen", "--address", "tcp://127.0.0.1:0",
                                 "--accept-timeout", "2", *flags],  # (the bug: it listens)
                                capture_output=True, text=True, env=env, timeout=60)
        assert listen.returncode == 1 and listen.stdout == ""
        assert f"{flags[0]} is for TLS: give --tls-cert" in _one_error_line(listen.stderr)
    source = subprocess.run([*MULTIFD, "migrate", "--to", "tcp://127.0.0.1:1", "--ram", "4M",
                             "--tls-peer-name", "dest.test"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert source.returncode == 1
    assert "--tls-peer-name is for TLS: give --tls-cert" in _one_error_line(source.stderr)
    offered = subprocess.run([*MULTIFD, "migrate", "--help"], capture_output=True, text=True, timeout=60)
    assert offered.returncode == 0 and "--tls-peer-name" in offered.stdout
    assert "--tls-any-peer" not in offered.stdout


def test_cli_tls_refusal_is_one_line_on_both_sides(pki: Pki) -> None:
    """`multifd listen` / `multifd migrate` over tls:// where the source expects
    another name: each side exits 1 with one line that says TLS, no traceback.
    A `listen` told neither which source to admit nor --tls-any-peer: one line."""
    env = {**os.environ, "MULTIFD_SECRET": "s3cret"}
    files = ["--tls-cert", str(pki.dir / "dest.pem"), "--tls-key", str(pki.dir / "dest.key"),
             "--tls-ca", str(pki.dir / "ca.pem")]
    unnamed = subprocess.run([*MULTIFD, "listen", "--address", "tls://127.0.0.1:0", *files],
                             capture_output=True, text=True, env=env, timeout=60)
    assert unnamed.returncode == 1 and unnamed.stdout == ""
    assert "--tls-peer-name NAME), or accept any" in _one_error_line(unnamed.stderr)
    listen = subprocess.Popen(
        [*MULTIFD, "listen", "--address", "tls://127.0.0.1:0", "--accept-timeout", "30",
         *files, "--tls-any-peer"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert listen.stdout is not None
        line = listen.stdout.readline() if wait_readable([listen.stdout], 30) else ""
        assert line.startswith("LISTENING tls://127.0.0.1:"), line
        source = subprocess.run(
            [*MULTIFD, "migrate", "--to", line.split()[1], "--ram", "4M", "--channels", "2",
             "--tls-cert", str(pki.dir / "source.pem"), "--tls-key", str(pki.dir / "source.key"),
             "--tls-ca", str(pki.dir / "ca.pem"), "--tls-peer-name", "elsewhere.test"],
            capture_output=True, text=True, env=env, timeout=60)
        _, listen_err = listen.communicate(timeout=30)
    finally:
        if listen.poll() is None:
            listen.kill()
            listen.communicate()
    assert source.returncode == listen.returncode == 1
    said = _one_error_line(source.stderr)
    assert "TLS: the destination's certificate was refused: Hostname mismatch" in said
    assert "TLS: the source refused the handshake" in _one_error_line(listen_err)


def test_a_bad_record_alert_is_named_tampering_not_a_certificate() -> None:
    """The side told by its peer's alert that a record failed (bytes changed in
    flight, the other direction) says so; other alerts still point at the handshake."""
    import ssl

    from engine.link import tls_error

    def alert(reason: str) -> str:
        exc = ssl.SSLError(1, reason)
        exc.reason = reason  # as _ssl sets it
        return str(tls_error(exc, "source"))

    assert alert("SSLV3_ALERT_BAD_RECORD_MAC") == (
        "TLS: the source received data that failed its check: bytes were changed in flight "
        "(sslv3 alert bad record mac)")
    assert "certificate" in alert("TLSV1_ALERT_UNKNOWN_CA")
