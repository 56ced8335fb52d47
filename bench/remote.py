"""A migration from this process to a destination VMM in a process of its own.

Every benchmark migrates this way, as a real VMM pair would: the destination
attaches the guest RAM the benchmark allocated (so it can be pre-touched or
zeroed outside the timing) and sends its result back over a pipe.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from clients.devices import demo_devices
from engine import DestinationMigration, GuestRAM, MigrationConfig, MigrationResult, SourceMigration
from engine.channel import channel_fork_server, channels_with_ram
from engine.device import MigratableDevice
from engine.link import TlsConfig
from engine.pool import WorkerPool
from engine.shm import RamHandle
from tests.netns import Hosts, enter, inside

T = TypeVar("T")
SECRET = b"bench"


def _destination_process(handle: RamHandle, address: str, config: MigrationConfig,
                         pipe: Connection, ram_is_zeroed: bool,
                         devices: dict[str, Any] | None, tls: TlsConfig | None = None,
                         netns: str | None = None) -> None:
    """The destination VMM.

    ``devices``, when given, holds :func:`clients.devices.demo_devices` arguments,
    ``device_load`` and ``max_device_buffer``: the destination builds its empty devices here and reports
    how many loaded intact.
    """
    if netns is not None:
        enter(netns)  # the destination host; its channel processes are born there too
    ram = GuestRAM.attach(handle)
    try:
        devices = dict(devices or {})
        device_load = devices.pop("device_load", "parallel")
        max_device_buffer = devices.pop("max_device_buffer", 64 << 20)
        loaded = demo_devices(**devices, with_state=False) if devices else []
        destination = DestinationMigration(address, secret=SECRET, ram=ram, config=config.for_destination(),
                                           ram_is_zeroed=ram_is_zeroed, devices=loaded,
                                           device_load=device_load, max_device_buffer=max_device_buffer,
                                           tls=tls)
        # Ready before the source connects, as `multifd listen` is: the fork server its
        # channels fork from has imported their modules (else its start, ~0.3 s here,
        # lands inside the transfer, while the source's pages wait in socket buffers).
        channel_fork_server().wait_ready()
        pipe.send(destination.address)
        result = destination.run().to_dict()
        result["devices_intact"] = sum(device.intact() for device in loaded)
        pipe.send(result)
    except BaseException as exc:
        pipe.send({"error": repr(exc)})
    finally:
        ram.close()
        pipe.close()


def migrate(src: GuestRAM, dst: GuestRAM, config: MigrationConfig, *, transport: str = "tcp",
            ram_is_zeroed: bool = False, source_devices: Sequence[MigratableDevice] | None = None,
            destination_devices: dict[str, Any] | None = None,
            tls: tuple[TlsConfig, TlsConfig] | None = None, hosts: Hosts | None = None,
            guest: Any = None) -> tuple[MigrationResult, dict[str, Any], float]:
    """Migrate `src` into `dst` (held by a destination process).

    `tls`: the source's and the destination's TLS files (TLS 1.3 on every channel).
    `hosts`: two network namespaces (tests/netns.py): the destination listens in
    one, the source connects from the other, over their veth pair.
    `guest`: a running guest on `src` (its ``pause``/``resume`` are the VMM's).
    Returns the source's result, the destination's result as a dict, and the CPU
    seconds this (the source's main) process spent.  Raises if the destination failed.
    """
    address = "tcp://127.0.0.1:0" if transport == "tcp" else f"unix:///tmp/mfd-bench-{os.getpid()}.sock"
    if hosts is not None:
        address = f"tcp://{hosts.destination_ip}:0"
    if tls is not None:
        address = address.replace("tcp://", "tls://")
    def source(to: str) -> tuple[MigrationResult, float]:
        times = os.times()
        # Connections are made by this thread: in the source namespace when asked.
        with inside(hosts.source) if hosts else contextlib.nullcontext():
            result = SourceMigration(src, to, secret=SECRET, config=config,
                                     devices=source_devices or (), tls=tls[0] if tls else None,
                                     pause_guest=guest.pause if guest else None,
                                     resume_guest=guest.resume if guest else None).run()
        return result, sum(os.times()[:2]) - sum(times[:2])

    (result, main_cpu_s), remote = against_destination(
        _destination_process, (dst.handle, address, config), source,
        ram_is_zeroed, destination_devices, tls[1] if tls else None, hosts.destination if hosts else None)
    return result, remote, main_cpu_s


def _warm_destination(blocks: dict[str, int], workers: int, timeout: float, pipe: Connection) -> None:
    """The destination VMM of :class:`WarmDestination`: preallocated RAM, mapped, page
    tables and all, by every worker of a pool kept across migrations.  Serves one
    migration per DestinationConfig received (its address, then its result as a dict,
    or ``{"error": ...}``); None stops it."""
    with GuestRAM.create(blocks, prealloc=True) as ram, \
            channels_with_ram(workers, "bench-warm-dst", ram) as pool:
        pipe.send("ready")
        while (config := pipe.recv()) is not None:
            try:
                destination = DestinationMigration("tcp://127.0.0.1:0", secret=SECRET, ram=ram, pool=pool,
                                                   accept_timeout_s=timeout, config=config)
                destination.start()
                pipe.send(destination.address)
                pipe.send(destination.wait().to_dict())
            except Exception as exc:
                pipe.send({"error": repr(exc)})


class WarmDestination:
    """A destination VMM process kept across migrations, as a VMM that keeps its pool
    and its RAM from VM start: nothing of its set-up lands on a migration's clock.
    Its RAM has `src`'s layout; `workers` is the most channels a migration may use."""

    def __init__(self, src: GuestRAM, workers: int, timeout: float = 300.0) -> None:
        self._pipe, theirs = multiprocessing.Pipe()
        blocks = {block.name: block.size for block in src.blocks}
        self._process = multiprocessing.get_context("spawn").Process(
            target=_warm_destination, args=(blocks, workers, timeout, theirs))
        self._process.start()
        theirs.close()
        try:
            if self._pipe.recv() != "ready":
                raise RuntimeError("the warm destination did not start")
        except BaseException:
            self.close()
            raise

    def migrate(self, src: GuestRAM, pool: WorkerPool,
                config: MigrationConfig) -> tuple[MigrationResult, dict[str, Any], float]:
        """Migrate `src` on `pool`'s workers into this destination: the source's result,
        the destination's as a dict, and the seconds the source's ``run()`` call took.
        Raises if either side failed."""
        self._pipe.send(config.for_destination())
        address = self._pipe.recv()
        if isinstance(address, dict):
            raise RuntimeError(f"the warm destination failed: {address['error']}")
        started = time.perf_counter()
        try:
            result = SourceMigration(src, address, secret=SECRET, pool=pool, config=config).run()
        except BaseException:
            if self._pipe.poll(60):  # its answer to this one: the next migration starts clean
                self._pipe.recv()
            raise
        run_s = time.perf_counter() - started
        remote = self._pipe.recv()
        if "error" in remote:
            raise RuntimeError(f"the warm destination failed: {remote['error']}")
        return result, remote, run_s

    def close(self) -> None:
        """Stop the destination; end it if it does not stop (after a failed run)."""
        with contextlib.suppress(OSError):
            self._pipe.send(None)
        self._process.join(30)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(10)
        self._pipe.close()

    def __enter__(self) -> WarmDestination:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def against_destination(target: Callable[..., None], args: tuple[Any, ...],
                        source: Callable[[str], T], *more: Any) -> tuple[T, dict[str, Any]]:
    """Run `target(*args, pipe, *more)` as the destination VMM in a spawned process
    (it sends its address, then its result as a dict, or ``{"error": ...}``) and
    `source(address)` here; returns what `source` returned and the destination's
    result.  Raises if the destination failed, before it listened or after."""
    ours, theirs = multiprocessing.Pipe()
    process = multiprocessing.get_context("spawn").Process(target=target, args=(*args, theirs, *more))
    process.start()
    theirs.close()
    try:
        to = ours.recv()
        if isinstance(to, dict):  # it failed before it listened
            raise RuntimeError(f"the destination failed: {to['error']}")
        done = source(to)
        remote = ours.recv()
    finally:
        process.join(60)
        ours.close()
    if "error" in remote:
        raise RuntimeError(f"the destination failed: {remote['error']}")
    return done, remote


def channel_cpu(source: dict[str, Any], destination: dict[str, Any]) -> dict[str, int]:
    """Each side's channel processes' CPU, ms (their reports' ``cpu_ms``, READY to report),
    from the two results as dicts (``MigrationResult.to_dict()``, or a destination's)."""
    return {f"{side}_channel_cpu_ms": sum(m.get("cpu_ms", 0) for m in result["channel_memory_kib"])
            for side, result in (("source", source), ("destination", destination))}


def channel_cpu_per_gib(runs: list[dict[str, Any]], gib: float) -> tuple[float, float]:
    """The median source and destination channel CPU, ms per GiB moved, of runs that
    carry :func:`channel_cpu`'s keys."""
    src, dst = (statistics.median(r[f"{side}_channel_cpu_ms"] for r in runs) / gib
                for side in ("source", "destination"))
    return src, dst


def write_report(path: str, report: dict[str, Any]) -> None:
    """Every run of a benchmark, as JSON, for whoever checks its figures."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as out:
        json.dump(report, out, indent=1)
    print(f"wrote {path}")
