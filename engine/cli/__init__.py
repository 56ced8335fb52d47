"""The ``multifd`` command line.

``multifd demo``     a live migration of a synthetic guest between two processes on
                     this machine (this one is the source; it starts ``listen``)
``multifd listen``   the destination: wait for a source, receive, verify, resume
``multifd migrate``  the source: migrate a synthetic guest to a listening destination
``multifd save``     save a synthetic guest (live or stopped) to a snapshot file
``multifd restore``  restore a snapshot file into new guest RAM
``multifd inspect``  print what a snapshot file holds (a directory: its partial files)

This package is the composition root: it wires the engine to the synthetic guest
of ``clients``, or with ``--guest kvm`` to a real VM on /dev/kvm
(clients/kvm), its dirty log and its throttle (the engine itself never
imports clients).  Errors print one
line and exit non-zero (3: the outcome is unknown, see :func:`main`); ``--json``
prints one JSON object on stdout.  Log records print one line each, and only
until the operation fails: after that they are consequences of the error line.

The package::

    __init__.py   main(): parse, set up logging and signals, run the command, map
                  its error to one line and an exit status
    __main__.py   ``python -m engine.cli`` (the demo starts its destination so)
    parser.py     the options, parse_size/parse_rate, the secret, the option checks
    output.py     the summary, --json, the progress line, the one-line errors, the log;
                  home of the command's operation (``_operation``)
    signals.py    signals cancel the command; waiting for it with progress; home of
                  ``_signalled`` and ``_after_end``
    commands.py   listen, migrate, save, restore, inspect
    demo.py       demo: the source here, its destination a ``listen`` child process

Each module imports only those listed above it, ``__init__`` apart: it imports them
all, and re-exports what ``engine.cli`` always offered (parse_size for the benchmarks).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from engine.channel import channel_fork_server
from engine.cli import output
from engine.cli.commands import (
    DAMAGE_LINES,
    cmd_inspect,
    cmd_listen,
    cmd_migrate,
    cmd_partial_files,
    cmd_restore,
    cmd_save,
)
from engine.cli.demo import cmd_demo
from engine.cli.output import LINE_LIMIT, _fail, _setup_logging
from engine.cli.output import _one_line as _one_line  # the tests'
from engine.cli.output import _outcome_unknown as _outcome_unknown  # the tests'
from engine.cli.parser import (
    MAX_SECRET_FILE,
    SECRET_ENV,
    _parse,
    _UsageError,
    build_parser,
    parse_rate,
    parse_size,
)
from engine.cli.signals import _after_end, _cancel_on_signals, _signalled
from engine.errors import CancelledError, MigrationError, OutcomeUnknownError
from engine.pool import stop_fork_servers
from engine.sync import MigrationState

__all__ = [
    "DAMAGE_LINES", "EXIT_OUTCOME_UNKNOWN", "LINE_LIMIT", "MAX_SECRET_FILE", "SECRET_ENV", "build_parser",
    "cmd_demo", "cmd_inspect", "cmd_listen", "cmd_migrate", "cmd_partial_files", "cmd_restore", "cmd_save",
    "main", "parse_rate", "parse_size",
]

EXIT_OUTCOME_UNKNOWN = 3


def _restore_signal(number: int, handler: Any) -> None:
    """Put `handler` back for `number`, unless it is ignored (nohup, a background job)."""
    if signal.getsignal(number) is not signal.SIG_IGN:
        signal.signal(number, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command, as this process's command line: it returns with SIGINT,
    SIGTERM and SIGHUP ignored, its exit status decided.  Exit status: 0 done, 1
    failed (or not verified, or the destination committed but could not start its
    guest), 3 the outcome is unknown (COMMIT sent, no answer: the guest stays
    paused), 130 cancelled, 141 our reader went away."""
    output._operation = None  # its one home: output.py
    _signalled.clear()
    _after_end.clear()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parse(argv)
    except _UsageError as exc:  # one line, and with --json one object, as every error
        if "--json" in argv:
            print(json.dumps({"status": MigrationState.FAILED.value, "error": str(exc)}))
        print(f"multifd: failed: {exc} (`{exc.prog} --help` lists the options)", file=sys.stderr)
        return 1
    _setup_logging(args.verbose)
    handlers = {"demo": cmd_demo, "listen": cmd_listen, "migrate": cmd_migrate,
                "save": cmd_save, "restore": cmd_restore, "inspect": cmd_inspect}
    try:
        # engine/console.py's handlers held while nothing existed to tear down; from here
        # Ctrl-C is a KeyboardInterrupt again (one line below, after the teardown), and
        # SIGTERM and SIGHUP cancel the command, or end `inspect` as they would any program.
        _restore_signal(signal.SIGINT, signal.default_int_handler)
        if args.command == "inspect":
            _restore_signal(signal.SIGTERM, signal.SIG_DFL)
            _restore_signal(signal.SIGHUP, signal.SIG_DFL)
        else:
            _cancel_on_signals(None)  # SIGTERM and SIGHUP from here cancel the command
            # Channel processes fork from it in milliseconds; it imports their modules
            # while this process builds the guest (stopped below, or at exit).
            channel_fork_server().start()
        return handlers[args.command](args)
    except CancelledError as exc:
        _fail(args, MigrationState.CANCELLED, exc)
        return 130
    except BrokenPipeError:
        # Whoever read our output stopped (`| head`): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OutcomeUnknownError as exc:
        _fail(args, MigrationState.OUTCOME_UNKNOWN, exc)
        return EXIT_OUTCOME_UNKNOWN
    except (MigrationError, OSError) as exc:
        _fail(args, MigrationState.FAILED, exc)
        return 1
    except KeyboardInterrupt:
        _fail(args, MigrationState.CANCELLED, "interrupted")
        return 130
    finally:
        _stop_fork_servers_quietly()


def _stop_fork_servers_quietly() -> None:
    """The command's last step, its exit status decided: stop the fork servers (up to
    10 s) with Ctrl-C, SIGTERM and SIGHUP ignored from here to the exit, for they could
    only turn that status into a traceback or a "cancelled" it is not."""
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)
    stop_fork_servers()
