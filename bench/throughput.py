"""Throughput: migrate an idle guest of random RAM, against the raw-socket baseline.

For each channel count N (1, 2, 4 by default) and each repetition, in one run:

* **baseline** — the same bytes through plain TCP sockets with N sender and N
  receiver processes, shared memory to pre-allocated shared memory
  (bench/baseline.py): the kernel's limit on this machine;
* **multifd** — a live migration of an idle guest (random content, so nothing
  compresses or skips) over N channels, from this process to a destination
  process of its own, destination RAM allocated up front as for the baseline.

Prints one line per case (medians over the repetitions) with the ratio
multifd / baseline, and writes everything to JSON.  Timing: the migration's
transfer time is its total time minus setup (process start-up and handshakes,
reported apart); the baseline starts once its processes are up.

``--warm`` adds a third case to every repetition: the same migration between a
pool kept warm on this side and a destination VMM process kept across
migrations (bench/remote.py WarmDestination), both with the guest's RAM kept
mapped by their workers (``keep_ram_mapped``), as a VMM's pool from VM start.
Its page tables are then built off the clock, as the baseline's are; a cold
migration's channels build theirs as they first move pages (~80 ms per GiB
and side here), inside its transfer time.

The migration runs bare (``--integrity none``: the raw sockets are bare too, so
this is the engine against the kernel); ``--integrity mac`` measures the
default, MAC records (bench/secure.py compares bare, MAC and TLS in one run).

    python bench/throughput.py [--ram 1G] [--channels 1 2 4] [--repeat 5] [--integrity none|mac] [--warm]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.baseline import raw_socket_seconds  # noqa: E402
from bench.remote import WarmDestination, migrate, write_report  # noqa: E402
from clients.guest import fill_ram  # noqa: E402
from engine import GuestRAM, MigrationConfig, MigrationResult  # noqa: E402
from engine.channel import channels_with_ram  # noqa: E402
from engine.cli import parse_size  # noqa: E402


def migrate_once(src: GuestRAM, dst: GuestRAM, config: MigrationConfig, transport: str) -> dict:
    result, remote, _ = migrate(src, dst, config, transport=transport)
    return _figures(result, remote)


def _figures(result: MigrationResult, remote: dict) -> dict:
    transfer_s = result.total_time_s - result.setup_time_ms / 1000
    return {
        "transfer_s": transfer_s,
        "setup_ms": result.setup_time_ms,
        "total_s": result.total_time_s,
        "downtime_ms": result.downtime_ms,
        "bytes_on_wire": result.bytes_on_wire,
        "source_channel_memory_kib": result.channel_memory_kib,
        "destination_channel_memory_kib": remote["channel_memory_kib"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ram", type=parse_size, default=parse_size("1G"))
    parser.add_argument("--channels", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--packet-pages", type=int, default=MigrationConfig.packet_pages)
    parser.add_argument("--transport", choices=("tcp", "unix"), default="tcp")
    parser.add_argument("--integrity", choices=("none", "mac"), default="none")
    parser.add_argument("--warm", action="store_true",
                        help="also migrate between pools kept warm, RAM kept mapped (tcp only)")
    parser.add_argument("--json", default="bench/results/throughput.json")
    args = parser.parse_args()
    if args.warm and args.transport != "tcp":
        parser.error("--warm migrates over tcp only")

    kinds = ["baseline", "multifd"] + (["warm"] if args.warm else [])
    cases: dict[int, dict[str, list]] = {n: {kind: [] for kind in kinds} for n in args.channels}
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(GuestRAM.create({"pc.ram": args.ram}))
        dst = stack.enter_context(GuestRAM.create({"pc.ram": args.ram}, prealloc=True))
        fill_ram(src, "random", seed=7)
        if args.warm:
            pool = stack.enter_context(channels_with_ram(max(args.channels), "bench-warm-src", src))
            destination = stack.enter_context(WarmDestination(src, max(args.channels)))
        for rep in range(args.repeat + args.warm):  # with --warm, a first untimed round starts the pools
            for n in args.channels:
                config = MigrationConfig(channels=n, packet_pages=args.packet_pages,
                                         integrity=args.integrity)
                if rep == 0 and args.warm:
                    destination.migrate(src, pool, config)
                    continue
                # Alternate the order so every case shares the machine's drifts.
                for kind in kinds if rep % 2 == 0 else kinds[::-1]:
                    if kind == "baseline":
                        cases[n]["baseline"].append(raw_socket_seconds(src, dst, n))
                    elif kind == "multifd":
                        cases[n]["multifd"].append(migrate_once(src, dst, config, args.transport))
                    else:
                        result, remote, _ = destination.migrate(src, pool, config)
                        cases[n]["warm"].append(_figures(result, remote))
            time.sleep(0.2)

    report = {"ram_bytes": args.ram, "integrity": args.integrity, "repeat": args.repeat,
              "packet_pages": args.packet_pages, "transport": args.transport, "warm": args.warm,
              "cpus": os.cpu_count(), "cases": []}
    print(f"{args.ram / 2**30:.2f} GiB random RAM, idle guest, {args.transport}, "
          f"{args.repeat} runs, medians (min-max); ratio = multifd / baseline, per run"
          + ("; warm: pools kept, RAM kept mapped on both sides" if args.warm else ""))
    print(f"{'channels':>8} {'baseline GB/s':>16} {'multifd GB/s':>16} {'ratio':>6} "
          f"{'setup ms':>9} {'RSS/channel MiB':>16}"
          + (f" {'warm GB/s':>16} {'ratio':>6} {'setup ms':>9}" if args.warm else ""))

    def rates(runs: list[dict]) -> list[float]:
        return [args.ram / r["transfer_s"] / 1e9 for r in runs]

    def spread(values: list[float]) -> str:
        return f"{statistics.median(values):>7.2f} ({min(values):.2f}-{max(values):.2f})"

    for n, runs in cases.items():
        base = [args.ram / s / 1e9 for s in runs["baseline"]]
        ours = rates(runs["multifd"])
        ratios = [o / b for o, b in zip(ours, base)]
        setup = statistics.median(r["setup_ms"] for r in runs["multifd"])
        rss = [m.get("VmHWM", 0) - m.get("RssShmem", 0)
               for r in runs["multifd"] for m in r["source_channel_memory_kib"]]
        rss_mib = statistics.median(rss) / 1024 if rss else 0.0
        case = {"channels": n, "baseline_gbps": base, "multifd_gbps": ours, "ratio_per_run": ratios,
                "ratio_median": statistics.median(ratios), "runs": runs["multifd"]}
        line = (f"{n:>8} {spread(base)} {spread(ours)} {statistics.median(ratios):>6.2f} "
                f"{setup:>9.0f} {rss_mib:>16.1f}")
        if args.warm:
            warm = rates(runs["warm"])
            warm_ratios = [w / b for w, b in zip(warm, base)]
            line += (f" {spread(warm)} {statistics.median(warm_ratios):>6.2f} "
                     f"{statistics.median(r['setup_ms'] for r in runs['warm']):>9.1f}")
            case.update({"warm_gbps": warm, "warm_ratio_per_run": warm_ratios,
                         "warm_ratio_median": statistics.median(warm_ratios), "warm_runs": runs["warm"]})
        print(line)
        report["cases"].append(case)
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
