"""Set-up of a migration, step by step: from the request to the first page on the wire.

For each way of starting channels and each repetition, in one run and alternating
the order, an idle guest of random RAM migrates from this process to a destination
VMM in a process of its own (started, with its RAM touched, before the clock runs):

* **spawn** — each side's operation spawns its channel processes (a fresh
  interpreter each, importing the engine);
* **forkserver** — each side's operation forks its channel processes from the
  process's fork server (``engine.pool.fork_server``), whose interpreter already
  imported the channel modules; the server was started before the run, as the CLI
  starts it when a command begins;
* **warm** — both sides run their channels on a process pool started (and its
  channel modules imported, ``engine.pool.warm_up``) before the migration, as a VMM
  keeps one and ``listen`` starts one before a source connects.

Printed per case (medians): the request → first page on the wire (the earliest
channel's first ``sendmsg``, CLOCK_MONOTONIC in every process), the set-up steps
the source marks (main channel handshake, channel handshakes, channel processes up
and serving: then precopy starts), each channel's mapping of guest RAM, and the
whole migration.  Then a timeline of both sides, ms after the source's request:
each side's steps as they end and its channel processes' own steps (``started``:
the job runs in its process, ``attached``, ``ready``, ``first_job``), from the
results' ``setup_started_at`` and ``channel_steps_ms``.  JSON of every run goes to
``bench/results/setup.json``.

    python bench/setup.py [--ram 1G] [--channels 2] [--repeat 5] [--cases spawn forkserver warm]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.remote import SECRET, against_destination, write_report  # noqa: E402
from clients.guest import fill_ram  # noqa: E402
from engine import DestinationMigration, GuestRAM, MigrationConfig, MigrationResult, SourceMigration  # noqa: E402
from engine.channel import channel_fork_server, channel_pool  # noqa: E402
from engine.cli import parse_size  # noqa: E402
from engine.pool import WorkerPool, warm_up  # noqa: E402
from engine.shm import RamHandle  # noqa: E402

CASES = ("spawn", "forkserver", "warm")


def _start_method(case: str) -> str:
    return "spawn" if case == "spawn" else "forkserver"


def _destination(handle: RamHandle, case: str, channels: int, pipe: Connection) -> None:
    """The destination VMM: its RAM attached and touched, its pool warm (case
    "warm"), all before it tells the source where it listens."""
    ram = GuestRAM.attach(handle, populate=True)
    config = MigrationConfig(channels=channels, start_method=_start_method(case)).for_destination()
    # spawned workers, as the bench always had them (channel_pool's default is the fork server)
    pool = channel_pool(channels, "dst-warm", start_method="spawn") if case == "warm" else None
    try:
        if pool is not None:
            warm_up(pool)
        elif case == "forkserver":
            channel_fork_server().wait_ready()
        destination = DestinationMigration("tcp://127.0.0.1:0", secret=SECRET, ram=ram, config=config,
                                           ram_is_zeroed=False, pool=pool)
        pipe.send(destination.address)
        pipe.send(destination.run().to_dict())
    except BaseException as exc:
        pipe.send({"error": repr(exc)})
    finally:
        if pool is not None:
            pool.shutdown()
        ram.close()
        pipe.close()


def one_run(src: GuestRAM, dst: GuestRAM, case: str, channels: int,
            pool: WorkerPool | None) -> dict[str, Any]:
    def source(address: str) -> tuple[MigrationResult, float]:
        config = MigrationConfig(channels=channels, start_method=_start_method(case))
        started = time.perf_counter()
        result = SourceMigration(src, address, secret=SECRET, config=config, pool=pool).run()
        return result, time.perf_counter() - started

    (result, total_s), remote = against_destination(_destination, (dst.handle, case, channels), source)
    extra = result.extra
    return {"case": case, "total_s": total_s, "setup_ms": result.setup_time_ms,
            "timeline_ms": timeline(extra, remote),
            "first_packet_ms": extra["first_packet_ms"], "steps_ms": extra["setup_steps_ms"],
            "channel_attach_ms": extra["channel_attach_ms"],
            "destination_setup_ms": remote["setup_time_ms"],
            "destination_steps_ms": remote["setup_steps_ms"],
            "destination_attach_ms": remote.get("channel_attach_ms")}


def _side_events(side: str, extra: dict[str, Any], shift_ms: float) -> dict[str, float]:
    """One side's set-up on the request's timeline: its main process's steps (as
    they end), and its channels' own steps (the last channel to reach each, but
    the first one to get a job)."""
    events, at = {f"{side} request seen": shift_ms}, shift_ms
    for step, ms in extra["setup_steps_ms"].items():
        at += ms
        events[f"{side} {step}"] = at
    channels = extra.get("channel_steps_ms") or []
    for step in channels[0] if channels else ():
        pick = min if step == "first_job" else max
        events[f"{side} ch {step}"] = shift_ms + pick(ch[step] for ch in channels if step in ch)
    return events


def timeline(source: dict[str, Any], destination: dict[str, Any]) -> dict[str, float]:
    """Every step of both sides in ms after the source's request (both clocks are
    CLOCK_MONOTONIC on this host), in the order they happened."""
    shift = (destination["setup_started_at"] - source["setup_started_at"]) * 1000
    events = {**_side_events("src", source, 0.0), **_side_events("dst", destination, shift)}
    events.pop("src request seen")
    events["src first packet"] = source["first_packet_ms"]
    return dict(sorted(events.items(), key=lambda item: item[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ram", type=parse_size, default=parse_size("1G"))
    parser.add_argument("--channels", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--json", default="bench/results/setup.json")
    args = parser.parse_args()
    runs: list[dict[str, Any]] = []
    with GuestRAM.create({"pc.ram": args.ram}) as src, \
            GuestRAM.create({"pc.ram": args.ram}, prealloc=True) as dst, \
            channel_pool(args.channels, "src-warm", start_method="spawn") as warm:
        fill_ram(src, "random", seed=7)
        if "forkserver" in args.cases:
            channel_fork_server().wait_ready()  # as the CLI starts it when a command begins
        if "warm" in args.cases:
            warm_up(warm)
        for rep in range(args.repeat):
            for case in args.cases if rep % 2 == 0 else args.cases[::-1]:
                runs.append(one_run(src, dst, case, args.channels, warm if case == "warm" else None))
    print(f"{args.ram / 2**30:.2f} GiB random RAM, {args.channels} channels, {args.repeat} runs, "
          f"medians (ms); steps as the source marks them; attach = a channel mapping guest RAM")
    steps = list(runs[0]["steps_ms"])
    header = ["case", "first packet", *steps, "src attach", "dst attach", "dst setup", "total s"]
    print(" | ".join(header))
    for case in args.cases:
        cases = [run for run in runs if run["case"] == case]

        def median(get: Any) -> float:
            return statistics.median(get(run) for run in cases)  # noqa: B023
        row = [case, f"{median(lambda r: r['first_packet_ms']):.1f}"]
        row += [f"{median(lambda r, s=s: r['steps_ms'][s]):.1f}" for s in steps]
        row += [f"{median(lambda r: r['channel_attach_ms']):.1f}",
                f"{median(lambda r: r['destination_attach_ms'] or 0.0):.1f}",
                f"{median(lambda r: r['destination_setup_ms']):.1f}",
                f"{median(lambda r: r['total_s']):.2f}"]
        print(" | ".join(row))
    print("timeline: each step's end, ms after the request (medians; ch = the channel "
          "processes: the last one to reach a step, the first to get a job)")
    table = {event: [statistics.median(run["timeline_ms"][event] for run in runs
                                       if run["case"] == case and event in run["timeline_ms"])
                     for case in args.cases]
             for event in runs[-1]["timeline_ms"]}
    print(" | ".join(["step", *args.cases]))
    for event, cells in sorted(table.items(), key=lambda item: item[1][-1]):
        print(" | ".join([event, *(f"{cell:.1f}" for cell in cells)]))
    write_report(args.json, {"ram_bytes": args.ram, "channels": args.channels,
                             "repeat": args.repeat, "cpus": os.cpu_count(), "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
