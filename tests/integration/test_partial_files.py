"""A `multifd save` killed mid-way: its partial file is reported, then cleaned up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

MULTIFD = [sys.executable, "-m", "engine.cli"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*MULTIFD, *args], capture_output=True, text=True, timeout=120)


def partials(directory: Path) -> list[dict]:
    done = run("inspect", str(directory), "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["partial_files"]


def test_a_killed_save_leaves_a_partial_file_the_next_save_removes(tmp_path: Path) -> None:
    target = tmp_path / "vm.snap"
    # Live, dirtying faster than it saves, with a downtime limit it never meets:
    # the save keeps writing rounds until it is killed.
    save = subprocess.Popen([*MULTIFD, "save", "--ram", "128M", "--live", "--dirty-rate", "1G",
                             "--max-rounds", "100000", "--downtime-limit", "0.001", str(target)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not any(p.name.startswith(".vm.snap.partial-") and p.stat().st_size
                      for p in tmp_path.iterdir()):
            assert save.poll() is None and time.monotonic() < deadline, "the save never started writing"
            time.sleep(0.05)
        [running] = partials(tmp_path)
        assert running["pid"] == save.pid and not running["stale"]
        channels = psutil.Process(save.pid).children(recursive=True)
    finally:
        save.kill()  # SIGKILL: no teardown runs
        save.wait()
    # Its channel processes notice and exit on their own.
    _, alive = psutil.wait_procs(channels, timeout=30)
    for process in alive:
        process.kill()
    assert not alive, "channel processes outlived their killed save"

    [stale] = partials(tmp_path)
    assert stale["stale"] and stale["pid"] == save.pid and stale["size"] > 0
    assert stale["path"] == running["path"] and stale["target"] == str(target)
    assert not target.exists()
    listed = run("inspect", str(tmp_path))
    assert f"process {save.pid}: stale: its save died (--clean removes it)" in listed.stdout

    again = run("save", "--ram", "8M", str(target))
    assert again.returncode == 0, again.stderr
    assert again.stderr == (f"multifd: removed {stale['path']} ({stale['size'] / (1 << 20):.1f} MiB), "
                            f"left by a save to {target} that died (process {save.pid})\n")
    assert [p.name for p in tmp_path.iterdir()] == ["vm.snap"]
    assert run("inspect", str(target)).returncode == 0  # a complete snapshot
    assert partials(tmp_path) == []


def test_inspect_clean_removes_only_stale_partial_files(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    stale = tmp_path / f".a.snap.partial-{child.pid}-00000001"
    stale.write_bytes(b"x" * 4096)
    done = run("inspect", str(tmp_path), "--clean")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"1 partial file(s) in {tmp_path}",
                                        f"{stale.name}  4.0 KiB  for a.snap, process {child.pid}: removed"]
    assert list(tmp_path.iterdir()) == []
    assert run("inspect", str(tmp_path)).stdout == f"no partial files in {tmp_path}\n"


def test_an_unlocked_partial_file_is_stale_whoever_has_its_pid_now(tmp_path: Path) -> None:
    """After a reboot or a container's restart another process has the dead save's
    pid (here: this test's own), often the next save itself: only a new file (a save
    between creating and locking it) is kept for its pid; an older one is stale.
    Pids that name no process (0, past Linux's limit) are stale, never a traceback."""
    running = os.getpid()
    old = tmp_path / f".vm.snap.partial-{running}-0000000a"
    new = tmp_path / f".vm.snap.partial-{running}-0000000b"
    huge = tmp_path / ".vm.snap.partial-99999999999999999999-0000000c"
    zero = tmp_path / ".vm.snap.partial-0-0000000d"
    for path in (old, new, huge, zero):
        path.write_bytes(b"x" * 4096)
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    stale = {Path(p["path"]).name: p["stale"] for p in partials(tmp_path)}
    assert stale == {old.name: True, new.name: False, huge.name: True, zero.name: True}
    again = run("save", "--ram", "4M", str(tmp_path / "vm.snap"))
    assert again.returncode == 0, again.stderr
    assert f"removed {old} (4.0 KiB), left by a save to" in again.stderr  # not "(0.0 MiB)"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([new.name, "vm.snap"])


def test_verify_of_a_directory_is_refused(tmp_path: Path) -> None:
    """A directory lists partial files; --verify there would verify nothing."""
    done = run("inspect", str(tmp_path), "--verify")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == ("multifd: failed: --verify takes a snapshot file "
                           "(a directory lists its partial files)\n")


def _nohup() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


@pytest.mark.parametrize("number,nohup", [(signal.SIGTERM, False), (signal.SIGHUP, False),
                                          (signal.SIGTERM, True)], ids=["SIGTERM", "SIGHUP", "nohup"])
def test_a_terminated_save_cancels_and_leaves_nothing(tmp_path: Path, number: int, nohup: bool) -> None:
    """SIGTERM, or SIGHUP from a closed terminal, cancels a save as Ctrl-C does:
    one line, exit 130, its partial file removed, its channels gone.  Under nohup
    (SIGHUP ignored from the start) a SIGHUP changes nothing."""
    target = tmp_path / "vm.snap"
    save = subprocess.Popen([*MULTIFD, "save", "--ram", "64M", "--live", "--dirty-rate", "1G",
                             "--max-rounds", "100000", "--downtime-limit", "0.001", str(target)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_nohup if nohup else None)
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".vm.snap.partial-") and p.stat().st_size for p in tmp_path.iterdir()):
        assert save.poll() is None and time.monotonic() < deadline, "the save never started writing"
        time.sleep(0.05)
    channels = psutil.Process(save.pid).children(recursive=True)
    if nohup:
        save.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert save.poll() is None, "a SIGHUP under nohup stopped the save"
    save.send_signal(number)
    _, err = save.communicate(timeout=60)
    assert save.returncode == 130
    assert err == f"multifd: cancelled: terminated ({signal.Signals(number).name})\n"
    assert list(tmp_path.iterdir()) == []
    _, alive = psutil.wait_procs(channels, timeout=30)
    assert not alive
