"""Snapshot save and restore against a plain sequential write and read of the same bytes.

For each channel count N (1, 2, 4 by default) and each repetition, in one run, in
the same directory (so the same filesystem) and alternating the order:

* **baseline write** — the guest's RAM written to a file sequentially from this
  process, 8 MiB per call, then fsync: what one writer gets from this disk;
* **save** — ``SnapshotSave`` of the stopped guest over N file channels, timed
  from the call to its return: channel start-up, every page, device-free
  metadata, fsync, rename and directory fsync included;
* **baseline read** — that file read back sequentially into pre-touched memory;
* **restore** — ``SnapshotRestore`` of the snapshot into pre-touched guest RAM
  over N channels, timed from the call to its return (start-up included), and
  checked equal to the guest afterwards (untimed).

Save and restore run twice each: *cold*, each operation spawning its own channel
processes, and *warm*, on a process pool kept across operations (``pool=``, as
a VMM would keep one), which leaves only the transfer and the pre-faulting.
A third, *unchecked*, run is the warm one with the page checksums off (an
internal switch, for this comparison only): the "checksums" ratios are
throughput with them / without them, paired run by run, over the whole call and
over the transfer alone (the restore's transfer includes checking every page).

Scrub: after the warm restore, ``inspect_snapshot(verify=True)`` of the same file
three ways — sequentially in this process, over N workers of the warm pool, and
over N processes of its own (their start-up included); GB/s of guest RAM checked.

Both reads find the file in the page cache (it was just written), so a read
is a memory copy and start-up costs show.  The guest is random (no zero page
to skip), so every byte is written and read.  Prints medians, ratios
ours / baseline (throughput), and writes every run to JSON.

    python bench/snapshot.py [--ram 1G] [--channels 1 2 4] [--repeat 5] [--dir DIR]

The save and restore columns' GB/s are the cold ones; the ratios are given both ways.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.remote import write_report  # noqa: E402
from clients.guest import fill_ram  # noqa: E402
from engine import GuestRAM, MigrationConfig  # noqa: E402
from engine.cli import parse_size  # noqa: E402
from engine.pool import WorkerPool  # noqa: E402
from engine.snapshot import SnapshotRestore, SnapshotSave, inspect_snapshot  # noqa: E402

STEP = 8 << 20


def baseline_write(ram: GuestRAM, path: str) -> float:
    """Seconds to write the RAM sequentially and fsync it."""
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for block in ram.blocks:
            for at in range(0, block.size, STEP):
                view = block.pages[at:at + STEP]
                while view.nbytes:
                    view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - started


def baseline_read(ram: GuestRAM, path: str) -> float:
    """Seconds to read the file sequentially into `ram` (pre-touched)."""
    started = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        for block in ram.blocks:
            for at in range(0, block.size, STEP):
                view = block.pages[at:at + STEP]
                while view.nbytes:
                    got = os.readv(fd, [view])
                    if not got:
                        raise RuntimeError(f"{path} is short")
                    view = view[got:]
    finally:
        os.close(fd)
    return time.perf_counter() - started


def save_and_restore(src: GuestRAM, dst: GuestRAM, path: str, channels: int,
                     pool: WorkerPool | None, label: str, checksums: bool = True,
                     scrub: bool = False) -> dict[str, Any]:
    """Save `src` to `path` and restore it into `dst`; times keyed ``save_s_<label>``...

    `scrub`: also time ``inspect --verify`` of the file, in this process and over `channels`
    processes (of `pool`, and of a pool of its own)."""
    config = MigrationConfig(channels=channels)
    started = time.perf_counter()
    save = SnapshotSave(src, path, config=config, live=False, pool=pool)
    save._page_checksums = checksums
    saved = save.run()
    save_s = time.perf_counter() - started
    started = time.perf_counter()
    restore = SnapshotRestore(path, ram=dst, config=config, ram_is_zeroed=True, pool=pool)
    restore._page_checksums = checksums
    restored = restore.run()
    restore_s = time.perf_counter() - started
    if not all(np.array_equal(np.frombuffer(a.pages, np.uint8), np.frombuffer(b.pages, np.uint8))
               for a, b in zip(src.blocks, dst.blocks, strict=True)):
        raise RuntimeError(f"the {label} restore over {channels} channel(s) differs from the guest")
    figures = {"save_s": save_s, "restore_s": restore_s,
               "save_setup_ms": saved.setup_time_ms, "restore_setup_ms": restored.setup_time_ms,
               "save_transfer_s": saved.transfer_time_s, "restore_transfer_s": restored.transfer_time_s}
    if scrub:
        ways: list[tuple[str, dict[str, Any]]] = [("scrub_seq_s", {"channels": 1}),
                                                  ("scrub_warm_s", {"channels": channels, "pool": pool}),
                                                  ("scrub_cold_s", {"channels": channels})]
        for key, kwargs in ways:
            started = time.perf_counter()
            if inspect_snapshot(path, verify=True, **kwargs).damage:
                raise RuntimeError(f"the scrub found damage in {path}")
            figures[key] = time.perf_counter() - started
    os.unlink(path)
    return {f"{key}_{label}": value for key, value in figures.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ram", type=parse_size, default=parse_size("1G"))
    parser.add_argument("--channels", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where the files go (default: a temporary "
                        "directory under $TMPDIR)")
    parser.add_argument("--json", default="bench/results/snapshot.json")
    args = parser.parse_args()

    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in args.channels}
    with tempfile.TemporaryDirectory(prefix="mfd-snapbench-", dir=args.dir) as where, \
            GuestRAM.create({"pc.ram": args.ram}) as src, \
            GuestRAM.create({"pc.ram": args.ram}, prealloc=True) as dst, \
            WorkerPool("process", max(args.channels), name="bench-warm") as warm:
        fill_ram(src, "random", seed=7)
        baseline_path, snapshot_path = os.path.join(where, "plain.bin"), os.path.join(where, "vm.snap")
        # Start the warm pool's workers (and their imports) once, untimed.
        save_and_restore(src, dst, snapshot_path, max(args.channels), warm, "warm")
        for rep in range(args.repeat):
            for n in args.channels:
                run: dict[str, Any] = {}
                # Alternate the order so every kind shares the machine's drifts.
                kinds = ["baseline", "cold", "warm", "unchecked"]
                for kind in kinds if rep % 2 == 0 else kinds[::-1]:
                    if kind == "baseline":
                        run["write_s"] = baseline_write(src, baseline_path)
                        run["read_s"] = baseline_read(dst, baseline_path)
                        os.unlink(baseline_path)
                    else:
                        pool = None if kind == "cold" else warm
                        run.update(save_and_restore(src, dst, snapshot_path, n, pool, kind,
                                                    checksums=kind != "unchecked",
                                                    scrub=kind == "warm"))
                runs[n].append(run)
        where_fs = os.statvfs(where)

    gib = args.ram / 2**30
    report: dict[str, Any] = {"ram_bytes": args.ram, "repeat": args.repeat, "cpus": os.cpu_count(),
                              "dir_block_size": where_fs.f_bsize, "cases": []}
    print(f"{gib:.2f} GiB random RAM, stopped save / restore, {args.repeat} runs, medians; "
          f"GB/s = guest bytes / wall time from the call to its return; ratio = ours / baseline "
          f"(median of the paired runs); cold = channel processes spawned per operation, "
          f"warm = a process pool kept across operations")
    print(f"{'channels':>8} {'write':>6} {'save':>5} {'cold':>5} {'warm':>5}   "
          f"{'read':>5} {'restore':>7} {'cold':>5} {'warm':>5}   {'restore setup ms':>16}   "
          f"{'checksums, with / without (warm)':>33}")
    print(f"{'':>8} {'GB/s':>6} {'GB/s':>5} {'ratio':>5} {'ratio':>5}   "
          f"{'GB/s':>5} {'GB/s':>7} {'ratio':>5} {'ratio':>5}   {'cold':>7} {'warm':>8}   "
          f"{'save':>6} {'xfer':>6} {'restore':>7} {'xfer':>6}")
    for n, cases in runs.items():
        def rate(key: str) -> list[float]:
            return [args.ram / run[key] / 1e9 for run in cases]  # noqa: B023

        def ratio(ours: str, baseline: str) -> float:
            return statistics.median(o / b for o, b in zip(rate(ours), rate(baseline)))

        def median(key: str) -> float:
            return statistics.median(run[key] for run in cases)  # noqa: B023

        def speedup(without: str, with_: str) -> float:
            """Throughput with checksums / without: time without / time with, paired."""
            return statistics.median(run[without] / run[with_] for run in cases)  # noqa: B023

        case: dict[str, Any] = {"channels": n, "write_gbps": rate("write_s"), "read_gbps": rate("read_s")}
        for label in ("cold", "warm"):
            case[label] = {"save_gbps": rate(f"save_s_{label}"), "restore_gbps": rate(f"restore_s_{label}"),
                           "save_over_write": ratio(f"save_s_{label}", "write_s"),
                           "restore_over_read": ratio(f"restore_s_{label}", "read_s"),
                           "restore_setup_ms": median(f"restore_setup_ms_{label}"),
                           "save_setup_ms": median(f"save_setup_ms_{label}")}
        case["checksums"] = {
            "save": speedup("save_s_unchecked", "save_s_warm"),
            "save_transfer": speedup("save_transfer_s_unchecked", "save_transfer_s_warm"),
            "restore": speedup("restore_s_unchecked", "restore_s_warm"),
            "restore_transfer": speedup("restore_transfer_s_unchecked", "restore_transfer_s_warm"),
            "unchecked_save_gbps": rate("save_s_unchecked"),
            "unchecked_restore_gbps": rate("restore_s_unchecked")}
        case["scrub"] = {"sequential_gbps": rate("scrub_seq_s_warm"), "warm_gbps": rate("scrub_warm_s_warm"),
                         "cold_gbps": rate("scrub_cold_s_warm"),
                         "warm_over_sequential": speedup("scrub_seq_s_warm", "scrub_warm_s_warm"),
                         "cold_over_sequential": speedup("scrub_seq_s_warm", "scrub_cold_s_warm")}
        case["runs"] = cases
        cold, warm_, sums = case["cold"], case["warm"], case["checksums"]
        print(f"{n:>8} {statistics.median(case['write_gbps']):>6.2f} "
              f"{statistics.median(cold['save_gbps']):>5.2f} {cold['save_over_write']:>5.2f} "
              f"{warm_['save_over_write']:>5.2f}   {statistics.median(case['read_gbps']):>5.2f} "
              f"{statistics.median(cold['restore_gbps']):>7.2f} {cold['restore_over_read']:>5.2f} "
              f"{warm_['restore_over_read']:>5.2f}   {cold['restore_setup_ms']:>7.0f} "
              f"{warm_['restore_setup_ms']:>8.0f}   {sums['save']:>6.2f} {sums['save_transfer']:>6.2f} "
              f"{sums['restore']:>7.2f} {sums['restore_transfer']:>6.2f}")
        report["cases"].append(case)
    print("scrub (inspect --verify), GB/s of guest RAM: sequential in one process; N channels on the "
          "warm pool; N on a pool of its own (start-up included); ratios to sequential")
    for case in report["cases"]:
        scrub = case["scrub"]
        speeds = (statistics.median(scrub[key]) for key in ("sequential_gbps", "warm_gbps", "cold_gbps"))
        print(f"{case['channels']:>8} " + " ".join(f"{speed:>6.2f}" for speed in speeds) + "   "
              f"{scrub['warm_over_sequential']:>5.2f} {scrub['cold_over_sequential']:>5.2f}")
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
