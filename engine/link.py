"""Protected links: what guards the bytes after a connection's hello.

A connection starts bare (challenge and hello, engine/wire/packet.py §1); its
hello's flags say what follows, and :func:`secure` turns the bare
:class:`~engine.transport.Connection` into one that keeps that promise::

    hello flags   after the hellos                          Connection here
    MAC           MAC records (engine/wire/record.py)       RecordConnection
    TLS           a TLS 1.3 handshake (mutual x509), then   TlsConnection
                  TLS records
    none          the bare stream (only where allowed)      Connection

The seam for channel processes: a TLS session cannot cross a process boundary
(an ``SSLSocket`` does not pickle, and Python 3.11 has no kernel TLS), so a
channel's bare socket goes to its channel process by SCM_RIGHTS with a
:class:`LinkSecurity` in its spec, and the process calls :func:`secure` itself:
the TLS handshake happens in the process that carries the channel's bytes.
The main channel is secured the same way in the main process.

Errors: a refused certificate or handshake is :class:`~engine.errors.TlsError`
(one line naming the peer and the reason, on both sides); a record that fails
its MAC is :class:`~engine.errors.IntegrityError`.
"""

from __future__ import annotations

import array
import errno
import ipaddress
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from engine.errors import (
    ConfigError,
    MigrationError,
    TlsError,
    TransportBrokenError,
    TransportClosedError,
)
from engine.scatter import Buffer, advance, batch, flat_views
from engine.sync import Pollable, wait_readable, wait_writable
from engine.transport import Connection, broken
from engine.wire import packet, record

if TYPE_CHECKING:
    import ssl  # imported where TLS is used: a channel process without TLS need not load it

# ---------------------------------------------------------------------------
# What a side is given, and what a channel process is handed.


@dataclass(frozen=True)
class TlsConfig:
    """Mutual x509 for TLS 1.3: this side's certificate and key, and the CA file
    the peer's certificate must chain to (PEM files).

    `peer_name`: the name (DNS or IP subjectAltName, else the common name) the
    peer's certificate must carry.  On the source it defaults to the host of the
    destination's address.  The destination must be told which source it admits:
    its name here, or `any_peer=True` to accept any certificate the CA signed
    (:func:`destination_peer_name` refuses a destination given neither; the
    source's rule, :func:`source_peer_name`, is next to it).
    """

    cert: str
    key: str
    ca: str
    peer_name: str | None = None
    any_peer: bool = False  # destination only: no name check, the CA's signature is enough

    def validate(self) -> TlsConfig:
        """Return self, or raise ConfigError: a file that cannot be used, or both a
        peer name and any_peer (on either side)."""
        if self.peer_name and self.any_peer:
            raise ConfigError("TLS: give either the peer's certificate name (peer_name, "
                              "--tls-peer-name) or any_peer (--tls-any-peer), not both")
        for what, path in (("certificate", self.cert), ("key", self.key), ("CA", self.ca)):
            if not path or not os.access(path, os.R_OK):
                raise ConfigError(f"TLS {what} file {path!r} cannot be read")
        self.context(server_side=False)  # loads every file: a bad one fails here
        return self

    def context(self, server_side: bool) -> ssl.SSLContext:
        """A TLS 1.3-only context that sends this side's certificate and requires
        the peer's.  Raises ConfigError for files that do not load."""
        import ssl
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        if server_side:
            # A destination never writes on a multifd channel: a session ticket sent
            # after the handshake would look like data (the source reads it as a close).
            ctx.num_tickets = 0
        else:
            ctx.check_hostname = True  # against LinkSecurity.peer_name, in the handshake
        try:
            # Never OpenSSL's own passphrase prompt: it reads the terminal, from every
            # process that loads the key (a channel not in the foreground is stopped).
            ctx.load_cert_chain(self.cert, self.key, password=self._no_passphrase)
            ctx.load_verify_locations(cafile=self.ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"TLS files {self.cert}, {self.key}, {self.ca} do not load: "
                              f"{getattr(exc, 'reason', None) or exc}") from exc
        return ctx

    def _no_passphrase(self) -> bytes:
        raise ConfigError(f"TLS key file {self.key!r} is encrypted: give it unencrypted "
                          f"(e.g. openssl pkey -in KEY -out PLAIN), readable by this user only")


Mode = Literal["none", "mac", "tls"]


@dataclass(frozen=True)
class LinkSecurity:
    """How one connection is protected after its hello: everything a channel
    process needs to secure its own socket (picklable, no open objects)."""

    mode: Mode = "none"
    server_side: bool = False          # the destination's end
    tls: TlsConfig | None = None
    peer_name: str | None = None       # required name in the peer's certificate (None: any)
    session_key: bytes = field(default=b"", repr=False)  # MAC: record keys derive from it
    handshake_timeout_s: float = 10.0
    peer: str = "peer"                 # "source" or "destination", for errors

    @property
    def hello_flags(self) -> packet.HelloFlags:
        """What the hellos promise for this mode (docs/wire-format.md §1)."""
        return _HELLO_FLAGS[self.mode]


_HELLO_FLAGS = {"tls": packet.HelloFlags.TLS, "mac": packet.HelloFlags.MAC, "none": packet.HelloFlags(0)}


def require_tls_files(address: str, tls: TlsConfig | None) -> None:
    """A ``tls://`` address needs the TLS files.  Raises ConfigError."""
    if tls is not None and not isinstance(tls, TlsConfig):
        raise ConfigError(f"tls must be a TlsConfig or None, not {tls!r}")
    if urlsplit(address).scheme == "tls" and tls is None:
        raise ConfigError(f"{address} asks for TLS: give the certificate, key and CA files "
                          f"(tls=TlsConfig(...); the CLI's --tls-cert, --tls-key, --tls-ca)")


# Which name each side requires in its peer's certificate (`tls` validated first:
# never both a name and any_peer).


def source_peer_name(to: str, tls: TlsConfig) -> str:
    """The name a source requires in its destination's certificate: `peer_name`,
    else the host of `to`.  Raises ConfigError for any_peer (a source always
    checks), or when there is no name at all (a unix:// address)."""
    if tls.any_peer:
        raise ConfigError("TLS: any_peer (--tls-any-peer) is for the destination; a source always "
                          "checks the destination's certificate name (peer_name to expect another)")
    peer_name = tls.peer_name or urlsplit(to).hostname
    if not peer_name:
        raise ConfigError(f"TLS to {to}: there is no host name to check the destination's "
                          f"certificate against; give its name (peer_name, --tls-peer-name)")
    return peer_name


def destination_peer_name(tls: TlsConfig) -> str | None:
    """The name a destination requires in its source's certificate (None: any the
    CA signed, when `any_peer` says so).  Raises ConfigError when neither is given:
    a CA may sign certificates for more hosts than the ones allowed to migrate here."""
    if not tls.peer_name and not tls.any_peer:
        raise ConfigError("TLS on the destination: name the source whose certificate it admits "
                          "(TlsConfig(peer_name=NAME), --tls-peer-name NAME), or accept any "
                          "certificate the CA signed (TlsConfig(any_peer=True), --tls-any-peer)")
    return tls.peer_name


def secure(conn: Connection, link: LinkSecurity | None, connection: int,
           abort: Pollable | None = None, check_peer: bool = True) -> Connection:
    """`conn` (bare, its hello done) protected as `link` says; `connection` is
    the channel id, or ``record.MAIN_CONNECTION``.  For TLS this runs the
    handshake (at most ``handshake_timeout_s``; `abort` readable stops it) and,
    unless `check_peer` is False (then call :func:`check_peer_name`), checks the
    name in the peer's certificate.

    Raises TlsError for a refused certificate or handshake, TransportBrokenError
    for a timeout or a lost connection."""
    if link is None or link.mode == "none":
        return conn
    if link.mode == "mac":
        out, back = record.Direction.TO_DESTINATION, record.Direction.TO_SOURCE
        if link.server_side:
            out, back = back, out
        return RecordConnection(conn.sock, conn.peer,
                                record.record_key(link.session_key, connection, out),
                                record.record_key(link.session_key, connection, back))
    assert link.tls is not None
    secured = _tls_handshake(conn, link, abort)
    if check_peer:
        try:
            check_peer_name(secured, link)
        except TlsError:
            secured.close()
            raise
    return secured


def check_peer_name(conn: Connection, link: LinkSecurity) -> None:
    """A TLS server checks the name in its client's certificate (the client's own
    check is OpenSSL's, in the handshake).  Raises TlsError."""
    if not (isinstance(conn, TlsConnection) and link.server_side and link.peer_name):
        return
    names = _names(conn.sock.getpeercert() or {})
    if not any(_same_name(name, link.peer_name) for name in names):
        listed = ", ".join(f"{'IP' if kind == 'IP Address' else kind}:{value}" for kind, value in names)
        raise TlsError(f"TLS: the {link.peer}'s certificate is for {listed or 'no name'}, "
                       f"not {link.peer_name}")


# ---------------------------------------------------------------------------
# MAC records.


# Staging buffers of MAC records this process is done with, for its next
# connections: a fresh 1 MiB buffer costs its page faults (~0.5 ms) in set-up; a
# warm channel process reuses the last migration's (warm_up_records() readies one).
_STAGE_SIZE = record.PREFIX_SIZE + record.MAX_RECORD
_spare_stages: list[bytearray] = []
_spare_lock = threading.Lock()
_SPARE_STAGES_MAX = 2


def _after_fork_in_child() -> None:
    """A forked child starts with no spares (its parent's are shared copy-on-write:
    writing one costs the page faults a fresh buffer does) and a fresh lock (the
    parent's may have been held by another thread at the fork, for ever here)."""
    global _spare_lock
    _spare_lock = threading.Lock()
    _spare_stages.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _take_stage() -> bytearray:
    with _spare_lock:
        if _spare_stages:
            return _spare_stages.pop()
    return bytearray(_STAGE_SIZE)


def _give_stage(stage: bytearray) -> None:
    with _spare_lock:
        if len(_spare_stages) < _SPARE_STAGES_MAX:
            _spare_stages.append(stage)


def warm_up_records() -> None:
    """Ready this process for MAC records before a migration needs them: OpenSSL
    sets AES-GCM up on its first use (~5 ms here), and a connection's staging
    buffer costs its page faults.  Idempotent; a pool's preload and every
    operation call it ahead of set-up.  In a fork server (engine/pool) only the
    AES-GCM set-up reaches the children: each forked child drops the spare
    buffers it inherits (see :func:`_after_fork_in_child`) and readies its own
    when its pool's warm-up runs the preload again, or on its first connection."""
    key = record.RecordKey(bytes(32))
    key.tag(0, bytes(record.PREFIX_SIZE + 1))
    record.start_tag(key, 0, record.MAX_RECORD).digest()  # a large record's streaming context
    with _spare_lock:
        ready = bool(_spare_stages)
    if not ready:
        _give_stage(bytearray(_STAGE_SIZE))


class RecordConnection(Connection):
    """A stream in MAC records (engine/wire/record.py), over a bare socket.

    Sending copies each record's data into a staging buffer and tags that copy:
    the guest may write a page while it is being sent, and the tag must cover
    exactly the bytes that leave (TLS copies too, into its ciphertext).  The
    first buffer of each :meth:`send_buffers` (a packet's headers) is a record
    of its own, so a receiver checks headers before it acts on them.
    Receiving scatters each record's data straight into the caller's views
    (guest RAM) and feeds the tag from there; the tag is checked as soon as the
    record's last byte is in, before anything after it is read.  A caller that
    asks for a few bytes (:meth:`recv_exact_or_eof`: a packet's headers) gets
    them only from a whole record whose tag checked; the rest of that record
    waits in this object for the next call (:meth:`pending`).
    """

    def __init__(self, sock: socket.socket, peer: str, send_key: bytes, recv_key: bytes) -> None:
        super().__init__(sock, peer)
        self._send_key = record.RecordKey(send_key)
        self._recv_key = record.RecordKey(recv_key)
        self._send_seq = 0
        self._recv_seq = 0
        self._left = 0          # data bytes of the current incoming record not yet read
        self._tag: record.RunningTag | None = None  # the incoming record's, once it opens
        # sequence ‖ length, then the data: what the tag covers, in one buffer
        self._stage = _take_stage()
        self._stage_lock = threading.Lock()  # a send holds the buffer; close() gives it back
        self._fd_room = 0       # descriptors a receive may take now (recv_some_with_fds)
        self._fds: list[int] = []
        # Bytes of records whose tag checked, not yet handed on (recv_exact_or_eof).
        self._checked = bytearray()

    # -- descriptors (local mode: the RAM handover over a unix socket) ------

    def send_with_fds(self, data: bytes, fds: Sequence[int]) -> None:
        """`data` as one record whose first byte carries `fds` (SCM_RIGHTS)."""
        if self.sock.family != socket.AF_UNIX:
            raise ConfigError(f"descriptors can only be passed over a unix socket, not to {self.peer}")
        try:
            self._send_record([memoryview(data)], fds)
        except OSError as exc:
            raise self._failed(exc, f"send to {self.peer}") from exc

    def recv_some_with_fds(self, max_fds: int, max_bytes: int = 65536) -> tuple[bytes, list[int]]:
        """:meth:`recv_some`, also taking the descriptors that came with those bytes
        (at most `max_fds`; the caller owns and closes them)."""
        self._fd_room = max(1, max_fds)
        try:
            data = self.recv_some(max_bytes)
        finally:
            self._fd_room = 0
            fds, self._fds = self._fds, []
        return data, fds

    def _recv_into(self, iovs: Sequence[memoryview]) -> int:
        """recvmsg_into, keeping descriptors that ride along while a caller wants them
        (without room for them the kernel would discard them)."""
        if not self._fd_room:
            return self.sock.recvmsg_into(iovs)[0]
        got, ancdata, flags, _ = self.sock.recvmsg_into(iovs, socket.CMSG_SPACE(4 * self._fd_room))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
                self._fds += fds
        if flags & socket.MSG_CTRUNC:
            for fd in self._fds:
                os.close(fd)
            self._fds = []
            raise TransportBrokenError(f"{self.peer} sent more than {self._fd_room} descriptors")
        return got

    # -- sending -----------------------------------------------------------

    def send_buffers(self, buffers: Sequence[Buffer]) -> int:
        views = flat_views(buffers)
        total = sum(v.nbytes for v in views)
        try:
            if views:
                self._send_record([views[0]])
                self._send_views(views[1:])
        except OSError as exc:
            raise self._failed(exc, f"send to {self.peer}") from exc
        return total

    def send_all(self, data: Buffer) -> None:
        try:
            self._send_views(flat_views([data]))
        except OSError as exc:
            raise self._failed(exc, f"send to {self.peer}") from exc

    def _send_views(self, views: list[memoryview]) -> None:
        start = 0
        while start < len(views):
            chunk = batch(views, start, record.MAX_RECORD)
            start = advance(views, start, sum(v.nbytes for v in chunk))
            self._send_record(chunk)

    def close(self) -> None:
        super().close()
        # The staging buffer goes back for this process's next connection, unless a
        # send (another thread's) still holds it: then it is simply dropped.
        if self._stage_lock.acquire(blocking=False):
            try:
                stage, self._stage = self._stage, bytearray()
            finally:
                self._stage_lock.release()
            if stage:
                _give_stage(stage)

    def _send_record(self, chunk: Sequence[memoryview], fds: Sequence[int] = ()) -> None:
        with self._stage_lock:
            if not self._stage:  # closed: its buffer went back
                raise OSError(errno.EBADF, "the connection is closed")
            self._send_staged(memoryview(self._stage), chunk, fds)

    def _send_staged(self, stage: memoryview, chunk: Sequence[memoryview], fds: Sequence[int]) -> None:
        length = sum(view.nbytes for view in chunk)
        header = record.encode_header(length)
        stage[:record.PREFIX_SIZE] = record.encode_prefix(self._send_seq, length)
        at = record.PREFIX_SIZE
        for view in chunk:  # one copy: what is tagged is what is sent
            stage[at:at + view.nbytes] = view
            at += view.nbytes
        # One call over the whole copy: it beat copying and feeding a streaming GCM
        # context 128 KiB at a time (85 against 151 µs per MiB, medians, loaded 2-core VM).
        tag = self._send_key.tag(self._send_seq, stage[:at])
        self._send_seq += 1
        out = [memoryview(header), stage[record.PREFIX_SIZE:at], memoryview(tag)]
        start = 0
        if fds:  # they ride on the header's first byte
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            start = advance(out, start, self.sock.sendmsg(out, rights))
        while start < len(out):
            start = advance(out, start, self.sock.sendmsg(out[start:]))

    # -- receiving ---------------------------------------------------------

    def recv_into_buffers(self, buffers: Sequence[memoryview]) -> int:
        views = [b for b in buffers if b.nbytes]
        total = sum(v.nbytes for v in views)
        start = at = 0  # checked bytes left over from a headers read come first
        while at < len(self._checked) and start < len(views):
            take = min(views[start].nbytes, len(self._checked) - at)
            views[start][:take] = self._checked[at:at + take]
            at += take
            start = advance(views, start, take)
        del self._checked[:at]
        try:
            self._fill(views[start:])
        except OSError as exc:
            raise self._failed(exc, f"receive from {self.peer}") from exc
        return total

    def recv_exact_or_eof(self, n: int) -> bytes | None:
        """`n` bytes, each from a record whose tag checked: the whole record is read
        before any of it is handed on (a packet's headers are acted on only once
        checked), its rest kept for the next call."""
        try:
            while len(self._checked) < n:
                if not self._read_checked(eof_ok=not self._checked):
                    return None
        except OSError as exc:
            raise self._failed(exc, f"receive from {self.peer}") from exc
        data = bytes(self._checked[:n])
        del self._checked[:n]
        return data

    def recv_some(self, max_bytes: int = 65536) -> bytes:
        """The rest of the current record, whatever `max_bytes` says (b"" at the end
        of the stream): bytes are handed on only once their tag checked."""
        try:
            if not self._checked and not self._read_checked(eof_ok=True):
                return b""
        except OSError as exc:
            raise self._failed(exc, f"receive from {self.peer}") from exc
        data, self._checked = bytes(self._checked), bytearray()
        return data

    def pending(self) -> int:
        return len(self._checked)

    def _read_checked(self, eof_ok: bool) -> bool:
        """The rest of the current record (or all of the next one, ≤ MAX_RECORD)
        onto :attr:`_checked`, its tag checked; False at a clean end of the stream."""
        if not self._left and not self._open_record(eof_ok):
            return False
        rest = bytearray(self._left)
        self._fill([memoryview(rest)])
        self._checked += rest
        return True

    def _fill(self, views: list[memoryview]) -> None:
        """Fill `views` with record data as it arrives, each record's tag checked as
        its last byte lands."""
        start = 0
        while start < len(views):
            if not self._left:
                self._open_record(eof_ok=False)
            # The rest of the record in one call: the receiving thread's CPU per GiB of
            # 1 MiB records over a socket pair (2-vCPU VM, quiet) was 236-238 ms so,
            # 262-265 in 256 KiB calls, 278 in 128 KiB (bare: 165-173).
            iovs = batch(views, start, self._left)
            got = self._recv_into(iovs)
            if got == 0:
                raise TransportClosedError(f"{self.peer} closed the connection inside a record")
            left, tag = got, self._tag
            assert tag is not None  # a record is open
            for iov in iovs:
                take = min(left, iov.nbytes)
                tag.update(iov[:take])
                left -= take
                if not left:
                    break
            self._left -= got
            start = advance(views, start, got)
            if not self._left:
                self._close_record()

    def _raw_exact(self, n: int, eof_ok: bool) -> bytes | None:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            more = self._recv_into([view[got:]])
            if more == 0:
                if got == 0 and eof_ok:
                    return None
                raise TransportClosedError(f"{self.peer} closed the connection inside a record")
            got += more
        return bytes(buf)

    def _open_record(self, eof_ok: bool) -> bool:
        header = self._raw_exact(record.HEADER_SIZE, eof_ok)
        if header is None:
            return False
        self._left = record.decode_header(header)
        self._tag = record.start_tag(self._recv_key, self._recv_seq, self._left)
        return True

    def _close_record(self) -> None:
        received = self._raw_exact(record.TAG_SIZE, eof_ok=False)
        assert received is not None and self._tag is not None
        record.check_tag(self._tag, received, f"data from {self.peer}")
        self._recv_seq += 1


# ---------------------------------------------------------------------------
# TLS 1.3.

# Buffers smaller than this are gathered into one write (SSLSocket has no
# sendmsg: each write is at least one TLS record and one system call).
_GATHER = 64 << 10


def tls_error(exc: ssl.SSLError, peer: str) -> TlsError:
    """One line for a TLS failure: which side refused what."""
    import ssl
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = exc.verify_message or exc.reason or str(exc)
        return TlsError(f"TLS: the {peer}'s certificate was refused: {why}")
    reason = (exc.reason or "").lower().replace("_", " ")
    if "alert bad record mac" in reason:
        # The peer's record layer saw bytes that fail their check: not a certificate.
        return TlsError(f"TLS: the {peer} received data that failed its check: bytes were "
                        f"changed in flight ({reason})")
    if "alert" in reason:
        return TlsError(f"TLS: the {peer} refused the handshake or this side's certificate ({reason})")
    if reason == "peer did not return a certificate":
        return TlsError(f"TLS: the {peer} sent no certificate (a client certificate is required)")
    if reason in ("wrong version number", "http request", "record layer failure"):
        return TlsError(f"TLS: the {peer} does not speak TLS on this connection ({reason})")
    return TlsError(f"TLS with the {peer} failed: {reason or exc}")


def _same_name(name: tuple[str, str], wanted: str) -> bool:
    """A certificate's name (kind, value) is the one wanted, found as the client's
    check (OpenSSL's) finds it: an address only in an IP subjectAltName, in any
    spelling; a DNS name in a DNS one (or the common name), in any case, a
    ``*.`` leftmost label standing for exactly one label."""
    kind, value = name
    try:
        address = ipaddress.ip_address(wanted)
    except ValueError:
        address = None
    if address is not None or kind == "IP Address":
        try:
            return kind == "IP Address" and ipaddress.ip_address(value) == address
        except ValueError:
            return False
    value, wanted = value.casefold().rstrip("."), wanted.casefold().rstrip(".")
    if value.startswith("*.") and "*" not in value[2:]:
        label, dot, rest = wanted.partition(".")
        return bool(label and dot) and rest == value[2:]
    return value == wanted


def _names(cert: dict) -> list[tuple[str, str]]:
    """(kind, value) of each DNS and IP subjectAltName; without any, the common name's."""
    names = [(kind, value) for kind, value in cert.get("subjectAltName", ()) if kind in ("DNS", "IP Address")]
    if not names:  # no subjectAltName: the common name
        names = [("DNS", value) for rdn in cert.get("subject", ())
                 for key, value in rdn if key == "commonName"]
    return names


def _tls_handshake(conn: Connection, link: LinkSecurity, abort: Pollable | None) -> TlsConnection:
    import ssl
    assert link.tls is not None
    ctx = link.tls.context(link.server_side)
    # A client checks the server's name in the handshake (OpenSSL: a mismatch is a
    # refused certificate, and the server hears an alert); a server checks its
    # client's name after it (check_peer_name).
    hostname = None if link.server_side else link.peer_name
    sock = ctx.wrap_socket(conn.sock, server_side=link.server_side, server_hostname=hostname,
                           do_handshake_on_connect=False)
    deadline = time.monotonic() + link.handshake_timeout_s
    try:
        sock.setblocking(False)
        while True:
            try:
                sock.do_handshake()
                break
            except ssl.SSLWantReadError:
                waits = [sock, *([abort] if abort is not None else [])]
                ready = wait_readable(waits, max(0.0, deadline - time.monotonic()))
            except ssl.SSLWantWriteError:
                ready = wait_writable([sock], max(0.0, deadline - time.monotonic()), abort)
            if abort is not None and wait_readable([abort], 0):
                raise TransportBrokenError(f"the TLS handshake with the {link.peer} was aborted")
            if not ready:
                raise TransportBrokenError(f"TLS: the {link.peer} did not finish the handshake "
                                           f"within {link.handshake_timeout_s:.1f} s")
        sock.setblocking(True)
    except ssl.SSLError as exc:
        sock.close()
        raise tls_error(exc, link.peer) from exc
    except OSError as exc:
        sock.close()
        raise broken(exc, f"TLS handshake with the {link.peer}") from exc
    except MigrationError:
        sock.close()
        raise
    return TlsConnection(sock, conn.peer, link.peer)


class TlsConnection(Connection):
    """A TLS 1.3 stream.  Pages go from guest RAM to ``sendall`` and from
    ``recv_into`` to guest RAM as memoryviews: beside TLS's own copies, only
    buffers under 64 KiB (packet headers, short runs) are gathered into one
    write first (each write is a TLS record and a system call)."""

    sock: ssl.SSLSocket

    def __init__(self, sock: ssl.SSLSocket, peer: str, role: str) -> None:
        super().__init__(sock, peer)
        self._role = role

    def _failed(self, exc: OSError, what: str) -> MigrationError:
        import ssl
        if isinstance(exc, ssl.SSLError) and not isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
            return tls_error(exc, self._role)
        if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
            return TransportClosedError(f"{what}: the {self._role} closed the connection")
        return broken(exc, what)

    def send_buffers(self, buffers: Sequence[Buffer]) -> int:
        views = flat_views(buffers)
        total = sum(v.nbytes for v in views)
        gathered = bytearray()
        try:
            for view in views:
                if view.nbytes >= _GATHER:
                    if gathered:
                        self.sock.sendall(gathered)
                        gathered.clear()
                    self.sock.sendall(view)
                else:
                    gathered += view
                    if len(gathered) >= _GATHER:
                        self.sock.sendall(gathered)
                        gathered.clear()
            if gathered:
                self.sock.sendall(gathered)
        except OSError as exc:
            raise self._failed(exc, f"send to {self.peer}") from exc
        return total

    def recv_into_buffers(self, buffers: Sequence[memoryview]) -> int:
        total = 0
        try:
            for view in buffers:
                got, size = 0, view.nbytes
                while got < size:
                    more = self.sock.recv_into(view[got:], size - got)
                    if more == 0:
                        raise TransportClosedError(f"{self.peer} closed the connection mid-packet")
                    got += more
                total += size
        except OSError as exc:
            raise self._failed(exc, f"receive from {self.peer}") from exc
        return total

    def recv_some(self, max_bytes: int = 65536) -> bytes:
        """What is available (up to `max_bytes`), decrypted bytes TLS holds included
        (a poll on the socket cannot see those; :meth:`pending` says what is left):
        b"" at the end of the stream."""
        try:
            data = self.sock.recv(max_bytes)
            while data and len(data) < max_bytes and self.sock.pending():
                data += self.sock.recv(min(self.sock.pending(), max_bytes - len(data)))
        except OSError as exc:
            raise self._failed(exc, f"receive from {self.peer}") from exc
        return data

    def pending(self) -> int:
        return self.sock.pending()

    def peek(self) -> bool | None:
        """As :meth:`Connection.peek`; a TLS record that carries no data (a
        close_notify) is no bytes.  Decrypting what came may take a byte of data
        off the stream: a caller peeks where any byte is an error."""
        import ssl

        raw = super().peek()
        if not raw or self.sock.pending():
            return raw
        timeout = self.sock.gettimeout()
        self.sock.settimeout(0)
        try:
            return True if self.sock.recv(1) else None
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False  # part of a record
        except OSError:
            return None
        finally:
            self.sock.settimeout(timeout)

    def shutdown_read(self) -> None:
        # SSLSocket.shutdown() drops the TLS state (later writes would go out in the
        # clear): shut the socket underneath instead.
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_RD)
        except OSError:
            pass

    def shutdown(self) -> None:
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass
