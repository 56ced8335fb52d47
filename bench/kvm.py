"""A running KVM guest migrates: total time, rounds, downtime and the vCPU state's share of it.

The source is a 1 GiB KVM guest (clients/kvm) running the 64-bit user-mode loop
over 256 MiB, in this process; the destination is a VMM in a process of its
own that builds its VM on the received RAM, loads the vCPU state (a device on
the multifd channels) and starts it.  Cases, each ``--repeat`` times:

* ``N channels`` (1, 2, 4): no bandwidth cap, ``--downtime-limit`` ms (10),
  auto-converge on (it throttles only rounds that cannot shrink; off with
  ``--no-auto-converge``), with each ``--policies`` (default: rate; ``rate
  step`` measures QEMU's steps in the same run, as the baseline);
* ``capped``: 2 channels under a 1 Gbit/s cap (125e6 bytes/s), 300 ms limit,
  auto-converge with the throttle chosen from the measured dirty rate (the
  default policy, engine/converge.py), with QEMU's steps (20 %, +10 %) and a
  faster ramp (50 %, +20 %) (``--no-capped-steps``: without these two), and
  (``--capped-off-rounds`` > 0) off with ``on_max_rounds="fail"``.

``--warm``: both VMMs keep their channel processes in a pool across migrations
(engine/operation.py's shared pool), the destination one process for all runs,
after one untimed migration: setup then spawns nothing, so on a loaded host the
totals measure the migration rather than process start-up.

Downtime is the source's (pause → the destination's resume, the destination's
share measured there); the vCPU state's share of it is its save time (source,
guest paused) plus its load time (destination), over the downtime.  After
each move the destination runs its guest ``--run-after`` s and checks it (ran
on, invariant, no new boot: clients/kvm/guest.py).  Medians per case, one line
each, every run in the JSON.

Targets (issue 11): downtime <= 30 ms without a cap (2 channels); the capped
run converges within 10 s with auto-converge.

    python bench/kvm.py [--ram 1G] [--loop 256M] [--channels 1 2 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import statistics
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.remote import write_report  # noqa: E402
from clients.kvm.guest import KvmGuest  # noqa: E402
from engine import DestinationMigration, GuestRAM, MigrationConfig, SourceMigration  # noqa: E402
from engine.cli import parse_size  # noqa: E402
from engine.errors import ConvergenceError  # noqa: E402
from engine.pool import WorkerPool  # noqa: E402
from engine.shm import RamHandle  # noqa: E402

SECRET = b"bench-kvm"
START = 1 << 20
CAP = 125e6  # 1 Gbit/s


def _destination(handle: RamHandle, workers: int, pipe: Connection) -> None:
    """The destination VMM: for each (config, run_after) received, a VM on the
    received RAM, started at resume, checked after.  `workers` 0: one migration,
    channels spawned for it; else a warm pool of that many, migrations until None."""
    ram = GuestRAM.attach(handle)
    try:
        with contextlib.ExitStack() as stack:
            pool = stack.enter_context(WorkerPool("process", workers, name="bench-kvm-dst")) \
                if workers else None
            while (job := pipe.recv()) is not None:
                config, run_after = job
                try:
                    with KvmGuest.incoming(ram) as guest:
                        destination = DestinationMigration(
                            "tcp://127.0.0.1:0", secret=SECRET, ram=ram, pool=pool,
                            config=config.for_destination(), devices=guest.devices,
                            resume_guest=guest.start)
                        pipe.send(destination.address)
                        result = destination.run().to_dict()
                        result["guest"] = guest.after(run_after)
                        pipe.send(result)
                except Exception as exc:
                    pipe.send({"error": repr(exc)})
                if not workers:
                    break
    finally:
        ram.close()
        pipe.close()


class WarmVmms:
    """Warm VMMs (``--warm``): a process pool for the source's channels and a
    destination process with its own, both kept across migrations, as a VMM
    keeps them; setup then spawns nothing."""

    def __init__(self, dst: GuestRAM, workers: int) -> None:
        self.pool = WorkerPool("process", workers, name="bench-kvm-src")
        self.pipe, theirs = multiprocessing.Pipe()
        self.process = multiprocessing.get_context("spawn").Process(
            target=_destination, args=(dst.handle, workers, theirs))
        self.process.start()
        theirs.close()

    def close(self) -> None:
        self.pipe.send(None)
        self.process.join(60)
        self.pipe.close()
        self.pool.shutdown(wait=True)


def migrate_once(src: GuestRAM, dst: GuestRAM, loop: int, config: MigrationConfig,
                 run_after: float, warm: WarmVmms | None = None) -> dict[str, Any]:
    """Boot a fresh guest on `src`, let it run, migrate it into a destination process
    (a new one, or `warm`'s)."""
    for block in src.blocks:  # a fresh guest: its loop starts from equal first bytes
        block.pages[:] = bytes(block.size)
    process: multiprocessing.process.BaseProcess | None = None
    if warm is None:
        ours, theirs = multiprocessing.Pipe()
        process = multiprocessing.get_context("spawn").Process(
            target=_destination, args=(dst.handle, 0, theirs))
        process.start()
        theirs.close()
    else:
        ours = warm.pipe
    ours.send((config, run_after))
    try:
        with KvmGuest.boot(src, "user64", start=START, end=START + loop) as guest:
            guest.start()
            time.sleep(0.5)  # a few passes: the loop is dirtying at full speed
            address = ours.recv()
            if isinstance(address, dict):
                raise RuntimeError(f"destination failed: {address['error']}")
            source = SourceMigration(src, address, secret=SECRET, config=config,
                                     pool=warm.pool if warm is not None else None,
                                     pause_guest=guest.pause, resume_guest=guest.resume,
                                     throttle_guest=guest.throttle, dirty_source=guest.dirty_source,
                                     devices=guest.devices)
            began = time.perf_counter()
            try:
                result = source.run()
            except ConvergenceError as exc:
                ours.recv()  # the destination's answer: the migration failed there too
                return {"converged": False, "total_s": time.perf_counter() - began,
                        "rounds": source.tracker.round if source.tracker else 0,
                        "throttle_steps": source.throttle_steps, "error": str(exc)}
            remote = ours.recv()
    finally:
        if process is not None:
            process.join(60)
            ours.close()
    if "error" in remote:
        raise RuntimeError(f"destination failed: {remote['error']}")
    vcpu = result.extra["devices"][0]
    loaded = remote["devices"][0]
    state_ms = vcpu["save_ms"] + loaded["load_ms"]
    return {"converged": True, "total_s": result.total_time_s, "setup_ms": result.setup_time_ms,
            "after_setup_s": result.total_time_s - result.setup_time_ms / 1000,
            "rounds": result.rounds, "downtime_ms": result.downtime_ms,
            "destination_downtime_ms": remote["downtime_ms"],
            "expected_downtime_ms": result.expected_downtime_ms,
            "vcpu_save_ms": vcpu["save_ms"], "vcpu_load_ms": loaded["load_ms"],
            "vcpu_share": state_ms / result.downtime_ms if result.downtime_ms else 0.0,
            "pages_sent": result.pages_sent, "throttle_pct": result.extra.get("throttle_pct"),
            "throttle_steps": result.extra.get("throttle_steps"),
            "guest_dirty_pages_per_s": result.extra.get("guest_dirty_pages_per_s"),
            "guest_ok": remote["guest"]["ok"], "guest": remote["guest"]}


def _median(runs: list[dict[str, Any]], key: str) -> float:
    values = [run[key] for run in runs if key in run]
    return statistics.median(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ram", type=parse_size, default=parse_size("1G"))
    parser.add_argument("--loop", type=parse_size, default=parse_size("256M"),
                        help="the guest loops over [1M, 1M + LOOP)")
    parser.add_argument("--channels", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--downtime-limit", type=float, default=10.0, help="ms, uncapped cases")
    parser.add_argument("--capped-off-rounds", type=int, default=8,
                        help="capped, auto-converge off: fail after this many rounds (0: skip)")
    parser.add_argument("--no-capped", action="store_true", help="skip every capped case")
    parser.add_argument("--no-capped-steps", action="store_true",
                        help="capped: skip the two cases with QEMU-style steps")
    parser.add_argument("--no-uncapped", action="store_true", help="skip every uncapped case")
    parser.add_argument("--policies", nargs="+", choices=("rate", "step"), default=["rate"],
                        help="uncapped cases: the auto-converge policies to run (rate)")
    parser.add_argument("--no-auto-converge", action="store_true",
                        help="uncapped cases without auto-converge")
    parser.add_argument("--warm", action="store_true",
                        help="warm VMMs: channel pools kept across migrations on both sides "
                             "(after one untimed migration), so setup spawns nothing")
    parser.add_argument("--run-after", type=float, default=0.3)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default="bench/results/kvm.json")
    args = parser.parse_args()

    base = MigrationConfig(channels=2, downtime_limit_ms=args.downtime_limit,
                           auto_converge=not args.no_auto_converge)
    capped = base.with_(max_bandwidth=CAP, downtime_limit_ms=300.0, auto_converge=True)
    cases: dict[str, MigrationConfig] = {} if args.no_uncapped else {
        f"{n} channels" + (f", {policy}" if len(args.policies) > 1 else ""):
            base.with_(channels=n, throttle_policy=policy)
        for n in args.channels for policy in args.policies}
    if not args.no_capped:
        cases["capped, auto-converge (rate)"] = capped
    if not (args.no_capped or args.no_capped_steps):
        steps = capped.with_(throttle_policy="step")
        cases["capped, steps 20/+10"] = steps
        cases["capped, steps 50/+20"] = steps.with_(throttle_initial_pct=50, throttle_step_pct=20)
    if args.capped_off_rounds and not args.no_capped:
        cases["capped, no auto-converge"] = capped.with_(
            auto_converge=False, max_rounds=args.capped_off_rounds, on_max_rounds="fail")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in cases}
    with GuestRAM.create({"pc.ram": args.ram}) as src, \
            GuestRAM.create({"pc.ram": args.ram}, prealloc=True) as dst, \
            contextlib.ExitStack() as stack:
        warm = None
        if args.warm:
            warm = WarmVmms(dst, max(config.channels for config in cases.values()))
            stack.callback(warm.close)
            migrate_once(src, dst, args.loop, base, args.run_after, warm)  # imports, untimed
        for rep in range(args.repeat):
            names = list(cases) if rep % 2 == 0 else list(cases)[::-1]  # share the drifts
            for name in names:
                runs[name].append(migrate_once(src, dst, args.loop, cases[name], args.run_after, warm))
                last = runs[name][-1]
                print(f"  {name} run {rep + 1}: {last['total_s']:.2f} s, {last['rounds']} rounds"
                      + (f", downtime {last['downtime_ms']:.1f} ms" if last["converged"] else
                         ", not converged")
                      + (f", throttle {last['throttle_steps']}" if last.get("throttle_steps") else "")
                      + (f", guest {last['guest_dirty_pages_per_s']} pages/s"
                         if last.get("guest_dirty_pages_per_s") else ""), flush=True)

    print(f"{args.ram >> 20} MiB KVM guest, user64 loop over {args.loop >> 20} MiB, "
          f"{args.repeat} runs, medians" + (", warm VMMs" if args.warm else ""))
    print(f"{'case':>30} {'total s':>8} {'- setup':>8} {'rounds':>7} {'downtime ms':>12} {'vCPU ms':>8} "
          f"{'vCPU share':>11} {'throttle':>9} {'guest ok':>9} {'k pages/s':>10}")
    report: dict[str, Any] = {"ram_bytes": args.ram, "loop_bytes": args.loop, "repeat": args.repeat,
                              "warm": args.warm,
                              "downtime_limit_ms": args.downtime_limit, "cap_bytes_per_s": CAP,
                              "cpus": os.cpu_count(), "cases": []}
    for name, case_runs in runs.items():
        done = [run for run in case_runs if run["converged"]]
        vcpu = [run["vcpu_save_ms"] + run["vcpu_load_ms"] for run in done]
        throttle = [run["throttle_pct"] for run in done if cases[name].auto_converge]
        rated = [run for run in done if run.get("guest_dirty_pages_per_s") is not None]
        print(f"{name:>30} {_median(case_runs, 'total_s'):>8.2f} {_median(done, 'after_setup_s'):>8.2f} "
              f"{_median(case_runs, 'rounds'):>7.0f} "
              f"{_median(done, 'downtime_ms'):>12.1f} "
              f"{statistics.median(vcpu) if vcpu else float('nan'):>8.2f} "
              f"{_median(done, 'vcpu_share'):>10.1%} "
              f"{(str(int(statistics.median(throttle))) + ' %') if throttle else '-':>9} "
              f"{str(sum(run['guest_ok'] for run in done)) + '/' + str(len(case_runs)):>9} "
              f"{_median(rated, 'guest_dirty_pages_per_s') / 1000:>10.0f}")
        report["cases"].append({"case": name, "config": {
            "channels": cases[name].channels, "max_bandwidth": cases[name].max_bandwidth,
            "auto_converge": cases[name].auto_converge, "downtime_limit_ms": cases[name].downtime_limit_ms,
            "throttle_policy": cases[name].throttle_policy,
            "throttle_initial_pct": cases[name].throttle_initial_pct,
            "throttle_step_pct": cases[name].throttle_step_pct},
            "converged": len(done), "total_s_median": _median(case_runs, "total_s"),
            "after_setup_s_median": _median(done, "after_setup_s"),
            "downtime_ms_median": _median(done, "downtime_ms"), "runs": case_runs})
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
