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

``--iterative`` (issue 16): four devices of 256 MiB whose state changes 2 % per
second and loads in a time proportional to its bytes (``--load-ms`` per
``--state-size``), sent all at switchover (RegionDemoDevice) or during precopy
(IterativeDemoDevice, with the switchover ack); the devices' share of the
downtime in each case, against a migration without devices in the same run.
Target: the iterative share ≤ 10 % of the switchover-only one.

    python bench/devices.py --iterative [--count 4] [--state-size 256M] [--dirty-rate 2]
                            [--load-ms 1000] [--repeat 3]
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


ITERATIVE_CASES = ("none", "switchover-only", "iterative")


def iterative_once(src: GuestRAM, dst: GuestRAM, config: MigrationConfig, case: str, count: int,
                   state_size: int, load_s: float, dirty_rate: float) -> dict[str, Any]:
    """One migration of the issue-16 case: `count` devices of `state_size` bytes
    changing at `dirty_rate` (fraction per second), loading in `load_s` per
    `state_size` bytes; sent all at switchover or during precopy."""
    if case == "none":
        count = 0
    iterative = case == "iterative"
    sources = demo_devices(count, state_size, iterative=iterative, regions=not iterative,
                           dirty_rate=dirty_rate)
    devices = {"count": count, "state_size": state_size, "load_latency_s": load_s,
               "iterative": iterative, "regions": not iterative,
               # switchover-only: the whole state arrives faster than it loads
               "max_device_buffer": 2 * count * state_size} if count else None
    result, remote, _ = migrate(src, dst, config, source_devices=sources, destination_devices=devices)
    if remote["devices_intact"] != count:
        raise RuntimeError(f"{count - remote['devices_intact']} of {count} devices arrived damaged")
    reports = result.extra.get("devices", [])
    return {"downtime_ms": result.downtime_ms, "total_s": result.total_time_s, "rounds": result.rounds,
            "expected_downtime_ms": result.expected_downtime_ms,
            "destination_downtime_ms": remote["downtime_ms"],
            "live_bytes": sum(d["live_bytes"] for d in reports),
            "device_bytes": sum(d["bytes"] for d in reports)}


def main_iterative(args: argparse.Namespace) -> int:
    """Issue 16: devices' share of the downtime, iterative vs switchover-only."""
    load_s = args.load_ms / 1000
    config = MigrationConfig(channels=args.channels, max_rounds=60)
    runs: dict[str, list[dict[str, Any]]] = {case: [] for case in ITERATIVE_CASES}
    with GuestRAM.create({"pc.ram": args.ram}) as src, \
            GuestRAM.create({"pc.ram": args.ram}, prealloc=True) as dst:
        fill_ram(src, "random", seed=7)
        for rep in range(args.repeat):
            for case in ITERATIVE_CASES if rep % 2 == 0 else ITERATIVE_CASES[::-1]:
                runs[case].append(iterative_once(src, dst, config, case, args.count, args.state_size,
                                                 load_s, args.dirty_rate / 100))
                print(f"  {case:>15}: downtime {runs[case][-1]['downtime_ms']:.1f} ms, "
                      f"{runs[case][-1]['rounds']} rounds", flush=True)

    def median(case: str, key: str = "downtime_ms") -> float:
        return statistics.median(run[key] for run in runs[case])

    bare = median("none")
    only, live = median("switchover-only") - bare, median("iterative") - bare
    print(f"{args.ram >> 20} MiB idle guest, {args.channels} channels, {args.count} devices of "
          f"{args.state_size >> 20} MiB changing {args.dirty_rate:g} %/s, loading "
          f"{args.load_ms:.0f} ms per {args.state_size >> 20} MiB, {args.repeat} runs, medians")
    print(f"downtime without devices: {bare:.1f} ms")
    print(f"{'case':>15} {'downtime ms':>12} {'devices ms':>11} {'rounds':>7}")
    report: dict[str, Any] = {
        "ram_bytes": args.ram, "channels": args.channels, "devices": args.count,
        "state_size": args.state_size, "dirty_rate_pct_per_s": args.dirty_rate,
        "load_ms_per_state": args.load_ms, "repeat": args.repeat, "cpus": os.cpu_count(),
        "downtime_without_devices_ms": bare, "cases": []}
    for case, share in (("switchover-only", only), ("iterative", live)):
        print(f"{case:>15} {median(case):>12.1f} {share:>11.1f} {median(case, 'rounds'):>7.0f}")
        report["cases"].append({"case": case, "downtime_ms": median(case), "devices_share_ms": share,
                                "runs": runs[case]})
    ratio = live / only if only > 0 else float("nan")
    print(f"devices' share, iterative / switchover-only: {ratio:.3f} (target <= 0.10)")
    report["share_ratio"] = ratio
    write_report(args.json, report)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--load-ms", type=float, default=100.0, help="load time L of each device")
    parser.add_argument("--state-size", type=parse_size, default=parse_size("1M"))
    parser.add_argument("--ram", type=parse_size, default=parse_size("64M"))
    parser.add_argument("--channels", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", default=None,
                        help="bench/results/devices.json (--iterative: devices-iterative.json)")
    parser.add_argument("--iterative", action="store_true",
                        help="issue 16: iterative vs switchover-only devices (--count, --state-size, "
                        "--dirty-rate, --load-ms per state)")
    parser.add_argument("--count", type=int, default=4, help="--iterative: devices (4)")
    parser.add_argument("--dirty-rate", type=float, default=2.0,
                        help="--iterative: %% of each device's state changing per second (2)")
    args = parser.parse_args()
    if args.iterative:
        if args.json is None:
            args.json = "bench/results/devices-iterative.json"
        return main_iterative(args)
    if args.json is None:
        args.json = "bench/results/devices.json"

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
