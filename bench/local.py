"""Same-host migration (local mode): total time and downtime by RAM size.

Two VMM processes on this host hand one guest's RAM back and forth: this
process (A) creates the RAM, migrates it locally to a VMM process of its own
(B), which then migrates it back, and so on; every hand-over is one measured
migration (A → B and B → A alike).  No page is copied, so the source's RAM is
the only copy: a 16 GiB guest needs 16 GiB of /dev/shm once, not twice.  Each
side keeps a warm channel pool (``pool=``), as a VMM that upgrades itself
would, so the figures are the migration's own and not process start-up (one
hand-over each way first, not counted, starts the pools' workers).  The
guest is idle (no vCPU process: pause and resume are instant); with devices,
each of the ``--devices`` demo devices loads in ``--load-ms`` on the
destination, and the devices' share of the downtime is the median with
devices minus the median without, in the same run.

Targets (issue 15): without devices, total ≤ 50 ms and downtime ≤ 10 ms,
flat in RAM size; with devices, downtime grows by the slowest device's load.

    python bench/local.py [--sizes 1G 8G 16G] [--repeat 5] [--devices 4] [--load-ms 20]

A size that would leave less than ``--margin`` of the machine's available
memory is skipped, and the report says so.

``--iterative`` (issue 15's precopy for iterative devices): a small guest with
one device of ``--state-size`` (256 MiB) whose state changes ``--dirty-rate``
% per second and loads in ``--load-ms`` per ``--state-size`` on the
destination, sent all at switchover (RegionDemoDevice) or during precopy
rounds that carry no page (IterativeDemoDevice, with the switchover ack);
downtime of each, and of a hand-over without the device, in the same run.

    python bench/local.py --iterative [--state-size 256M] [--load-ms 1000]
                          [--dirty-rate 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.remote import write_report  # noqa: E402
from clients.devices import demo_devices  # noqa: E402
from engine import DestinationMigration, GuestRAM, MigrationConfig, SourceMigration  # noqa: E402
from engine.cli import parse_size  # noqa: E402
from engine.pool import WorkerPool  # noqa: E402
from engine.shm import PAGE_SIZE  # noqa: E402

SECRET = b"bench-local"


class Vmm:
    """One side's VMM: a warm channel pool and, between migrations, the guest's RAM."""

    def __init__(self, config: MigrationConfig) -> None:
        self.config = config
        self.pool = WorkerPool("process", config.channels, name="mfd-bench-vmm")
        self.ram: GuestRAM | None = None

    def receive(self, address: str, devices: dict[str, Any], told: Any) -> dict[str, Any]:
        """Take the guest over `address` (`told(address)` once listening)."""
        spec = {key: value for key, value in devices.items() if key != "max_device_buffer"}
        loading = demo_devices(**spec, with_state=False) if devices["count"] else []
        destination = DestinationMigration(address, secret=SECRET, config=self.config.for_destination(),
                                           devices=loading, pool=self.pool,
                                           max_device_buffer=devices.get("max_device_buffer", 64 << 20))
        told(destination.address)
        result = destination.run().to_dict()
        if sum(device.intact() for device in loading) != len(loading):
            raise RuntimeError("a device arrived damaged")
        self.ram = destination.ram
        return result

    def receive_from(self, b: Connection, address: str, devices: dict[str, Any]) -> dict[str, Any]:
        """Take the guest from VMM B: listen, then tell B where to send it."""
        return self.receive(address, devices, lambda bound: b.send(("send", bound, devices)))

    def send(self, to: str, devices: dict[str, Any]) -> dict[str, Any]:
        """Hand the guest to the VMM listening on `to`; our RAM is theirs afterwards."""
        assert self.ram is not None
        kind = {key: devices[key] for key in ("iterative", "regions", "dirty_rate") if key in devices}
        saving = demo_devices(devices["count"], devices["state_size"], **kind) if devices["count"] else []
        result = SourceMigration(self.ram, to, secret=SECRET, config=self.config, devices=saving,
                                 pool=self.pool).run().to_dict()
        ram, self.ram = self.ram, None
        ram.close()  # disowned at the commit: closing removes nothing
        return result

    def close(self) -> None:
        if self.ram is not None:
            self.ram.close()
            if self.ram.owner:
                self.ram.unlink()
        self.pool.shutdown(wait=True, cancel=True)


def _vmm_process(config: MigrationConfig, pipe: Connection) -> None:
    """VMM B: serves ("receive", address, devices) and ("send", to, devices)."""
    vmm = Vmm(config)
    try:
        while (command := pipe.recv()) is not None:
            verb, where, devices = command
            try:
                if verb == "receive":
                    pipe.send(vmm.receive(where, devices, lambda address: pipe.send(address)))
                else:
                    pipe.send(vmm.send(where, devices))
            except Exception as exc:
                pipe.send({"error": repr(exc)})
    finally:
        vmm.close()
        pipe.close()


def _checked(answer: Any) -> Any:
    """The other VMM's answer (an address, a result), unless it says it failed."""
    if isinstance(answer, dict) and "error" in answer:
        raise RuntimeError(f"the other VMM failed: {answer['error']}")
    return answer


def hand_over(a: Vmm, b: Connection, a_has_it: bool, address: str,
              devices: dict[str, Any]) -> dict[str, Any]:
    """One local migration between A (this process) and B; the source's result."""
    if a_has_it:
        b.send(("receive", address, devices))
        to = _checked(b.recv())
        result = a.send(to, devices)
        result["destination_downtime_ms"] = _checked(b.recv())["downtime_ms"]
        return result
    destination_result = a.receive_from(b, address, devices)
    result = _checked(b.recv())
    result["destination_downtime_ms"] = destination_result["downtime_ms"]
    return result


def available_memory() -> int:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info["MemAvailable"]


def measure(size: int, repeat: int, config: MigrationConfig, devices: dict[str, Any],
            where: str) -> dict[str, list[dict[str, Any]]]:
    """`repeat` hand-overs each way of a `size` guest, without and with devices."""
    a = Vmm(config)
    ours, theirs = multiprocessing.Pipe()
    process = multiprocessing.get_context("spawn").Process(target=_vmm_process, args=(config, theirs))
    process.start()
    theirs.close()
    runs: dict[str, list[dict[str, Any]]] = {"none": [], "devices": []}
    try:
        t0 = time.perf_counter()
        a.ram = GuestRAM.create({"pc.ram": size}, prealloc=True)  # every page resident: a used guest
        print(f"  {size >> 20} MiB guest created and touched in {time.perf_counter() - t0:.1f} s")
        a_has_it = True
        count = 0
        for _ in range(2):  # warm-up, there and back: each pool starts its workers on first use
            address = f"unix://{where}/m{count}.sock"
            count += 1
            hand_over(a, ours, a_has_it, address, devices)
            a_has_it = not a_has_it
        for rep in range(repeat):
            # Alternate the order so both cases share the machine's drifts.
            cases = ["none", "devices"] if rep % 2 == 0 else ["devices", "none"]
            for case in cases if devices["count"] else ["none"]:
                for _ in range(2):  # A → B, then B → A
                    address = f"unix://{where}/m{count}.sock"
                    count += 1
                    spec = devices if case == "devices" else {**devices, "count": 0}
                    runs[case].append(hand_over(a, ours, a_has_it, address, spec))
                    a_has_it = not a_has_it
    finally:
        ours.send(None)
        process.join(60)
        ours.close()
        a.close()
    return runs


def median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


ITERATIVE_CASES = ("none", "switchover-only", "iterative")


def measure_iterative(size: int, repeat: int, config: MigrationConfig, device: dict[str, Any],
                      where: str) -> dict[str, list[dict[str, Any]]]:
    """`repeat` hand-overs each way per case of ITERATIVE_CASES (order alternating
    per repeat), with `device` the iterative device's demo_devices spec."""
    cases = {
        "none": {**device, "count": 0},
        # switchover-only: the whole state arrives faster than it loads
        "switchover-only": {**device, "regions": True, "max_device_buffer": 2 * device["state_size"]},
        "iterative": {**device, "iterative": True},
    }
    a = Vmm(config)
    ours, theirs = multiprocessing.Pipe()
    process = multiprocessing.get_context("spawn").Process(target=_vmm_process, args=(config, theirs))
    process.start()
    theirs.close()
    runs: dict[str, list[dict[str, Any]]] = {case: [] for case in ITERATIVE_CASES}
    try:
        a.ram = GuestRAM.create({"pc.ram": size}, prealloc=True)
        a_has_it = True
        count = 0
        for _ in range(2):  # warm-up, there and back
            hand_over(a, ours, a_has_it, f"unix://{where}/m{count}.sock", cases["none"])
            count += 1
            a_has_it = not a_has_it
        for rep in range(repeat):
            for case in ITERATIVE_CASES if rep % 2 == 0 else ITERATIVE_CASES[::-1]:
                for _ in range(2):  # A → B, then B → A
                    run = hand_over(a, ours, a_has_it, f"unix://{where}/m{count}.sock", cases[case])
                    count += 1
                    a_has_it = not a_has_it
                    reports = run.get("devices", [])
                    run["live_bytes"] = sum(d["live_bytes"] for d in reports)
                    run["device_bytes"] = sum(d["bytes"] for d in reports)
                    runs[case].append(run)
                    print(f"  {case:>15}: downtime {run['downtime_ms']:.1f} ms, total "
                          f"{run['total_time_s'] * 1000:.0f} ms, {run['rounds']} rounds, "
                          f"{run['live_bytes'] >> 20} of {run['device_bytes'] >> 20} MiB live", flush=True)
    finally:
        ours.send(None)
        process.join(60)
        ours.close()
        a.close()
    return runs


def main_iterative(args: argparse.Namespace) -> int:
    """Local mode with one iterative device: downtime with precopy rounds vs all at switchover."""
    size = args.sizes[0] if args.sizes_given else parse_size("64M")
    config = MigrationConfig(channels=args.channels, local=True, max_rounds=60)
    device = {"count": 1, "state_size": args.state_size, "dirty_rate": args.dirty_rate / 100,
              "load_latency_s": args.load_ms / 1000}
    print(f"local migration, {size >> 20} MiB idle guest, one device of {args.state_size >> 20} MiB "
          f"changing {args.dirty_rate:g} %/s, loading {args.load_ms:.0f} ms per "
          f"{args.state_size >> 20} MiB; {args.repeat} hand-overs each way per case; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="mfd-bench-local-") as where:
        runs = measure_iterative(size, args.repeat, config, device, where)
    bare = median(runs["none"], "downtime_ms")
    report: dict[str, Any] = {
        "ram_bytes": size, "channels": args.channels, "state_size": args.state_size,
        "dirty_rate_pct_per_s": args.dirty_rate, "load_ms_per_state": args.load_ms,
        "repeat": args.repeat, "cpus": os.cpu_count(), "load_average": os.getloadavg(),
        "downtime_without_devices_ms": bare, "cases": []}
    print(f"downtime without the device: {bare:.1f} ms (median)")
    print(f"{'case':>15} {'downtime ms':>12} {'device ms':>10} {'total ms':>9} {'rounds':>7} "
          f"{'live MiB':>9} {'at pause MiB':>13}")
    shares = {}
    for case in ("switchover-only", "iterative"):
        share = median(runs[case], "downtime_ms") - bare
        shares[case] = share
        at_pause = statistics.median(run["device_bytes"] - run["live_bytes"] for run in runs[case])
        row = {"case": case, "downtime_ms": median(runs[case], "downtime_ms"), "device_share_ms": share,
               "total_ms": median(runs[case], "total_time_s") * 1000,
               "rounds": median(runs[case], "rounds"), "live_bytes": median(runs[case], "live_bytes"),
               "bytes_at_pause": at_pause, "pages_sent": max(run["pages_sent"] for run in runs[case]),
               "runs": runs[case]}
        report["cases"].append(row)
        print(f"{case:>15} {row['downtime_ms']:>12.1f} {share:>10.1f} {row['total_ms']:>9.0f} "
              f"{row['rounds']:>7.0f} {row['live_bytes'] / (1 << 20):>9.1f} {at_pause / (1 << 20):>13.1f}")
    ratio = (median(runs["iterative"], "downtime_ms") / median(runs["switchover-only"], "downtime_ms"))
    report["downtime_ratio"] = ratio
    print(f"downtime, iterative / switchover-only: {ratio:.3f}")
    write_report(args.json or "bench/results/local-iterative.json", report)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=None,
                        help="RAM sizes (1G 8G 16G; --iterative: one size, 64M)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="hand-overs each way, per case (5; --iterative: 3)")
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--devices", type=int, default=4,
                        help="demo devices in the with-devices case (0: none)")
    parser.add_argument("--state-size", type=parse_size, default=None,
                        help="each device's state (256K; --iterative: 256M)")
    parser.add_argument("--load-ms", type=float, default=None,
                        help="each device's load time on the destination (20; --iterative: "
                             "1000 per --state-size)")
    parser.add_argument("--margin", type=parse_size, default=parse_size("3G"),
                        help="memory a size must leave available to run (others use this machine too)")
    parser.add_argument("--json", default=None,
                        help="bench/results/local.json (--iterative: local-iterative.json)")
    parser.add_argument("--iterative", action="store_true",
                        help="one iterative device: precopy rounds vs switchover-only")
    parser.add_argument("--dirty-rate", type=float, default=2.0,
                        help="--iterative: %% of the device's state changing per second (2)")
    args = parser.parse_args()
    args.sizes_given = args.sizes is not None
    if args.iterative:
        args.repeat = args.repeat or 3
        args.state_size = parse_size("256M") if args.state_size is None else args.state_size
        args.load_ms = 1000.0 if args.load_ms is None else args.load_ms
        return main_iterative(args)
    args.repeat = args.repeat or 5
    args.sizes = args.sizes or [parse_size(s) for s in ("1G", "8G", "16G")]
    args.state_size = parse_size("256K") if args.state_size is None else args.state_size
    args.load_ms = 20.0 if args.load_ms is None else args.load_ms
    args.json = args.json or "bench/results/local.json"

    config = MigrationConfig(channels=args.channels, local=True)
    devices = {"count": args.devices, "state_size": args.state_size, "load_latency_s": args.load_ms / 1000}
    report: dict[str, Any] = {"channels": args.channels, "repeat": args.repeat, "devices": args.devices,
                              "state_size": args.state_size, "load_ms": args.load_ms,
                              "cpus": os.cpu_count(), "load_average": os.getloadavg(), "cases": [],
                              "skipped": []}
    print(f"local migration, idle guest, {args.channels} channel(s), warm pools, "
          f"{args.repeat} hand-overs each way per case, medians; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    rows = []
    with tempfile.TemporaryDirectory(prefix="mfd-bench-local-") as where:
        for size in args.sizes:
            need = size + size // PAGE_SIZE
            room = available_memory()
            if need + args.margin > room:
                why = (f"{size >> 20} MiB skipped: needs {need >> 20} MiB + {args.margin >> 20} MiB "
                       f"margin, {room >> 20} MiB available")
                print("  " + why)
                report["skipped"].append({"ram_bytes": size, "why": why})
                continue
            runs = measure(size, args.repeat, config, devices, where)
            case: dict[str, Any] = {"ram_bytes": size, "runs": runs}
            for name in runs:
                if runs[name]:
                    case[name] = {"total_ms": median(runs[name], "total_time_s") * 1000,
                                  "downtime_ms": median(runs[name], "downtime_ms"),
                                  "setup_ms": median(runs[name], "setup_time_ms"),
                                  "pages_sent": max(run["pages_sent"] for run in runs[name])}
            report["cases"].append(case)
            rows.append(case)
    print(f"{'RAM MiB':>7} {'total ms':>9} {'downtime ms':>12} {'setup ms':>9} {'pages':>6}"
          + (f" | {'+devices total':>14} {'downtime':>9} {'devices share':>14}" if args.devices else ""))
    for case in rows:
        bare = case["none"]
        line = (f"{case['ram_bytes'] >> 20:>7} {bare['total_ms']:>9.1f} {bare['downtime_ms']:>12.2f} "
                f"{bare['setup_ms']:>9.1f} {bare['pages_sent']:>6}")
        if "devices" in case:
            dev = case["devices"]
            share = dev["downtime_ms"] - bare["downtime_ms"]
            case["devices_share_ms"] = share
            line += f" | {dev['total_ms']:>14.1f} {dev['downtime_ms']:>9.2f} {share:>14.1f}"
        print(line)
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
