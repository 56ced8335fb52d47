"""Partial files a dead save left: found, told from a running save's, removed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.errors import SnapshotError
from transports.file import open_file, partial_files, remove_partial


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def left_by_a_dead_save(target: Path, size: int = 8192) -> Path:
    partial = target.parent / f".{target.name}.partial-{dead_pid()}-0badf00d"
    partial.write_bytes(b"x" * size)
    return partial


def test_a_dead_saves_partial_file_is_stale_and_a_running_ones_is_not(tmp_path: Path) -> None:
    target = tmp_path / "vm.snap"
    with open_file(str(target), "create") as running:
        dead = left_by_a_dead_save(target)
        found = {p.path: p for p in partial_files(str(tmp_path))}
        assert set(found) == {str(dead), running.path}
        assert found[str(dead)].stale and found[str(dead)].size == 8192
        assert found[str(dead)].target == str(target)
        assert not found[running.path].stale  # its save holds the lock
        assert found[running.path].pid == os.getpid()
        with pytest.raises(SnapshotError, match="a save in progress"):
            remove_partial(found[running.path])
        running.discard()


def test_an_unlocked_partial_of_a_running_process_is_not_stale(tmp_path: Path) -> None:
    # Between creating its partial file and locking it, a save is alive by pid.
    partial = tmp_path / f".vm.snap.partial-{os.getpid()}-12345678"
    partial.write_bytes(b"")
    assert [p.stale for p in partial_files(str(tmp_path))] == [False]


def test_the_next_save_removes_stale_partial_files_of_its_target_only(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    target, other = tmp_path / "vm.snap", tmp_path / "other.snap"
    dead = left_by_a_dead_save(target)
    dead_other = left_by_a_dead_save(other)
    with open_file(str(target), "create") as file:
        file.write_at(0, [b"new"])
        file.publish()
    assert not dead.exists() and dead_other.exists()
    assert sorted(os.listdir(tmp_path)) == sorted([dead_other.name, "vm.snap"])
    assert any(f"removed {dead}" in r.getMessage() and "that died" in r.getMessage() for r in caplog.records)


def test_the_next_save_leaves_a_running_saves_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "vm.snap"
    with open_file(str(target), "create") as first, open_file(str(target), "create") as second:
        assert os.path.exists(first.path) and os.path.exists(second.path)
        second.discard()
        first.discard()


def test_things_merely_named_like_partial_files_are_left_alone(tmp_path: Path) -> None:
    (tmp_path / f".vm.snap.partial-{dead_pid()}-abcdef01").mkdir()
    (tmp_path / ".vm.snap.partial-x-1").write_bytes(b"")
    (tmp_path / "vm.snap.partial-1-1").write_bytes(b"")
    assert partial_files(str(tmp_path)) == []


def test_a_target_whose_partial_name_is_too_long_is_refused_saying_why(tmp_path: Path) -> None:
    """A legal 240-byte name: its partial file's name would pass NAME_MAX.  The
    reason comes first, as the one-line error cuts a long path's tail."""
    target = tmp_path / ("v" * 240)
    target.touch()
    target.unlink()
    with pytest.raises(SnapshotError, match=r"^file name too long for a save \(240 bytes; its partial "
                                            r"file's name adds \d+, over 255\)"):
        open_file(str(target), "create")
    assert list(tmp_path.iterdir()) == []
    with open_file(str(tmp_path / ("v" * 200)), "create"):  # room for the partial name
        pass


def test_a_symbolic_link_named_like_a_partial_file_is_not_one(tmp_path: Path) -> None:
    (tmp_path / f".vm.snap.partial-{dead_pid()}-00000001").symlink_to(tmp_path / "elsewhere")
    assert partial_files(str(tmp_path)) == []
