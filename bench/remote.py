"""A migration from this process to a destination VMM in a process of its own.

Every benchmark migrates this way, as a real VMM pair would: the destination
attaches the guest RAM the benchmark allocated (so it can be pre-touched or
zeroed outside the timing) and sends its result back over a pipe.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from multiprocessing.connection import Connection
from typing import Any

from clients.devices import demo_devices
from engine import DestinationMigration, GuestRAM, MigrationConfig, MigrationResult, SourceMigration
from engine.device import MigratableDevice
from engine.shm import RamHandle

SECRET = b"bench"


def _destination_process(handle: RamHandle, address: str, config: MigrationConfig,
                         pipe: Connection, ram_is_zeroed: bool,
                         devices: dict[str, Any] | None) -> None:
    """The destination VMM.

    ``devices``, when given, holds :func:`clients.devices.demo_devices` arguments
    and ``device_load``: the destination builds its empty devices here and reports
    how many loaded intact.
    """
    ram = GuestRAM.attach(handle)
    try:
        devices = dict(devices or {})
        device_load = devices.pop("device_load", "parallel")
        loaded = demo_devices(**devices, with_state=False) if devices else []
        destination = DestinationMigration(address, secret=SECRET, ram=ram, config=config.for_destination(),
                                           ram_is_zeroed=ram_is_zeroed, devices=loaded,
                                           device_load=device_load)
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
            ram_is_zeroed: bool = False, source_devices: list[MigratableDevice] | None = None,
            destination_devices: dict[str, Any] | None = None,
            guest: Any = None) -> tuple[MigrationResult, dict[str, Any], float]:
    """Migrate `src` into `dst` (held by a destination process).

    `guest`: a running guest on `src` (its ``pause``/``resume`` are the VMM's).
    Returns the source's result, the destination's result as a dict, and the CPU
    seconds this (the source's main) process spent.  Raises if the destination failed.
    """
    address = "tcp://127.0.0.1:0" if transport == "tcp" else f"unix:///tmp/mfd-bench-{os.getpid()}.sock"
    ours, theirs = multiprocessing.Pipe()
    process = multiprocessing.get_context("spawn").Process(
        target=_destination_process,
        args=(dst.handle, address, config, theirs, ram_is_zeroed, destination_devices))
    process.start()
    theirs.close()
    try:
        times = os.times()
        result = SourceMigration(src, ours.recv(), secret=SECRET, config=config,
                                 devices=source_devices or (),
                                 pause_guest=guest.pause if guest else None,
                                 resume_guest=guest.resume if guest else None).run()
        main_cpu_s = sum(os.times()[:2]) - sum(times[:2])
        remote = ours.recv()
    finally:
        process.join(60)
        ours.close()
    if "error" in remote:
        raise RuntimeError(f"destination failed: {remote['error']}")
    return result, remote, main_cpu_s


def write_report(path: str, report: dict[str, Any]) -> None:
    """Every run of a benchmark, as JSON, for whoever checks its figures."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as out:
        json.dump(report, out, indent=1)
    print(f"wrote {path}")
