"""The `multifd` command: the demo, the two-process listen/migrate pair, errors."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from engine.destination import DestinationMigration
from engine.errors import MigrationError
from engine.shm import GuestRAM
from engine.source import SourceMigration
from engine.sync import wait_readable
from tests.leaks import segment_mappings

MULTIFD = [sys.executable, "-m", "engine.console"]  # the `multifd` console script
REQUIRED = {"status", "ram_bytes", "channels", "total_time_s", "setup_time_ms", "downtime_ms",
            "rounds", "pages_sent", "bytes_on_wire", "throughput_bytes_per_s", "verified"}


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*MULTIFD, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@contextlib.contextmanager
def _running(*args: str, **popen: Any) -> Iterator[subprocess.Popen]:
    """`multifd ARGS` started (the tests' secret, output piped, `popen` for the rest);
    killed and reaped at the block's end if it still runs then (a failed test)."""
    process = subprocess.Popen([*MULTIFD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "MULTIFD_SECRET": "s3cret"}, **popen)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_demo_json(transport: str) -> None:
    done = run("demo", "--ram", "16M", "--channels", "2", "--transport", transport,
               "--workload", "incrementer", "--dirty-rate", "16M", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert REQUIRED <= summary.keys()
    assert summary["status"] == "completed"
    assert summary["verified"] is True
    assert summary["ram_bytes"] == 16 << 20 and summary["channels"] == 2
    assert summary["rounds"] >= 2 and summary["pages_sent"] > 4096  # dirtied pages went again
    assert summary["destination"]["status"] == "completed"
    assert summary["destination"]["verified"] is True


def test_demo_with_devices_reports_each_device() -> None:
    done = run("demo", "--ram", "8M", "--workload", "random", "--dirty-rate", "8M",
               "--devices", "3", "--device-state", "600K", "--device-save-latency", "10",
               "--device-load-latency", "20", "--device-load", "serial", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["devices_verified"] is True
    assert [d["idstr"] for d in summary["devices"]] == ["dev0", "dev1", "dev2"]
    for device in summary["devices"]:
        assert device["verified"] is True
        assert device["bytes"] > 600 << 10          # the state and its config part
        assert device["save_ms"] >= 10 and device["load_ms"] >= 20
    # Serial loading: the destination held the guest while all three loaded.
    assert summary["destination"]["downtime_ms"] >= 3 * 20


def test_a_forced_switchover_says_the_limit_was_out_of_reach() -> None:
    """max_rounds ran out above the downtime limit and --on-max-rounds switchover
    (the default) switched over anyway: the summary says so beside the downtime,
    and the JSON carries it; a migration that converged carries nothing of it."""
    # Capped, round 1 takes ~0.5 s: the guest has dirtied pages by its end, whatever the timing.
    slow = ("--max-bandwidth", "16M", "--downtime-limit", "0", "--max-rounds", "2")
    forced = run("demo", "--ram", "8M", "--workload", "random", "--dirty-rate", "8M", *slow)
    assert forced.returncode == 0, forced.stderr
    assert "(the 0 ms limit was out of reach after 2 rounds: switched over as --on-max-rounds says)" \
        in forced.stdout
    forced = run("demo", "--ram", "8M", "--workload", "random", "--dirty-rate", "8M", *slow, "--json")
    summary = json.loads(forced.stdout)
    assert summary["switchover_forced"] == {"after_rounds": 2, "downtime_limit_ms": 0.0}
    calm = json.loads(run("demo", "--ram", "8M", "--json").stdout)
    assert "switchover_forced" not in calm


def test_demo_dumps_equal_images(tmp_path: Path) -> None:
    done = run("demo", "--ram", "8M", "--dump-dir", str(tmp_path), "--json")
    assert done.returncode == 0, done.stderr
    source, dest = tmp_path / "source.ram", tmp_path / "dest.ram"
    assert source.stat().st_size == dest.stat().st_size == 8 << 20
    assert source.read_bytes() == dest.read_bytes()
    # Guest memory, readable by its owner only (as the RAM and a snapshot are).
    assert source.stat().st_mode & 0o777 == dest.stat().st_mode & 0o777 == 0o600
    # Again into the same directory: new files, and a symlink planted there is not followed.
    planted = tmp_path / "elsewhere"
    planted.write_bytes(b"untouched")
    source.unlink()
    source.symlink_to(planted)
    assert run("demo", "--ram", "8M", "--dump-dir", str(tmp_path), "--json").returncode == 0
    assert planted.read_bytes() == b"untouched" and not source.is_symlink()
    assert source.read_bytes() == dest.read_bytes()


def test_demo_human_summary() -> None:
    done = run("demo", "--ram", "8M", "--workload", "idle")
    assert done.returncode == 0, done.stderr
    assert "status           completed (source)" in done.stdout
    assert "memory verified  yes" in done.stdout


@pytest.fixture
def listener(request: pytest.FixtureRequest) -> Iterator[tuple[subprocess.Popen, str]]:
    """`multifd listen` (its extra arguments: the test's parametrize "listen_args")
    and the address it printed; killed if the test left it running."""
    extra = getattr(request, "param", ())
    process = subprocess.Popen(
        [*MULTIFD, "listen", "--address", "tcp://127.0.0.1:0", "--accept-timeout", "30", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "MULTIFD_SECRET": "s3cret"})
    try:
        said = process.stderr if "--json" in extra else process.stdout  # --json: stdout is the document
        assert said is not None
        line = said.readline() if wait_readable([said], 30) else ""
        assert line.startswith("LISTENING "), line
        yield process, line.split()[1]
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def test_listen_and_migrate_as_two_processes(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(os.urandom(32).hex().encode())
    listener = subprocess.Popen(
        [*MULTIFD, "listen", "--address", "tcp://127.0.0.1:0", "--secret-file", str(secret),
         "--json", "--accept-timeout", "60", "--run-after", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert listener.stderr is not None  # with --json the address is said on stderr
        ready = wait_readable([listener.stderr], 60)
        line = listener.stderr.readline() if ready else ""
        assert line.startswith("LISTENING tcp://127.0.0.1:"), line
        address = line.split()[1]
        done = run("migrate", "--to", address, "--secret-file", str(secret), "--ram", "8M",
                   "--channels", "3", "--json")
        assert done.returncode == 0, done.stderr
        source = json.loads(done.stdout)
        out, err = listener.communicate(timeout=60)
        assert listener.returncode == 0, err
        assert len(out.splitlines()) == 1  # exactly one JSON document on stdout
        destination = json.loads(out)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.communicate()
    assert source["status"] == destination["status"] == "completed"
    assert source["verified"] is True and source["channels"] == 3
    assert destination["guest_pages_written_after_resume"] > 0  # the guest ran afterwards
    assert destination["committed"] is True and destination["migration_id"] == source["migration_id"]


@pytest.mark.parametrize("listener", [("--devices", "2", "--device-load-latency", "20", "--json")],
                         indirect=True)
def test_each_side_reports_its_own_part_of_the_devices(listener: tuple[subprocess.Popen, str]) -> None:
    """The source knows what it saved, the destination what it loaded: neither
    makes up the other's figure (the source printed "loaded in 0 ms")."""
    process, address = listener
    done = run("migrate", "--to", address, "--ram", "8M", "--devices", "2", "--json",
               env={"MULTIFD_SECRET": "s3cret"})
    assert done.returncode == 0, done.stderr
    out, _ = process.communicate(timeout=60)
    source, destination = json.loads(done.stdout), json.loads(out)
    for device in source["devices"]:
        assert device["save_ms"] >= 0 and device["load_ms"] is None and device["verified"] is None
    for device in destination["devices"]:
        assert device["save_ms"] is None and device["load_ms"] >= 20 and device["verified"] is True


@pytest.mark.heavy  # a demo with devices runs by default (test_demo_with_devices_reports_each_device)
def test_demo_with_iterative_devices() -> None:
    """--device-iterative: the devices' state goes in precopy, changing as it goes
    (--device-dirty-rate), and arrives verified."""
    done = run("demo", "--ram", "8M", "--devices", "2", "--device-state", "2M", "--device-iterative",
               "--device-dirty-rate", "50", "--device-load-latency", "100", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["devices_verified"] is True
    for device in summary["devices"]:
        assert device["verified"] is True and device["live_bytes"] >= 2 << 20


def test_device_dirty_rate_needs_iterative_devices() -> None:
    refused = run("demo", "--ram", "8M", "--devices", "1", "--device-dirty-rate", "2")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip() == ("multifd: failed: --device-dirty-rate needs --device-iterative "
                                      "(a plain demo device's state does not change while the guest runs)")


def test_errors_are_one_line_without_traceback() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    done = run("migrate", "--to", f"tcp://127.0.0.1:{port}", "--ram", "4M",
               env={"MULTIFD_SECRET": "x"})
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0
    assert done.stderr.startswith("multifd: failed: cannot connect to tcp://127.0.0.1:")


def test_missing_secret_is_a_clear_error() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MULTIFD_SECRET"}
    done = subprocess.run([*MULTIFD, "listen", "--address", "tcp://127.0.0.1:0"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 1
    assert "no shared secret" in done.stderr and "Traceback" not in done.stderr


def test_failure_json() -> None:
    done = run("migrate", "--to", "bogus://nowhere", "--ram", "4M", "--json",
               env={"MULTIFD_SECRET": "x"})
    assert done.returncode == 1
    assert json.loads(done.stdout) == {"status": "failed", "error": json.loads(done.stdout)["error"]}
    assert "unknown transport 'bogus'" in json.loads(done.stdout)["error"]


def test_save_restore_inspect(tmp_path: Path) -> None:
    snap, saved, restored = tmp_path / "vm.snap", tmp_path / "saved", tmp_path / "restored"
    done = run("save", str(snap), "--live", "--ram", "16M", "--workload", "incrementer",
               "--dirty-rate", "16M", "--channels", "3", "--devices", "2", "--device-state", "300K",
               "--dump-dir", str(saved), "--json")
    assert done.returncode == 0, done.stderr
    save = json.loads(done.stdout)
    assert save["status"] == "completed" and save["role"] == "save" and save["live"] is True
    assert save["path"] == str(snap) and save["rounds"] >= 2 and save["channels"] == 3
    assert [d["idstr"] for d in save["devices"]] == ["dev0", "dev1"]

    done = run("inspect", str(snap), "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["live"] is True and info["ram_bytes"] == 16 << 20
    assert info["blocks"][0]["name"] == "pc.ram" and info["blocks"][0]["pages"] == 4096
    assert [(d["idstr"], d["chunks"]) for d in info["devices"]] == [("dev0", 3), ("dev1", 3)]

    done = run("restore", str(snap), "--channels", "2", "--dump-dir", str(restored), "--json")
    assert done.returncode == 0, done.stderr
    restore = json.loads(done.stdout)
    assert restore["role"] == "restore" and restore["devices_verified"] is True
    assert restore["pages_sent"] + restore["zero_pages"] == 4096
    # The restored RAM is the guest's RAM at the pause, byte for byte.
    assert (saved / "source.ram").read_bytes() == (restored / "dest.ram").read_bytes()

    human = run("inspect", str(snap))
    assert human.returncode == 0
    assert "block pc.ram" in human.stdout and "device dev1/0" in human.stdout


def test_restore_of_a_damaged_file_is_one_line(tmp_path: Path) -> None:
    snap = tmp_path / "vm.snap"
    assert run("save", str(snap), "--ram", "4M").returncode == 0
    with open(snap, "r+b") as f:
        f.truncate(snap.stat().st_size // 2)
    for command in ("restore", "inspect"):
        done = run(command, str(snap))
        assert done.returncode == 1
        assert "Traceback" not in done.stderr and done.stderr.strip().count("\n") == 0
        assert "snapshot is truncated" in done.stderr


def test_restore_of_a_kvm_snapshot_without_guest_kvm_says_so(tmp_path: Path) -> None:
    """The vCPU's state would go to a demo device and fail as a JSON error after
    the load started; the command names the flag instead, before anything loads."""
    from clients.devices import DemoDevice
    from clients.kvm.machine import VcpuDevice
    from engine.snapshot import SnapshotSave

    snap = tmp_path / "vm.snap"
    with GuestRAM.create({"pc.ram": 1 << 20}) as ram:
        SnapshotSave(ram, str(snap), devices=[DemoDevice(VcpuDevice.idstr, state_size=4096)]).run()
    done = run("restore", str(snap))
    assert done.returncode == 1
    assert f"holds a KVM guest (device {VcpuDevice.idstr}): restore it with --guest kvm" in \
        _one_error_line(done.stderr)


def _one_error_line(stderr: str, status: str = "failed") -> str:
    assert "Traceback" not in stderr and "terminating" not in stderr, stderr
    assert stderr.endswith("\n") and stderr.count("\n") == 1, stderr
    assert stderr.startswith(f"multifd: {status}: "), stderr
    return stderr


def _channel_processes(pid: int) -> list[psutil.Process]:
    """The channel processes of the command `pid`: forked by its fork server (or spawned)."""
    found = []
    for child in psutil.Process(pid).children():
        with contextlib.suppress(psutil.Error):  # gone, or a zombie, meanwhile
            command = " ".join(child.cmdline())
            if "engine.pool._forkserver" in command:
                found += child.children()
            elif "spawn_main" in command:
                found.append(child)
    return found


def test_a_channel_killed_in_setup_is_one_line_on_each_side(listener) -> None:
    """A destination channel process dies as the channels start, the others are stuck:
    each side says so in one line (no pool warnings about terminating the stuck
    workers, no traceback)."""
    process, address = listener
    # The cap keeps the transfer going for seconds: the channels are still at work when
    # they die (a source whose channels are up with its guest is done in milliseconds).
    workers: list[psutil.Process] = []
    with _running("migrate", "--to", address, "--ram", "16M", "--channels", "3",
                  "--max-bandwidth", "4M") as source:
        try:
            deadline = time.monotonic() + 20
            while len(workers) < 3 and time.monotonic() < deadline:
                workers = _channel_processes(process.pid)
                time.sleep(0.005)
            assert len(workers) == 3
            for stuck in workers[1:]:  # they cannot stop in time: the pool terminates them
                stuck.suspend()
            workers[0].kill()
            _, source_err = source.communicate(timeout=30)
            _, listen_err = process.communicate(timeout=30)
        finally:
            for worker in workers:
                with contextlib.suppress(psutil.NoSuchProcess):
                    worker.kill()
    assert source.returncode == process.returncode == 1
    assert "died with exit code -9" in _one_error_line(source_err)
    assert "died with exit code -9" in _one_error_line(listen_err)


def _family(pid: int) -> set[int]:
    return {pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))}


def _gone(pid: int) -> bool:
    """Exited: reaped, or a zombie of whichever process adopted it."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _left_after(pids: Iterable[int], timeout: float = 10) -> list[int]:
    """Those of `pids` still running once `timeout` s have passed (none: at once)."""
    deadline = time.monotonic() + timeout
    while (left := [pid for pid in pids if not _gone(pid)]) and time.monotonic() < deadline:
        time.sleep(0.01)
    return left


def _maps_guest_ram(pid: int) -> bool:
    return bool(segment_mappings(pid))


@pytest.mark.parametrize("listener", [("--ram", "32M", "--channels", "2", "--json")], indirect=True)
@pytest.mark.parametrize("channels", [2, 3])
def test_listen_with_ram_has_its_channels_mapping_it_before_a_source_comes(listener, channels: int) -> None:
    """listen --ram --channels N: N channel processes are up with the RAM mapped
    before any source connects, and serve a source with N channels (no process is
    started for it); a source asking for more still migrates, on channel processes
    started for its migration."""
    process, address = listener
    family = _family(process.pid)
    assert sum(map(_maps_guest_ram, family)) == 3  # listen itself, and its two channel processes
    source = subprocess.Popen([*MULTIFD, "migrate", "--to", address, "--ram", "32M", "--channels",
                               str(channels), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "MULTIFD_SECRET": "s3cret"})
    started: set[int] = set()
    while source.poll() is None:
        with contextlib.suppress(psutil.Error):
            started |= _family(process.pid) - family
        time.sleep(0.002)
    out, err = source.communicate()
    assert source.returncode == 0, err
    listened, _ = process.communicate(timeout=60)
    assert process.returncode == 0
    assert json.loads(listened)["status"] == json.loads(out)["status"] == "completed"
    assert (not started) if channels == 2 else len(started) >= channels, started


def test_migrate_has_its_channels_mapping_the_guest_before_it_connects() -> None:
    """migrate starts its --channels channel processes with the guest, RAM mapped,
    before the migration begins: they are up when it connects to a destination that
    never answers (a migration forks its own only after the handshakes).  SIGTERM
    then ends the command in one line, leaving none of them."""
    with socket.create_server(("127.0.0.1", 0)) as server, \
            _running("migrate", "--to", f"tcp://127.0.0.1:{server.getsockname()[1]}", "--ram", "32M",
                     "--channels", "3") as source:
        server.settimeout(30)
        conn, _ = server.accept()  # the request: its main channel connects, and waits
        with conn:
            family = _family(source.pid)
            workers = [worker.pid for worker in _channel_processes(source.pid)]
            # the 3 channels, and the synthetic guest's own process
            assert len(workers) == 4 and all(map(_maps_guest_ram, workers)), workers
            source.send_signal(signal.SIGTERM)
            _, err = source.communicate(timeout=30)
    assert source.returncode == 130, err
    _one_error_line(err, "cancelled")
    left = _left_after(family - {source.pid}, 10)  # a worker may still be exiting on a loaded machine
    assert not left, [psutil.Process(pid).cmdline() for pid in left]


def test_ctrl_c_from_a_terminal_reaches_the_command_only() -> None:
    """A terminal's Ctrl-C goes to its foreground process group: the command's own.
    Every process the command started (guest, fork server, channels) is in a group
    of its own, so the command alone gets it, cancels in one line, and stops them:
    one that got it as it started printed its import's traceback."""
    with socket.create_server(("127.0.0.1", 0)) as server, \
            _running("migrate", "--to", f"tcp://127.0.0.1:{server.getsockname()[1]}", "--ram", "16M",
                     start_new_session=True) as source:  # its group: a terminal's foreground job
        server.settimeout(30)
        conn, _ = server.accept()  # set up: its main channel connects, and waits
        with conn:
            family = _family(source.pid)
            assert len(family) >= 4  # the command, its fork server, channels, the guest
            # the resource tracker included: its own group spares it a kill of the command's
            assert [" ".join(psutil.Process(pid).cmdline()) for pid in family - {source.pid}
                    if os.getpgid(pid) == source.pid] == []
            os.killpg(source.pid, signal.SIGINT)
            _, err = source.communicate(timeout=30)
    assert source.returncode == 130, err
    assert err.splitlines() == ["multifd: cancelling: waiting for the teardown",
                                "multifd: cancelled: interrupted (Ctrl-C)"], err
    left = _left_after(family - {source.pid}, 10)
    assert not left, [psutil.Process(pid).cmdline() for pid in left]


def _catches(pid: int, number: int) -> bool:
    """Whether process `pid` has a handler of its own for signal `number`."""
    with open(f"/proc/{pid}/status") as f:
        caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    return bool(caught >> (number - 1) & 1)


@pytest.mark.parametrize(("number", "why"), [(signal.SIGINT, "interrupted"),
                                             (signal.SIGTERM, "terminated (SIGTERM)")])
def test_a_signal_while_the_command_loads_is_one_line(number: int, why: str) -> None:
    """Ctrl-C or SIGTERM in the command's first ~0.4 s, while its modules load: the
    one line and 130 of any cancel (it was a 26-36-line KeyboardInterrupt traceback,
    and SIGTERM killed it with no word).  The console script's handler is in place
    before numpy (the bulk of the loading) is, and the signal comes then."""
    with _running("save", "--ram", "16M", "--json", os.devnull) as save:
        deadline = time.monotonic() + 30
        while not _catches(save.pid, signal.SIGTERM) and time.monotonic() < deadline:
            time.sleep(0.001)
        with open(f"/proc/{save.pid}/maps") as f:
            loaded = "_multiarray_umath" in f.read()
        save.send_signal(number)
        out, err = save.communicate(timeout=30)
    assert not loaded, "the console script's handler came after the engine's modules had loaded"
    assert save.returncode == 130, err
    assert err.splitlines() == [f"multifd: cancelled: {why}"], err
    assert json.loads(out) == {"status": "cancelled", "error": why}


def test_ctrl_c_the_moment_listen_says_listening_is_a_cancel(listener) -> None:
    """From its LISTENING line on, `listen` is waiting for its source: a Ctrl-C then
    cancels it as documented, with both lines (it used to come before the wait's
    handler, and only the last line came)."""
    process, _ = listener
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 130, err
    assert err.splitlines() == ["multifd: cancelling: waiting for the teardown",
                                "multifd: cancelled: interrupted (Ctrl-C)"], err


def test_sigterm_while_the_demo_starts_its_destination_is_one_line() -> None:
    """SIGTERM while the demo waits for its destination process to listen: exit 130,
    one line and the one JSON object, the destination process stopped (it died
    silently of the signal, 143, nothing said)."""
    with _running("demo", "--ram", "64M", "--json") as demo:
        deadline = time.monotonic() + 30
        while not (started := _children_running(demo.pid, "listen")) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert started
        family = _family(demo.pid)
        demo.send_signal(signal.SIGTERM)  # the destination imports, fills its RAM, starts channels
        out, err = demo.communicate(timeout=60)
    assert demo.returncode == 130, err
    _one_error_line(err, "cancelled")
    assert json.loads(out)["status"] == "cancelled"
    left = _left_after(family, 10)
    assert not left


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_a_killed_demo_leaves_no_destination(transport: str) -> None:
    """SIGKILL of the demo alone, its destination listening for it: the destination
    (started with a --lifeline-fd) is cancelled at once with its channels, fork server
    and RAM, instead of waiting out its 60 s accept timeout; a unix socket's file goes
    with it, and no directory was made for it."""
    with _running("demo", "--ram", "256M", "--channels", "2", "--transport", transport) as demo:
        assert demo.stdout is not None
        line = demo.stdout.readline()  # "destination process N listening on ...": set up, unconnected
        assert " listening on " in line, line
        family = _family(demo.pid) - {demo.pid}
        assert _children_running(demo.pid, "listen")
        demo.kill()
        demo.wait()
    left = _left_after(family, 15)
    assert not left, [psutil.Process(pid).cmdline() for pid in left]
    address = line.split(" listening on ")[1].strip()
    if transport == "unix":
        socket_path = address.removeprefix("unix://")
        assert os.path.dirname(socket_path) == tempfile.gettempdir()  # no directory of its own
        assert not os.path.exists(socket_path)


def test_sigterm_to_the_demos_group_while_its_destination_starts_is_a_cancel() -> None:
    """SIGTERM to the whole group (a hang-up, systemd's stop) reaches the demo and its
    starting destination at once; the destination ends before its LISTENING line, and
    the demo reported that as a failure (exit 1) instead of its own cancel (130)."""
    with _running("demo", "--ram", "64M", start_new_session=True) as demo:
        deadline = time.monotonic() + 30
        while not _children_running(demo.pid, "listen") and time.monotonic() < deadline:
            time.sleep(0.005)
        assert _children_running(demo.pid, "listen"), "the demo's destination never started"
        os.killpg(demo.pid, signal.SIGTERM)
        _, err = demo.communicate(timeout=60)
    assert demo.returncode == 130, err
    assert err.splitlines()[-1] == "multifd: cancelled: terminated (SIGTERM)", err


def test_a_lifeline_is_a_pipe_and_its_end_says_why_listen_stops(tmp_path: Path) -> None:
    """--lifeline-fd: a descriptor that is not a pipe is refused (it read EOF at once and
    stopped listen, "terminated (SIGTERM)"); the pipe's end is named as the reason."""
    regular = tmp_path / "not-a-pipe"
    regular.write_bytes(b"")
    with open(regular, "rb") as f:
        fd = f.fileno()
        done = subprocess.run([*MULTIFD, "listen", "--address", "tcp://127.0.0.1:0", "--lifeline-fd",
                               str(fd)], pass_fds=(fd,), capture_output=True, text=True,
                              timeout=60, env={**os.environ, "MULTIFD_SECRET": "s3cret"})
    assert done.returncode == 1
    assert done.stderr == f"multifd: failed: --lifeline-fd {fd} is not a pipe: give the read end " \
                          f"of one whose write end only the starting process holds\n"
    read, write = os.pipe()
    try:
        with _running("listen", "--address", "tcp://127.0.0.1:0", "--lifeline-fd", str(read),
                      pass_fds=(read,)) as listen:
            os.close(read)
            assert listen.stdout is not None and listen.stdout.readline().startswith("LISTENING ")
            os.close(write)  # the supervisor is gone
            write = -1
            _, err = listen.communicate(timeout=30)
    finally:
        if write >= 0:
            os.close(write)
    assert listen.returncode == 130
    assert err.splitlines()[-1] == ("multifd: cancelled: the process that started it is gone "
                                    "(its --lifeline-fd ended)"), err


def _children_running(pid: int, word: str) -> list[int]:
    """The children of `pid` whose command line holds `word`."""
    found = []
    for child in psutil.Process(pid).children():
        with contextlib.suppress(psutil.Error):
            if word in child.cmdline():
                found.append(child.pid)
    return found


def test_sigkill_of_the_commands_group_leaves_no_guest_ram() -> None:
    """SIGKILL to the whole process group of a command (a shell's `kill -9 %1`): the
    resource tracker, in a group of its own, survives it and unlinks the guest RAM
    the command owned (killed with the group, it left the RAM in /dev/shm for good)."""
    with _running("listen", "--address", "tcp://127.0.0.1:0", "--ram", "16M", "--channels", "2",
                  start_new_session=True) as listen:
        assert listen.stdout is not None
        line = listen.stdout.readline() if wait_readable([listen.stdout], 30) else ""
        assert line.startswith("LISTENING "), line
        segments = {line.split()[-1] for line in segment_mappings(listen.pid)}
        assert segments  # its guest RAM
        family = _family(listen.pid)  # its channels and fork server: out of the test's tree once orphaned
        os.killpg(listen.pid, signal.SIGKILL)
        listen.wait(30)
    deadline = time.monotonic() + 20  # its channels notice they are orphans, then the tracker runs
    while (left := [path for path in segments if os.path.exists(path)]
           + [pid for pid in family if not _gone(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left


def _moved_by_channels_mapping_all_of_it(done: subprocess.CompletedProcess, channels: int, mib: int) -> bool:
    """Each channel process of the operation held all of the RAM mapped: those started
    with the guest (channels started for the operation map only the pieces they move,
    about a third each with three)."""
    assert done.returncode == 0, done.stderr
    memory = json.loads(done.stdout)["channel_memory_kib"]
    return len(memory) == channels and all(m["RssShmem"] >= mib << 10 for m in memory)


@pytest.mark.parametrize("listener", [("--ram", "32M", "--channels", "3", "--json")], indirect=True)
def test_migrate_moves_pages_on_the_channels_started_with_the_guest(listener) -> None:
    _, address = listener
    done = run("migrate", "--to", address, "--ram", "32M", "--channels", "3", "--json",
               env={"MULTIFD_SECRET": "s3cret"})
    assert _moved_by_channels_mapping_all_of_it(done, 3, 32)


def test_save_writes_pages_from_the_channels_started_with_the_guest(tmp_path: Path) -> None:
    done = run("save", str(tmp_path / "vm.snap"), "--ram", "32M", "--channels", "3", "--json")
    assert _moved_by_channels_mapping_all_of_it(done, 3, 32)


def test_sigterm_while_the_guest_is_built_cancels_in_one_line() -> None:
    """SIGTERM before the migration exists (its RAM being filled, its channels
    started) still ends the command in one line with 130, and the RAM goes."""
    with _running("migrate", "--to", "tcp://127.0.0.1:9", "--ram", "2G") as source:
        deadline = time.monotonic() + 30
        while not _maps_guest_ram(source.pid) and time.monotonic() < deadline:
            time.sleep(0.002)
        source.send_signal(signal.SIGTERM)  # filling 2 GiB takes far longer than this poll
        _, err = source.communicate(timeout=60)
    assert source.returncode == 130, err
    # One line: a RAM segment the command left would add the resource tracker's warning.
    assert "terminated (SIGTERM)" in _one_error_line(err, "cancelled")


def test_listen_needs_a_channel() -> None:
    done = run("listen", "--ram", "1M", "--channels", "0", env={"MULTIFD_SECRET": "s3cret"})
    assert done.returncode == 1
    assert done.stderr.strip() == "multifd: failed: --channels must be at least 1, not 0"
    done = run("listen", "--ram", "1M", "--channels", "100000", env={"MULTIFD_SECRET": "s3cret"})
    assert done.returncode == 1
    assert done.stderr.strip() == "multifd: failed: --channels must be at most 256, not 100000"
    done = run("listen", "--devices", "-1", env={"MULTIFD_SECRET": "s3cret"})
    assert done.returncode == 1
    assert done.stderr.strip() == "multifd: failed: --devices must be 0 or more, not -1"
    for command in (["listen"], ["demo", "--ram", "1M"], ["restore", "any.snap"]):
        for value in ("-1", "inf", "1e12"):  # a sleep past time_t failed after the commit
            done = run(*command, "--run-after", value, env={"MULTIFD_SECRET": "s3cret"})
            assert done.returncode == 1
            assert done.stderr.strip() == (f"multifd: failed: --run-after must be 0 to 604800 seconds "
                                           f"(a week), not {float(value)!r}")
    for value in ("nan", "inf"):
        done = run("demo", "--ram", "1M", "--devices", "1", "--device-load-latency", value)
        assert done.returncode == 1
        assert done.stderr.strip() == f"multifd: failed: --device-load-latency must be 0 or more " \
                                      f"milliseconds, not {value}"
    with tempfile.NamedTemporaryFile() as not_a_directory:  # found before the migration, not at its end
        done = run("demo", "--ram", "1M", "--dump-dir", f"{not_a_directory.name}/dumps")
    assert done.returncode == 1
    assert done.stderr.strip() == f"multifd: failed: dump directory '{not_a_directory.name}/dumps': " \
                                  f"Not a directory"
    with tempfile.NamedTemporaryFile() as longer:  # a line end, then more: not the secret either
        longer.write(b"s" * 4096 + b"\n" + b"more")
        longer.flush()
        done = run("listen", "--secret-file", longer.name, "--address", "tcp://127.0.0.1:0",
                   "--accept-timeout", "2")
    assert done.returncode == 1 and "holds more than 4096 bytes" in done.stderr
    done = run("listen", "--secret-file", "/dev/zero")  # read to its end, it never ended
    assert done.returncode == 1
    assert done.stderr.strip() == "multifd: failed: --secret-file /dev/zero holds more than 4096 bytes: " \
                                  "is it the secret?"
    with tempfile.NamedTemporaryFile() as blank:  # the file was given: say it is empty
        blank.write(b" \n")
        blank.flush()
        done = run("listen", "--secret-file", blank.name)
    assert done.returncode == 1
    assert done.stderr.strip() == f"multifd: failed: --secret-file {blank.name} is empty (blank): put the " \
                                  f"shared secret in it, the same on both sides"
    done = run("listen", "--ready-fd", "987", env={"MULTIFD_SECRET": "s3cret"})
    assert done.returncode == 1
    assert done.stderr.strip() == "multifd: failed: --ready-fd 987: Bad file descriptor"


def test_a_usage_error_is_one_line_and_exit_1() -> None:
    done = run("migrate", "--channels", "two")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == ("multifd: failed: argument --channels: invalid int value: 'two' "
                           "(`multifd migrate --help` lists the options)\n")
    # an option the command does not know: its own --help is named
    done = run("save", "vm.snap", "--no-verify")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == ("multifd: failed: unrecognized arguments: --no-verify "
                           "(`multifd save --help` lists the options)\n")
    # with --json, the error is the one JSON object on stdout too
    done = run("migrate", "--ram", "abc", "--json")
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert json.loads(done.stdout) == {"status": "failed", "error": "argument --ram: not a size: 'abc' "
                                                                    "(try 256M or 1G)"}


@pytest.mark.parametrize("listener", [("--ram", "1M", "--json")], indirect=True)
def test_a_long_refusal_is_cut_to_one_readable_line(listener) -> None:
    """The destination quotes the source's 256-block layout: stderr cuts it, --json keeps it.
    Both name the source's migration and say it did not commit."""
    process, address = listener
    with GuestRAM.create([(f"block{i}", 4096) for i in range(256)]) as ram:
        source = SourceMigration(ram, address, secret=b"s3cret")
        with pytest.raises(MigrationError, match="RAM layout differs"):
            source.run()
    out, err = process.communicate(timeout=30)
    assert process.returncode == 1
    line = _one_error_line(err)
    assert len(line) < 450 and "more characters)" in line
    assert line.rstrip().endswith(f"(migration {source.migration_id}: committed no)")
    error = json.loads(out)["error"]
    assert "('block255', 4096)" in error and len(error) > 5000
    assert json.loads(out)["committed"] is False
    assert json.loads(out)["migration_id"] == str(source.migration_id)


def test_outcome_unknown_is_exit_3_and_names_the_migration() -> None:
    """COMMIT sent, RESUMED lost: the source says the outcome is unknown, its guest
    paused, and which migration to look up on the destination."""
    def resume_then_lose_the_main_channel() -> None:
        assert destination._conn is not None
        destination._conn.sock.shutdown(socket.SHUT_RDWR)  # RESUMED cannot go out

    destination = DestinationMigration("tcp://127.0.0.1:0", secret=b"s3cret",
                                       resume_guest=resume_then_lose_the_main_channel)
    destination.start()
    done = run("migrate", "--to", destination.address, "--ram", "4M", "--workload", "idle",
               "--json", env={"MULTIFD_SECRET": "s3cret"}, timeout=60)
    result = destination.wait(30)
    assert destination.ram is not None
    destination.ram.close()
    destination.ram.unlink()
    assert done.returncode == 3, done.stderr
    assert "the guest stays paused" in _one_error_line(done.stderr, "outcome unknown")
    assert f"whether migration {result.migration_id} committed" in done.stderr
    summary = json.loads(done.stdout)
    assert summary["status"] == "outcome_unknown"
    assert summary["migration_id"] == result.migration_id and destination.committed
    # the CLI's words, not the API's ("call settle()")
    assert summary["error"].startswith("the destination never answered COMMIT")
    assert f"`listen` output says whether migration {result.migration_id}" in summary["error"]


def test_an_unanswered_local_commit_names_the_ram_it_handed_over(monkeypatch: pytest.MonkeyPatch) -> None:
    """In local mode the RAM went over with COMMIT: the outcome-unknown line names its
    segment, the destination's if it committed and nobody's if not (the CLI cannot
    settle(): without it the RAM stayed in /dev/shm, unnamed)."""
    from engine import cli
    from engine.config import MigrationConfig
    from engine.errors import OutcomeUnknownError

    with GuestRAM.create([("pc.ram", 1 << 20)]) as ram:
        source = SourceMigration(ram, "unix:///nowhere.sock", secret=b"s3cret",
                                 config=MigrationConfig(local=True))
        monkeypatch.setattr(cli.output, "_operation", source)  # its one home
        line = cli._outcome_unknown(OutcomeUnknownError("no RESUMED within 60 s"), verbose=False)
        source.cancel("test over")
        assert line.endswith(f"its RAM went with COMMIT: /dev/shm/{ram.blocks[0].segment.name}, if still "
                             f"there, is the destination's if it committed (gone if it then died), "
                             f"nobody's if not: remove it then")
        assert f"whether migration {source.migration_id} committed" in line


def test_ctrl_c_after_the_commit_waits_for_the_outcome() -> None:
    """Ctrl-C, twice, while the source waits for RESUMED after COMMIT: the cancel
    is refused, the source says so and waits, and reports the completed
    migration (exit 0), never "cancelled" for a VM the destination runs."""
    source: subprocess.Popen | None = None

    def interrupt_twice_then_resume() -> None:
        assert source is not None
        for _ in range(2):
            source.send_signal(signal.SIGINT)
            time.sleep(0.3)

    destination = DestinationMigration("tcp://127.0.0.1:0", secret=b"s3cret",
                                       resume_guest=interrupt_twice_then_resume)
    destination.start()
    source = subprocess.Popen([*MULTIFD, "migrate", "--to", destination.address, "--ram", "4M",
                               "--workload", "idle", "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "MULTIFD_SECRET": "s3cret"})
    out, err = source.communicate(timeout=60)
    destination.wait(30)
    assert destination.ram is not None
    destination.ram.close()
    destination.ram.unlink()
    assert source.returncode == 0, err
    assert json.loads(out)["status"] == "completed" and destination.committed
    assert err.count("multifd: cannot cancel, the migration has committed: waiting for its outcome\n") == 2


@pytest.mark.parametrize("listener", [("--run-after", "60", "--json")], indirect=True)
def test_signals_after_the_migration_ended_leave_its_outcome(listener: tuple[subprocess.Popen, str]) -> None:
    """Ctrl-C and SIGTERM once the migration has ended (here while the destination's
    guest runs its --run-after): its outcome is decided, the signals only cut the
    --run-after short, and the command exits 0 with its completed, committed
    summary: never 130, "cancelled", for a VM the destination runs."""
    process, address = listener
    done = run("migrate", "--to", address, "--ram", "4M", "--workload", "idle", "--json",
               env={"MULTIFD_SECRET": "s3cret"})
    assert done.returncode == 0, done.stderr
    process.send_signal(signal.SIGINT)  # the source exited: the destination has resumed
    time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=30)  # not the 60 s of --run-after
    assert process.returncode == 0, err
    assert "Traceback" not in err and "cancel" not in err
    summary = json.loads(out)
    assert summary["status"] == "completed" and summary["committed"] is True


def test_inspect_verify_reports_each_damaged_region_and_exits_1(tmp_path: Path) -> None:
    from engine.snapshot import inspect_snapshot

    snap = tmp_path / "vm.snap"
    assert run("save", str(snap), "--ram", "4M").returncode == 0
    good = run("inspect", str(snap), "--verify")
    assert good.returncode == 0, good.stderr
    assert "intact: every page and device stream matches its checksum" in good.stdout
    block = inspect_snapshot(str(snap)).metadata.blocks[0]
    with open(snap, "r+b") as f:
        for page in [3, *range(100, 150, 2)]:  # 26 separate damaged pages
            f.seek(block.pages_offset + page * 4096 + 7)
            byte = f.read(1)[0]
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte ^ 0x04]))
    done = run("inspect", str(snap), "--verify")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    damaged = [line for line in done.stdout.splitlines() if line.startswith("damaged ")]
    assert len(damaged) == 21  # 20 regions, then how many more
    assert damaged[0].endswith(f"block 'pc.ram' page 3, file offset {block.pages_offset + 3 * 4096} (+4096)")
    assert damaged[-1].endswith("… and 6 more region(s)")
    assert "26 damaged region(s)" in done.stdout
    as_json = run("inspect", str(snap), "--verify", "--json")
    assert as_json.returncode == 1
    summary = json.loads(as_json.stdout)
    assert summary["verified"] is False and len(summary["damage"]) == 26
    assert summary["damage"][0]["page"] == 3 and summary["damage"][0]["block"] == "pc.ram"
    restore = run("restore", str(snap))
    assert restore.returncode == 1 and restore.stderr.count("\n") == 1
    assert "block 'pc.ram' page" in restore.stderr and "is damaged" in restore.stderr


def test_inspect_verify_over_channels_finds_damage_in_every_job(tmp_path: Path) -> None:
    """20 MiB of pages is two scrub jobs: over 2 channel processes, each job's
    damaged page is named (the API test compares parallel with sequential)."""
    from engine.snapshot import inspect_snapshot

    snap = tmp_path / "vm.snap"
    assert run("save", str(snap), "--ram", "20M").returncode == 0
    block = inspect_snapshot(str(snap)).metadata.blocks[0]
    with open(snap, "r+b") as f:
        for page in (10, 4500):  # jobs are 4096 pages
            f.seek(block.pages_offset + page * 4096 + 99)
            byte = f.read(1)[0]
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte ^ 0x10]))
    done = run("inspect", str(snap), "--verify", "--channels", "2")
    assert done.returncode == 1, done.stderr
    damaged = [line for line in done.stdout.splitlines() if line.startswith("damaged ")]
    assert [line.split("page ")[1].split(",")[0] for line in damaged] == ["10", "4500"]
    bad = run("inspect", str(snap), "--verify", "--channels", "0")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "at least 1 channel" in bad.stderr


# -- same-host upgrade (--local) ------------------------------------------------


def test_demo_local_hands_the_ram_over_and_sends_no_page() -> None:
    done = run("demo", "--local", "--ram", "16M", "--workload", "incrementer", "--dirty-rate", "16M",
               "--devices", "1", "--device-state", "64K", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["status"] == "completed" and summary["local"] is True
    assert summary["pages_sent"] == 0 and summary["rounds"] == 0
    assert summary["verified"] is True  # the destination hashed the pages it mapped
    assert summary["devices_verified"] is True  # the device state went over the channels
    assert summary["destination"]["local"] is True and summary["destination"]["committed"] is True


@pytest.mark.heavy  # the refusal itself is in the default suite (tests/integration/test_local.py)
def test_a_listener_that_refuses_local_mode_is_one_clear_line(tmp_path: Path) -> None:
    path = f"unix://{tmp_path}/m.sock"
    listener = subprocess.Popen([*MULTIFD, "listen", "--address", path, "--refuse-local",
                                 "--accept-timeout", "30"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "MULTIFD_SECRET": "s3cret"})
    try:
        assert listener.stdout is not None
        line = listener.stdout.readline() if wait_readable([listener.stdout], 30) else ""
        assert line.startswith("LISTENING "), line
        done = run("migrate", "--local", "--to", path, "--ram", "4M", "--workload", "incrementer",
                   env={"MULTIFD_SECRET": "s3cret"})
        listener.communicate(timeout=30)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.communicate()
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0
    assert "refused the configuration: local mode" in done.stderr and "not accepted" in done.stderr


def test_a_peers_control_characters_are_shown_escaped() -> None:
    """An error may quote what the peer sent (an ABORT's text, unauthenticated before
    the hellos): its escape sequences must not reach the user's terminal."""
    from engine.cli import _one_line

    assert _one_line("destination failed: \x1b[2J\x1b[32mok\x1b[0m\r\x07 é") == \
        "destination failed: \\x1b[2J\\x1b[32mok\\x1b[0m \\x07 é"
