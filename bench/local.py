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
        loading = demo_devices(**devices, with_state=False) if devices["count"] else []
        destination = DestinationMigration(address, secret=SECRET, config=self.config.for_destination(),
                                           devices=loading, pool=self.pool)
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
        saving = demo_devices(devices["count"], devices["state_size"]) if devices["count"] else []
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


def _checked(answer: Any) -> dict[str, Any]:
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=parse_size, nargs="+",
                        default=[parse_size(s) for s in ("1G", "8G", "16G")])
    parser.add_argument("--repeat", type=int, default=5, help="hand-overs each way, per case")
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--devices", type=int, default=4,
                        help="demo devices in the with-devices case (0: none)")
    parser.add_argument("--state-size", type=parse_size, default=parse_size("256K"))
    parser.add_argument("--load-ms", type=float, default=20.0,
                        help="each device's load time on the destination")
    parser.add_argument("--margin", type=parse_size, default=parse_size("3G"),
                        help="memory a size must leave available to run (others use this machine too)")
    parser.add_argument("--json", default="bench/results/local.json")
    args = parser.parse_args()

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
