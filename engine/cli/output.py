"""What a command prints: the summary (or one JSON object), the live progress line,
the one-line errors, and the log's set-up, which goes quiet once the command's
operation (:func:`_watch`) has failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, TypeGuard

from engine.errors import OutcomeUnknownError
from engine.operation import Operation
from engine.stats import MigrationResult
from engine.sync import MigrationState
from engine.units import size_text

LINE_LIMIT = 300  # characters of an error or log line at the default level


# The operation this command runs, once built: its latch says whether it failed.
_operation: Operation | None = None


def _print_summary(result: MigrationResult, extra: dict[str, Any] | None = None) -> None:
    verified = {True: "yes", False: "NO", None: "not checked"}[result.verified]
    to_file, from_file = result.role == "save", result.role == "restore"
    moved = "written" if to_file else "read" if from_file else "sent"
    lines = [
        f"status           {result.status} ({result.role})",
        f"guest RAM        {size_text(result.ram_bytes)} over {result.channels} channel(s)",
        f"total time       {result.total_time_s:.3f} s (setup {result.setup_time_ms:.1f} ms)",
    ]
    if not from_file:
        forced = result.extra.get("switchover_forced")
        lines += [f"{'guest paused' if to_file else 'downtime':<16} {result.downtime_ms:.1f} ms"
                  + (f" (the {forced['downtime_limit_ms']:.0f} ms limit was out of reach after "
                     f"{forced['after_rounds']} rounds: switched over as --on-max-rounds says)"
                     if forced else ""),
                  f"rounds           {result.rounds}"]
    lines += [
        f"{'pages ' + moved:<16} {result.pages_sent}"
        + f" (+{result.zero_pages} zero pages, "
        + ("not written)" if to_file else "not stored)" if from_file else "no payload)"),
        f"{'bytes ' + moved if to_file or from_file else 'bytes on wire':<16} "
        f"{size_text(result.bytes_on_wire)} for {size_text(result.guest_bytes)} of guest memory",
    ]
    if result.extra.get("local"):
        lines.append("local mode       the guest's RAM was handed over on this host: no page copied")
    if not (to_file or from_file):
        lines.append(f"compression      {result.compression}"
                     + (f", {size_text(result.payload_bytes)} of payload, "
                        f"ratio {result.compression_ratio:.2f}"
                        if result.compression != "none" else ""))
    lines.append(f"throughput       {size_text(result.guest_throughput_bytes_per_s)}/s of guest memory"
                 + (f", {size_text(result.throughput_bytes_per_s)}/s on the wire"
                    if not (to_file or from_file) else ""))
    if not (to_file or from_file):
        lines.append(f"memory verified  {verified}"
                     + ((f" ({result.verify_time_ms:.1f} ms of the downtime: the last round's pieces "
                         f"hashed and the digests compared; the rest hashed as it moved)"
                         if result.extra.get("verification") == "tracked" else
                         f" ({result.verify_time_ms:.1f} ms of the downtime: the guest stays paused "
                         f"while both sides hash)") if result.verified else ""))
    for device in result.extra.get("devices", []):
        checked = {True: "verified", False: "DIFFERS", None: ""}[device["verified"]]
        line = (f"device {device['idstr']}/{device['instance_id']:<6} {size_text(device['bytes'])} in "
                f"{device['chunks']} chunks"
                + (f", {size_text(device['live_bytes'])} of them in precopy"
                   if device.get("live_bytes") else ""))
        # Each side knows its own part: the source what it saved, the destination what it loaded.
        if device["save_ms"] is not None:
            line += f", saved in {device['save_ms']:.0f} ms"
        if device["load_ms"] is not None:
            line += f", loaded in {device['load_ms']:.0f} ms {checked}".rstrip()
        lines.append(line)
    for key, value in (extra or {}).items():
        lines.append(f"{key:<16} {value}")
    print("\n".join(lines))


class _Progress:
    """A one-line live view on a terminal (nothing when not a tty or with --json)."""

    @classmethod
    def for_command(cls, args: argparse.Namespace) -> _Progress:
        """Shown on a terminal, unless the command prints --json."""
        return cls(sys.stdout.isatty() and not args.json)

    def __init__(self, enabled: bool) -> None:
        self._live = None
        if enabled:
            from rich.live import Live

            self._live = Live(refresh_per_second=10, transient=True)
            self._live.start()

    def update(self, stats: Any) -> None:
        if self._live is None or stats is None:
            return
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        # Round 1 fills the bar; later rounds only resend what the guest dirtied.
        done = min(stats.guest_bytes_sent, stats.ram_bytes) if stats.round <= 1 else stats.ram_bytes
        line = Table.grid(padding=(0, 1))
        line.add_row(
            f"[bold]{stats.state:<10}[/]",
            ProgressBar(total=max(stats.ram_bytes, 1), completed=done, width=16),
            f"round {stats.round} · {size_text(stats.bytes_on_wire)} · "
            f"{size_text(stats.throughput_bytes_per_s)}/s · left {size_text(stats.remaining_bytes)} · "
            f"~{stats.expected_downtime_ms:.0f} ms",
        )
        self._live.update(line)

    def close(self) -> None:  # idempotent
        live, self._live = self._live, None
        if live is not None:
            live.stop()


def _emit(args: argparse.Namespace, result: MigrationResult, extra: dict[str, Any] | None = None) -> None:
    if args.json:
        data = result.to_dict()
        data.update(extra or {})
        print(json.dumps(data, indent=None, default=str))
    else:
        _print_summary(result, extra)


def _watch(operation: Operation) -> Any:
    """Note the operation this command runs (its failure silences the log)."""
    global _operation
    _operation = operation
    return operation


def _one_line(text: str, verbose: bool = False, limit: int = LINE_LIMIT) -> str:
    """`text` on one line, cut to `limit` characters unless `verbose`: an error
    may quote the peer's data (a CONFIG's blocks) at any length, and its control
    characters (a terminal's escape sequences) are shown escaped, never sent on."""
    text = " ".join(line.strip() for line in text.splitlines())
    if not text.isprintable():
        text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    if verbose or len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit} more characters)"


class _LogFilter(logging.Filter):
    """Default level: once the operation failed, its log records (pool workers
    terminated, teardown steps that could not run) are consequences of the one
    error line; they are counted, not printed (--verbose prints them)."""

    hidden = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if _operation is not None and _operation.latch.failed:
            _LogFilter.hidden += 1
            return False
        return True


class _OneLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:  # no traceback at the default level
        return f"multifd: {_one_line(record.getMessage())}"


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler()
    if verbose:
        handler.setFormatter(logging.Formatter("multifd: %(message)s"))
    else:
        _LogFilter.hidden = 0
        handler.addFilter(_LogFilter())
        handler.setFormatter(_OneLineFormatter())
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, handlers=[handler],
                        force=True)


def _outcome_unknown(error: OutcomeUnknownError, verbose: bool) -> str:
    """The one line for a source that sent COMMIT and heard nothing back."""
    from engine.shm import SHM_DIR

    migration_id = getattr(_operation, "migration_id", None)
    cause = _one_line(str(error.__cause__ or error), verbose, limit=120)
    line = (f"the destination never answered COMMIT ({cause}); the guest stays paused; the "
            f"destination's `listen` output says whether migration {migration_id} committed")
    ram = getattr(_operation, "ram", None)
    if getattr(getattr(_operation, "config", None), "local", False) and ram is not None:
        # Handed over at COMMIT, the RAM is the destination's if it committed; nobody's if not.
        paths = ", ".join(os.path.join(SHM_DIR, block.segment.name) for block in ram.blocks)
        line += (f"; its RAM went with COMMIT: {paths}, if still there, is the destination's if it "
                 f"committed (gone if it then died), nobody's if not: remove it then")
    return line


def _names_migration(operation: Operation | None, error: object) -> TypeGuard[Operation]:
    """Whether a failure's report names the migration: a source whose COMMIT went
    unanswered, and a destination a source reached (its id is the source's)."""
    return operation is not None and (isinstance(error, OutcomeUnknownError)
                                      or getattr(operation, "source_known", False))


def _fail(args: argparse.Namespace, status: MigrationState, error: object) -> None:
    """Report a failure: the full error in --json output (``status`` is the state's
    value, "outcome_unknown" say), one line on stderr ("multifd: outcome unknown: ...");
    an unanswered COMMIT in the CLI's words (:func:`_outcome_unknown`), not the API's."""
    verbose = getattr(args, "verbose", False)
    if getattr(args, "json", False):
        data: dict[str, Any] = {"status": status.value, "error": _outcome_unknown(error, True)
                                if isinstance(error, OutcomeUnknownError) else str(error)}
        if _operation is not None and args.command == "listen":
            data["committed"] = _operation.committed
        if _names_migration(_operation, error):
            data["migration_id"] = str(_operation.migration_id)
        try:
            print(json.dumps(data), flush=True)
        except BrokenPipeError:  # whoever read stdout went away (a killed demo): the line below stays
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    line = (_outcome_unknown(error, verbose) if isinstance(error, OutcomeUnknownError)
            else _one_line(str(error), verbose))
    if args.command == "listen" and _names_migration(_operation, error):
        # the line a source's "outcome unknown" points its user to
        line += (f" (migration {_operation.migration_id}: committed "
                 f"{'yes' if _operation.committed else 'no'})")
    if _LogFilter.hidden and not verbose:
        line += f" ({_LogFilter.hidden} more log line(s): --verbose shows them)"
    print(f"multifd: {status.value.replace('_', ' ')}: {line}", file=sys.stderr)
