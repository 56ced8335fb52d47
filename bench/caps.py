"""Does the downtime limit hold under a bandwidth cap?  A grid of guest sizes and caps.

For each guest size and each cap, in one run (sizes and caps alternate their order
between repetitions), a guest of random RAM that keeps dirtying pages (the synthetic
guest, ``--dirty-rate``, random writes over all of its RAM) migrates from this process
to a destination VMM in a process of its own, with ``--max-bandwidth`` set to the cap
and a downtime limit of ``--limit`` ms.  Each run records the downtime (the source's
pause → the destination's resume), what the engine expected it to be when it switched
over, the rounds, and whether it switched over because it converged or because
``max_rounds`` ran out (``on_max_rounds="switchover"``: the configured way out).

A case *holds* when the downtime is ≤ limit + 20 % or the switchover was forced as
configured.  Printed per case: medians, and how many runs held; JSON of every run goes
to ``bench/results/caps.json``.  Nothing here is a pass/fail test: the machine's load
moves these figures.

    python bench/caps.py [--sizes 64M 256M 1G] [--caps 64M 256M 1G] [--limit 300]
                         [--dirty-rate 4M] [--channels 2] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.remote import migrate, write_report  # noqa: E402
from clients.guest import SyntheticGuest, fill_ram  # noqa: E402
from engine import GuestRAM, MigrationConfig  # noqa: E402
from engine.cli import parse_size  # noqa: E402

SLACK = 1.2  # the bar: downtime within the limit + 20 %


def one_run(size: int, cap: int, args: argparse.Namespace) -> dict[str, Any]:
    config = MigrationConfig(channels=args.channels, max_bandwidth=float(cap),
                             downtime_limit_ms=args.limit, max_rounds=args.max_rounds,
                             on_max_rounds="switchover")
    with GuestRAM.create({"pc.ram": size}) as src, \
            GuestRAM.create({"pc.ram": size}, prealloc=True) as dst:
        fill_ram(src, "random", seed=3)
        with SyntheticGuest(src, "random", args.dirty_rate) as guest:
            result, remote, _ = migrate(src, dst, config, ram_is_zeroed=True, guest=guest)
    forced = result.rounds >= args.max_rounds + 1 and result.expected_downtime_ms > args.limit
    return {"size": size, "cap": cap, "downtime_ms": result.downtime_ms,
            "expected_downtime_ms": result.expected_downtime_ms, "rounds": result.rounds,
            "total_s": result.total_time_s, "forced": forced,
            "held": result.downtime_ms <= args.limit * SLACK or forced,
            "wire_bytes": result.bytes_on_wire,
            "wire_rate": result.bytes_on_wire / max(result.total_time_s - result.setup_time_ms / 1000, 1e-9),
            "destination_downtime_ms": remote.get("downtime_ms")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    grid = [parse_size(s) for s in ("64M", "256M", "1G")]
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=grid)
    parser.add_argument("--caps", type=parse_size, nargs="+", default=grid)
    parser.add_argument("--limit", type=float, default=300.0, help="downtime limit, ms (300)")
    parser.add_argument("--dirty-rate", type=parse_size, default=parse_size("4M"), help="bytes/s (4M)")
    parser.add_argument("--max-rounds", type=int, default=30)
    parser.add_argument("--channels", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", default="bench/results/caps.json")
    args = parser.parse_args()
    runs: list[dict[str, Any]] = []
    for rep in range(args.repeat):
        sizes = args.sizes if rep % 2 == 0 else args.sizes[::-1]
        caps = args.caps if rep % 2 == 0 else args.caps[::-1]
        for size in sizes:
            for cap in caps:
                runs.append(one_run(size, cap, args))
    print(f"downtime under a cap: limit {args.limit:.0f} ms (held: ≤ {args.limit * SLACK:.0f} ms, "
          f"or switched over after max_rounds as configured), guest dirtying "
          f"{args.dirty_rate / 2**20:.0f} MiB/s, {args.channels} channels, {args.repeat} runs, medians")
    print(f"{'size':>6} {'cap':>6} {'downtime ms':>11} {'expected ms':>11} {'rounds':>6} "
          f"{'wire MB/s':>9} {'held':>5}")
    for size in args.sizes:
        for cap in args.caps:
            cases = [run for run in runs if run["size"] == size and run["cap"] == cap]

            def median(key: str) -> float:
                return statistics.median(run[key] for run in cases)  # noqa: B023
            print(f"{size / 2**20:>5.0f}M {cap / 2**20:>5.0f}M {median('downtime_ms'):>11.0f} "
                  f"{median('expected_downtime_ms'):>11.0f} {median('rounds'):>6.0f} "
                  f"{median('wire_rate') / 1e6:>9.0f} {sum(r['held'] for r in cases)}/{len(cases):<3}")
    write_report(args.json, {"limit_ms": args.limit, "dirty_rate": args.dirty_rate,
                             "channels": args.channels, "repeat": args.repeat, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
