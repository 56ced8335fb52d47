"""The commands but the demo: ``listen`` (the destination), ``migrate`` (the source),
``save``, ``restore`` and ``inspect``, each on the synthetic guest of ``clients``, or
with ``--guest kvm`` on a VM on /dev/kvm (clients/kvm).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from engine.channel import channel_fork_server, channels_with_ram
from engine.cli.output import _emit, _one_line, _Progress, _watch
from engine.cli.parser import _check_args, _checked, _secret, _tls
from engine.cli.signals import (
    _after_end,
    _cancel_on_signals,
    _lifeline_ended,
    _raise_if_signalled,
    _wait_with_progress,
)
from engine.config import DestinationConfig, MigrationConfig
from engine.errors import ConfigError, MigrationError
from engine.operation import Operation
from engine.stats import MigrationResult
from engine.sync import wait_readable
from engine.units import size_text
from engine.wire.packet import MAX_CHANNELS


def cmd_listen(args: argparse.Namespace) -> int:
    from clients.devices import demo_devices
    from clients.guest import SyntheticGuest
    from engine.destination import DestinationMigration
    from engine.shm import GuestRAM

    secret = _secret(args)
    config = DestinationConfig(integrity=args.integrity)
    if args.channels < 1:
        raise ConfigError(f"--channels must be at least 1, not {args.channels}")
    if args.channels > MAX_CHANNELS:  # no source may ask for more: no processes for them
        raise ConfigError(f"--channels must be at most {MAX_CHANNELS}, not {args.channels}")
    _check_args(args)
    if args.lifeline_fd is not None and args.lifeline_fd == args.ready_fd:
        raise ConfigError(f"--lifeline-fd and --ready-fd are both {args.ready_fd}: they are two pipes")
    for option, fd in (("--ready-fd", args.ready_fd), ("--lifeline-fd", args.lifeline_fd)):
        if fd is not None:  # before anything starts, not when it is needed
            try:
                mode = os.fstat(fd).st_mode
            except OSError as exc:
                raise ConfigError(f"{option} {fd}: {exc.strerror}") from exc
            if option == "--lifeline-fd" and not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
                raise ConfigError(f"--lifeline-fd {fd} is not a pipe: give the read end of one whose "
                                  f"write end only the starting process holds")
    if args.lifeline_fd is not None:
        _watch_lifeline(args.lifeline_fd)
    ram = GuestRAM.create([("pc.ram", args.ram)], prealloc=True) if args.ram else None
    kvm = destination = None
    stack = contextlib.ExitStack()
    try:
        _raise_if_signalled()
        pool = None if ram is None else stack.enter_context(channels_with_ram(
            args.channels, "mfd-listen", ram, config.start_method, config.cancel_grace_s))
        # Without --ram the VM takes its memory when it exists: created from the
        # source's CONFIG, or the source's own pages (--local).
        kvm = _kvm_guest(args, ram) if args.guest == "kvm" else None
        devices = demo_devices(args.devices, args.device_state,
                               load_latency_s=args.device_load_latency / 1000, with_state=False,
                               iterative=args.device_iterative)
        destination = DestinationMigration(
            args.address, secret=secret, ram=ram, dump_dir=args.dump_dir,
            accept_timeout_s=args.accept_timeout, ram_is_zeroed=True,  # created just now
            devices=(kvm.devices if kvm else []) + devices, device_load=args.device_load,
            resume_guest=kvm.start if kvm else None, accept_local=not args.refuse_local,
            on_ram=kvm.take_ram if kvm is not None and ram is None else None,
            config=config, tls=_tls(args),
            pool=pool, own_pool_if_short=True,
        )
        _watch(destination)
        _cancel_on_signals(destination)
        # Ready before a source connects: RAM created and touched (--ram), and the fork
        # server its channels fork from has imported their modules.
        channel_fork_server().wait_ready()
        destination.start()
        # LISTENING inside the wait: a Ctrl-C from the line on meets the wait's cancel.
        result = _wait_with_progress(destination, _Progress.for_command(args),
                                     first=lambda: _announce(args, f"LISTENING {destination.address}"))
        ram = destination.ram
        # The answer to a source whose outcome is unknown: did this migration commit?
        extra: dict[str, Any] = {"committed": destination.committed} if args.json else {
            "committed": f"{'yes' if destination.committed else 'no'} (migration {result.migration_id})"}
        if kvm is not None:
            extra["guest"] = kvm.after(1.0 if args.run_after is None else args.run_after)
        elif (args.run_after or 0) > 0 and ram is not None:
            guest = SyntheticGuest(ram, workload="incrementer", dirty_rate=0)
            guest.start()
            _after_end.wait(args.run_after)  # a signal ends it early
            report = guest.stop()
            extra["guest_pages_written_after_resume"] = report.pages_written if report else 0
        _emit(args, result, extra if args.json or kvm is None else
              {**extra, "guest": _describe_com1(extra["guest"])})
        return 0 if kvm is None or extra["guest"]["ok"] else 1
    finally:
        try:
            _stop_unfinished(destination)
            stack.close()  # the channels give the RAM up, then stop
        finally:
            if kvm is not None:
                kvm.stop()
            if ram is not None:
                ram.close()
                ram.unlink()


def _run_with_guest(args: argparse.Namespace, config: MigrationConfig,
                    operation: Callable[..., Operation]) -> MigrationResult:
    """Run the synthetic guest and demo devices `args` describe, and the
    operation ``operation(ram, guest, devices, config, pool)`` builds on them, with
    progress; SIGTERM cancels it (the guest is resumed, nothing is left).  `config`:
    :func:`_checked`'s.  `pool`: the channels, started with the guest (None in local
    mode: no page moves)."""
    from clients.devices import demo_devices
    from clients.guest import SyntheticGuest, fill_ram
    from engine.shm import GuestRAM

    with GuestRAM.create([("pc.ram", args.ram)]) as ram, contextlib.ExitStack() as stack:
        guest: Any
        if args.guest == "kvm":
            guest = _kvm_guest(args, ram)
        else:
            fill_ram(ram, args.fill, args.zero_fraction)
            guest = SyntheticGuest(ram, args.workload, args.dirty_rate, args.hot_fraction)
        running: Any = None  # the operation, once made
        try:
            _raise_if_signalled()
            pool = None
            if not config.local:  # local mode moves no page
                pool = stack.enter_context(channels_with_ram(
                    config.channels, "mfd-vmm", ram, config.start_method, config.cancel_grace_s))
            _raise_if_signalled()
            guest.start()
            devices = getattr(guest, "devices", []) + demo_devices(
                args.devices, args.device_state, save_latency_s=args.device_save_latency / 1000,
                iterative=getattr(args, "device_iterative", False),
                dirty_rate=getattr(args, "device_dirty_rate", 0.0) / 100)
            running = _watch(operation(ram, guest, devices, config, pool))
            running.dirty_source, running.throttle_guest = guest.dirty_source, guest.throttle
            _cancel_on_signals(running)
            running.start()
            result = _wait_with_progress(running, _Progress.for_command(args))
            if args.guest != "kvm":
                return result
            return dataclasses.replace(result, extra={**result.extra, "guest": guest.com1()})
        finally:
            try:
                _stop_unfinished(running)
            finally:
                guest.stop()  # then the channels give the RAM up and stop (the stack)


def _stop_unfinished(operation: Operation | None) -> None:
    """Cancel the command's operation if an exception left it running (a second Ctrl-C
    as the first one's wait began) and wait for its teardown: it ends before its
    guest and its channels do.  None (not made yet) or done: nothing to do."""
    if operation is None or operation.done():
        return
    operation.cancel("interrupted")
    with contextlib.suppress(MigrationError):
        operation.wait()


def _kvm_guest(args: argparse.Namespace, ram: Any) -> Any:
    """`args`' KVM machine on `ram`: booted (a source) or incoming (no --program)."""
    from clients.kvm.guest import KvmGuest

    if not hasattr(args, "program"):
        return KvmGuest.incoming(ram)
    if args.boot_image:
        with open(args.boot_image, "rb") as f:
            return KvmGuest.boot(ram, "boot-image", boot_image=f.read())
    start = 1 << 20
    return KvmGuest.boot(ram, args.program, start=start,
                         end=start + args.loop_size if args.loop_size else None)


def _describe_com1(report: dict[str, Any]) -> str:
    from clients.kvm.guest import describe_com1

    return describe_com1(report)


def _kvm_lines(args: argparse.Namespace, result: MigrationResult,
               remote: dict[str, Any] | None = None) -> dict[str, str]:
    from clients.kvm.guest import summary_lines

    return summary_lines(result.extra, (remote or {}).get("guest"), args.auto_converge)


def _run_source(args: argparse.Namespace, config: MigrationConfig, to: str, secret: bytes) -> MigrationResult:
    from engine.source import SourceMigration

    return _run_with_guest(args, config, lambda ram, guest, devices, config, pool: SourceMigration(
        ram, to, secret=secret, config=config, pause_guest=guest.pause, pool=pool,
        resume_guest=guest.resume, dump_dir=args.dump_dir, devices=devices,
        tls=_tls(args) if hasattr(args, "tls_cert") else None,
    ))


def cmd_migrate(args: argparse.Namespace) -> int:
    secret = _secret(args)
    result = _run_source(args, _checked(args), args.to, secret)
    _emit(args, result, _kvm_lines(args, result) if args.guest == "kvm" and not args.json else None)
    if "destination_error" in result.extra:  # the VM runs nowhere: the destination's VMM must act
        print(f"multifd: failed: the destination committed, but its guest is not running: "
              f"{_one_line(result.extra['destination_error'], args.verbose)}", file=sys.stderr)
        return 1
    return 0


def cmd_save(args: argparse.Namespace) -> int:
    from engine.snapshot import SnapshotSave

    result = _run_with_guest(args, _checked(args), lambda ram, guest, devices, config, pool: SnapshotSave(
        ram, args.file, config=config, live=args.live, pause_guest=guest.pause, pool=pool,
        resume_guest=guest.resume, devices=devices, direct_io=args.direct_io, dump_dir=args.dump_dir,
    ))
    _emit(args, result, {} if args.json else {"file": result.extra["path"],
                                              **(_kvm_lines(args, result) if args.guest == "kvm" else {})})
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from clients.devices import DemoDevice
    from engine.snapshot import SnapshotRestore, inspect_snapshot

    _check_args(args)
    info = inspect_snapshot(args.file)
    if args.guest != "kvm":
        from clients.kvm.machine import VcpuDevice

        if any(d.idstr == VcpuDevice.idstr for d in info.metadata.devices):
            raise ConfigError(f"{args.file} holds a KVM guest (device {VcpuDevice.idstr}): restore it "
                              f"with --guest kvm")
    kvm = restore = None
    if args.guest == "kvm":  # the VM is built on new RAM before the vCPU's state loads
        from engine.shm import GuestRAM

        new_ram = GuestRAM.create(info.layout)
        try:
            kvm = _kvm_guest(args, new_ram)
        except BaseException:
            new_ram.close()
            new_ram.unlink()
            raise
    # The demo devices the snapshot holds, empty, to be loaded.
    devices = [DemoDevice(d.idstr, d.instance_id, d.size - d.chunks[-1][1],
                          load_latency_s=args.device_load_latency / 1000, with_state=False)
               for d in info.metadata.devices if kvm is None or d.idstr != kvm.machine.device.idstr]
    try:
        restore = SnapshotRestore(args.file, config=MigrationConfig(channels=args.channels),
                                  devices=(kvm.devices if kvm else []) + devices,
                                  device_load=args.device_load, direct_io=args.direct_io,
                                  dump_dir=args.dump_dir, ram=kvm.machine.ram if kvm else None,
                                  ram_is_zeroed=kvm is not None, resume_guest=kvm.start if kvm else None)
        _watch(restore)
        _cancel_on_signals(restore)
        restore.start()
        result = _wait_with_progress(restore, _Progress.for_command(args))
        if kvm is not None:
            report = kvm.after(1.0 if args.run_after is None else args.run_after)
            result = dataclasses.replace(result, extra={**result.extra, "guest": report})
    finally:
        try:
            _stop_unfinished(restore)
        finally:
            restored = kvm.machine.ram if kvm is not None else restore.ram if restore is not None else None
            if kvm is not None:
                kvm.stop()
            if restored is not None:
                restored.close()
                restored.unlink()
    if devices:  # each demo device also checks its state against its own config part
        verified = bool(result.extra.get("devices_verified")) and all(d.intact() for d in devices)
        result = dataclasses.replace(result, extra={**result.extra, "devices_verified": verified})
    _emit(args, result, {} if args.json else {"file": args.file, **(
        {"guest COM1": _describe_com1(result.extra["guest"])} if kvm is not None else {})})
    guest_ok = kvm is None or result.extra["guest"]["ok"]
    return 0 if result.extra.get("devices_verified", True) is not False and guest_ok else 1


def cmd_partial_files(args: argparse.Namespace) -> int:
    """`inspect DIR`: the partial files there, a running save's or a dead one's."""
    from transports.file import partial_files, remove_partial

    found = partial_files(args.file)
    removed = {p.path for p in found if args.clean and p.stale}
    for partial in found:
        if partial.path in removed:
            remove_partial(partial)
    if args.json:
        print(json.dumps({"directory": args.file, "partial_files": [
            {**dataclasses.asdict(p), "removed": p.path in removed} for p in found]}))
        return 0
    lines = [f"{len(found)} partial file(s) in {args.file}" if found else f"no partial files in {args.file}"]
    for p in found:
        state = ("removed" if p.path in removed else "stale: its save died (--clean removes it)"
                 if p.stale else "a save in progress")
        lines.append(f"{os.path.basename(p.path)}  {size_text(p.size)}  for {os.path.basename(p.target)}, "
                     f"process {p.pid}: {state}")
    print("\n".join(lines))
    return 0


DAMAGE_LINES = 20  # inspect --verify: damaged regions listed at most


def cmd_inspect(args: argparse.Namespace) -> int:
    from engine.snapshot import inspect_snapshot

    if os.path.isdir(args.file):
        if args.verify:
            raise ConfigError("--verify takes a snapshot file (a directory lists its partial files)")
        return cmd_partial_files(args)
    if args.clean:
        raise ConfigError("--clean takes a directory (it removes the partial files of dead saves)")
    info = inspect_snapshot(args.file, verify=args.verify, channels=args.channels)
    summary = info.to_dict()
    damaged = 1 if info.damage else 0
    if args.json:
        print(json.dumps(summary))
        return damaged
    saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(summary["saved_at_ns"] / 1e9))
    lines = [
        f"snapshot         {summary['path']} ({size_text(summary['file_size'])})",
        f"format           version {summary['format_version']}, id {summary['snapshot_id']}",
        f"saved            {saved}, {'live' if summary['live'] else 'stopped'}, "
        f"page size {summary['page_size']}",
        f"guest RAM        {size_text(summary['ram_bytes'])} in {len(summary['blocks'])} block(s)",
    ]
    for block in summary["blocks"]:
        lines.append(f"block {block['name']:<10} {size_text(block['size'])}: {block['present_pages']} of "
                     f"{block['pages']} pages present (the rest zero), pages at {block['pages_offset']}")
    for device in summary["devices"]:
        lines.append(f"device {device['idstr']}/{device['instance_id']:<6} {size_text(device['bytes'])} in "
                     f"{device['chunks']} chunks, sha256 {device['sha256'][:16]}…")
    if not summary["devices"]:
        lines.append("devices          none")
    lines.append(f"info             {json.dumps(summary['info'], sort_keys=True)}")
    if info.damage is not None:
        lines.append(f"verified         {len(info.damage)} damaged region(s)" if info.damage else
                     "verified         intact: every page and device stream matches its checksum")
        lines += [f"damaged          {d.describe()}" for d in info.damage[:DAMAGE_LINES]]
        if len(info.damage) > DAMAGE_LINES:
            lines.append(f"damaged          … and {len(info.damage) - DAMAGE_LINES} more region(s)")
    print("\n".join(lines))
    return damaged


def _announce(args: argparse.Namespace, line: str) -> None:
    """Say where `listen` listens: on stdout; on stderr with --json (whose one
    document is then alone on stdout); or on the descriptor --ready-fd names."""
    if args.ready_fd is not None:
        with open(args.ready_fd, "w", closefd=True) as ready:
            ready.write(line + "\n")
    else:
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)


def _watch_lifeline(fd: int) -> None:
    """SIGTERM to this process once `fd` reads end of file (or anything): the
    process that holds its write end, the one that started this one, is gone, and
    the usual SIGTERM cancel tears down.  A thread of its own waits on it for the
    process's life; a pipe, unlike a parent-death signal, follows a process, not
    the thread that forked, and any reparenting."""
    def watch() -> None:
        wait_readable([fd], None)
        _lifeline_ended.set()
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="mfd-lifeline", daemon=True).start()
