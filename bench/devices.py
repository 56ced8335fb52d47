"""Devices' share of the downtime: parallel loading against serial.

M demo devices (clients/devices.py), each with the same state size and the same
load time L spread over its chunks (save time 0: the source's side is not what
is measured), migrate with a small idle guest to a destination process of its
own, once with ``device_load="parallel"`` (one pool worker per device) and once
with ``device_load="serial"`` (one worker, devices one after another, as QEMU
loads them).  The devices' share of the downtime is the median downtime with M
devices minus the median downtime with none, measured in the same run.

Target (issue 4): with 8 devices loading in parallel the share stays within 1.5 L;
serial grows as M x L.

    python bench/devices.py [--devices 1 2 4 8] [--load-ms 100] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.remote import migrate, write_report  # noqa: E402
from clients.devices import demo_devices  # noqa: E402
from clients.guest import fill_ram  # noqa: E402
from engine import GuestRAM, MigrationConfig  # noqa: E402
from engine.cli import parse_size  # noqa: E402

MODES = ("parallel", "serial")


def migrate_once(src: GuestRAM, dst: GuestRAM, config: MigrationConfig, count: int,
                 state_size: int, load_s: float, mode: str) -> dict[str, Any]:
    devices = {"count": count, "state_size": state_size, "load_latency_s": load_s,
               "device_load": mode} if count else None
    result, remote, _ = migrate(src, dst, config,
                                source_devices=demo_devices(count, state_size),
                                destination_devices=devices)
    if remote["devices_intact"] != count:
        raise RuntimeError(f"{count - remote['devices_intact']} of {count} devices arrived damaged")
    return {"downtime_ms": result.downtime_ms, "total_s": result.total_time_s,
            "destination_downtime_ms": remote["downtime_ms"],
            "destination_devices": remote.get("devices", [])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--load-ms", type=float, default=100.0, help="load time L of each device")
    parser.add_argument("--state-size", type=parse_size, default=parse_size("1M"))
    parser.add_argument("--ram", type=parse_size, default=parse_size("64M"))
    parser.add_argument("--channels", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", default="bench/results/devices.json")
    args = parser.parse_args()

    load_s = args.load_ms / 1000
    config = MigrationConfig(channels=args.channels)
    cases = [(0, "parallel")] + [(m, mode) for m in args.devices for mode in MODES]
    runs: dict[tuple[int, str], list[dict[str, Any]]] = {case: [] for case in cases}
    with GuestRAM.create({"pc.ram": args.ram}) as src, \
            GuestRAM.create({"pc.ram": args.ram}, prealloc=True) as dst:
        fill_ram(src, "random", seed=7)
        for rep in range(args.repeat):
            # Alternate the order so every case shares the machine's drifts.
            for count, mode in cases if rep % 2 == 0 else cases[::-1]:
                runs[count, mode].append(
                    migrate_once(src, dst, config, count, args.state_size, load_s, mode))

    def median_downtime(case: tuple[int, str]) -> float:
        return statistics.median(run["downtime_ms"] for run in runs[case])

    bare = median_downtime((0, "parallel"))
    print(f"{args.ram >> 20} MiB idle guest, {args.channels} channels, devices of "
          f"{args.state_size >> 10} KiB loading in L = {args.load_ms:.0f} ms each, "
          f"{args.repeat} runs, medians")
    print(f"downtime without devices: {bare:.1f} ms")
    print(f"{'devices':>7} {'mode':>9} {'downtime ms':>12} {'devices ms':>11} {'x L':>6}")
    report: dict[str, Any] = {
        "ram_bytes": args.ram, "channels": args.channels, "state_size": args.state_size,
        "load_ms": args.load_ms, "repeat": args.repeat, "cpus": os.cpu_count(),
        "downtime_without_devices_ms": bare, "cases": []}
    for count, mode in cases[1:]:
        downtime = median_downtime((count, mode))
        share = downtime - bare
        print(f"{count:>7} {mode:>9} {downtime:>12.1f} {share:>11.1f} {share / args.load_ms:>6.2f}")
        report["cases"].append({"devices": count, "mode": mode, "downtime_ms": downtime,
                                "devices_share_ms": share, "share_over_l": share / args.load_ms,
                                "runs": runs[count, mode]})
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
