"""transports/file.py on real files: positional I/O, partial files, publish, O_DIRECT."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from engine.errors import SnapshotError
from transports.file import open_file


def test_write_and_read_many_buffers_at_an_offset(tmp_path: Path) -> None:
    # More buffers than one call takes (IOV_MAX), of uneven sizes, from memoryviews.
    buffers = [os.urandom(n % 97 + 1) for n in range(3000)]
    with open_file(str(tmp_path / "f"), "create") as file:
        assert file.write_at(5000, buffers) == sum(map(len, buffers))
        back = [bytearray(len(b)) for b in buffers]
        assert file.read_into(5000, [memoryview(b) for b in back]) == sum(map(len, buffers))
        assert [bytes(b) for b in back] == buffers
        assert file.read_at(0, 5000) == bytes(5000)  # a hole reads as zeros
        file.discard()


def test_reading_past_the_end_is_an_error_not_a_short_read(tmp_path: Path) -> None:
    """The transport says where the file ended; judging the snapshot is the format's job."""
    path = tmp_path / "short"
    path.write_bytes(b"x" * 100)
    with open_file(str(path), "read") as file, pytest.raises(SnapshotError, match="ends at 100"):
        file.read_at(50, 51)


def test_a_file_that_shrank_says_where_it_ends_now(tmp_path: Path) -> None:
    # Truncated under a restore: the read finds the end at once, at its own offset;
    # the message gives the file's size, not that offset.
    path = tmp_path / "shrinking"
    path.write_bytes(b"x" * 8192)
    with open_file(str(path), "read") as file:
        os.truncate(path, 100)
        with pytest.raises(SnapshotError, match="it ends at 100, 10 bytes from offset 4096 were asked for"):
            file.read_at(4096, 10)


def test_partial_file_is_hidden_until_published(tmp_path: Path) -> None:
    target = tmp_path / "vm.snap"
    target.write_bytes(b"the old snapshot")
    file = open_file(str(target), "create")
    try:
        partial = Path(file.path)
        assert partial.parent == tmp_path and partial.name.startswith(".vm.snap.partial-")
        assert oct(partial.stat().st_mode & 0o777) == "0o600"  # guest memory: owner only
        file.write_at(0, [b"the new one"])
        assert target.read_bytes() == b"the old snapshot"  # untouched until publish
        assert file.publish() == str(target)
    finally:
        file.close()
    assert target.read_bytes() == b"the new one"
    assert os.listdir(tmp_path) == ["vm.snap"]


def test_discard_removes_the_partial_file_only(tmp_path: Path) -> None:
    target = tmp_path / "vm.snap"
    target.write_bytes(b"old")
    with open_file(str(target), "create") as file:
        file.write_at(0, [b"half a snapshot"])
        file.discard()
    assert os.listdir(tmp_path) == ["vm.snap"] and target.read_bytes() == b"old"


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="no snapshot at"):
        open_file(str(tmp_path / "missing"), "read")
    with pytest.raises(SnapshotError, match="is a directory"):
        open_file(str(tmp_path), "create")
    with pytest.raises(SnapshotError, match="cannot open"):
        open_file(str(tmp_path / "missing" / "x"), "create")
    with open_file(str(tmp_path / "ro"), "create") as file:
        file.publish()
    with open_file(str(tmp_path / "ro"), "read") as file, pytest.raises(SnapshotError, match="cannot write"):
        file.write_at(0, [b"x"])


def test_a_fifo_or_device_is_never_saved_over_nor_waited_on(tmp_path: Path) -> None:
    """A save renames its file over the target: a FIFO or a device node there (a root
    save 'to /dev/null') would become a regular file.  A restore's open of a FIFO
    would block until a writer came, deaf to SIGTERM."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(SnapshotError, match="it is a FIFO, which a save would replace"):
        open_file(str(fifo), "create")
    with pytest.raises(SnapshotError, match="fifo is a FIFO, not a snapshot file"):
        open_file(str(fifo), "read")  # at once
    null = tmp_path / "null"
    null.symlink_to(os.devnull)  # what a save "to /dev/null" names (a node needs root)
    with pytest.raises(SnapshotError, match="it is a character device"):
        open_file(str(null), "create")
    assert null.is_symlink() and stat.S_ISCHR(os.stat(os.devnull).st_mode)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_direct_io_where_supported(tmp_path: Path) -> None:
    path = tmp_path / "direct"
    path.write_bytes(bytes(8192))
    try:
        file = open_file(str(path), "write", direct_io=True)
    except SnapshotError as exc:
        assert "does not support O_DIRECT" in str(exc)
        pytest.skip(str(exc))
    import mmap
    page = mmap.mmap(-1, 4096)  # page-aligned memory, as guest RAM is
    page[:] = b"\x42" * 4096
    with file:
        assert file.write_at(4096, [memoryview(page)]) == 4096
    page.close()
    assert path.read_bytes()[4096:] == b"\x42" * 4096
