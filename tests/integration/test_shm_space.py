"""Guest RAM bigger than /dev/shm: one clear line, never a SIGBUS.

POSIX shared memory always lives in /dev/shm, so each test runs its body in a
child inside a private mount namespace with a 16 MiB tmpfs over /dev/shm
(``unshare --mount``, which needs root or user namespaces: skipped otherwise).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

MULTIFD = [sys.executable, "-m", "engine.cli"]
NEED = "need 64.0 MiB, /dev/shm has 16.0 MiB free"
# The child mounts the small tmpfs in its own namespace, then runs "$@"; 77: no mount.
_SMALL_SHM = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
              'mount -t tmpfs -o size=16m tmpfs /dev/shm || exit 77; exec "$@"', "sh"]


def in_small_shm(*command: str, timeout: float = 60, env: dict[str, str] | None = None,
                 ) -> subprocess.CompletedProcess:
    return subprocess.run([*_SMALL_SHM, *command], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module", autouse=True)
def _small_shm_possible() -> None:
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount a small tmpfs over /dev/shm in a private namespace")
    probe = in_small_shm("true")
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs over /dev/shm in a private mount namespace "
                    f"(not root?): {probe.stderr.strip() or probe.returncode}")


def python_in_small_shm(body: str) -> dict:
    """Run `body` (it sets `out`) in the namespace; returns `out` and /dev/shm after."""
    script = textwrap.dedent(body) + textwrap.dedent("""
        import json, os
        out["left_in_shm"] = sorted(os.listdir("/dev/shm"))
        print(json.dumps(out))
    """)
    done = in_small_shm(sys.executable, "-c", script)
    assert done.returncode == 0, (done.returncode, done.stderr)  # not 135: no SIGBUS
    return json.loads(done.stdout)


def test_guest_ram_larger_than_shm_is_one_clear_config_error() -> None:
    out = python_in_small_shm("""
        from engine.errors import ConfigError
        from engine.shm import GuestRAM
        out = {}
        try:
            GuestRAM.create({"pc.ram": 48 << 20, "vga": 16 << 20})
        except ConfigError as exc:
            out["error"] = str(exc)
    """)
    # The message names the whole RAM (both blocks and their dirty maps), before any is created.
    assert out["error"] == "not enough shared memory for guest RAM: need 64.0 MiB, /dev/shm has 16.0 MiB free"
    assert out["left_in_shm"] == []


def test_a_segment_that_fills_shm_on_allocation_is_removed_again() -> None:
    # Past the up-front check (a race with another process): posix_fallocate
    # says ENOSPC, the same line comes out, and the segment is gone.
    out = python_in_small_shm("""
        from engine import shm
        from engine.errors import ConfigError
        out = {}
        shm.check_space = lambda need, what, headroom=0: None
        try:
            shm.Segment.create(64 << 20, what="slot table")
        except ConfigError as exc:
            out["error"] = str(exc)
            out["cause"] = type(exc.__cause__).__name__
    """)
    assert out["error"].startswith("not enough shared memory for slot table: need 64.0 MiB, /dev/shm has")
    assert out["cause"] == "OSError"
    assert out["left_in_shm"] == []


def test_cli_save_with_too_much_ram_prints_one_line_and_exits_1(tmp_path: Path) -> None:
    done = in_small_shm(*MULTIFD, "save", "--ram", "64M", str(tmp_path / "x.snap"))
    assert done.returncode == 1, done  # not 135 (SIGBUS)
    assert done.stderr == f"multifd: failed: not enough shared memory for guest RAM: {NEED}\n"
    assert list(tmp_path.iterdir()) == []


def test_cli_listen_with_too_much_ram_prints_one_line_and_exits_1() -> None:
    done = in_small_shm(*MULTIFD, "listen", "--address", "tcp://127.0.0.1:0", "--ram", "64M",
                        env={"MULTIFD_SECRET": "s3cret"})
    assert done.returncode == 1, done
    assert done.stdout == ""  # never said LISTENING
    assert done.stderr == f"multifd: failed: not enough shared memory for guest RAM: {NEED}\n"


def test_destination_creating_ram_from_the_source_layout_refuses_in_one_line(tmp_path: Path) -> None:
    # The destination (listen, RAM from the source's layout) runs in the small
    # namespace; the source outside, over a unix socket both see.
    socket_path = tmp_path / "m.sock"
    env_secret = {"MULTIFD_SECRET": "s3cret"}
    listener = subprocess.Popen(
        [*_SMALL_SHM, *MULTIFD, "listen", "--address", f"unix://{socket_path}", "--accept-timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env_secret})
    try:
        assert listener.stdout is not None
        assert listener.stdout.readline().startswith("LISTENING ")
        source = subprocess.run([*MULTIFD, "migrate", "--to", f"unix://{socket_path}", "--ram", "64M"],
                                capture_output=True, text=True, timeout=60, env={**os.environ, **env_secret})
        _, listen_err = listener.communicate(timeout=60)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.communicate()
    line = f"not enough shared memory for guest RAM: {NEED}"
    assert listener.returncode == 1
    # listen names the migration the source's hello gave it, and that it did not commit
    assert re.fullmatch(rf"multifd: failed: {re.escape(line)} \(migration [0-9a-f-]{{36}}: committed no\)\n",
                        listen_err), listen_err
    assert source.returncode == 1
    assert source.stderr == f"multifd: failed: destination failed: {line}\n"


def test_restore_into_new_ram_larger_than_shm_refuses_in_one_line(tmp_path: Path) -> None:
    snapshot = tmp_path / "vm.snap"
    saved = subprocess.run([*MULTIFD, "save", "--ram", "64M", "--fill", "zero", str(snapshot)],
                           capture_output=True, text=True, timeout=60)
    assert saved.returncode == 0, saved.stderr
    done = in_small_shm(*MULTIFD, "restore", str(snapshot))
    assert done.returncode == 1, done
    assert done.stderr == f"multifd: failed: not enough shared memory for guest RAM: {NEED}\n"
