"""What protection costs: the same migration bare, in MAC records, and over TLS 1.3.

For each channel count N (1, 2, 4 by default) and each repetition, in one run,
an idle guest of random RAM migrates to a destination process of its own
(bench/remote.py) three ways, in an order that rotates every repetition:

* **bare** — ``integrity="none"``: the bytes after the hellos unprotected;
* **mac** — the default: every byte after the hellos in AES-256-GMAC records
  (docs/wire-format.md §1.1), the sender tagging a copy of what it sends;
* **tls** — TLS 1.3 with mutual x509 on the main and every multifd channel
  (certificates made for the run by ``openssl``; the channel processes run the
  handshakes).

Prints the medians of the transfer rate (total time minus setup) and of setup,
with each mode's ratio to bare in the same run and each side's channel CPU per
GiB, the TLS cipher suite the contexts negotiate, and whether kernel TLS could be
switched on here (a probe: SSL_OP_ENABLE_KTLS set by value, then
``getsockopt(SOL_TLS, TLS_TX)`` on the socket; where it is off, what the kernel's
build configuration says); writes everything to JSON.

    python bench/secure.py [--ram 512M] [--channels 1 2 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.remote import channel_cpu, channel_cpu_per_gib, migrate, write_report  # noqa: E402
from clients.guest import fill_ram  # noqa: E402
from engine import GuestRAM, MigrationConfig  # noqa: E402
from engine.cli import parse_size  # noqa: E402
from tests.certs import Pki, make_pki  # noqa: E402

MODES = ("bare", "mac", "tls")
SOL_TLS, TLS_TX = 282, 1
SSL_OP_ENABLE_KTLS = 1 << 3  # OpenSSL 3's value; Python 3.11's ssl does not name it


def kernel_tls_support() -> str:
    """Why the kernel can or cannot take TLS records here: its ``tls`` upper-layer
    protocol, else what its build configuration says (/proc/config.gz)."""
    ulps = Path("/proc/sys/net/ipv4/tcp_available_ulp")
    available = ulps.read_text().split() if ulps.exists() else []
    if "tls" in available:
        return "tls ULP loaded"
    said = f"tcp_available_ulp: {' '.join(available) or 'none'}"
    config = Path("/proc/config.gz")
    if config.exists():
        import gzip
        lines = gzip.decompress(config.read_bytes()).decode(errors="replace").splitlines()
        options = {line.split("=")[0]: line.split("=")[1] for line in lines if line.startswith("CONFIG_")}
        tls = options.get("CONFIG_TLS", "not set")
        modules = options.get("CONFIG_MODULES", "not set")
        said += f"; kernel CONFIG_TLS={tls}, CONFIG_MODULES={modules}"
        if tls == "not set":
            said += " (this kernel cannot do TLS: no module to load)"
        elif tls == "m":
            said += " (a module: `modprobe tls` would add it)"
    return said


def ktls_probe(pki: Pki) -> tuple[str, str]:
    """Whether OpenSSL hands a TLS 1.3 socket's records to the kernel here, and
    the cipher suite the sides' contexts (the migration's) negotiate."""
    server = pki.config("dest").context(True)
    client = pki.config("source", peer_name="localhost").context(False)
    for ctx in (server, client):
        ctx.options |= SSL_OP_ENABLE_KTLS
    listener = socket.create_server(("127.0.0.1", 0))
    said: dict[str, str] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        with server.wrap_socket(conn, server_side=True) as tls:
            tls.recv(1)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client.wrap_socket(socket.create_connection(listener.getsockname()),
                                server_hostname="localhost") as tls:
            try:
                tls.getsockopt(SOL_TLS, TLS_TX, 64)
                said["tx"] = "on"
            except OSError as exc:
                said["tx"] = f"off ({exc.strerror})"
            cipher = tls.cipher()
            said["suite"] = f"{cipher[0]} ({cipher[1]})" if cipher else "none"
            tls.sendall(b"x")
    finally:
        thread.join()
        listener.close()
    return (f"kernel TLS: {said['tx']}; {kernel_tls_support()}; Python's ssl.OP_ENABLE_KTLS: "
            f"{'yes' if hasattr(__import__('ssl'), 'OP_ENABLE_KTLS') else 'no (set by value)'}",
            said["suite"])


def migrate_once(src: GuestRAM, dst: GuestRAM, n: int, mode: str, pki: Pki) -> dict[str, Any]:
    config = MigrationConfig(channels=n, integrity="none" if mode == "bare" else "mac")
    tls = (pki.config("source", peer_name="localhost"), pki.config("dest", peer_name="source.test"))
    result, remote, main_cpu_s = migrate(src, dst, config, tls=tls if mode == "tls" else None)
    transfer_s = result.total_time_s - result.setup_time_ms / 1000
    return {"transfer_s": transfer_s, "setup_ms": result.setup_time_ms,
            "gb_per_s": src.size / transfer_s / 1e9, "bytes_on_wire": result.bytes_on_wire,
            **channel_cpu(result.to_dict(), remote)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ram", type=parse_size, default=parse_size("512M"))
    parser.add_argument("--channels", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default="bench/results/secure.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mfd-bench-pki-") as where:
        pki = make_pki(Path(where))
        ktls, suite = ktls_probe(pki)
        runs: dict[int, dict[str, list[dict[str, Any]]]] = {n: {m: [] for m in MODES} for n in args.channels}
        with GuestRAM.create({"pc.ram": args.ram}) as src, \
                GuestRAM.create({"pc.ram": args.ram}, prealloc=True) as dst:
            fill_ram(src, "random", seed=7)
            for rep in range(args.repeat):
                for n in args.channels:
                    order = MODES[rep % 3:] + MODES[:rep % 3]  # each mode first in turn
                    for mode in order:
                        runs[n][mode].append(migrate_once(src, dst, n, mode, pki))

    print(f"{args.ram / 2**30:.2f} GiB random RAM, idle guest, tcp loopback, {args.repeat} runs, "
          f"medians; ratio: to bare in the same run")
    print(ktls)
    print(f"TLS cipher suite negotiated: {suite}")
    report: dict[str, Any] = {"ram_bytes": args.ram, "repeat": args.repeat, "cpus": os.cpu_count(),
                              "ktls": ktls, "tls_suite": suite, "cases": []}
    for n in args.channels:
        bare = statistics.median(r["gb_per_s"] for r in runs[n]["bare"])
        for mode in MODES:
            rates = [r["gb_per_s"] for r in runs[n][mode]]
            rate = statistics.median(rates)
            setup = statistics.median(r["setup_ms"] for r in runs[n][mode])
            cpu = statistics.median(r["source_channel_cpu_ms"] + r["destination_channel_cpu_ms"]
                                    for r in runs[n][mode])
            src_cpu, dst_cpu = (ms / 1000 for ms in channel_cpu_per_gib(runs[n][mode], args.ram / 2**30))
            print(f"  {n} ch  {mode:4}  {rate:5.2f} GB/s ({min(rates):.2f}-{max(rates):.2f})  "
                  f"x{rate / bare:4.2f}  setup {setup:5.0f} ms  channel CPU {cpu:5.0f} ms "
                  f"(CPU-s/GiB source {src_cpu:4.2f}, destination {dst_cpu:4.2f})")
            report["cases"].append({"channels": n, "mode": mode, "gb_per_s": rate,
                                    "ratio_to_bare": rate / bare, "setup_ms": setup,
                                    "src_cpu_s_per_gib": src_cpu, "dst_cpu_s_per_gib": dst_cpu,
                                    "runs": runs[n][mode]})
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
