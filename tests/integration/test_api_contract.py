"""What the API promises a VMM that drives it (README "Embedding it in a VMM",
engine/operation.py): an operation runs once, says where it is at every moment,
refuses what it cannot use with a ConfigError, and a cancel means what it says."""

from __future__ import annotations

import math
import os
import socket
import threading
import time
import types

import pytest

import engine.admission
import engine.destination
import engine.snapshot
from clients.devices import DemoDevice
from engine import (
    DestinationMigration,
    GuestRAM,
    MigrationConfig,
    MigrationError,
    SnapshotRestore,
    SnapshotSave,
    SourceMigration,
)
from engine.errors import CancelledError, ConfigError, GuestControlError, WaitTimeout
from engine.sync import MigrationState
from tests.harness import SECRET, MiB, address, guest_ram, same_memory, wait_until
from tests.leaks import segment_mappings
from transports.file import SnapshotFile

pytestmark = pytest.mark.usefixtures("no_leaks")

SLOW = MigrationConfig(channels=1, max_bandwidth=8 * MiB)  # 16 MiB: about two seconds


def test_an_operation_runs_once_and_a_second_run_leaves_it_alone() -> None:
    """A second run() (a retry path, two threads) is refused as a second start()
    is; the migration it would have wrecked completes.  done() holds after run()."""
    with guest_ram(16 * MiB) as src, guest_ram(16 * MiB, fill="zero") as dst:
        incoming = DestinationMigration("tcp://127.0.0.1:0", secret=SECRET, ram=dst)
        incoming.start()
        outgoing = SourceMigration(src, incoming.address, secret=SECRET, config=SLOW)
        outgoing.start()
        for again in (outgoing.run, outgoing.start, incoming.run, incoming.start):
            with pytest.raises(ConfigError, match=r"started \(with start\(\)\): an operation runs once"):
                again()
        assert outgoing.wait(30).status == incoming.wait(30).status == "completed"
        assert same_memory(src, dst) and outgoing.done() and incoming.done()
    with guest_ram(1 * MiB) as src, guest_ram(1 * MiB, fill="zero") as dst:
        incoming = DestinationMigration("tcp://127.0.0.1:0", secret=SECRET, ram=dst)
        incoming.start()
        outgoing = SourceMigration(src, incoming.address, secret=SECRET, config=MigrationConfig(channels=1))
        assert not outgoing.done()
        outgoing.run()
        assert outgoing.done()  # run() returned: it is over (it said False for ever)
        with pytest.raises(ConfigError, match=r"with run\(\)"):
            outgoing.run()
        with pytest.raises(ConfigError, match="wait\\(\\) is for one started with start\\(\\)"):
            outgoing.wait()
        incoming.wait(10)


def test_stats_say_where_each_side_is() -> None:
    """stats().state is the operation's state at every moment (the destination's
    said "setup" all through precopy and "committed" after completion); before
    set-up the figures are zero, never None."""
    with guest_ram(16 * MiB) as src, guest_ram(16 * MiB, fill="zero") as dst:
        incoming = DestinationMigration("tcp://127.0.0.1:0", secret=SECRET, ram=dst)
        outgoing = SourceMigration(src, incoming.address, secret=SECRET, config=SLOW)
        assert incoming.stats().state == outgoing.stats().state == "none"
        assert incoming.stats().bytes_on_wire == 0
        time.sleep(0.2)
        assert incoming.stats().elapsed_s == outgoing.stats().elapsed_s == 0  # its clock starts with it
        incoming.start()
        seen: set[tuple[str, str]] = set()
        outgoing.start()
        while not (outgoing.done() and incoming.done()):
            for side in (incoming, outgoing):
                state = side.state
                figures = side.stats()
                if state == side.state:  # no move in between: the two must agree
                    assert figures.state == state, (side.role, figures.state, state)
                seen.add((side.role, figures.state))
            time.sleep(0.001)  # (the migration it watches shares the cores)
        assert ("destination", "active") in seen, seen
        outgoing.wait(0)  # done(): over, torn down, its result there to take
        incoming.wait(0)
        assert incoming.stats().state == outgoing.stats().state == "completed"
        elapsed = incoming.stats().elapsed_s
        assert incoming.stats().elapsed_s == elapsed  # over: the clock stopped
        assert outgoing.stats().elapsed_s <= outgoing.result.total_time_s + 0.2  # not from the constructor


@pytest.mark.parametrize(("change", "field"), [
    ({"channels": 2.0}, "channels"),
    ({"channels": "2"}, "channels"),
    ({"channels": True}, "channels"),
    ({"stall_timeout_s": math.inf}, "stall_timeout_s"),
    ({"downtime_limit_ms": math.nan}, "downtime_limit_ms"),
    ({"verify": 1}, "verify"),
    ({"compression": None}, "compression"),
])
def test_a_config_value_of_the_wrong_type_is_a_config_error(change: dict, field: str) -> None:
    """Values from a JSON or YAML file (2.0, "2", inf) are refused up front: they
    passed the range checks and failed later outside the error tree."""
    with pytest.raises(ConfigError, match=f"^{field} must be"):
        MigrationConfig(**change).validate()


def test_arguments_that_are_not_what_they_should_be_are_config_errors() -> None:
    with guest_ram(1 * MiB) as ram:
        cases = [
            lambda: GuestRAM.create({"a": "4096"}),  # type: ignore[dict-item]
            lambda: GuestRAM.create({1: 4096}),  # type: ignore[dict-item]
            lambda: GuestRAM.attach("mfd-nothing"),  # type: ignore[arg-type]
            lambda: SourceMigration(None, "tcp://127.0.0.1:1", secret=SECRET),  # type: ignore[arg-type]
            lambda: SourceMigration(None, "unix:///tmp/x.sock", secret=SECRET,  # type: ignore[arg-type]
                                    config=MigrationConfig(local=True)),
            lambda: SourceMigration(ram, "tcp://127.0.0.1:1", secret=SECRET, devices=[object()]),  # type: ignore[list-item]
            lambda: SourceMigration(ram, "tcp://127.0.0.1:1", secret=SECRET, config={}),  # type: ignore[arg-type]
            lambda: DestinationMigration("tcp://127.0.0.1:0", secret=SECRET, config={}),  # type: ignore[arg-type]
            lambda: DestinationMigration("tcp://127.0.0.1:0", secret=SECRET, max_device_buffer=0),
            lambda: SnapshotSave(ram, "/nonexistent/x.snap", devices=[object()]),  # type: ignore[list-item]
            # what the second outside round tried, argument by argument
            lambda: SourceMigration(ram, 1, secret=SECRET),  # type: ignore[arg-type]
            lambda: SourceMigration(ram, "ftp://x", secret=SECRET),
            lambda: SourceMigration(ram, "tcp://[fd00::1:4444", secret=SECRET),  # no ']': not a URL
            lambda: DestinationMigration("tcp://[::1:4444", secret=SECRET),
            lambda: SourceMigration(ram, "tcp://127.0.0.1:1", secret=SECRET, devices=None),  # type: ignore[arg-type]
            lambda: SourceMigration(ram, "tcp://127.0.0.1:1", secret=SECRET, pause_guest=1),  # type: ignore[arg-type]
            lambda: SourceMigration(ram, "tcp://127.0.0.1:1", secret=SECRET, pool="s"),  # type: ignore[arg-type]
            lambda: SourceMigration(ram, "tcp://127.0.0.1:1", secret=SECRET, tls="s"),  # type: ignore[arg-type]
            lambda: DestinationMigration(1, secret=SECRET),  # type: ignore[arg-type]
            lambda: DestinationMigration("tcp://127.0.0.1:0", secret=SECRET, payloads=None),  # type: ignore[arg-type]
            lambda: DestinationMigration("tcp://127.0.0.1:0", secret=SECRET, accept_timeout_s=math.nan),
            lambda: DestinationMigration("tcp://127.0.0.1:0", secret=SECRET, on_ram=1),  # type: ignore[arg-type]
            lambda: SnapshotSave(ram, None),  # type: ignore[arg-type]
            lambda: SnapshotSave(ram, "/tmp/x.snap", vmm_config="s"),  # type: ignore[arg-type]
            lambda: SnapshotSave(ram, "/tmp/x.snap", dump_dir=1),  # type: ignore[arg-type]
            lambda: SnapshotRestore(1),  # type: ignore[arg-type]
            lambda: GuestRAM.create("s"),  # type: ignore[arg-type]
            # device names the wire cannot carry (they failed later, some after the pause)
            *(lambda key=key: SourceMigration(ram, "tcp://127.0.0.1:1", secret=SECRET,
                                              devices=[DemoDevice(*key, state_size=4096)])
              for key in (("", 0), ("x" * 256, 0), ("nic", -1), ("nic", 1 << 32))),
            lambda: DestinationMigration("tcp://127.0.0.1:0", secret=SECRET,
                                         devices=[DemoDevice("", 0, state_size=4096)]),
        ]
        for case in cases:
            with pytest.raises(ConfigError):
                case()


def test_wait_with_a_timeout_raises_an_error_of_the_tree() -> None:
    incoming = DestinationMigration("tcp://127.0.0.1:0", secret=SECRET)
    incoming.start()
    with pytest.raises(MigrationError, match="still running") as waited:
        incoming.wait(timeout=0.1)
    assert isinstance(waited.value, WaitTimeout) and isinstance(waited.value, TimeoutError)
    assert incoming.cancel()
    with pytest.raises(CancelledError):
        incoming.wait(10)


def test_a_pause_that_raises_says_where_the_guest_is() -> None:
    def pause() -> None:
        raise RuntimeError("boom")

    resumed: list[bool] = []
    for resume in (lambda: resumed.append(True), None):
        with guest_ram(1 * MiB) as src, guest_ram(1 * MiB, fill="zero") as dst:
            incoming = DestinationMigration("tcp://127.0.0.1:0", secret=SECRET, ram=dst)
            incoming.start()
            outgoing = SourceMigration(src, incoming.address, secret=SECRET, pause_guest=pause,
                                       resume_guest=resume, config=MigrationConfig(channels=1))
            with pytest.raises(GuestControlError) as failed:
                outgoing.run()
            with pytest.raises(MigrationError):
                incoming.wait(10)
        where = "resume_guest was called: the guest runs on here" if resume else \
            "no resume_guest was given: the guest is as pause_guest left it"
        assert str(failed.value) == f"pause_guest raised RuntimeError: boom; {where}"
        assert isinstance(failed.value.__cause__, RuntimeError)
    assert resumed == [True]


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_a_cancel_before_start_releases_the_listener(transport: str) -> None:
    """The VMM made the incoming side (to hand its address to the source), then
    gave up: cancel() closes the port (and the unix socket file) at once, and a
    later run() or start() raises the cancel."""
    where = address(transport)
    incoming = DestinationMigration(where, secret=SECRET)
    assert incoming.cancel() and incoming.state is MigrationState.CANCELLED and incoming.done()
    if transport == "tcp":
        host, port = incoming.address.removeprefix("tcp://").rsplit(":", 1)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, int(port)), timeout=5).close()
    else:
        assert not os.path.exists(where.removeprefix("unix://"))
    for call in (incoming.run, incoming.start, incoming.wait):
        with pytest.raises(CancelledError):
            call()
    assert not incoming.cancel()


@pytest.mark.parametrize("how", ["not-started", "start", "run-in-a-thread"])
def test_close_stops_a_destination_listening_started_or_not(how: str) -> None:
    """close() is "this destination will not run": it returns with the port closed
    and the operation over, and waiting says why, however it was run (started, it
    used to go on listening; closed first, start() failed on the closed listener)."""
    incoming = DestinationMigration(address("tcp"), secret=SECRET)
    host, port = incoming.address.removeprefix("tcp://").rsplit(":", 1)
    outcome: list[BaseException] = []
    runner = threading.Thread(target=lambda: outcome.append(pytest.raises(CancelledError, incoming.run)))
    if how == "start":
        incoming.start()
    elif how == "run-in-a-thread":
        runner.start()
        while incoming.state is not MigrationState.LISTENING:
            time.sleep(0.001)
    incoming.close()
    assert incoming.done() and incoming.state is MigrationState.CANCELLED
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=5).close()
    if how == "run-in-a-thread":
        runner.join(10)
        assert outcome
    else:
        with pytest.raises(CancelledError):
            if how == "not-started":
                incoming.start()
            incoming.wait(10)


def test_close_waits_for_the_teardown_on_the_end_itself_not_a_sleep_loop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """close() returns the moment the running thread's teardown ends (an event set
    by the operation's end), without waking every few ms to look."""
    real_close = engine.admission.Admission.close

    def slow_close(admission: engine.admission.Admission) -> None:
        time.sleep(0.1)  # a teardown that takes a while: close() must wait for it
        real_close(admission)

    def no_sleep(seconds: float) -> None:
        raise AssertionError(f"close() sleep-polled ({seconds} s)")

    monkeypatch.setattr(engine.admission.Admission, "close", slow_close)
    monkeypatch.setattr(engine.destination, "time", types.SimpleNamespace(
        monotonic=time.monotonic, perf_counter=time.perf_counter, sleep=no_sleep))
    incoming = DestinationMigration(address("tcp"), secret=SECRET)
    incoming.start()
    wait_until(lambda: incoming.state is MigrationState.LISTENING, "listening")
    incoming.close()
    assert incoming.done() and incoming.state is MigrationState.CANCELLED
    with pytest.raises(CancelledError):
        incoming.wait(10)


def test_close_from_a_hook_of_the_destination_cancels_without_waiting_on_itself() -> None:
    """A hook runs on the destination's own thread: close() there cancels and returns
    (waiting for its own teardown would never end); both sides then fail as a cancel."""
    with guest_ram(4 * MiB) as ram:
        incoming = DestinationMigration(address("tcp"), secret=SECRET,
                                        on_ram=lambda created: incoming.close())
        incoming.start()
        with pytest.raises(MigrationError):  # the ABORT, or (set-up had not said it) a reset
            SourceMigration(ram, incoming.address, secret=SECRET).run()
        with pytest.raises(CancelledError, match="closed: the destination will not run"):
            incoming.wait(30)
        assert incoming.ram is None  # the RAM it created went with the teardown


def test_a_cancelled_snapshot_says_what_was_cancelled(tmp_path) -> None:
    with guest_ram(1 * MiB) as ram:
        save = SnapshotSave(ram, str(tmp_path / "vm.snap"))
        assert save.cancel()
        with pytest.raises(CancelledError, match="^snapshot save cancelled$"):
            save.run()


def test_a_finished_snapshot_cannot_be_cancelled(tmp_path, monkeypatch) -> None:
    """True from cancel() means stopped: once a save publishes its file, or a restore
    starts its guest, cancel() is refused (it said True, and the guest ran)."""
    path = str(tmp_path / "vm.snap")
    device = DemoDevice("dev", state_size=4096)
    publish = SnapshotFile.publish
    cancels: list[bool] = []

    def cancel_then_publish(file: SnapshotFile) -> str:
        cancels.append(save.cancel())  # at the point of no return: the file stands
        return publish(file)

    monkeypatch.setattr(SnapshotFile, "publish", cancel_then_publish)
    with guest_ram(1 * MiB) as ram:
        save = SnapshotSave(ram, path, devices=[device])
        save.run()
        assert cancels == [False] and os.path.exists(path)
        assert not save.cancel() and save.state is MigrationState.COMPLETED
        cancels.clear()
        started = threading.Event()

        def resume() -> None:
            cancels.append(restore.cancel())  # at the point of no return: the guest starts
            started.set()

        with guest_ram(1 * MiB, fill="zero") as into:
            empty = DemoDevice("dev", state_size=4096, with_state=False)
            restore = SnapshotRestore(path, ram=into, devices=[empty], resume_guest=resume)
            result = restore.run()
            assert started.is_set() and cancels == [False] and result.status == "completed"
            assert not restore.cancel()
            assert same_memory(ram, into)


def test_one_operation_at_a_time_takes_a_guests_dirty_pages(tmp_path) -> None:
    """A live save and a migration of the same RAM at once would each take (and
    clear) marks the other needs, and both report success with stale pages: the
    second is refused, and the RAM is free again once the first ends."""
    with guest_ram(16 * MiB) as src, guest_ram(16 * MiB, fill="zero") as dst:
        incoming = DestinationMigration("tcp://127.0.0.1:0", secret=SECRET, ram=dst)
        incoming.start()
        outgoing = SourceMigration(src, incoming.address, secret=SECRET, config=SLOW)
        outgoing.start()
        wait_until(lambda: outgoing.state is MigrationState.ACTIVE, "the source's rounds")
        save = SnapshotSave(src, str(tmp_path / "vm.snap"), live=True)
        with pytest.raises(ConfigError, match="already being saved or migrated .source "):
            save.run()
        with pytest.raises(ConfigError, match="already being saved or migrated .destination "):
            SnapshotSave(dst, str(tmp_path / "dst.snap"), live=True).run()
        assert outgoing.wait(30).status == "completed"
        incoming.wait(30)
        again = SnapshotSave(src, str(tmp_path / "vm.snap"), live=True)
        assert again.run().status == "completed"
        # A restore into that RAM lands pages in it: it waits its turn too.
        save = SnapshotSave(src, str(tmp_path / "other.snap"), live=True, config=SLOW)
        save.start()
        wait_until(lambda: save.state is MigrationState.ACTIVE, "the save's rounds")
        with pytest.raises(ConfigError, match="already being saved or migrated .save "):
            SnapshotRestore(str(tmp_path / "vm.snap"), ram=src).run()
        assert save.wait(30).status == "completed"


def test_a_cancelled_restore_keeps_no_shared_memory_mapped(tmp_path, monkeypatch) -> None:
    """Teardown releases the checksum map; the failure's traceback must not keep it
    mapped (a deleted segment, for as long as the VMM keeps the object).  The
    failure comes right after the map is filled, where the set-up holds views of it."""
    path = str(tmp_path / "vm.snap")
    with guest_ram(16 * MiB) as ram:
        SnapshotSave(ram, path).run()

    def cancelled(*args: object, **kwargs: object) -> None:
        raise CancelledError("cancelled as the channels start")

    monkeypatch.setattr(SnapshotRestore, "_start_file_channels", cancelled)
    restore = SnapshotRestore(path)
    with pytest.raises(CancelledError):
        restore.run()
    assert not (mapped := segment_mappings()), mapped
