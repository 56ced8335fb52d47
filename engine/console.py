"""The ``multifd`` console script: :func:`engine.cli.main`, but a Ctrl-C, SIGTERM or
SIGHUP that comes while the command's modules load (~0.4 s here) ends it with
the one line, and the exit status 130, of any other cancel, not a traceback.

Nothing exists yet to tear down then (no RAM, no process but this one), so the
handler writes its line and exits at once; :func:`engine.cli.main` puts its own
handlers in place before it starts anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys


def _cancelled(number: int, _frame: object) -> None:
    why = "interrupted" if number == signal.SIGINT else f"terminated ({signal.Signals(number).name})"
    said = [(2, f"multifd: cancelled: {why}\n")]
    if "--json" in sys.argv[1:]:
        said.insert(0, (1, json.dumps({"status": "cancelled", "error": why}) + "\n"))
    for fd, text in said:
        with contextlib.suppress(OSError):  # its reader gone (a pipeline's Ctrl-C): the rest still goes
            os.write(fd, text.encode())
    os._exit(130)


def main() -> int:
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(number) is not signal.SIG_IGN:  # nohup, or a background job: left so
            signal.signal(number, _cancelled)
    from engine.cli import main as run_command

    return run_command()


if __name__ == "__main__":
    sys.exit(main())
