"""The command line's options: the parser (its usage errors are one line, as every
error), sizes and rates ('256M'), the shared secret, the TLS files, and the checks
that refuse options which cannot work before anything starts.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Sequence
from typing import NoReturn

from engine import codecs
from engine.config import MigrationConfig, check_argument
from engine.errors import ConfigError
from engine.link import TlsConfig
from engine.verify import check_dump_dir

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
SECRET_ENV = "MULTIFD_SECRET"


# --run-after's bound: a KVM guest runs all of it before its check (no signal cuts
# it short), and a sleep past the platform's time_t would fail after the commit.
_MAX_RUN_AFTER_S = 7 * 86400.0


def parse_size(text: str) -> int:
    """'1G', '256M', '64MiB', '4096' → bytes (binary units)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 256M or 1G)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_rate(text: str) -> float:
    return float(parse_size(text))


MAX_SECRET_FILE = 4096  # bytes a secret file may hold


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
    parser = _Parser(prog="multifd", description="The ``multifd`` command line.")
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
    listen.add_argument("--lifeline-fd", type=int, default=None,
                        help="an inherited pipe's read end whose writer is the process that started "
                        "this one: its end of file (that process is gone) stops this one as SIGTERM does")
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
