"""The ``multifd`` command line.

``multifd demo``     a live migration of a synthetic guest between two processes on
                     this machine (this one is the source; it starts ``listen``)
``multifd listen``   the destination: wait for a source, receive, verify, resume
``multifd migrate``  the source: migrate a synthetic guest to a listening destination
``multifd save``     save a synthetic guest (live or stopped) to a snapshot file
``multifd restore``  restore a snapshot file into new guest RAM
``multifd inspect``  print what a snapshot file holds (a directory: its partial files)

This module is the composition root: it wires the engine to the synthetic guest
of ``clients``, or with ``--guest kvm`` to a real VM on /dev/kvm
(clients/kvm), its dirty log and its throttle (the engine itself never
imports clients).  Errors print one
line and exit non-zero (3: the outcome is unknown, see :func:`main`); ``--json``
prints one JSON object on stdout.  Log records print one line each, and only
until the operation fails: after that they are consequences of the error line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeGuard

from engine import codecs
from engine.channel import channel_fork_server, channels_with_ram
from engine.config import DestinationConfig, MigrationConfig, check_argument
from engine.errors import CancelledError, ConfigError, MigrationError, OutcomeUnknownError
from engine.link import TlsConfig
from engine.operation import Operation
from engine.pool import stop_fork_servers
from engine.stats import MigrationResult
from engine.sync import MigrationState, wait_readable
from engine.units import size_text
from engine.verify import check_dump_dir
from engine.wire.packet import MAX_CHANNELS

log = logging.getLogger("multifd.cli")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
SECRET_ENV = "MULTIFD_SECRET"
LINE_LIMIT = 300  # characters of an error or log line at the default level
EXIT_OUTCOME_UNKNOWN = 3

# The operation this command runs, once built: its latch says whether it failed.
_operation: Operation | None = None
# SIGTERM or SIGHUP that came while the command set up, before its operation existed.
_signalled: list[str] = []
# --run-after's bound: a KVM guest runs all of it before its check (no signal cuts
# it short), and a sleep past the platform's time_t would fail after the commit.
_MAX_RUN_AFTER_S = 7 * 86400.0

# Set by a signal once the command's operation has ended: its --run-after stops.
_after_end = threading.Event()


def parse_size(text: str) -> int:
    """'1G', '256M', '64MiB', '4096' → bytes (binary units)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 256M or 1G)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_rate(text: str) -> float:
    return float(parse_size(text))


MAX_SECRET_FILE = 4096  # bytes a secret file may hold
_PR_SET_PDEATHSIG = 1  # prctl(2)


def _secret(args: argparse.Namespace) -> bytes:
    if getattr(args, "secret_file", None):
        with open(args.secret_file, "rb") as f:
            raw = f.read(MAX_SECRET_FILE + 3)  # the secret, and a line end (\r\n) at most
        secret = raw.strip()
        if len(raw.rstrip(b"\r\n")) > MAX_SECRET_FILE:  # /dev/zero, a disk image: not a secret
            raise ConfigError(f"--secret-file {args.secret_file} holds more than {MAX_SECRET_FILE} "
                              f"bytes: is it the secret?")
        if not secret:
            raise ConfigError(f"--secret-file {args.secret_file} is empty (blank): put the shared "
                              f"secret in it, the same on both sides")
    else:
        secret = os.environ.get(SECRET_ENV, "").encode()
    if not secret:
        raise ConfigError(
            f"no shared secret: pass --secret-file FILE or set {SECRET_ENV} (same on both sides)"
        )
    return secret


# ---------------------------------------------------------------------------
# Arguments.


def _add_guest_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ram", type=parse_size, default=parse_size("256M"), help="guest RAM size (256M)")
    p.add_argument("--workload", choices=("idle", "random", "incrementer"), default="random")
    p.add_argument("--dirty-rate", type=parse_rate, default=parse_rate("32M"),
                   help="bytes/s the guest dirties (32M); 0 = as fast as it can (incrementer)")
    p.add_argument("--hot-fraction", type=float, default=1.0,
                   help="random workload: dirty only this fraction of the pages")
    p.add_argument("--fill", choices=("random", "zero", "text"), default="random")
    p.add_argument("--zero-fraction", type=float, default=0.0)
    _add_kvm_option(p)
    p.add_argument("--program", choices=("boot", "user64"), default="boot",
                   help="kvm: our boot sector (emulated here) or the 64-bit user-mode loop (native)")
    p.add_argument("--boot-image", help="kvm: run this 512-byte boot sector instead of --program")
    p.add_argument("--loop-size", type=parse_size, default=None,
                   help="kvm: the loop walks [1M, 1M + SIZE) (default: up to the end of RAM)")


def _add_kvm_option(p: argparse.ArgumentParser, run_after: bool = False) -> None:
    p.add_argument("--guest", choices=("synthetic", "kvm"), default="synthetic",
                   help="kvm: a VM on /dev/kvm (RAM >= 128M) instead of the synthetic guest")
    if run_after:
        p.add_argument("--run-after", type=float, default=None,
                       help="kvm: run the guest this many seconds after its resume, then check it (1)")


def _add_migration_options(p: argparse.ArgumentParser, wire: bool = True) -> None:
    p.add_argument("--channels", type=int, default=2)
    p.add_argument("--packet-pages", type=int, default=MigrationConfig.packet_pages)
    p.add_argument("--downtime-limit", type=float, default=300.0, help="milliseconds (300)")
    p.add_argument("--max-rounds", type=int, default=30)
    p.add_argument("--on-max-rounds", choices=("switchover", "fail"), default="switchover")
    if wire:  # a snapshot keeps pages at fixed places, uncompressed, and hashes nothing
        p.add_argument("--local", action="store_true",
                       help="same-host upgrade: hand the guest's RAM itself to the destination over "
                       "unix:// (no page is copied); only device state travels")
        p.add_argument("--no-verify", action="store_true", help="skip hashing both memories")
        p.add_argument("--compression", choices=codecs.available(), default="none")
        p.add_argument("--compression-level", type=int, default=None,
                       help="the codec's own scale (default: the codec's default)")
    p.add_argument("--zero-page-detection", choices=("on", "off"), default="on")
    p.add_argument("--max-bandwidth", type=parse_rate, default=None,
                   help="bytes/s over all channels together, e.g. 125M (default: no cap)")
    p.add_argument("--auto-converge", action="store_true",
                   help="throttle the guest while rounds cannot shrink (see --throttle-policy)")
    p.add_argument("--throttle-policy", choices=("rate", "step"), default="rate",
                   help="auto-converge: 'rate' throttles as the guest's measured dirty rate "
                        "needs (default), 'step' as QEMU (20 %%, +10 %% a round)")


def _add_device_options(p: argparse.ArgumentParser, source: bool = True,
                        destination: bool = True, iterative: bool = True) -> None:
    p.add_argument("--devices", type=int, default=0, help="demo devices to migrate (0)")
    p.add_argument("--device-state", type=parse_size, default=parse_size("4M"),
                   help="state size of each demo device (4M)")
    if iterative:  # both sides must say it
        p.add_argument("--device-iterative", action="store_true",
                       help="demo devices send their state during precopy, and the source waits "
                       "for the destination to load it before it pauses (both sides must say it)")
    if iterative and source:
        p.add_argument("--device-dirty-rate", type=float, default=0.0,
                       help="with --device-iterative: %% of each device's state that changes per "
                       "second while the guest runs (0)")
    if source:
        p.add_argument("--device-save-latency", type=float, default=0.0,
                       help="milliseconds each device takes to save, in all (0)")
    if destination:
        p.add_argument("--device-load-latency", type=float, default=0.0,
                       help="milliseconds each device takes to load, in all (0)")
        p.add_argument("--device-load", choices=("parallel", "serial"), default="parallel",
                       help="destination: load devices at once, or one after another")


def _add_security_options(p: argparse.ArgumentParser, destination: bool = False) -> None:
    """TLS 1.3 with mutual x509 (README, "Security"), or what protects a bare link
    (`destination`: `listen`'s, with --tls-any-peer, which a source cannot use)."""
    p.add_argument("--tls-cert", help="TLS: this side's certificate (PEM); with --tls-key and --tls-ca")
    p.add_argument("--tls-key", help="TLS: this side's private key (PEM)")
    p.add_argument("--tls-ca", help="TLS: the CA certificate(s) the peer's certificate must chain to")
    p.add_argument("--tls-peer-name", default=None,
                   help="TLS: the name the source's certificate must carry (this or --tls-any-peer "
                   "is required)" if destination else "TLS: the name the destination's certificate "
                   "must carry (default: the host in --to)")
    if destination:
        p.add_argument("--tls-any-peer", action="store_true",
                       help="TLS: admit a source with any certificate the CA signed (no name check)")
    p.add_argument("--integrity", choices=("mac", "none"), default="mac",
                   help="without TLS: MAC records after the hellos (mac, the default), or the bare "
                   "stream on a trusted link (none; the destination must say none too)")


def _tls(args: argparse.Namespace) -> TlsConfig | None:
    files = (args.tls_cert, args.tls_key, args.tls_ca)
    any_peer = getattr(args, "tls_any_peer", False)  # listen only
    if not any(files):
        named = "--tls-peer-name" if args.tls_peer_name else "--tls-any-peer" if any_peer else None
        if named:  # a name check without TLS would silently be no check at all
            raise ConfigError(f"{named} is for TLS: give --tls-cert, --tls-key and --tls-ca too")
        return None
    if not all(files):
        raise ConfigError("TLS needs all of --tls-cert, --tls-key and --tls-ca")
    return TlsConfig(args.tls_cert, args.tls_key, args.tls_ca, args.tls_peer_name, any_peer)


def _add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--dump-dir", help="write the RAM image here (source.ram from the side that sends, "
                                      "dest.ram on the side that receives); written while the guest is "
                                      "stopped, it lengthens its pause")
    p.add_argument("-v", "--verbose", action="store_true")


class _UsageError(Exception):
    """A command line that does not parse; `prog`: the command whose --help lists the options."""

    def __init__(self, message: str, prog: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """A usage error is reported as every other error is (:func:`_parse`), not by
    argparse's own (the whole usage, exit 2).  Subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message, self.prog)


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    """The command line's options.  Raises _UsageError, naming the subcommand's
    --help for an option it does not know."""
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        raise _UsageError(f"unrecognized arguments: {' '.join(unknown)}", f"multifd {args.command}")
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="multifd", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="live-migrate a synthetic guest between two local processes")
    _add_guest_options(demo)
    _add_migration_options(demo)
    demo.add_argument("--transport", choices=("tcp", "unix"), default="tcp")
    demo.add_argument("--run-after", type=float, default=None,
                      help="kvm: the destination runs its guest this long after resume, then checks it (1)")
    _add_device_options(demo)
    _add_output_options(demo)

    listen = sub.add_parser("listen", help="destination: receive one migration")
    listen.add_argument("--address", default="tcp://0.0.0.0:4444",
                        help="tcp://HOST:PORT, tls://HOST:PORT (with the --tls-* files) or unix:///PATH")
    listen.add_argument("--ram", type=parse_size, help="create the RAM up front (default: from the source, "
                        "or the source's own RAM when it migrates with --local)")
    listen.add_argument("--channels", type=int, default=2,
                        help="with --ram: channel processes started now, each with the RAM mapped "
                        "(a source asking for more gets processes started for its migration)")
    listen.add_argument("--refuse-local", action="store_true",
                        help="refuse a same-host migration that hands over the source's RAM (--local)")
    listen.add_argument("--secret-file")
    listen.add_argument("--accept-timeout", type=float, default=None, help="seconds to wait for a source")
    listen.add_argument("--ready-fd", type=int, default=None,
                        help="write the LISTENING line to this inherited descriptor (then close it) "
                        "instead of stdout, or stderr with --json")
    listen.add_argument("--exit-with-parent", action="store_true",
                        help="stop, as SIGTERM does, when the process that started this one exits "
                        "(a supervisor's, or the demo's, destination)")
    listen.add_argument("--run-after", type=float, default=None,
                        help="after resume, run the guest this many seconds (the incrementer: 0; kvm: "
                        "the VM, then check it: 1)")
    _add_kvm_option(listen)
    _add_security_options(listen, destination=True)
    _add_device_options(listen, source=False)
    _add_output_options(listen)

    migrate = sub.add_parser("migrate", help="source: migrate a synthetic guest to a listener")
    migrate.add_argument("--to", required=True,
                         help="tcp://HOST:PORT, tls://HOST:PORT (with the --tls-* files) or unix:///PATH")
    migrate.add_argument("--secret-file")
    _add_security_options(migrate)
    _add_guest_options(migrate)
    _add_migration_options(migrate)
    _add_device_options(migrate, destination=False)
    _add_output_options(migrate)

    save = sub.add_parser("save", help="save a synthetic guest to a snapshot file")
    save.add_argument("file", help="the snapshot to write (replaced only once the new one is durable)")
    save.add_argument("--live", action="store_true",
                      help="keep the guest running through precopy rounds (default: pause first)")
    save.add_argument("--direct-io", action="store_true", help="write pages with O_DIRECT")
    _add_guest_options(save)
    _add_migration_options(save, wire=False)
    _add_device_options(save, destination=False, iterative=False)
    _add_output_options(save)

    restore = sub.add_parser("restore", help="restore a snapshot file into new guest RAM")
    restore.add_argument("file")
    restore.add_argument("--channels", type=int, default=2)
    restore.add_argument("--direct-io", action="store_true", help="read pages with O_DIRECT")
    restore.add_argument("--device-load-latency", type=float, default=0.0,
                         help="milliseconds each demo device takes to load, in all (0)")
    restore.add_argument("--device-load", choices=("parallel", "serial"), default="parallel")
    _add_kvm_option(restore, run_after=True)
    _add_output_options(restore)

    inspect = sub.add_parser("inspect", help="print what a snapshot file holds, or list the partial "
                             "files of saves in progress or dead in a directory")
    inspect.add_argument("file", help="a snapshot, or a directory")
    inspect.add_argument("--clean", action="store_true",
                         help="directory: remove the partial files of saves that died")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.add_argument("--verify", action="store_true", help="also read every page and device "
                         "stream and check it against its checksum; exit 1 if any is damaged")
    inspect.add_argument("--channels", type=int, default=2,
                         help="--verify: processes that read and check pages in parallel (2; "
                              "1: sequentially, in this process)")
    inspect.add_argument("-v", "--verbose", action="store_true")
    return parser


def _config(args: argparse.Namespace) -> MigrationConfig:
    return MigrationConfig(
        channels=args.channels,
        packet_pages=args.packet_pages,
        downtime_limit_ms=args.downtime_limit,
        max_rounds=args.max_rounds,
        on_max_rounds=args.on_max_rounds,
        verify=not getattr(args, "no_verify", True),
        compression=getattr(args, "compression", "none"),
        compression_level=getattr(args, "compression_level", None),
        zero_page_detection=args.zero_page_detection == "on",
        max_bandwidth=args.max_bandwidth,
        auto_converge=args.auto_converge,
        throttle_policy=args.throttle_policy,
        local=getattr(args, "local", False),
        integrity=getattr(args, "integrity", "mac"),
    ).validate()


# ---------------------------------------------------------------------------
# Output.


def _print_summary(result: MigrationResult, extra: dict[str, Any] | None = None) -> None:
    verified = {True: "yes", False: "NO", None: "not checked"}[result.verified]
    to_file, from_file = result.role == "save", result.role == "restore"
    moved = "written" if to_file else "read" if from_file else "sent"
    lines = [
        f"status           {result.status} ({result.role})",
        f"guest RAM        {size_text(result.ram_bytes)} over {result.channels} channel(s)",
        f"total time       {result.total_time_s:.3f} s (setup {result.setup_time_ms:.1f} ms)",
    ]
    if not from_file:
        forced = result.extra.get("switchover_forced")
        lines += [f"{'guest paused' if to_file else 'downtime':<16} {result.downtime_ms:.1f} ms"
                  + (f" (the {forced['downtime_limit_ms']:.0f} ms limit was out of reach after "
                     f"{forced['after_rounds']} rounds: switched over as --on-max-rounds says)"
                     if forced else ""),
                  f"rounds           {result.rounds}"]
    lines += [
        f"{'pages ' + moved:<16} {result.pages_sent}"
        + f" (+{result.zero_pages} zero pages, "
        + ("not written)" if to_file else "not stored)" if from_file else "no payload)"),
        f"{'bytes ' + moved if to_file or from_file else 'bytes on wire':<16} "
        f"{size_text(result.bytes_on_wire)} for {size_text(result.guest_bytes)} of guest memory",
    ]
    if result.extra.get("local"):
        lines.append("local mode       the guest's RAM was handed over on this host: no page copied")
    if not (to_file or from_file):
        lines.append(f"compression      {result.compression}"
                     + (f", {size_text(result.payload_bytes)} of payload, "
                        f"ratio {result.compression_ratio:.2f}"
                        if result.compression != "none" else ""))
    lines.append(f"throughput       {size_text(result.guest_throughput_bytes_per_s)}/s of guest memory"
                 + (f", {size_text(result.throughput_bytes_per_s)}/s on the wire"
                    if not (to_file or from_file) else ""))
    if not (to_file or from_file):
        lines.append(f"memory verified  {verified}"
                     + ((f" ({result.verify_time_ms:.1f} ms of the downtime: the last round's pieces "
                         f"hashed and the digests compared; the rest hashed as it moved)"
                         if result.extra.get("verification") == "tracked" else
                         f" ({result.verify_time_ms:.1f} ms of the downtime: the guest stays paused "
                         f"while both sides hash)") if result.verified else ""))
    for device in result.extra.get("devices", []):
        checked = {True: "verified", False: "DIFFERS", None: ""}[device["verified"]]
        line = (f"device {device['idstr']}/{device['instance_id']:<6} {size_text(device['bytes'])} in "
                f"{device['chunks']} chunks"
                + (f", {size_text(device['live_bytes'])} of them in precopy"
                   if device.get("live_bytes") else ""))
        # Each side knows its own part: the source what it saved, the destination what it loaded.
        if device["save_ms"] is not None:
            line += f", saved in {device['save_ms']:.0f} ms"
        if device["load_ms"] is not None:
            line += f", loaded in {device['load_ms']:.0f} ms {checked}".rstrip()
        lines.append(line)
    for key, value in (extra or {}).items():
        lines.append(f"{key:<16} {value}")
    print("\n".join(lines))


class _Progress:
    """A one-line live view on a terminal (nothing when not a tty or with --json)."""

    def __init__(self, enabled: bool) -> None:
        self._live = None
        if enabled:
            from rich.live import Live

            self._live = Live(refresh_per_second=10, transient=True)
            self._live.start()

    def update(self, stats: Any) -> None:
        if self._live is None or stats is None:
            return
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        # Round 1 fills the bar; later rounds only resend what the guest dirtied.
        done = min(stats.guest_bytes_sent, stats.ram_bytes) if stats.round <= 1 else stats.ram_bytes
        line = Table.grid(padding=(0, 1))
        line.add_row(
            f"[bold]{stats.state:<10}[/]",
            ProgressBar(total=max(stats.ram_bytes, 1), completed=done, width=16),
            f"round {stats.round} · {size_text(stats.bytes_on_wire)} · "
            f"{size_text(stats.throughput_bytes_per_s)}/s · left {size_text(stats.remaining_bytes)} · "
            f"~{stats.expected_downtime_ms:.0f} ms",
        )
        self._live.update(line)

    def close(self) -> None:  # idempotent
        live, self._live = self._live, None
        if live is not None:
            live.stop()


def _cancel_on_signals(operation: Any) -> None:
    """SIGTERM, and SIGHUP (the terminal went away; not under ``nohup``, which
    ignores it), cancel the operation as Ctrl-C does: it tears down, and the
    command exits 130 with one line.  The cancel runs on a thread of its own, not
    in the interrupted frame, which may hold the locks a cancel takes.  Before the
    operation exists (`operation` None: the guest, its RAM and channels being set
    up), the signal is noted, and the set-up raises CancelledError at its next step
    (:func:`_raise_if_signalled`; not from the handler, whose exception any library
    code it interrupts might swallow), at the latest as the operation is given here.
    With the operation given, Ctrl-C raises KeyboardInterrupt while it runs
    (:func:`_wait_with_progress` cancels); once it has ended, any of the three
    only sets `_after_end`: the outcome is decided."""
    if operation is not None and _signalled:
        operation.cancel(_signalled[0])  # not started: it releases what it holds
        _raise_if_signalled()

    def cancel(number: int, _frame: object) -> None:
        reason = f"terminated ({signal.Signals(number).name})"
        if operation is None:
            _signalled.append(reason)
        elif operation.done():
            _after_end.set()
        else:
            threading.Thread(target=operation.cancel, args=(reason,), name="mfd-signal-cancel",
                             daemon=True).start()

    def interrupt(number: int, frame: Any) -> None:
        # Once the operation has ended its outcome is decided: a KeyboardInterrupt
        # in what is left (the report, --run-after, the teardown) would exit 130,
        # "cancelled", for a migration the destination may have committed and
        # runs.  The signal only cuts --run-after short (_after_end).
        if operation.done():
            _after_end.set()
        else:
            signal.default_int_handler(number, frame)

    for number in (signal.SIGTERM, signal.SIGHUP):
        if number == signal.SIGHUP and signal.getsignal(number) is signal.SIG_IGN:
            continue
        signal.signal(number, cancel)
    if operation is not None and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, interrupt)


def _raise_if_signalled() -> None:
    """CancelledError if a signal came while the command set up (_cancel_on_signals)."""
    if _signalled:
        raise CancelledError(_signalled[0])


def _wait_with_progress(migration: Any, progress: _Progress,
                        first: Callable[[], None] | None = None) -> MigrationResult:
    """Wait for a started migration (having called `first`, if given); Ctrl-C
    cancels it and still waits for the teardown.  Past the commit point a cancel
    is refused and the wait goes on to the real outcome: more Ctrl-Cs only say so
    again, for leaving then would report "cancelled" for a VM the destination
    runs.  Every later wait is bounded (the teardown's grace, the answer's stall timeout: exit 3)."""
    try:
        if first is not None:
            first()
        while True:
            try:
                result: MigrationResult = migration.wait(timeout=0.1)
            except TimeoutError:
                progress.update(migration.stats())
                continue
            except MigrationError:
                progress.close()  # it ended: a Ctrl-C from here on is ignored
                raise
            progress.close()
            return result
    except KeyboardInterrupt:
        pass
    # Every step from here is retried on a further Ctrl-C (the cancel itself may wait
    # for a COMMIT being sent), so none of them can end the command early.
    note: str | None = None
    while True:
        try:
            progress.close()  # idempotent
            if note is None:
                note = _cancel_note(migration)
                if note:
                    print(note, file=sys.stderr, flush=True)
            return migration.wait()
        except KeyboardInterrupt:
            if note:
                print(note, file=sys.stderr, flush=True)


def _cancel_note(migration: Any) -> str:
    """Cancel on Ctrl-C; what the user is told ("": it had already ended)."""
    if migration.cancel("interrupted (Ctrl-C)"):
        return "multifd: cancelling: waiting for the teardown"
    if migration.committed:
        return "multifd: cannot cancel, the migration has committed: waiting for its outcome"
    return ""


# ---------------------------------------------------------------------------
# Commands.


def cmd_listen(args: argparse.Namespace) -> int:
    from clients.devices import demo_devices
    from clients.guest import SyntheticGuest
    from engine.destination import DestinationMigration
    from engine.shm import GuestRAM

    secret = _secret(args)
    config = DestinationConfig(integrity=args.integrity)
    if args.channels < 1:
        raise ConfigError(f"--channels must be at least 1, not {args.channels}")
    if args.channels > MAX_CHANNELS:  # no source may ask for more: no processes for them
        raise ConfigError(f"--channels must be at most {MAX_CHANNELS}, not {args.channels}")
    _check_args(args)
    if args.ready_fd is not None:  # before anything starts, not when it is ready
        try:
            os.fstat(args.ready_fd)
        except OSError as exc:
            raise ConfigError(f"--ready-fd {args.ready_fd}: {exc.strerror}") from exc
    if args.exit_with_parent:
        _exit_with_parent()
    ram = GuestRAM.create([("pc.ram", args.ram)], prealloc=True) if args.ram else None
    kvm = destination = None
    stack = contextlib.ExitStack()
    try:
        _raise_if_signalled()
        pool = None if ram is None else stack.enter_context(channels_with_ram(
            args.channels, "mfd-listen", ram, config.start_method, config.cancel_grace_s))
        # Without --ram the VM takes its memory when it exists: created from the
        # source's CONFIG, or the source's own pages (--local).
        kvm = _kvm_guest(args, ram) if args.guest == "kvm" else None
        devices = demo_devices(args.devices, args.device_state,
                               load_latency_s=args.device_load_latency / 1000, with_state=False,
                               iterative=args.device_iterative)
        destination = DestinationMigration(
            args.address, secret=secret, ram=ram, dump_dir=args.dump_dir,
            accept_timeout_s=args.accept_timeout, ram_is_zeroed=True,  # created just now
            devices=(kvm.devices if kvm else []) + devices, device_load=args.device_load,
            resume_guest=kvm.start if kvm else None, accept_local=not args.refuse_local,
            on_ram=kvm.take_ram if kvm is not None and ram is None else None,
            config=config, tls=_tls(args),
            pool=pool, own_pool_if_short=True,
        )
        _watch(destination)
        _cancel_on_signals(destination)
        # Ready before a source connects: RAM created and touched (--ram), and the fork
        # server its channels fork from has imported their modules.
        channel_fork_server().wait_ready()
        destination.start()
        # LISTENING inside the wait: a Ctrl-C from the line on meets the wait's cancel.
        result = _wait_with_progress(destination, _Progress(sys.stdout.isatty() and not args.json),
                                     first=lambda: _announce(args, f"LISTENING {destination.address}"))
        ram = destination.ram
        # The answer to a source whose outcome is unknown: did this migration commit?
        extra: dict[str, Any] = {"committed": destination.committed} if args.json else {
            "committed": f"{'yes' if destination.committed else 'no'} (migration {result.migration_id})"}
        if kvm is not None:
            extra["guest"] = kvm.after(1.0 if args.run_after is None else args.run_after)
        elif (args.run_after or 0) > 0 and ram is not None:
            guest = SyntheticGuest(ram, workload="incrementer", dirty_rate=0)
            guest.start()
            _after_end.wait(args.run_after)  # a signal ends it early
            report = guest.stop()
            extra["guest_pages_written_after_resume"] = report.pages_written if report else 0
        _emit(args, result, extra if args.json or kvm is None else
              {**extra, "guest": _describe_com1(extra["guest"])})
        return 0 if kvm is None or extra["guest"]["ok"] else 1
    finally:
        try:
            _stop_unfinished(destination)
            stack.close()  # the channels give the RAM up, then stop
        finally:
            if kvm is not None:
                kvm.stop()
            if ram is not None:
                ram.close()
                ram.unlink()


def _run_with_guest(args: argparse.Namespace, config: MigrationConfig,
                    operation: Callable[..., Operation]) -> MigrationResult:
    """Run the synthetic guest and demo devices `args` describe, and the
    operation ``operation(ram, guest, devices, config, pool)`` builds on them, with
    progress; SIGTERM cancels it (the guest is resumed, nothing is left).  `config`:
    :func:`_checked`'s.  `pool`: the channels, started with the guest (None in local
    mode: no page moves)."""
    from clients.devices import demo_devices
    from clients.guest import SyntheticGuest, fill_ram
    from engine.shm import GuestRAM

    with GuestRAM.create([("pc.ram", args.ram)]) as ram, contextlib.ExitStack() as stack:
        guest: Any
        if args.guest == "kvm":
            guest = _kvm_guest(args, ram)
        else:
            fill_ram(ram, args.fill, args.zero_fraction)
            guest = SyntheticGuest(ram, args.workload, args.dirty_rate, args.hot_fraction)
        running: Any = None  # the operation, once made
        try:
            _raise_if_signalled()
            pool = None
            if not config.local:  # local mode moves no page
                pool = stack.enter_context(channels_with_ram(
                    config.channels, "mfd-vmm", ram, config.start_method, config.cancel_grace_s))
            _raise_if_signalled()
            guest.start()
            devices = getattr(guest, "devices", []) + demo_devices(
                args.devices, args.device_state, save_latency_s=args.device_save_latency / 1000,
                iterative=getattr(args, "device_iterative", False),
                dirty_rate=getattr(args, "device_dirty_rate", 0.0) / 100)
            running = _watch(operation(ram, guest, devices, config, pool))
            running.dirty_source, running.throttle_guest = guest.dirty_source, guest.throttle
            _cancel_on_signals(running)
            running.start()
            result = _wait_with_progress(running, _Progress(sys.stdout.isatty() and not args.json))
            if args.guest != "kvm":
                return result
            return dataclasses.replace(result, extra={**result.extra, "guest": guest.com1()})
        finally:
            try:
                _stop_unfinished(running)
            finally:
                guest.stop()  # then the channels give the RAM up and stop (the stack)


def _stop_unfinished(operation: Operation | None) -> None:
    """Cancel the command's operation if an exception left it running (a second Ctrl-C
    as the first one's wait began) and wait for its teardown: it ends before its
    guest and its channels do.  None (not made yet) or done: nothing to do."""
    if operation is None or operation.done():
        return
    operation.cancel("interrupted")
    with contextlib.suppress(MigrationError):
        operation.wait()


def _kvm_guest(args: argparse.Namespace, ram: Any) -> Any:
    """`args`' KVM machine on `ram`: booted (a source) or incoming (no --program)."""
    from clients.kvm.guest import KvmGuest

    if not hasattr(args, "program"):
        return KvmGuest.incoming(ram)
    if args.boot_image:
        with open(args.boot_image, "rb") as f:
            return KvmGuest.boot(ram, "boot-image", boot_image=f.read())
    start = 1 << 20
    return KvmGuest.boot(ram, args.program, start=start,
                         end=start + args.loop_size if args.loop_size else None)


def _describe_com1(report: dict[str, Any]) -> str:
    from clients.kvm.guest import describe_com1

    return describe_com1(report)


def _kvm_lines(args: argparse.Namespace, result: MigrationResult,
               remote: dict[str, Any] | None = None) -> dict[str, str]:
    from clients.kvm.guest import summary_lines

    return summary_lines(result.extra, (remote or {}).get("guest"), args.auto_converge)


def _run_source(args: argparse.Namespace, config: MigrationConfig, to: str, secret: bytes) -> MigrationResult:
    from engine.source import SourceMigration

    return _run_with_guest(args, config, lambda ram, guest, devices, config, pool: SourceMigration(
        ram, to, secret=secret, config=config, pause_guest=guest.pause, pool=pool,
        resume_guest=guest.resume, dump_dir=args.dump_dir, devices=devices,
        tls=_tls(args) if hasattr(args, "tls_cert") else None,
    ))


def cmd_migrate(args: argparse.Namespace) -> int:
    secret = _secret(args)
    result = _run_source(args, _checked(args), args.to, secret)
    _emit(args, result, _kvm_lines(args, result) if args.guest == "kvm" and not args.json else None)
    if "destination_error" in result.extra:  # the VM runs nowhere: the destination's VMM must act
        print(f"multifd: failed: the destination committed, but its guest is not running: "
              f"{_one_line(result.extra['destination_error'], args.verbose)}", file=sys.stderr)
        return 1
    return 0


def _checked(args: argparse.Namespace) -> MigrationConfig:
    """The operation's config from `args`, once every option is checked
    (:func:`_check_args`): before anything starts."""
    config = _config(args)
    _check_args(args)
    return config


def _check_args(args: argparse.Namespace) -> None:
    """ConfigError, before anything starts, for options that cannot work or do not
    go together (demo devices, --run-after, --dump-dir)."""
    devices = getattr(args, "devices", 0)
    check_argument("--devices", devices, devices >= 0, "0 or more")
    run_after = getattr(args, "run_after", None)
    check_argument("--run-after", run_after, 0 <= (run_after or 0) <= _MAX_RUN_AFTER_S,
                   f"0 to {_MAX_RUN_AFTER_S:.0f} seconds (a week)")
    for option in ("device_save_latency", "device_load_latency"):
        value = getattr(args, option, 0.0)
        check_argument(f"--{option.replace('_', '-')}", value, 0 <= value < math.inf,
                       "0 or more milliseconds")
    check_dump_dir(getattr(args, "dump_dir", None))
    if getattr(args, "device_dirty_rate", 0.0) and not getattr(args, "device_iterative", False):
        raise ConfigError("--device-dirty-rate needs --device-iterative (a plain demo "
                          "device's state does not change while the guest runs)")


def cmd_demo(args: argparse.Namespace) -> int:
    config = _checked(args)  # before the destination process starts
    secret = secrets.token_hex(32).encode()
    # --local: over a unix socket, to a destination that takes the source's RAM.
    unix = args.transport == "unix" or args.local
    with (tempfile.TemporaryDirectory(prefix="multifd-demo-") if unix else contextlib.nullcontext("")) as tmp:
        address = f"unix://{tmp}/migration.sock" if unix else "tcp://127.0.0.1:0"
        command = [sys.executable, "-m", "engine.cli", "listen", "--address", address,
                   *(() if args.local else ("--ram", str(args.ram), "--channels", str(args.channels))),
                   "--json", "--accept-timeout", "60", "--exit-with-parent",
                   "--devices", str(args.devices), "--device-state", str(args.device_state),
                   "--device-load-latency", str(args.device_load_latency),
                   "--device-load", args.device_load]
        if args.device_iterative:
            command.append("--device-iterative")
        if args.dump_dir:
            command += ["--dump-dir", args.dump_dir]
        if args.guest == "kvm":
            run_after = 1.0 if args.run_after is None else args.run_after
            command += ["--guest", "kvm", "--run-after", str(run_after)]
        if args.verbose:
            command.append("--verbose")
        env = dict(os.environ, **{SECRET_ENV: secret.decode()})
        # The destination's stderr: live with --verbose; else kept, and shown only
        # on success (on failure the source's one line says "destination failed: …").
        ready_read, ready_write = os.pipe()
        command += ["--ready-fd", str(ready_write)]
        # An unnamed file: nothing of it is left, whatever ends this process.
        with tempfile.TemporaryFile("w+") as errors, open(ready_read, closefd=True) as ready:
            try:
                destination = subprocess.Popen(command, stdout=subprocess.PIPE, env=env, text=True,
                                               stderr=None if args.verbose else errors,
                                               pass_fds=(ready_write,))
            finally:
                os.close(ready_write)  # the destination holds it now: EOF when it exits
            try:
                to = _read_listening(destination, ready, errors)
                if not args.json:
                    print(f"destination process {destination.pid} listening on {to}")
                result = _run_source(args, config, to, secret)
                remote = json.loads(destination.communicate(timeout=60)[0] or "{}")
            finally:
                if destination.poll() is None:
                    destination.terminate()
                    destination.wait(timeout=10)
                if destination.stdout:
                    destination.stdout.close()
            errors.seek(0)
            sys.stderr.write(errors.read())
    result = _merge_devices(result, remote)
    # Committed, then the destination said nothing: it died, and the guest with it.
    lost = None if remote or destination.returncode == 0 else (
        f"the destination process {destination.pid} "
        f"{_ended_how(destination.returncode)} after the commit: the guest runs nowhere")
    _emit(args, result, {"destination": remote, **({"destination_error": lost} if lost else {})}
          if args.json else {
              "dest downtime": f"{remote.get('downtime_ms', 0):.1f} ms (destination's share)",
              **(_kvm_lines(args, result, remote) if args.guest == "kvm" and not lost else {}),
          })
    if lost:
        print(f"multifd: failed: {lost}", file=sys.stderr)
        return 1
    guest_ok = args.guest != "kvm" or remote.get("guest", {}).get("ok", False)
    return 0 if result.verified is not False and guest_ok else 1


def _ended_how(returncode: int) -> str:
    """'was killed by SIGKILL', 'exited 1': how a child process ended."""
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited {returncode}"


def cmd_save(args: argparse.Namespace) -> int:
    from engine.snapshot import SnapshotSave

    result = _run_with_guest(args, _checked(args), lambda ram, guest, devices, config, pool: SnapshotSave(
        ram, args.file, config=config, live=args.live, pause_guest=guest.pause, pool=pool,
        resume_guest=guest.resume, devices=devices, direct_io=args.direct_io, dump_dir=args.dump_dir,
    ))
    _emit(args, result, {} if args.json else {"file": result.extra["path"],
                                              **(_kvm_lines(args, result) if args.guest == "kvm" else {})})
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from clients.devices import DemoDevice
    from engine.snapshot import SnapshotRestore, inspect_snapshot

    _check_args(args)
    info = inspect_snapshot(args.file)
    if args.guest != "kvm":
        from clients.kvm.machine import VcpuDevice

        if any(d.idstr == VcpuDevice.idstr for d in info.metadata.devices):
            raise ConfigError(f"{args.file} holds a KVM guest (device {VcpuDevice.idstr}): restore it "
                              f"with --guest kvm")
    kvm = restore = None
    if args.guest == "kvm":  # the VM is built on new RAM before the vCPU's state loads
        from engine.shm import GuestRAM

        new_ram = GuestRAM.create(info.layout)
        try:
            kvm = _kvm_guest(args, new_ram)
        except BaseException:
            new_ram.close()
            new_ram.unlink()
            raise
    # The demo devices the snapshot holds, empty, to be loaded.
    devices = [DemoDevice(d.idstr, d.instance_id, d.size - d.chunks[-1][1],
                          load_latency_s=args.device_load_latency / 1000, with_state=False)
               for d in info.metadata.devices if kvm is None or d.idstr != kvm.machine.device.idstr]
    try:
        restore = SnapshotRestore(args.file, config=MigrationConfig(channels=args.channels),
                                  devices=(kvm.devices if kvm else []) + devices,
                                  device_load=args.device_load, direct_io=args.direct_io,
                                  dump_dir=args.dump_dir, ram=kvm.machine.ram if kvm else None,
                                  ram_is_zeroed=kvm is not None, resume_guest=kvm.start if kvm else None)
        _watch(restore)
        _cancel_on_signals(restore)
        restore.start()
        result = _wait_with_progress(restore, _Progress(sys.stdout.isatty() and not args.json))
        if kvm is not None:
            report = kvm.after(1.0 if args.run_after is None else args.run_after)
            result = dataclasses.replace(result, extra={**result.extra, "guest": report})
    finally:
        try:
            _stop_unfinished(restore)
        finally:
            restored = kvm.machine.ram if kvm is not None else restore.ram if restore is not None else None
            if kvm is not None:
                kvm.stop()
            if restored is not None:
                restored.close()
                restored.unlink()
    if devices:  # each demo device also checks its state against its own config part
        verified = bool(result.extra.get("devices_verified")) and all(d.intact() for d in devices)
        result = dataclasses.replace(result, extra={**result.extra, "devices_verified": verified})
    _emit(args, result, {} if args.json else {"file": args.file, **(
        {"guest COM1": _describe_com1(result.extra["guest"])} if kvm is not None else {})})
    guest_ok = kvm is None or result.extra["guest"]["ok"]
    return 0 if result.extra.get("devices_verified", True) is not False and guest_ok else 1


def cmd_partial_files(args: argparse.Namespace) -> int:
    """`inspect DIR`: the partial files there, a running save's or a dead one's."""
    from transports.file import partial_files, remove_partial

    found = partial_files(args.file)
    removed = {p.path for p in found if args.clean and p.stale}
    for partial in found:
        if partial.path in removed:
            remove_partial(partial)
    if args.json:
        print(json.dumps({"directory": args.file, "partial_files": [
            {**dataclasses.asdict(p), "removed": p.path in removed} for p in found]}))
        return 0
    lines = [f"{len(found)} partial file(s) in {args.file}" if found else f"no partial files in {args.file}"]
    for p in found:
        state = ("removed" if p.path in removed else "stale: its save died (--clean removes it)"
                 if p.stale else "a save in progress")
        lines.append(f"{os.path.basename(p.path)}  {size_text(p.size)}  for {os.path.basename(p.target)}, "
                     f"process {p.pid}: {state}")
    print("\n".join(lines))
    return 0


DAMAGE_LINES = 20  # inspect --verify: damaged regions listed at most


def cmd_inspect(args: argparse.Namespace) -> int:
    from engine.snapshot import inspect_snapshot

    if os.path.isdir(args.file):
        if args.verify:
            raise ConfigError("--verify takes a snapshot file (a directory lists its partial files)")
        return cmd_partial_files(args)
    if args.clean:
        raise ConfigError("--clean takes a directory (it removes the partial files of dead saves)")
    info = inspect_snapshot(args.file, verify=args.verify, channels=args.channels)
    summary = info.to_dict()
    damaged = 1 if info.damage else 0
    if args.json:
        print(json.dumps(summary))
        return damaged
    saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(summary["saved_at_ns"] / 1e9))
    lines = [
        f"snapshot         {summary['path']} ({size_text(summary['file_size'])})",
        f"format           version {summary['format_version']}, id {summary['snapshot_id']}",
        f"saved            {saved}, {'live' if summary['live'] else 'stopped'}, "
        f"page size {summary['page_size']}",
        f"guest RAM        {size_text(summary['ram_bytes'])} in {len(summary['blocks'])} block(s)",
    ]
    for block in summary["blocks"]:
        lines.append(f"block {block['name']:<10} {size_text(block['size'])}: {block['present_pages']} of "
                     f"{block['pages']} pages present (the rest zero), pages at {block['pages_offset']}")
    for device in summary["devices"]:
        lines.append(f"device {device['idstr']}/{device['instance_id']:<6} {size_text(device['bytes'])} in "
                     f"{device['chunks']} chunks, sha256 {device['sha256'][:16]}…")
    if not summary["devices"]:
        lines.append("devices          none")
    lines.append(f"info             {json.dumps(summary['info'], sort_keys=True)}")
    if info.damage is not None:
        lines.append(f"verified         {len(info.damage)} damaged region(s)" if info.damage else
                     "verified         intact: every page and device stream matches its checksum")
        lines += [f"damaged          {d.describe()}" for d in info.damage[:DAMAGE_LINES]]
        if len(info.damage) > DAMAGE_LINES:
            lines.append(f"damaged          … and {len(info.damage) - DAMAGE_LINES} more region(s)")
    print("\n".join(lines))
    return damaged


def _merge_devices(result: MigrationResult, remote: dict[str, Any]) -> MigrationResult:
    """The source knows what each device saved; the destination what it loaded."""
    if "devices" not in result.extra:
        return result
    loaded = {(d["idstr"], d["instance_id"]): d for d in remote.get("devices", [])}
    devices = []
    for device in result.extra["devices"]:
        theirs = loaded.get((device["idstr"], device["instance_id"]), {})
        devices.append({**device, "load_ms": theirs.get("load_ms"), "verified": theirs.get("verified")})
    extra = {**result.extra, "devices": devices,
             "devices_verified": remote.get("devices_verified")}
    return dataclasses.replace(result, extra=extra)


def _announce(args: argparse.Namespace, line: str) -> None:
    """Say where `listen` listens: on stdout; on stderr with --json (whose one
    document is then alone on stdout); or on the descriptor --ready-fd names."""
    if args.ready_fd is not None:
        with open(args.ready_fd, "w", closefd=True) as ready:
            ready.write(line + "\n")
    else:
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)


def _exit_with_parent() -> None:
    """SIGTERM from the kernel when our parent exits (Linux's PR_SET_PDEATHSIG): a
    killed demo's destination is cancelled, as by any SIGTERM (_cancel_on_signals),
    instead of waiting out its --accept-timeout.  A parent gone already: now."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise ConfigError(f"--exit-with-parent: prctl failed: {os.strerror(ctypes.get_errno())}")
    if os.getppid() == 1:  # orphaned before the prctl: init adopted us
        os.kill(os.getpid(), signal.SIGTERM)


def _read_listening(process: subprocess.Popen, ready: Any, errors: Any = None) -> str:
    """The address `listen` wrote to its ready pipe (`ready`, our end); `errors`,
    its stderr file, says why not."""
    assert process.stdout is not None
    deadline = time.monotonic() + 30
    while not (said := bool(wait_readable([ready], 0.1))) and time.monotonic() < deadline:
        _raise_if_signalled()  # a SIGTERM while it starts (_cancel_on_signals)
    line = ready.readline() if said else ""
    if not line.startswith("LISTENING "):
        # It ended, or will: its --json error is on stdout, its line on stderr.
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
        why = ""
        with contextlib.suppress(ValueError):
            said_json = json.loads(process.stdout.read() if process.poll() is not None else "")
            why = str(said_json.get("error", "")) if isinstance(said_json, dict) else ""
        if not why and errors is not None:
            errors.seek(0)
            said = errors.read().strip().splitlines()
            why = said[-1].removeprefix("multifd: failed: ") if said else ""
        raise MigrationError(f"the destination process did not start listening{': ' + why if why else ''}")
    return line.split(maxsplit=1)[1].strip()


def _emit(args: argparse.Namespace, result: MigrationResult, extra: dict[str, Any] | None = None) -> None:
    if args.json:
        data = result.to_dict()
        data.update(extra or {})
        print(json.dumps(data, indent=None, default=str))
    else:
        _print_summary(result, extra)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command, as this process's command line: it returns with SIGINT,
    SIGTERM and SIGHUP ignored, its exit status decided.  Exit status: 0 done, 1
    failed (or not verified, or the destination committed but could not start its
    guest), 3 the outcome is unknown (COMMIT sent, no answer: the guest stays
    paused), 130 cancelled, 141 our reader went away."""
    global _operation
    _operation = None
    _signalled.clear()
    _after_end.clear()
    # Undo engine/console.py's handlers for the loading (any not ignored): Ctrl-C is a
    # KeyboardInterrupt again, SIGTERM and SIGHUP end `inspect` as they would any program
    # (the other commands cancel on them: _cancel_on_signals below).
    for number, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL),
                            (signal.SIGHUP, signal.SIG_DFL)):
        if signal.getsignal(number) is not signal.SIG_IGN:
            signal.signal(number, default)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parse(argv)
    except _UsageError as exc:  # one line, and with --json one object, as every error
        if "--json" in argv:
            print(json.dumps({"status": MigrationState.FAILED.value, "error": str(exc)}))
        print(f"multifd: failed: {exc} (`{exc.prog} --help` lists the options)", file=sys.stderr)
        return 1
    _setup_logging(args.verbose)
    handlers = {"demo": cmd_demo, "listen": cmd_listen, "migrate": cmd_migrate,
                "save": cmd_save, "restore": cmd_restore, "inspect": cmd_inspect}
    try:
        if args.command != "inspect":
            _cancel_on_signals(None)  # SIGTERM and SIGHUP from here cancel the command
            # Channel processes fork from it in milliseconds; it imports their modules
            # while this process builds the guest (stopped below, or at exit).
            channel_fork_server().start()
        return handlers[args.command](args)
    except CancelledError as exc:
        _fail(args, MigrationState.CANCELLED, exc)
        return 130
    except BrokenPipeError:
        # Whoever read our output stopped (`| head`): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OutcomeUnknownError as exc:
        _fail(args, MigrationState.OUTCOME_UNKNOWN, exc)
        return EXIT_OUTCOME_UNKNOWN
    except (MigrationError, OSError) as exc:
        _fail(args, MigrationState.FAILED, exc)
        return 1
    except KeyboardInterrupt:
        _fail(args, MigrationState.CANCELLED, "interrupted")
        return 130
    finally:
        _stop_fork_servers_quietly()


def _stop_fork_servers_quietly() -> None:
    """The command's last step, its exit status decided: stop the fork servers (up to
    10 s) with Ctrl-C, SIGTERM and SIGHUP ignored from here to the exit, for they could
    only turn that status into a traceback or a "cancelled" it is not."""
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)
    stop_fork_servers()


def _watch(operation: Operation) -> Any:
    """Note the operation this command runs (its failure silences the log)."""
    global _operation
    _operation = operation
    return operation


def _one_line(text: str, verbose: bool = False, limit: int = LINE_LIMIT) -> str:
    """`text` on one line, cut to `limit` characters unless `verbose`: an error
    may quote the peer's data (a CONFIG's blocks) at any length, and its control
    characters (a terminal's escape sequences) are shown escaped, never sent on."""
    text = " ".join(line.strip() for line in text.splitlines())
    if not text.isprintable():
        text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    if verbose or len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit} more characters)"


class _LogFilter(logging.Filter):
    """Default level: once the operation failed, its log records (pool workers
    terminated, teardown steps that could not run) are consequences of the one
    error line; they are counted, not printed (--verbose prints them)."""

    hidden = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if _operation is not None and _operation.latch.failed:
            _LogFilter.hidden += 1
            return False
        return True


class _OneLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:  # no traceback at the default level
        return f"multifd: {_one_line(record.getMessage())}"


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler()
    if verbose:
        handler.setFormatter(logging.Formatter("multifd: %(message)s"))
    else:
        _LogFilter.hidden = 0
        handler.addFilter(_LogFilter())
        handler.setFormatter(_OneLineFormatter())
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, handlers=[handler],
                        force=True)


def _outcome_unknown(error: OutcomeUnknownError, verbose: bool) -> str:
    """The one line for a source that sent COMMIT and heard nothing back."""
    from engine.shm import SHM_DIR

    migration_id = getattr(_operation, "migration_id", None)
    cause = _one_line(str(error.__cause__ or error), verbose, limit=120)
    line = (f"the destination never answered COMMIT ({cause}); the guest stays paused; the "
            f"destination's `listen` output says whether migration {migration_id} committed")
    ram = getattr(_operation, "ram", None)
    if getattr(getattr(_operation, "config", None), "local", False) and ram is not None:
        # Handed over at COMMIT, the RAM is the destination's if it committed; nobody's if not.
        paths = ", ".join(os.path.join(SHM_DIR, block.segment.name) for block in ram.blocks)
        line += (f"; its RAM went with COMMIT: {paths}, if still there, is the destination's if it "
                 f"committed (gone if it then died), nobody's if not: remove it then")
    return line


def _names_migration(operation: Operation | None, error: object) -> TypeGuard[Operation]:
    """Whether a failure's report names the migration: a source whose COMMIT went
    unanswered, and a destination a source reached (its id is the source's)."""
    return operation is not None and (isinstance(error, OutcomeUnknownError)
                                      or getattr(operation, "source_known", False))


def _fail(args: argparse.Namespace, status: MigrationState, error: object) -> None:
    """Report a failure: the full error in --json output (``status`` is the state's
    value, "outcome_unknown" say), one line on stderr ("multifd: outcome unknown: ...");
    an unanswered COMMIT in the CLI's words (:func:`_outcome_unknown`), not the API's."""
    verbose = getattr(args, "verbose", False)
    if getattr(args, "json", False):
        data: dict[str, Any] = {"status": status.value, "error": _outcome_unknown(error, True)
                                if isinstance(error, OutcomeUnknownError) else str(error)}
        if _operation is not None and args.command == "listen":
            data["committed"] = _operation.committed
        if _names_migration(_operation, error):
            data["migration_id"] = str(_operation.migration_id)
        try:
            print(json.dumps(data), flush=True)
        except BrokenPipeError:  # whoever read stdout went away (a killed demo): the line below stays
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    line = (_outcome_unknown(error, verbose) if isinstance(error, OutcomeUnknownError)
            else _one_line(str(error), verbose))
    if args.command == "listen" and _names_migration(_operation, error):
        # the line a source's "outcome unknown" points its user to
        line += (f" (migration {_operation.migration_id}: committed "
                 f"{'yes' if _operation.committed else 'no'})")
    if _LogFilter.hidden and not verbose:
        line += f" ({_LogFilter.hidden} more log line(s): --verbose shows them)"
    print(f"multifd: {status.value.replace('_', ' ')}: {line}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
