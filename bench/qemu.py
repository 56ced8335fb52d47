"""QEMU's multifd and ours, side by side: the same guest RAM, end to end, in one run.

Skips with one line (exit 0) where ``qemu-system-x86_64`` is not installed.  For
each round and each channel count N (2 and 4 by default), alternating QEMU and
ours (the order reverses every round), every case moves the same amount of
random guest RAM (nothing zero, nothing compressible) over TCP on 127.0.0.1:

* ``qemu-prealloc`` — two ``qemu-system-x86_64`` processes (q35, KVM where
  /dev/kvm opens, else TCG; ``-nodefaults``, no disk: the guest idles in the
  firmware), multifd with N channels, bandwidth uncapped, downtime limit 300 ms
  (ours' default too).  The source's RAM is a ``memory-backend-file`` on a file
  in /dev/shm (``share=on``) that this script filled with random bytes once,
  before the first QEMU started.  The destination (``-incoming defer``) has
  ``prealloc=on``: its RAM is allocated and touched when it starts;
* ``qemu-sparse`` — the same with the destination's RAM file sparse: every page
  is faulted in during the migration;
* ``ours-cli`` — ``multifd listen --ram SIZE --channels N`` and ``multifd migrate
  --ram SIZE --channels N --workload idle --fill random --json``, two processes as a
  user types them; each command starts its N channel processes with its guest's
  RAM mapped, as a VMM's pool does from VM start (``listen --ram`` before the source
  connects, as QEMU's ``-incoming`` is ready; ``migrate`` while it creates its
  guest), verification and MAC records at their defaults (on);
* ``ours-warm`` — the API, with a process pool kept warm on both sides
  (``pool=``, as a VMM keeps one: its workers started by an untimed migration
  first, each keeping its side's guest RAM mapped, ``keep_ram_mapped``, as a VMM's
  pool does from VM start), the destination a process of its own with
  preallocated RAM, no verification.

What each clock includes (the ``seconds`` of a run, the ones compared):

* QEMU: from just before the QMP ``migrate`` command is written to the source
  until the destination's QMP socket delivers the ``RESUME`` event (its vCPUs
  run); ``query-status`` then confirms ``running``.  Excluded: starting both
  processes (the destination's preallocation with them), filling the source's
  RAM, QMP set-up (capabilities, parameters, ``migrate-incoming``, which opens
  the listening socket).  The RESUME event's own timestamp, relative to the
  wall clock at ``migrate``, is kept as ``resume_event_s``.
* ours-cli: the ``total_time_s`` the source prints with ``--json``: from the
  request (the migration's start inside ``migrate``, once its RAM is created and
  filled) until the destination's RESUMED answer, which it sends after its
  guest runs: handshakes, transfer, both sides' verification and the commit are
  inside (both sides' channels are up, RAM mapped, before the clock starts).
  Excluded, like QEMU's process start and filling: the ``migrate`` process's
  interpreter start, imports, creating and filling its RAM and starting its
  channels; that whole process,
  from ``exec`` to exit, is reported apart as ``process_wall_s``, and
  ``listen_done_s`` is when ``listen`` printed its result, counted from the same
  ``exec``.
* ours-warm: the source's ``total_time_s`` (the request → RESUMED, as above);
  ``call_s`` is the whole ``SourceMigration(...).run()`` call around it,
  teardown included.

Every QEMU run is checked after the clock stops: the destination's RAM file
against the source's, page by page (``pages_differing``: only the pages the
resumed firmware wrote since may differ).  Ours-cli verifies itself (its
default); ours-warm runs unverified, as asked of it.

Prints the median seconds (min–max) per case and the median of the per-round
ratios QEMU seconds / ours (> 1: ours faster; only ratios from the same round
and run are formed), writes every run to JSON and a chart (matplotlib, the
``bench`` extra).

    python bench/qemu.py [--ram 2G] [--rounds 5] [--channels 2 4] [--accel auto|kvm|tcg]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.remote import WarmDestination, channel_cpu, channel_cpu_per_gib, write_report  # noqa: E402
from clients.guest import fill_ram  # noqa: E402
from engine import GuestRAM, MigrationConfig  # noqa: E402
from engine.channel import channels_with_ram  # noqa: E402
from engine.cli import parse_size  # noqa: E402
from engine.pool import WorkerPool  # noqa: E402
from engine.shm import SEGMENT_PREFIX  # noqa: E402

QEMU = "qemu-system-x86_64"
CASES = ("qemu-prealloc", "qemu-sparse", "ours-cli", "ours-warm")
PAIRS = [(q, o) for q in ("qemu-prealloc", "qemu-sparse") for o in ("ours-cli", "ours-warm")]
BLOCK = "pc.ram"  # the RAM block's id: the same on both QEMUs, as migration requires
PAGE = 4096
SECRET = secrets.token_hex(32)
SEED = 7


class QemuError(RuntimeError):
    """QEMU failed to start, refused a command, or its migration failed."""


# ---------------------------------------------------------------------------
# QEMU: a QMP client and the processes.


class Qmp:
    """QMP over a unix socket: one JSON object per line each way; events queue up."""

    def __init__(self, path: str, process: subprocess.Popen, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        self._sock = socket.socket(socket.AF_UNIX)
        while True:
            try:
                self._sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise QemuError(f"no QMP socket at {path} (exit status {process.poll()})") from None
                time.sleep(0.01)
        self._buffer = b""
        self.events: list[dict[str, Any]] = []
        self._read(deadline)  # the greeting: it comes once the machine is built
        self.execute("qmp_capabilities")

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QemuError("QMP: no answer in time")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise QemuError("QMP: QEMU closed the socket")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        """Run `command`; its ``return`` value.  Raises QemuError on an ``error`` answer."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            message = self._read(deadline)
            if "event" in message:
                self.events.append(message)
            elif "error" in message:
                raise QemuError(f"{command}: {message['error'].get('desc', message['error'])}")
            else:
                return message.get("return")

    def wait_event(self, names: set[str], timeout: float) -> dict[str, Any]:
        """The first queued or coming event named in `names` (earlier others are dropped)."""
        deadline = time.monotonic() + timeout
        while True:
            while self.events:
                event = self.events.pop(0)
                if event["event"] in names:
                    return event
            self.events.append(self._read(deadline))

    def close(self) -> None:
        self._sock.close()


def accel_choice(asked: str) -> str:
    if asked != "auto":
        return asked
    return "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"


@contextlib.contextmanager
def qemu(binary: str, accel: str, size: int, backend: str, where: str, name: str,
         incoming: bool = False) -> Iterator[Qmp]:
    """A QEMU process whose RAM is `backend` (the options after its id); its QMP client.

    Quits it (then kills it if it lingers) on exit."""
    qmp_path, log_path = os.path.join(where, f"{name}.qmp"), os.path.join(where, f"{name}.log")
    # The default CPU model: "-cpu host" fails on nested KVM here (an MSR it cannot set).
    command = [binary, "-machine", f"q35,memory-backend={BLOCK}", "-accel", accel,
               "-m", f"{size // 2**20}M", "-object", backend, "-nographic", "-nodefaults", "-no-user-config",
               "-qmp", f"unix:{qmp_path},server=on,wait=off",
               *(["-incoming", "defer"] if incoming else [])]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    client = None
    try:
        try:
            client = Qmp(qmp_path, process)
        except (QemuError, OSError) as exc:
            with open(log_path, errors="replace") as log:
                raise QemuError(f"{name} QEMU did not start: {exc}; it said: {log.read()[-500:]}") from exc
        yield client
    finally:
        if client is not None:
            with contextlib.suppress(QemuError, OSError):
                client.execute("quit", timeout=5)
            client.close()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def fill_file(path: str, size: int, seed: int) -> None:
    """Random bytes, none zero-page or compressible, from a fixed seed."""
    bits = np.random.SFC64(seed)
    with open(path, "wb") as out:
        for start in range(0, size, 64 << 20):
            out.write(bits.random_raw(min(64 << 20, size - start) // 8).tobytes())


def remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def pages_differing(a_path: str, b_path: str, size: int) -> int:
    """Pages whose bytes differ between two RAM files (untimed check)."""
    differing = 0
    with open(a_path, "rb") as a, open(b_path, "rb") as b:
        for _ in range(0, size, 64 << 20):
            x = np.frombuffer(a.read(64 << 20), dtype=np.uint64).reshape(-1, PAGE // 8)
            y = np.frombuffer(b.read(64 << 20), dtype=np.uint64).reshape(-1, PAGE // 8)
            differing += int(np.count_nonzero((x != y).any(axis=1)))
    return differing


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def qemu_once(args: argparse.Namespace, src_path: str, where: str, channels: int,
              prealloc: bool) -> dict[str, Any]:
    """One QEMU migration of `src_path`'s RAM; its clock (module docstring) and figures."""
    size, dst_path = args.ram, src_path.replace("-src", "-dst")
    source_ram = f"memory-backend-file,id={BLOCK},size={size},mem-path={src_path},share=on"
    dest_ram = (f"memory-backend-file,id={BLOCK},size={size},mem-path={dst_path},share=on,"
                f"prealloc={'on' if prealloc else 'off'}")
    params = {"multifd-channels": channels, "max-bandwidth": 1 << 40, "downtime-limit": 300}
    caps = [{"capability": c, "state": True} for c in ("multifd", "events")]
    uri = f"tcp:127.0.0.1:{free_port()}"
    try:
        with qemu(args.qemu, args.accel, size, source_ram, where, "src") as src, \
                qemu(args.qemu, args.accel, size, dest_ram, where, "dst", incoming=True) as dst:
            for side in (src, dst):
                side.execute("migrate-set-capabilities", {"capabilities": caps})
                side.execute("migrate-set-parameters", params)
            dst.execute("migrate-incoming", {"uri": uri})
            if (state := dst.execute("query-status")["status"]) != "inmigrate":
                raise QemuError(f"the destination is {state}, not waiting for a migration")
            wall0 = time.time()
            t0 = time.perf_counter()
            src.execute("migrate", {"uri": uri})
            while (event := dst.wait_event({"RESUME", "MIGRATION"}, args.timeout))["event"] != "RESUME":
                if event["data"]["status"] == "failed":
                    raise QemuError(f"the destination failed: {dst.execute('query-migrate')}")
            seconds = time.perf_counter() - t0
            stamp = event["timestamp"]
            status = dst.execute("query-status")["status"]
            deadline = time.monotonic() + args.timeout
            while (info := src.execute("query-migrate"))["status"] not in ("completed", "failed"):
                if time.monotonic() > deadline:
                    raise QemuError(f"source still {info['status']}")
                time.sleep(0.01)
            if info["status"] != "completed" or status != "running":
                raise QemuError(f"source {info['status']} ({info.get('error-desc', '')}), "
                                f"destination {status}")
            differing = pages_differing(src_path, dst_path, size)
            if differing > size // PAGE // 100:  # more than the firmware can have written since
                raise QemuError(f"{differing} pages of the destination differ from the source")
        return {"seconds": seconds,
                "resume_event_s": stamp["seconds"] + stamp["microseconds"] / 1e6 - wall0,
                "qemu_total_time_ms": info.get("total-time"),
                "qemu_setup_time_ms": info.get("setup-time"),
                "qemu_downtime_ms": info.get("downtime"),
                "ram_transferred": info.get("ram", {}).get("transferred"),
                "ram_normal_pages": info.get("ram", {}).get("normal"),
                "ram_duplicate_pages": info.get("ram", {}).get("duplicate"),
                "pages_differing": differing}
    finally:
        remove(dst_path)


# ---------------------------------------------------------------------------
# Ours: the CLI as typed, and the API on warm pools.


def multifd_command() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "multifd")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "engine.console"]


def cli_once(args: argparse.Namespace, channels: int) -> dict[str, Any]:
    """``multifd listen`` then ``multifd migrate``, as two processes; the clocks of the docstring."""
    env = {**os.environ, "MULTIFD_SECRET": SECRET}
    size = str(args.ram)
    ready_read, ready_write = os.pipe()
    listen = subprocess.Popen(
        [*multifd_command(), "listen", "--address", "tcp://127.0.0.1:0", "--ram", size,
         "--channels", str(channels), "--json", "--ready-fd", str(ready_write)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, pass_fds=(ready_write,))
    os.close(ready_write)
    try:
        with os.fdopen(ready_read) as ready:
            line = ready.readline()  # once its RAM is preallocated
        if not line.startswith("LISTENING "):
            raise RuntimeError(f"listen did not start: {listen.communicate(timeout=30)[1][-500:]}")
        address = line.split()[1]
        said: dict[str, Any] = {}

        def read_listen() -> None:
            assert listen.stdout is not None
            said["json"] = listen.stdout.read()
            said["at"] = time.perf_counter()

        reader = threading.Thread(target=read_listen, daemon=True)
        reader.start()
        t0 = time.perf_counter()
        migrate = subprocess.run(
            [*multifd_command(), "migrate", "--to", address, "--ram", size, "--channels", str(channels),
             "--workload", "idle", "--fill", "random", "--json"],
            env=env, capture_output=True, text=True, timeout=args.timeout)
        wall = time.perf_counter() - t0
        reader.join(args.timeout)
        listen.wait(args.timeout)
        if migrate.returncode != 0 or listen.returncode != 0:
            raise RuntimeError(f"migrate exit {migrate.returncode}: {migrate.stdout[-300:]} "
                               f"{migrate.stderr[-300:]}; listen exit {listen.returncode}")
    finally:
        if listen.poll() is None:
            listen.kill()
            listen.wait()
    source, destination = json.loads(migrate.stdout), json.loads(said["json"])
    if source.get("verified") is not True:
        raise RuntimeError(f"ours-cli not verified: status {source.get('status')}, "
                           f"verified {source.get('verified')}")
    return {"seconds": source["total_time_s"], "process_wall_s": wall,
            "listen_done_s": said["at"] - t0, "setup_ms": source["setup_time_ms"],
            "downtime_ms": source["downtime_ms"], "verify_ms": source["verify_time_ms"],
            "verification": source.get("verification"),
            "transfer_s": source["transfer_time_s"], "bytes_on_wire": source["bytes_on_wire"],
            "destination_total_s": destination["total_time_s"], **channel_cpu(source, destination)}


def warm_once(src: GuestRAM, pool: WorkerPool, destination: WarmDestination, channels: int) -> dict[str, Any]:
    # Bare and unverified, as QEMU's plain multifd is.
    config = MigrationConfig(channels=channels, verify=False, integrity="none")
    result, remote, call = destination.migrate(src, pool, config)
    return {"seconds": result.total_time_s, "call_s": call, "setup_ms": result.setup_time_ms,
            "downtime_ms": result.downtime_ms, "transfer_s": result.transfer_time_s,
            "bytes_on_wire": result.bytes_on_wire, "destination_total_s": remote["total_time_s"],
            **channel_cpu(result.to_dict(), remote)}


# ---------------------------------------------------------------------------
# The run.


def summarize(args: argparse.Namespace, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per case and per-round ratios QEMU / ours, printed and returned."""
    summary: dict[str, Any] = {"cases": [], "ratios": []}
    print(f"{args.ram / 2**30:.2f} GiB random guest RAM, tcp 127.0.0.1, {args.rounds} round(s), "
          f"QEMU accel {args.accel}; seconds from the request to the destination running, "
          f"median (min-max); ratio = QEMU s / ours s per round, median (> 1: ours faster)")
    for n in args.channels:
        for case in CASES:
            mine = [r for r in runs if r["channels"] == n and r["case"] == case]
            secs = [r["seconds"] for r in mine]
            entry = {"channels": n, "case": case, "median_s": statistics.median(secs),
                     "min_s": min(secs), "max_s": max(secs)}
            cpu = ""
            if case.startswith("ours"):  # where the two cores went
                src_ms, dst_ms = channel_cpu_per_gib(mine, args.ram / 2**30)
                entry |= {"source_channel_cpu_ms_per_gib": src_ms,
                          "destination_channel_cpu_ms_per_gib": dst_ms}
                cpu = f"  channel CPU per GiB: source {src_ms:.0f} ms, destination {dst_ms:.0f} ms"
            if case == "ours-cli":  # the whole command, off the clock included
                entry["median_process_wall_s"] = statistics.median(r["process_wall_s"] for r in mine)
                cpu += f"; the migrate process, exec to exit: {entry['median_process_wall_s']:.2f} s"
            summary["cases"].append(entry)
            secs_text = f"{statistics.median(secs):7.3f} s ({min(secs):.3f}-{max(secs):.3f})"
            print(f"{n} ch  {case:<14} {secs_text}{cpu}")
        for qemu_case, ours in PAIRS:
            per_round = []
            for k in range(args.rounds):
                pick = {r["case"]: r["seconds"] for r in runs if r["channels"] == n and r["round"] == k}
                per_round.append(pick[qemu_case] / pick[ours])
            summary["ratios"].append({"channels": n, "qemu": qemu_case, "ours": ours,
                                      "per_round": per_round, "median": statistics.median(per_round)})
            print(f"{n} ch  {qemu_case} / {ours:<10} {statistics.median(per_round):6.2f}  "
                  f"(per round: {', '.join(f'{x:.2f}' for x in per_round)})")
    return summary


def chart(path: str, args: argparse.Namespace, summary: dict[str, Any]) -> None:
    try:
        import matplotlib
    except ImportError:
        print("chart skipped: matplotlib is not installed (pip install -e '.[bench]')")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(CASES)
    for i, case in enumerate(CASES):
        rows = [c for c in summary["cases"] if c["case"] == case]
        x = [k + i * width for k in range(len(rows))]
        med = [c["median_s"] for c in rows]
        errors = [[m - c["min_s"] for m, c in zip(med, rows)], [c["max_s"] - m for m, c in zip(med, rows)]]
        left.bar(x, med, width, yerr=errors, capsize=3, label=case)
    left.set_xticks([k + 0.4 - width / 2 for k in range(len(args.channels))],
                    [f"{n} channels" for n in args.channels])
    left.set_ylabel("seconds, request → destination running (median, min–max)")
    left.legend(fontsize=8)
    width = 0.8 / len(PAIRS)
    for i, (qemu_case, ours) in enumerate(PAIRS):
        rows = [r for r in summary["ratios"] if r["qemu"] == qemu_case and r["ours"] == ours]
        right.bar([k + i * width for k in range(len(rows))], [r["median"] for r in rows], width,
                  label=f"{qemu_case} / {ours}")
    right.axhline(1.0, color="black", linewidth=0.8)
    right.set_xticks([k + 0.4 - width / 2 for k in range(len(args.channels))],
                     [f"{n} channels" for n in args.channels])
    right.set_ylabel("QEMU s / ours s, median of rounds (> 1: ours faster)")
    right.legend(fontsize=8)
    fig.suptitle(f"{args.ram / 2**30:.2f} GiB random guest RAM over loopback, {args.rounds} round(s)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ram", type=parse_size, default=parse_size("2G"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--channels", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    parser.add_argument("--qemu", default=QEMU, help=f"the QEMU binary ({QEMU})")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one migration may take")
    parser.add_argument("--json", default="bench/results/qemu.json")
    parser.add_argument("--chart", default="bench/results/qemu.png")
    args = parser.parse_args()
    if shutil.which(args.qemu) is None:
        print(f"skipped: {args.qemu} is not installed (apt-get install qemu-system-x86)")
        return 0
    args.accel = accel_choice(args.accel)
    version = subprocess.run([args.qemu, "--version"], capture_output=True, text=True).stdout.split("\n")[0]

    runs: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        where = stack.enter_context(tempfile.TemporaryDirectory(prefix="mfd-bench-qemu-"))
        src_path = f"/dev/shm/{SEGMENT_PREFIX}bench-qemu-{os.getpid()}-src"
        stack.callback(remove, src_path)
        fill_file(src_path, args.ram, SEED)
        src = stack.enter_context(GuestRAM.create({BLOCK: args.ram}))
        fill_ram(src, "random", seed=SEED)
        pool = stack.enter_context(channels_with_ram(max(args.channels), "bench-qemu-src", src))
        ours = stack.enter_context(WarmDestination(src, max(args.channels), args.timeout))
        for n in args.channels:  # start both pools' workers (and imports), untimed
            warm_once(src, pool, ours, n)
        for k in range(args.rounds):
            for n in args.channels:
                # QEMU and ours alternate, and the order reverses every round.
                order = ["qemu-prealloc", "ours-cli", "qemu-sparse", "ours-warm"]
                for case in order if k % 2 == 0 else order[::-1]:
                    if case.startswith("qemu"):
                        run = qemu_once(args, src_path, where, n, prealloc=case == "qemu-prealloc")
                    elif case == "ours-cli":
                        run = cli_once(args, n)
                    else:
                        run = warm_once(src, pool, ours, n)
                    runs.append({"round": k, "channels": n, "case": case, **run})
                    print(f"  round {k + 1} {n} ch {case:<14} {run['seconds']:.3f} s", flush=True)

    summary = summarize(args, runs)
    write_report(args.json, {"ram_bytes": args.ram, "rounds": args.rounds, "channels": args.channels,
                             "accel": args.accel, "qemu": version, "cpus": os.cpu_count(),
                             **summary, "runs": runs})
    chart(args.chart, args, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
