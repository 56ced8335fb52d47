"""``multifd demo``: a live migration between two processes on this machine.  This
one is the source; it starts ``multifd listen`` as a child process (``python -m
engine.cli``, which exits with it), reads the address it listens on from a pipe,
migrates to it, and merges the destination's JSON summary into its own.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from engine.cli.commands import _kvm_lines, _run_source
from engine.cli.output import _emit
from engine.cli.parser import SECRET_ENV, _checked
from engine.cli.signals import _raise_if_signalled
from engine.errors import MigrationError
from engine.stats import MigrationResult
from engine.sync import wait_readable

_PACKAGE = __name__.rpartition(".")[0]  # engine.cli


def cmd_demo(args: argparse.Namespace) -> int:
    config = _checked(args)  # before the destination process starts
    secret = secrets.token_hex(32).encode()
    # --local: over a unix socket, to a destination that takes the source's RAM.  A name
    # of its own, no directory: the destination removes the socket whatever ends the demo.
    unix = args.transport == "unix" or args.local
    socket_path = os.path.join(tempfile.gettempdir(), f"multifd-demo-{secrets.token_hex(8)}.sock")
    # The destination's lifeline: the read end of a pipe whose write end only this
    # process holds, so that it reads EOF (and cancels) once this process is gone.
    lifeline_read, lifeline_write = os.pipe()
    try:
        address = f"unix://{socket_path}" if unix else "tcp://127.0.0.1:0"
        # `listen` runs as this package's script (__main__.py).  Its name is derived, not
        # written out: test_layers reads a module's name in a string as an import of it.
        command = [sys.executable, "-m", _PACKAGE, "listen", "--address", address,
                   *(() if args.local else ("--ram", str(args.ram), "--channels", str(args.channels))),
                   "--json", "--accept-timeout", "60", "--lifeline-fd", str(lifeline_read),
                   "--devices", str(args.devices), "--device-state", str(args.device_state),
                   "--device-load-latency", str(args.device_load_latency),
                   "--device-load", args.device_load]
        if args.device_iterative:
            command.append("--device-iterative")
        if args.dump_dir:
            command += ["--dump-dir", args.dump_dir]
        if args.guest == "kvm":
            run_after = 1.0 if args.run_after is None else args.run_after
            command += ["--guest", "kvm", "--run-after", str(run_after)]
        if args.verbose:
            command.append("--verbose")
        env = dict(os.environ, **{SECRET_ENV: secret.decode()})
        # The destination's stderr: live with --verbose; else kept, and shown only
        # on success (on failure the source's one line says "destination failed: …").
        ready_read, ready_write = os.pipe()
        command += ["--ready-fd", str(ready_write)]
        # An unnamed file: nothing of it is left, whatever ends this process.
        with tempfile.TemporaryFile("w+") as errors, open(ready_read, closefd=True) as ready:
            try:
                destination = subprocess.Popen(command, stdout=subprocess.PIPE, env=env, text=True,
                                               stderr=None if args.verbose else errors,
                                               pass_fds=(ready_write, lifeline_read))
            finally:
                os.close(ready_write)  # the destination holds it now: EOF when it exits
                os.close(lifeline_read)
            try:
                to = _read_listening(destination, ready, errors)
                if not args.json:
                    print(f"destination process {destination.pid} listening on {to}")
                result = _run_source(args, config, to, secret)
                remote = json.loads(destination.communicate(timeout=60)[0] or "{}")
            finally:
                if destination.poll() is None:
                    destination.terminate()
                    destination.wait(timeout=10)
                if destination.stdout:
                    destination.stdout.close()
            errors.seek(0)
            sys.stderr.write(errors.read())
    finally:
        os.close(lifeline_write)
    result = _merge_devices(result, remote)
    # Committed, then the destination said nothing: it died, and the guest with it.
    lost = None if remote or destination.returncode == 0 else (
        f"the destination process {destination.pid} "
        f"{_ended_how(destination.returncode)} after the commit: the guest runs nowhere")
    _emit(args, result, {"destination": remote, **({"destination_error": lost} if lost else {})}
          if args.json else {
              "dest downtime": f"{remote.get('downtime_ms', 0):.1f} ms (destination's share)",
              **(_kvm_lines(args, result, remote) if args.guest == "kvm" and not lost else {}),
          })
    if lost:
        print(f"multifd: failed: {lost}", file=sys.stderr)
        return 1
    guest_ok = args.guest != "kvm" or remote.get("guest", {}).get("ok", False)
    return 0 if result.verified is not False and guest_ok else 1


def _ended_how(returncode: int) -> str:
    """'was killed by SIGKILL', 'exited 1': how a child process ended."""
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited {returncode}"


def _read_listening(process: subprocess.Popen, ready: Any, errors: Any) -> str:
    """The address `listen` wrote to its ready pipe (`ready`, our end); `errors`,
    its stderr file, says why not."""
    assert process.stdout is not None
    deadline = time.monotonic() + 30
    while not (said := bool(wait_readable([ready], 0.1))) and time.monotonic() < deadline:
        _raise_if_signalled()  # a SIGTERM while it starts (_cancel_on_signals)
    line = ready.readline() if said else ""
    if not line.startswith("LISTENING "):
        # A SIGTERM to the whole group ends it too, before its line: ours comes first.
        _raise_if_signalled()
        # It ended, or will: its --json error is on stdout, its line on stderr.
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
        why = ""
        with contextlib.suppress(ValueError):
            said_json = json.loads(process.stdout.read() if process.poll() is not None else "")
            why = str(said_json.get("error", "")) if isinstance(said_json, dict) else ""
        if not why:
            errors.seek(0)
            said = errors.read().strip().splitlines()
            why = said[-1].removeprefix("multifd: failed: ") if said else ""
        raise MigrationError(f"the destination process did not start listening{': ' + why if why else ''}")
    return line.split(maxsplit=1)[1].strip()


def _merge_devices(result: MigrationResult, remote: dict[str, Any]) -> MigrationResult:
    """The source knows what each device saved; the destination what it loaded."""
    if "devices" not in result.extra:
        return result
    loaded = {(d["idstr"], d["instance_id"]): d for d in remote.get("devices", [])}
    devices = []
    for device in result.extra["devices"]:
        theirs = loaded.get((device["idstr"], device["instance_id"]), {})
        devices.append({**device, "load_ms": theirs.get("load_ms"), "verified": theirs.get("verified")})
    extra = {**result.extra, "devices": devices,
             "devices_verified": remote.get("devices_verified")}
    return dataclasses.replace(result, extra=extra)
