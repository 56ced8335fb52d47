"""The process's fork server (engine/pool/_forkserver.py) and warm pools.

Workers forked from it come from an interpreter that already imported the pool's
`preload`; it has an owner (stop() waits for it, nothing is left), and a process
that dies with one leaves nothing running either.  (Its crash cases are in
test_pool_crashes.py's matrix, run with both start methods.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from engine.errors import PoolError
from engine.pool import WorkerPool, fork_server, fork_server_pids, warm_up

GUARD = 30.0  # deadlock guard for every wait; never reached when the code works
# Imported by nothing else in the test process or the engine: a worker has it only
# if the fork server preloaded it.
MARKER = "xml.dom.minidom"


def imported(name: str) -> bool:
    return name in sys.modules


def parent_pid() -> int:
    return os.getppid()


def test_workers_fork_from_the_server_with_its_preloads() -> None:
    assert MARKER not in sys.modules
    server = fork_server((MARKER,))
    with WorkerPool("process", 2, name="forked", start_method="forkserver", preload=(MARKER,)) as pool:
        assert pool.submit(imported, MARKER).result(GUARD)  # in the worker, before any job asked
        assert pool.submit(parent_pid).result(GUARD) == server.pid  # the server forked it
        assert server.pid in fork_server_pids()
    assert MARKER not in sys.modules
    server.stop()
    assert server.pid is None


def test_channel_processes_start_with_numpys_lazy_imports_done() -> None:
    """np.unique imports numpy.ma at its first call (9-35 ms): a channel's first
    packet of scattered pages, usually the final round's, paid it inside the
    downtime.  Channels forked from the channel server have it already."""
    from engine.channel import channel_pool

    with channel_pool(1, name="channel-preload") as pool:
        assert pool.submit(imported, "numpy.ma").result(GUARD)


def test_stop_waits_for_the_server_and_a_later_pool_starts_another() -> None:
    server = fork_server((MARKER,))
    server.wait_ready(GUARD)
    first = psutil.Process(server.pid)
    server.stop()
    assert not first.is_running() or first.status() == psutil.STATUS_ZOMBIE
    server.stop()  # idempotent
    with WorkerPool("process", 1, name="again", start_method="forkserver", preload=(MARKER,)) as pool:
        assert pool.submit(parent_pid).result(GUARD) == server.pid != first.pid
    server.stop()


def test_warm_up_starts_every_worker_once() -> None:
    with WorkerPool("process", 3, name="warm", start_method="forkserver", preload=(MARKER,)) as pool:
        pids = warm_up(pool, GUARD)
        assert len(set(pids)) == 3  # each worker ran one warm-up job
        assert pool.statistics().workers_alive == 3
        # The jobs that follow find them running, and the preloads imported.
        assert {pool.submit(os.getpid).result(GUARD) for _ in range(6)} <= set(pids)
    fork_server((MARKER,)).stop()


def test_warm_up_of_a_pool_that_cannot_start_is_a_pool_error() -> None:
    with WorkerPool("process", 2, name="bad", start_method="forkserver",
                    preload=("no_such_module_anywhere",)) as pool:
        with pytest.raises(PoolError, match="broke while warming up"):
            warm_up(pool, GUARD)
    fork_server(("no_such_module_anywhere",)).stop()


def test_an_owner_killed_with_a_fork_server_leaves_nothing_running(tmp_path) -> None:
    """SIGKILL the owner while its pool's workers run: they see EOF and exit, and the
    server goes with the last of them."""
    script = tmp_path / "owner.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.getcwd()!r})
        from engine.pool import WorkerPool, warm_up
        if __name__ == "__main__":  # the fork server imports this file as its __main__
            pool = WorkerPool("process", 2, name="orphans", start_method="forkserver")
            warm_up(pool)
            print("up", flush=True)
            time.sleep(60)
    """))
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None and owner.stdout.readline() == "up\n"
        everything = psutil.Process(owner.pid).children(recursive=True)
        assert len(everything) >= 3  # the fork server and two workers (and the resource tracker)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        if owner.stdout is not None:
            owner.stdout.close()
    _, alive = psutil.wait_procs(everything, timeout=GUARD)
    for process in alive:
        process.kill()
    assert not alive, f"outlived their owner: {alive}"


def test_a_pool_of_a_fork_server_that_died_starts_another() -> None:
    server = fork_server((MARKER,))
    server.wait_ready(GUARD)
    old = server.pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + GUARD
    while psutil.Process(old).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.01)
    with WorkerPool("process", 1, name="revived", start_method="forkserver", preload=(MARKER,)) as pool:
        assert pool.submit(parent_pid).result(GUARD) == server.pid != old
    server.stop()
