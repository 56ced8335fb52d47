"""Compression and zero pages: what each codec costs and saves, in one run.

Cases (an idle guest, so every page is sent once; destination in its own
process, RAM allocated up front and zeroed before each run, as a fresh
destination's is; medians over --repeat runs):

* every codec/level on ``random`` (incompressible), ``text`` (compressible) and
  ``zero90`` (90 % zero pages, text in the rest): guest bytes per second, bytes
  on the wire, CPU seconds per GiB of guest memory in the channel processes of
  each side;
* ``zero90`` with zero-page detection off, against on (target: on ≥ 5× faster),
  over loopback and over a 10 Gbit/s link (the engine's cap over all channels);
* ``text`` under a cap of 1 Gbit/s over all channels, where compression should
  win (target: lz4 moves guest bytes ≥ 2× faster than none).
* ``--netns``: the same two link cases over a real link instead of the engine's
  cap: the destination in one network namespace, the source in another, joined
  by a veth pair whose rate the kernel sets (``tc qdisc ... tbf``, 1 and 10
  Gbit/s; tests/netns.py; needs root).

The links run bare (``--integrity none``), so the codecs' costs are not mixed
with the MAC records' (bench/secure.py measures those); ``--integrity mac`` for
the default.

    python bench/compression.py [--ram 512M] [--channels 2] [--repeat 3] [--netns]
                                [--integrity none|mac]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.remote import channel_cpu, migrate, write_report  # noqa: E402
from clients.guest import fill_ram  # noqa: E402
from engine import GuestRAM, MigrationConfig  # noqa: E402
from engine.cli import parse_size  # noqa: E402
from tests.netns import Hosts, two_hosts, unavailable  # noqa: E402

CODECS = [("none", None), ("lz4", 0), ("zstd", 1), ("zstd", 3), ("zlib", 1)]
FILLS = {"random": ("random", 0.0), "text": ("text", 0.0), "zero90": ("text", 0.9)}
GBIT = 125e6        # 1 Gbit/s in bytes/s
TEN_GBIT = 1.25e9   # 10 Gbit/s


def migrate_once(src: GuestRAM, dst: GuestRAM, config: MigrationConfig,
                 hosts: Hosts | None = None) -> dict[str, Any]:
    # A fresh destination, as a VMM starting an incoming migration has: zeroed
    # (outside the timing) and declared so, so zero pages cost it nothing.
    for block in dst.blocks:
        block.array()[:] = 0
    result, remote, main_cpu = migrate(src, dst, config, ram_is_zeroed=True, hosts=hosts)
    gib = result.guest_bytes / 2**30
    cpu = channel_cpu(result.to_dict(), remote)
    return {
        "guest_gbps": result.guest_throughput_bytes_per_s / 1e9,
        "wire_mib": result.bytes_on_wire / 2**20,
        "ratio": result.compression_ratio,
        "zero_pages": result.zero_pages,
        "transfer_s": result.transfer_time_s,
        "src_cpu_s_per_gib": cpu["source_channel_cpu_ms"] / 1000 / gib,
        "dst_cpu_s_per_gib": cpu["destination_channel_cpu_ms"] / 1000 / gib,
        "src_main_cpu_s": main_cpu,
    }


def run_case(src: GuestRAM, dst: GuestRAM, config: MigrationConfig, repeat: int,
             hosts: Hosts | None = None) -> dict[str, Any]:
    runs = [migrate_once(src, dst, config, hosts) for _ in range(repeat)]
    median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    return {"median": median, "runs": runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ram", type=parse_size, default=parse_size("512M"))
    parser.add_argument("--channels", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default="bench/results/compression.json")
    parser.add_argument("--integrity", choices=("none", "mac"), default="none")
    parser.add_argument("--netns", action="store_true",
                        help="also the link cases over a veth pair between two network namespaces")
    args = parser.parse_args()
    if args.netns and unavailable():
        parser.error(f"--netns: {unavailable()}")

    base = MigrationConfig(channels=args.channels, integrity=args.integrity)
    report: dict[str, Any] = {"ram_bytes": args.ram, "channels": args.channels,
                              "integrity": args.integrity,
                              "repeat": args.repeat, "cpus": os.cpu_count(), "cases": []}

    def line(label: str, fill: str, m: dict[str, Any]) -> None:
        print(f"{label:<31} {fill:<7} {m['guest_gbps']:>7.2f} {m['wire_mib']:>9.1f} {m['ratio']:>6.2f} "
              f"{m['src_cpu_s_per_gib']:>8.2f} {m['dst_cpu_s_per_gib']:>8.2f}", flush=True)

    print(f"{args.ram / 2**20:.0f} MiB guest, {args.channels} channels, idle guest, tcp, "
          f"median of {args.repeat}")
    print(f"{'codec (level)':<31} {'RAM':<7} {'GB/s*':>7} {'wire MiB':>9} {'ratio':>6} "
          f"{'src CPU':>8} {'dst CPU':>8}    * guest bytes/s; CPU s/GiB, channels")
    with GuestRAM.create({"pc.ram": args.ram}) as src, \
            GuestRAM.create({"pc.ram": args.ram}, prealloc=True) as dst:
        results: dict[tuple[str, str], dict[str, Any]] = {}
        for fill, (content, zero_fraction) in FILLS.items():
            fill_ram(src, content, zero_fraction, seed=11)
            for codec, level in CODECS:
                config = base.with_(compression=codec, compression_level=level)
                case = run_case(src, dst, config, args.repeat)
                label = f"{codec} ({level})" if level is not None else codec
                line(label, fill, case["median"])
                results[(label, fill)] = case["median"]
                report["cases"].append({"codec": codec, "level": level, "fill": fill, **case})
            if fill == "zero90":
                for cap, label in ((None, ""), (TEN_GBIT, " @ 10 Gbit/s")):
                    for detection in (True, False):
                        if cap is None and detection:
                            continue  # measured above as "none"
                        config = base.with_(zero_page_detection=detection, max_bandwidth=cap)
                        case = run_case(src, dst, config, args.repeat)
                        name = f"none, detection {'on' if detection else 'off'}{label}"
                        line(name, fill, case["median"])
                        results[(name, fill)] = case["median"]
                        report["cases"].append({"codec": "none", "fill": fill, "max_bandwidth": cap,
                                                "zero_page_detection": detection, **case})
        fill_ram(src, "text", seed=11)
        for codec, level in [("none", None), ("lz4", 0), ("zstd", 1)]:
            config = base.with_(compression=codec, compression_level=level, max_bandwidth=GBIT)
            case = run_case(src, dst, config, args.repeat)
            label = f"{codec} @ 1 Gbit/s"
            line(label, "text", case["median"])
            results[(label, "text")] = case["median"]
            report["cases"].append({"codec": codec, "level": level, "fill": "text",
                                    "max_bandwidth": GBIT, **case})
        if args.netns:
            netns_cases(args, src, dst, base, results, report, line)

    zero_gain = results[("none", "zero90")]["guest_gbps"] / \
        results[("none, detection off", "zero90")]["guest_gbps"]
    zero_gain_link = results[("none, detection on @ 10 Gbit/s", "zero90")]["guest_gbps"] / \
        results[("none, detection off @ 10 Gbit/s", "zero90")]["guest_gbps"]
    cap_gain = results[("lz4 @ 1 Gbit/s", "text")]["guest_gbps"] / \
        results[("none @ 1 Gbit/s", "text")]["guest_gbps"]
    report["targets"] = {"zero90_detection_on_vs_off_loopback": zero_gain,
                         "zero90_detection_on_vs_off_10gbit": zero_gain_link,
                         "lz4_vs_none_text_at_1gbit": cap_gain}
    print(f"\n90%-zero guest, detection on vs off:    {zero_gain:.1f}x faster on loopback, "
          f"{zero_gain_link:.1f}x at 10 Gbit/s (target >= 5x)")
    print(f"text at 1 Gbit/s, lz4 vs none:          {cap_gain:.1f}x faster (target >= 2x)")
    if args.netns:
        link_gain = results[("lz4 @ 1 Gbit/s veth", "text")]["guest_gbps"] / \
            results[("none @ 1 Gbit/s veth", "text")]["guest_gbps"]
        zero_veth = results[("none, detection on @ 10 Gbit/s veth", "zero90")]["guest_gbps"] / \
            results[("none, detection off @ 10 Gbit/s veth", "zero90")]["guest_gbps"]
        report["targets"].update({"lz4_vs_none_text_at_1gbit_veth": link_gain,
                                  "zero90_detection_on_vs_off_10gbit_veth": zero_veth})
        print(f"over a veth pair (tc tbf): text at 1 Gbit/s, lz4 vs none {link_gain:.1f}x; "
              f"90%-zero at 10 Gbit/s, detection on vs off {zero_veth:.1f}x")
    write_report(args.json, report)
    return 0


def netns_cases(args: argparse.Namespace, src: GuestRAM, dst: GuestRAM, base: MigrationConfig,
                results: dict[tuple[str, str], dict[str, Any]], report: dict[str, Any],
                line: Callable[[str, str, dict[str, Any]], None]) -> None:
    """The link cases over a real (namespaced) link whose rate the kernel sets."""
    fill_ram(src, "text", seed=11)
    with two_hosts(rate="1gbit") as hosts:
        for codec, level in [("none", None), ("lz4", 0), ("zstd", 1)]:
            case = run_case(src, dst, base.with_(compression=codec, compression_level=level),
                            args.repeat, hosts)
            label = f"{codec} @ 1 Gbit/s veth"
            line(label, "text", case["median"])
            results[(label, "text")] = case["median"]
            report["cases"].append({"codec": codec, "level": level, "fill": "text",
                                    "link": "veth tbf 1gbit", **case})
    fill_ram(src, "text", 0.9, seed=11)
    with two_hosts(rate="10gbit", burst="4mb") as hosts:
        for detection in (True, False):
            case = run_case(src, dst, base.with_(zero_page_detection=detection), args.repeat, hosts)
            label = f"none, detection {'on' if detection else 'off'} @ 10 Gbit/s veth"
            line(label, "zero90", case["median"])
            results[(label, "zero90")] = case["median"]
            report["cases"].append({"codec": "none", "fill": "zero90", "zero_page_detection": detection,
                                    "link": "veth tbf 10gbit", **case})


if __name__ == "__main__":
    sys.exit(main())
