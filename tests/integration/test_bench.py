"""The benchmarks still run: each script end to end at a tiny size.

No figure is judged here (timing belongs to bench/, on a quiet machine); only
that every case ran and landed in the JSON report (the compression case and
every snapshot restore are also checked byte for byte).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.compression import migrate_once as compression_run
from bench.qemu import CASES, PAIRS, QEMU
from clients.kvm.ioctl import kvm_unavailable_reason
from engine import MigrationConfig
from tests.harness import MiB, guest_ram, same_memory

ROOT = Path(__file__).resolve().parents[2]


def bench(script: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args],
                          capture_output=True, text=True, timeout=110, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done


def test_throughput_bench(tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    bench("throughput.py", "--ram", "8M", "--channels", "1", "2", "--repeat", "1", "--warm",
          "--json", str(out))
    report = json.loads(out.read_text())
    assert [case["channels"] for case in report["cases"]] == [1, 2]
    for case in report["cases"]:
        assert len(case["runs"]) == 1 and case["ratio_median"] > 0
        assert len(case["warm_runs"]) == 1 and case["warm_ratio_median"] > 0


def test_devices_bench(tmp_path: Path) -> None:
    out = tmp_path / "devices.json"
    bench("devices.py", "--ram", "8M", "--devices", "1", "3", "--load-ms", "20",
          "--state-size", "256K", "--repeat", "1", "--json", str(out))
    report = json.loads(out.read_text())
    cases = {(case["devices"], case["mode"]): case for case in report["cases"]}
    assert set(cases) == {(1, "parallel"), (1, "serial"), (3, "parallel"), (3, "serial")}
    # Serial loading sleeps through every device's load time in turn.
    assert cases[3, "serial"]["downtime_ms"] >= 3 * 20
    for case in cases.values():
        loads = case["runs"][0]["destination_devices"]
        assert len(loads) == case["devices"] and all(d["verified"] for d in loads)


@pytest.mark.heavy  # three migrations with devices, each in a process of its own
def test_iterative_devices_bench(tmp_path: Path) -> None:
    out = tmp_path / "devices-iterative.json"
    bench("devices.py", "--iterative", "--ram", "8M", "--count", "2", "--state-size", "2M",
          "--load-ms", "50", "--repeat", "1", "--json", str(out))
    report = json.loads(out.read_text())
    cases = {case["case"]: case["runs"][0] for case in report["cases"]}
    assert set(cases) == {"switchover-only", "iterative"}
    assert cases["switchover-only"]["live_bytes"] == 0
    assert cases["iterative"]["live_bytes"] >= 2 * (2 << 20)  # every device's state went live


def test_setup_bench(tmp_path: Path) -> None:
    out = tmp_path / "setup.json"
    bench("setup.py", "--ram", "8M", "--repeat", "1", "--json", str(out))
    runs = json.loads(out.read_text())["runs"]
    assert [run["case"] for run in runs] == ["spawn", "forkserver", "warm"]
    for run in runs:  # every step measured, the first packet after the set-up
        assert list(run["steps_ms"]) == ["main_channel", "channel_handshakes", "channel_processes"]
        assert run["first_packet_ms"] >= run["setup_ms"] > 0
        # The timeline: both sides and their channel processes, in the order things happen.
        line = run["timeline_ms"]
        for step in ("started", "attached", "ready"):
            assert f"src ch {step}" in line and f"dst ch {step}" in line
        assert line["src ch started"] <= line["src ch ready"] <= line["src channel_processes"]
        assert line["src ch first_job"] <= line["src first packet"]


def test_caps_bench(tmp_path: Path) -> None:
    out = tmp_path / "caps.json"
    bench("caps.py", "--sizes", "8M", "--caps", "64M", "1G", "--repeat", "1", "--json", str(out))
    runs = json.loads(out.read_text())["runs"]
    assert [(run["size"], run["cap"]) for run in runs] == [(8 << 20, 64 << 20), (8 << 20, 1 << 30)]
    assert all(run["downtime_ms"] > 0 and run["rounds"] >= 2 for run in runs)


def test_compression_bench_case() -> None:
    with guest_ram(8 * MiB, fill="text") as src, guest_ram(8 * MiB, fill="zero") as dst:
        run = compression_run(src, dst, MigrationConfig(channels=2, compression="zstd"))
        assert same_memory(src, dst)
    assert run["ratio"] > 1.5 and run["wire_mib"] < 8


@pytest.mark.heavy
def test_compression_bench(tmp_path: Path) -> None:
    out = tmp_path / "compression.json"
    bench("compression.py", "--ram", "8M", "--repeat", "1", "--json", str(out))
    assert json.loads(out.read_text())["cases"]


def test_snapshot_bench(tmp_path: Path) -> None:
    out = tmp_path / "snapshot.json"
    bench("snapshot.py", "--ram", "8M", "--channels", "1", "2", "--repeat", "1",
          "--dir", str(tmp_path), "--json", str(out))
    report = json.loads(out.read_text())
    assert [case["channels"] for case in report["cases"]] == [1, 2]
    for case in report["cases"]:
        for label in ("cold", "warm"):  # each restore was checked equal to the guest
            assert case[label]["save_over_write"] > 0 and case[label]["restore_over_read"] > 0
        assert case["checksums"]["restore"] > 0  # the restore without checksums ran
        assert min(case["scrub"]["warm_gbps"] + case["scrub"]["cold_gbps"]) > 0  # and each scrub
    assert [p.name for p in tmp_path.iterdir()] == ["snapshot.json"]  # nothing left behind


@pytest.mark.skipif(kvm_unavailable_reason() is not None, reason="the KVM bench needs /dev/kvm")
def test_kvm_bench(tmp_path: Path) -> None:
    out = tmp_path / "kvm.json"
    bench("kvm.py", "--ram", "128M", "--loop", "8M", "--channels", "2", "--no-capped",
          "--run-after", "0.2", "--repeat", "1", "--json", str(out))
    report = json.loads(out.read_text())
    [case] = report["cases"]
    [run] = case["runs"]
    assert case["case"] == "2 channels" and run["converged"] and run["guest_ok"]
    assert run["downtime_ms"] > 0 and 0 < run["vcpu_share"] < 1


@pytest.mark.skipif(kvm_unavailable_reason() is not None, reason="the KVM bench needs /dev/kvm")
def test_kvm_throttle_bench(tmp_path: Path) -> None:
    out = tmp_path / "kvm_throttle.json"
    bench("kvm_throttle.py", "--loop", "8M", "--window", "0.2", "--repeat", "1", "--json", str(out))
    report = json.loads(out.read_text())
    assert [case["percent"] for case in report["cases"]] == [0, 50, 90]
    assert report["invariant"] == "" and len(report["runs"]) == 3
    assert report["runs"][0]["holds"] == 0  # unthrottled: never held


def test_qemu_bench_skips_without_qemu(tmp_path: Path) -> None:
    out = tmp_path / "qemu.json"
    done = bench("qemu.py", "--qemu", "no-such-qemu", "--json", str(out))
    assert done.stdout.strip() == "skipped: no-such-qemu is not installed (apt-get install qemu-system-x86)"
    assert not out.exists()


@pytest.mark.skipif(shutil.which(QEMU) is None,
                    reason=f"the QEMU side-by-side bench needs {QEMU} (apt-get install qemu-system-x86)")
def test_qemu_bench(tmp_path: Path) -> None:
    out, png = tmp_path / "qemu.json", tmp_path / "qemu.png"
    bench("qemu.py", "--ram", "32M", "--rounds", "1", "--channels", "2", "--timeout", "60",
          "--json", str(out), "--chart", str(png))
    report = json.loads(out.read_text())
    assert sorted(run["case"] for run in report["runs"]) == sorted(CASES)
    for run in report["runs"]:
        assert run["seconds"] > 0
        if run["case"].startswith("qemu"):  # QEMU's copy was checked page by page
            assert run["pages_differing"] <= 32 * MiB // 4096 // 100
    assert [(r["qemu"], r["ours"]) for r in report["ratios"]] == PAIRS
    assert all(r["median"] > 0 for r in report["ratios"])
    assert png.exists() == (importlib.util.find_spec("matplotlib") is not None)


def test_local_bench(tmp_path: Path) -> None:
    out = tmp_path / "local.json"
    bench("local.py", "--sizes", "8M", "--repeat", "1", "--devices", "1", "--load-ms", "1",
          "--margin", "0", "--json", str(out))
    report = json.loads(out.read_text())
    assert [case["ram_bytes"] for case in report["cases"]] == [8 * MiB]
    for case in report["cases"]:
        assert len(case["runs"]["none"]) == len(case["runs"]["devices"]) == 2  # there and back
        assert case["none"]["pages_sent"] == case["devices"]["pages_sent"] == 0


@pytest.mark.heavy  # eight local hand-overs, two VMM processes
def test_local_iterative_bench(tmp_path: Path) -> None:
    out = tmp_path / "local-iterative.json"
    bench("local.py", "--iterative", "--sizes", "8M", "--state-size", "2M", "--load-ms", "50",
          "--repeat", "1", "--json", str(out))
    report = json.loads(out.read_text())
    cases = {case["case"]: case for case in report["cases"]}
    assert set(cases) == {"switchover-only", "iterative"}
    for case in cases.values():
        assert len(case["runs"]) == 2 and case["pages_sent"] == 0  # there and back, no page
    assert cases["switchover-only"]["live_bytes"] == 0 and cases["switchover-only"]["rounds"] == 0
    assert cases["iterative"]["live_bytes"] >= 2 << 20  # the whole state went in rounds


def test_tls_link_bench(tmp_path: Path) -> None:
    """One link bare and in TLS; the AES-128 mode really negotiates that suite (its
    OPENSSL_CONF reached the two processes), the default one does not; every
    transfer filled the receiver's fresh memory with the sender's (the script
    fails otherwise)."""
    out = tmp_path / "tls_link.json"
    bench("tls_link.py", "--size", "4M", "--packet", "1M", "--repeat", "1", "--json", str(out))
    cases = {case["mode"]: case for case in json.loads(out.read_text())["cases"]}
    assert set(cases) == {"bare", "tls", "tls-aes128"}
    assert cases["bare"]["suite"] is None and cases["tls"]["suite"] == "TLS_AES_256_GCM_SHA384"
    assert cases["tls-aes128"]["suite"] == "TLS_AES_128_GCM_SHA256"
    assert all(case["gb_per_s"] > 0 and case["recv_cpu_s_per_gib"] > 0 for case in cases.values())


def test_secure_bench(tmp_path: Path) -> None:
    """bare, MAC records and TLS 1.3 side by side (certificates made by the script)."""
    out = tmp_path / "secure.json"
    bench("secure.py", "--ram", "8M", "--channels", "1", "--repeat", "1", "--json", str(out))
    report = json.loads(out.read_text())
    assert report["tls_suite"].endswith("(TLSv1.3)")  # what the migration's contexts negotiate
    cases = report["cases"]
    assert {case["mode"] for case in cases} == {"bare", "mac", "tls"}
    bare = next(case for case in cases if case["mode"] == "bare")
    assert bare["ratio_to_bare"] == 1.0 and all(case["gb_per_s"] > 0 for case in cases)
