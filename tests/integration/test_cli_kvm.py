"""`multifd ... --guest kvm`: a VM on /dev/kvm through the command line, both sides real processes."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from clients.kvm.ioctl import kvm_unavailable_reason
from tests.integration.test_cli import _children_running, _running, run

_UNAVAILABLE = kvm_unavailable_reason()
pytestmark = pytest.mark.skipif(_UNAVAILABLE is not None,
                                reason=f"KVM tests need /dev/kvm: {_UNAVAILABLE}")

KVM = ("--guest", "kvm", "--ram", "128M", "--loop-size", "8M")


def test_demo_moves_the_boot_sector_guest_and_checks_it() -> None:
    done = run("demo", *KVM, "--run-after", "0.3", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["status"] == "completed" and summary["verified"] is True
    assert summary["guest"]["boot_chars"] == 1                  # the source booted once
    arrived = summary["destination"]["guest"]
    assert arrived["ok"] and arrived["ran_on"] and arrived["invariant"] == ""
    assert arrived["boot_chars"] == 0 and arrived["progress_chars"] >= 1
    assert [d["idstr"] for d in summary["devices"]] == ["kvm-vcpu0"]


def test_demo_summary_shows_both_consoles_and_the_throttle() -> None:
    done = run("demo", *KVM, "--program", "user64", "--auto-converge", "--run-after", "0.2")
    assert done.returncode == 0, done.stderr
    lines = {line.split("  ", 1)[0]: line for line in done.stdout.splitlines()}
    assert "1 × 'A' boot" in lines["source COM1"]
    assert "0 × 'A' boot" in lines["dest COM1"] and "invariant: holds" in lines["dest COM1"]
    assert "ran on: yes" in lines["dest COM1"] and "at the pause" in lines["throttle"]
    assert "k pages/s while it runs" in lines["throttle"]       # the rate auto-converge measured


def test_live_save_then_restore_in_a_new_process(tmp_path: Path) -> None:
    snapshot = str(tmp_path / "kvm.snap")
    saved = run("save", snapshot, "--live", *KVM, "--program", "user64", "--json")
    assert saved.returncode == 0, saved.stderr
    assert json.loads(saved.stdout)["rounds"] >= 2
    restored = run("restore", snapshot, "--guest", "kvm", "--run-after", "0.2", "--json")
    assert restored.returncode == 0, restored.stderr
    report = json.loads(restored.stdout)["guest"]
    assert report["ok"] and report["boot_chars"] == 0 and report["invariant"] == ""


@pytest.mark.heavy  # a KVM guest's local move is in the default suite (test_kvm_migration.py)
def test_demo_local_runs_the_vm_on_the_pages_handed_over() -> None:
    """--local: the listener is given no --ram; its VM takes the source's own pages
    as its memory slots, and only the vCPU state travels."""
    done = run("demo", "--local", *KVM, "--run-after", "0.3", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["status"] == "completed" and summary["local"] is True
    assert summary["pages_sent"] == 0 and summary["verified"] is True
    arrived = summary["destination"]["guest"]
    assert arrived["ok"] and arrived["ran_on"] and arrived["invariant"] == ""
    assert arrived["boot_chars"] == 0 and arrived["progress_chars"] >= 1


def test_a_destination_that_dies_after_the_commit_is_one_line() -> None:
    """The demo's destination killed while it runs the guest it committed (its
    --run-after): the demo says so in one line, and in --json, and exits 1 (it
    printed 'dest downtime 0.0 ms' and exited 1 with no word)."""
    with _running("demo", *KVM, "--run-after", "60", "--json") as demo:
        deadline = time.monotonic() + 60
        servers: list[psutil.Process] = []
        while not servers and time.monotonic() < deadline:
            servers = [p for p in psutil.Process(demo.pid).children()
                       if "_forkserver" in " ".join(p.cmdline())]
            time.sleep(0.01)
        assert servers, "the demo's fork server never started"
        while not servers[0].children() and time.monotonic() < deadline:  # the source's channels, up
            time.sleep(0.01)
        while servers[0].children() and time.monotonic() < deadline:  # ... and gone: it has committed
            time.sleep(0.01)
        (listen,) = _children_running(demo.pid, "listen")
        os.kill(listen, signal.SIGKILL)
        out, err = demo.communicate(timeout=60)
    assert demo.returncode == 1, err
    lost = f"the destination process {listen} was killed by SIGKILL after the commit: the guest runs nowhere"
    assert err.splitlines()[-1] == f"multifd: failed: {lost}", err
    summary = json.loads(out)
    assert summary["status"] == "completed" and summary["destination_error"] == lost
