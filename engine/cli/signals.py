"""How SIGINT, SIGTERM and SIGHUP reach a command: they cancel it while it sets up
or runs; once its operation has ended they only cut --run-after short
(``_after_end``), for the outcome is decided.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from engine.cli.output import _Progress
from engine.errors import CancelledError, MigrationError
from engine.stats import MigrationResult

# SIGTERM or SIGHUP that came while the command set up, before its operation existed.
_signalled: list[str] = []


# Set by a signal once the command's operation has ended: its --run-after stops.
_after_end = threading.Event()
# Set when listen's --lifeline-fd ended: the SIGTERM that follows says why.
_lifeline_ended = threading.Event()


def _cancel_on_signals(operation: Any) -> None:
    """SIGTERM, and SIGHUP (the terminal went away; not under ``nohup``, which
    ignores it), cancel the operation as Ctrl-C does: it tears down, and the
    command exits 130 with one line.  The cancel runs on a thread of its own, not
    in the interrupted frame, which may hold the locks a cancel takes.  Before the
    operation exists (`operation` None: the guest, its RAM and channels being set
    up), the signal is noted, and the set-up raises CancelledError at its next step
    (:func:`_raise_if_signalled`; not from the handler, whose exception any library
    code it interrupts might swallow), at the latest as the operation is given here.
    With the operation given, Ctrl-C raises KeyboardInterrupt while it runs
    (:func:`_wait_with_progress` cancels); once it has ended, any of the three
    only sets `_after_end`: the outcome is decided."""
    if operation is not None and _signalled:
        operation.cancel(_signalled[0])  # not started: it releases what it holds
        _raise_if_signalled()

    def cancel(number: int, _frame: object) -> None:
        reason = ("the process that started it is gone (its --lifeline-fd ended)"
                  if number == signal.SIGTERM and _lifeline_ended.is_set()
                  else f"terminated ({signal.Signals(number).name})")
        if operation is None:
            _signalled.append(reason)
        elif operation.done():
            _after_end.set()
        else:
            threading.Thread(target=operation.cancel, args=(reason,), name="mfd-signal-cancel",
                             daemon=True).start()

    def interrupt(number: int, frame: Any) -> None:
        # Once the operation has ended its outcome is decided: a KeyboardInterrupt
        # in what is left (the report, --run-after, the teardown) would exit 130,
        # "cancelled", for a migration the destination may have committed and
        # runs.  The signal only cuts --run-after short (_after_end).
        if operation.done():
            _after_end.set()
        else:
            signal.default_int_handler(number, frame)

    for number in (signal.SIGTERM, signal.SIGHUP):
        if number == signal.SIGHUP and signal.getsignal(number) is signal.SIG_IGN:
            continue
        signal.signal(number, cancel)
    if operation is not None and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, interrupt)


def _raise_if_signalled() -> None:
    """CancelledError if a signal came while the command set up (_cancel_on_signals)."""
    if _signalled:
        raise CancelledError(_signalled[0])


def _wait_with_progress(migration: Any, progress: _Progress,
                        first: Callable[[], None] | None = None) -> MigrationResult:
    """Wait for a started migration (having called `first`, if given); Ctrl-C
    cancels it and still waits for the teardown.  Past the commit point a cancel
    is refused and the wait goes on to the real outcome: more Ctrl-Cs only say so
    again, for leaving then would report "cancelled" for a VM the destination
    runs.  Every later wait is bounded (the teardown's grace, the answer's stall timeout: exit 3)."""
    try:
        if first is not None:
            first()
        while True:
            try:
                result: MigrationResult = migration.wait(timeout=0.1)
            except TimeoutError:
                progress.update(migration.stats())
                continue
            except MigrationError:
                progress.close()  # it ended: a Ctrl-C from here on is ignored
                raise
            progress.close()
            return result
    except KeyboardInterrupt:
        pass
    # Every step from here is retried on a further Ctrl-C (the cancel itself may wait
    # for a COMMIT being sent), so none of them can end the command early.
    note: str | None = None
    while True:
        try:
            progress.close()  # idempotent
            if note is None:
                note = _cancel_note(migration)
                if note:
                    print(note, file=sys.stderr, flush=True)
            return migration.wait()
        except KeyboardInterrupt:
            if note:
                print(note, file=sys.stderr, flush=True)


def _cancel_note(migration: Any) -> str:
    """Cancel on Ctrl-C; what the user is told ("": it had already ended)."""
    if migration.cancel("interrupted (Ctrl-C)"):
        return "multifd: cancelling: waiting for the teardown"
    if migration.committed:
        return "multifd: cannot cancel, the migration has committed: waiting for its outcome"
    return ""
