#!/usr/bin/env python3
"""A small mutation check: does the default test suite catch the bugs it exists for?

Each mutant below is one bug the project must never ship, written as exact text
replacements in the engine's source.  For each mutant the script makes a fresh
copy of the tree (``git archive HEAD``, or the working tree with
``--worktree``), applies the replacements to the *copy* (every old text must
occur exactly once there, or the script stops: the source drifted and the table
needs updating), and runs the default test suite in that copy with the
project's virtual environment::

    <venv>/bin/python -m pytest -x -q -p no:cacheprovider     (cwd: the copy)

A mutant is *killed* when the suite fails and the first failing test fails
again when run alone on the same copy (a test that then passes failed for a
reason of its own, such as load: it is deselected and the suite runs again),
*survived* when the suite passes, and *timeout* / *error* when a run hit the
per-run limit or pytest could not run the tests (collection error, internal
error).  The repository itself is
never modified.  Before the mutants, the unmutated copy must pass (the
baseline; ``--no-baseline`` skips it), so a kill is the mutant's doing.

Exit status: 0 when every mutant was killed, 1 when one survived (or timed out,
or errored), 2 when the table does not apply or the baseline fails.

    python tools/mutants.py                 # the whole table (make mutants)
    python tools/mutants.py --list
    python tools/mutants.py --only take-clears-whole-map --pytest-args tests/unit
    python tools/mutants.py --worktree      # uncommitted changes included

Standard library only.  Results and the table are recorded in docs/mutants.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTEST = ["-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
PACKAGES = ("engine", "clients", "transports")


@dataclass(frozen=True)
class Edit:
    """Replace `old` (which must occur exactly once in `file`) with `new`."""

    file: str
    old: str
    new: str


@dataclass(frozen=True)
class Mutant:
    name: str
    what: str
    edits: tuple[Edit, ...]


def mutant(name: str, what: str, *edits: tuple[str, str, str]) -> Mutant:
    return Mutant(name, what, tuple(Edit(*edit) for edit in edits))


MUTANTS: tuple[Mutant, ...] = (
    mutant(
        "sync-barrier-removed",
        "destination channels read on past SYNC(e) without waiting for RELEASE(e); "
        "the RELEASE that arrives later is ignored between packets",
        ("engine/channel.py",
         '        """Block at the sync barrier until main sends RELEASE(epoch)."""\n'
         "        while True:\n",
         '        """Block at the sync barrier until main sends RELEASE(epoch)."""\n'
         "        return  # MUTANT: no barrier, read on at once\n"
         "        while True:\n"),
        ("engine/channel.py",
         "            if message.op is not ControlOp.RETURN:\n"
         '                raise LocalProtocolError(f"recv channel got {message.op.name}")\n',
         "            if message.op not in (ControlOp.RETURN, ControlOp.RELEASE):  # MUTANT\n"
         '                raise LocalProtocolError(f"recv channel got {message.op.name}")\n'),
    ),
    mutant(
        "take-clears-whole-map",
        "DirtyMap.take() clears the whole map, not exactly the entries it saw set "
        "(a mark made between the scan and the clear is lost)",
        ("engine/shm.py",
         "        pages = np.flatnonzero(self._map.copy())\n"
         "        self._map[pages] = 0\n",
         "        pages = np.flatnonzero(self._map.copy())\n"
         "        self._map[:] = 0  # MUTANT\n"),
    ),
    mutant(
        "final-round-skipped",
        "the source's switchover does not queue the pages dirtied since the last round",
        ("engine/source.py",
         "            self.tracker.round += 1\n"
         "            client.queue_dirty()\n"
         "            client.flush()\n",
         "            self.tracker.round += 1\n"
         "            client.flush()  # MUTANT: no queue_dirty()\n"),
    ),
    mutant(
        "snapshot-restore-keeps-stale-pages",
        "restoring a snapshot into used RAM does not zero the pages the snapshot lacks",
        ("engine/snapshot.py",
         "        if not self._ram_is_zeroed:\n"
         "            self._zero_absent(present)\n",
         "        if not self._ram_is_zeroed:\n"
         "            pass  # MUTANT: self._zero_absent(present)\n"),
    ),
    mutant(
        "used-ram-taken-as-zeroed",
        "an incoming migration into RAM not known to be zero starts with an empty "
        "may-hold-data map, so ZERO runs never clear what the RAM held",
        ("engine/destination.py",
         "            else:\n"
         "                block.dirty.mark(0, block.n_pages)\n",
         "            else:\n"
         "                block.dirty.clear_all()  # MUTANT\n"),
    ),
    mutant(
        "zero-run-not-written",
        "the receiver takes a ZERO run's may-hold-data marks but does not zero those pages",
        ("clients/ram_payload.py",
         "        if stale.size:\n"
         "            block.array()[stale] = 0\n",
         "        if stale.size:\n"
         "            pass  # MUTANT: block.array()[stale] = 0\n"),
    ),
    mutant(
        "page-run-bound-off-by-one",
        "the RAM_PAGES decoder lets a page run end one page past its block",
        ("engine/wire/packet.py",
         "    if ends[-1] > limits.block_pages[block_index]:\n",
         "    if ends[-1] > limits.block_pages[block_index] + 1:  # MUTANT\n"),
    ),
    mutant(
        "device-chunk-index-unchecked",
        "the device loader accepts a chunk index it already has (or already loaded, or is loading)",
        ("clients/device_state.py",
         "            if index < max(stream.next, stream.taken) or index in stream.pending:\n",
         "            if False:  # MUTANT: the duplicate check\n"),
    ),
    mutant(
        "device-loaded-chunk-accepted",
        "half of the check above: a chunk index the device already loaded (or took out of the "
        "buffer to load) is accepted again",
        ("clients/device_state.py",
         "            if index < max(stream.next, stream.taken) or index in stream.pending:\n",
         "            if index in stream.pending:  # MUTANT: index < max(next, taken) or ...\n"),
    ),
    mutant(
        "device-pending-chunk-accepted",
        "the other half: a chunk index still waiting in the buffer is accepted again",
        ("clients/device_state.py",
         "            if index < max(stream.next, stream.taken) or index in stream.pending:\n",
         "            if index < max(stream.next, stream.taken):  # MUTANT: ... or index in pending\n"),
    ),
    mutant(
        "device-loading-chunk-accepted",
        "a chunk index the device is loading (taken out of the buffer, not yet loaded) is "
        "accepted again and parked where nothing loads it",
        ("clients/device_state.py",
         "            if index < max(stream.next, stream.taken) or index in stream.pending:\n",
         "            if index < stream.next or index in stream.pending:  # MUTANT: taken ignored\n"),
    ),
    mutant(
        "hello-reserved-unchecked",
        "decode_hello accepts nonzero reserved bytes",
        ("engine/wire/packet.py",
         "    if reserved:\n"
         '        raise HandshakeError(f"hello reserved bytes must be 0',
         "    if False:  # MUTANT\n"
         '        raise HandshakeError(f"hello reserved bytes must be 0'),
    ),
    mutant(
        "hello-flags-unchecked",
        "decode_hello accepts unknown hello flags (or both TLS and MAC)",
        ("engine/wire/packet.py",
         "    if flags not in _HELLO_FLAGS:\n"
         '        raise HandshakeError(f"hello flags 0x',
         "    if False:  # MUTANT\n"
         '        raise HandshakeError(f"hello flags 0x'),
    ),
    mutant(
        "record-tag-unchecked",
        "a MAC record whose tag does not match is accepted",
        ("engine/wire/record.py",
         "    if not hmac.compare_digest(tag.digest(), bytes(received)):",
         "    if False:  # MUTANT"),
    ),
    mutant(
        "bare-source-accepted",
        "a destination that requires MAC records accepts a source that sends none",
        ("engine/destination.py",
         "        if mode == \"mac\" and flags != packet.HelloFlags.MAC:",
         "        if False:  # MUTANT"),
    ),
    mutant(
        "tls-client-certificate-optional",
        "a TLS destination does not require the source's certificate",
        ("engine/link.py",
         "        ctx.verify_mode = ssl.CERT_REQUIRED\n",
         "        ctx.verify_mode = ssl.CERT_OPTIONAL if server_side else ssl.CERT_REQUIRED  # MUTANT\n"),
    ),
    mutant(
        "tls-source-name-unchecked",
        "a TLS destination given the source's name does not check it",
        ("engine/link.py",
         "    if not (isinstance(conn, TlsConnection) and link.server_side and link.peer_name):",
         "    if True:  # MUTANT"),
    ),
    mutant(
        "tls-destination-admits-any-source",
        "a TLS destination told no source name admits any certificate its CA signed",
        ("engine/link.py",
         "    if not tls.peer_name and not tls.any_peer:",
         "    if False:  # MUTANT"),
    ),
    mutant(
        "resume-after-unanswered-commit",
        "after COMMIT without an answer the source resumes its guest (it could run twice)",
        ("engine/saving.py",
         "        if self._committed:\n            unknown = OutcomeUnknownError(\n",
         "        if False:  # MUTANT: self._committed\n            unknown = OutcomeUnknownError(\n"),
    ),
    mutant(
        "commit-refusal-ignored",
        "the destination's ABORT after COMMIT left the source is taken for an unanswered COMMIT "
        "(the guest stays paused, outcome unknown, though the destination never took it)",
        ("engine/saving.py",
         "        if self._committed and error is self._peer_reason:\n",
         "        if False:  # MUTANT: self._committed and error is self._peer_reason\n"),
    ),
    mutant(
        "segment-registered-after-reserve",
        "a segment is registered with the resource tracker only once its pages are reserved: a "
        "process killed inside posix_fallocate (the memory cgroup's OOM killer) leaves it in /dev/shm",
        ("engine/shm.py",
         "        register(path)\n        try:\n            os.ftruncate(fd, size)\n",
         "        try:  # MUTANT: registered after the reservation\n            os.ftruncate(fd, size)\n"),
        ("engine/shm.py",
         "        if not keep_fd:\n            os.close(fd)\n            fd = -1\n",
         "        register(path)\n        if not keep_fd:\n            os.close(fd)\n            fd = -1\n"),
    ),
    mutant(
        "commit-round-trips-uncounted",
        "the expected downtime leaves out the commit's round trips: on a link with latency the source "
        "converges on an estimate the downtime then misses by 1.5 RTT",
        ("engine/stats.py",
         "        return moving / self.bandwidth + self.device_load_s + self.commit_s\n",
         "        return moving / self.bandwidth + self.device_load_s  # MUTANT: no commit_s\n"),
    ),
    mutant(
        "snapshot-replaced-unnoticed",
        "a channel or scrub job that opens the snapshot by name reads whatever file has the name now: "
        "one renamed over it is read against the first one's checksums (a good file called damaged)",
        ("engine/transport.py",
         "    if identity is not None and file.identity() != identity:\n",
         "    if False:  # MUTANT: identity is not None and file.identity() != identity\n"),
    ),
    mutant(
        "stall-wait-uncapped",
        "the destination waits a whole stall_timeout_s between looks at its channels' bytes "
        "(a stall is told up to twice the limit after the last byte)",
        ("engine/sync.py",
         "        return max(0.0, min(self.tick, self._moved_at + self.limit - now))\n",
         "        return max(0.0, self._moved_at + self.limit - now)  # MUTANT: no tick\n"),
    ),
    mutant(
        "cancel-ignores-commit",
        "cancel() after the commit point is not refused",
        ("engine/operation.py",
         "            if self._committed or self._past_return or self.state.finished:\n",
         "            if self._past_return or self.state.finished:  # MUTANT: self._committed or\n"),
    ),
    mutant(
        "scrub-chunk-word-unchecked",
        "the scrub never reports a chunk whose word does not match over intact pages",
        ("engine/scrub.py",
         "            elif word:\n                bad_chunks.append(",
         "            elif False:  # MUTANT: word\n                bad_chunks.append("),
    ),
    mutant(
        "save-slots-split-chunks",
        "a save's slots may end inside a chunk (a dense chunk hashed twice, or left without a word)",
        ("engine/snapshot.py",
         "        return _chunk_piece_pages(self._packet_pages())  # packet_pages, or a cap's\n",
         "        return 1  # MUTANT: whole chunks per slot\n"),
    ),
    mutant(
        "scrub-drops-last-job",
        "the parallel scrub's plan leaves out the last, partly filled job",
        ("engine/scrub.py",
         "    if chunks:\n        jobs.append(",
         "    if False:  # MUTANT: chunks\n        jobs.append("),
    ),
    mutant(
        "snapshot-chunk-rehash-skipped",
        "a live save's later rounds keep a chunk's first checksum instead of hashing it again",
        ("engine/pages.py",
         "        for region in regions:\n"
         "            words[region] = hash_fn(self.view(block, region))\n",
         "        for region in regions:\n"
         "            if words.dtype.itemsize == 8 and words[region] != 0:  # MUTANT: a chunk hashed once\n"
         "                continue\n"
         "            words[region] = hash_fn(self.view(block, region))\n"),
    ),
    mutant(
        "snapshot-chunk-word-kept",
        "a slot that touches few pages of a chunk leaves its old checksum instead of clearing it",
        ("clients/ram_payload.py",
         "        words[touched[n_touched < CHUNK_HASH_MIN_PAGES]] = 0\n",
         "        pass  # MUTANT: words[touched[n_touched < CHUNK_HASH_MIN_PAGES]] = 0\n"),
    ),
    mutant(
        "restore-chunk-check-passes",
        "a restore channel takes any chunk it checks by its chunk checksum as intact",
        ("clients/ram_payload.py",
         "        if chunks.hash_fn(chunks.view(block, chunk)) == word:\n",
         "        if True:  # MUTANT: the chunk's hash is not compared\n"),
    ),
    mutant(
        "restore-slots-split-chunks",
        "a restore's slots may end inside a chunk (so its chunk checksum goes unused)",
        ("engine/snapshot.py",
         "                                            "
         "piece_pages=_chunk_piece_pages(self.config.packet_pages))\n",
         "                                            piece_pages=1)  # MUTANT: whole chunks per slot\n"),
    ),
    mutant(
        "tracked-digest-hashed-once",
        "tracked verification hashes a piece the first time it moves and never again "
        "(both sides: their digests still agree, on memory that has changed since)",
        ("engine/pages.py",
         "        for region in regions:\n"
         "            words[region] = hash_fn(self.view(block, region))\n",
         "        for region in regions:\n"
         "            if words.dtype.itemsize == 16 and words[region]:  # MUTANT: a piece hashed once\n"
         "                continue\n"
         "            words[region] = hash_fn(self.view(block, region))\n"),
    ),
    mutant(
        "tracked-zero-pieces-hashed-early",
        "the receiver hashes pieces with ZERO runs before it has zeroed their stale pages",
        ("clients/ram_payload.py",
         "                part_normal, part_total = _place_marks(block, *segments)\n"
         "                normal, total = normal + part_normal, total + part_total\n"
         "                digests.store(block, pieces)\n",
         "                digests.store(block, pieces)  # MUTANT: before the ZERO runs land\n"
         "                part_normal, part_total = _place_marks(block, *segments)\n"
         "                normal, total = normal + part_normal, total + part_total\n"),
    ),
    mutant(
        "tracked-piece-dropped",
        "a compressed packet's sender and receiver leave its first piece unhashed (both digest "
        "maps still zero there, equal)",
        ("clients/ram_payload.py",
         "    digests.store(block, digests.regions_touched(firsts, counts).tolist())\n",
         "    digests.store(block, digests.regions_touched(firsts, counts).tolist()[1:])  # MUTANT\n"),
    ),
    mutant(
        "snapshot-zero-chunk-word-wrong",
        "a chunk a slot found all zero gets a word that is not the hash of its zeros",
        ("clients/ram_payload.py",
         "            words[chunk] = self.zero_words[n]\n",
         "            words[chunk] = self.zero_words[n] ^ 1  # MUTANT\n"),
    ),
    mutant(
        "piece-split-across-packets",
        "the RAM client cuts scattered pages into packets without regard to pieces, so two "
        "channels may hash one piece in one round",
        ("clients/ram.py",
         "            if piece > 1 and done + take < pages.size:\n",
         "            if False:  # MUTANT: piece > 1 and done + take < pages.size\n"),
    ),
)


# ── the copy ──────────────────────────────────────────────────────────────────


def snapshot_tree(dest: Path, worktree: bool) -> None:
    """The tree to mutate, in `dest`: HEAD, or the working tree's tracked and
    untracked-but-not-ignored files."""
    dest.mkdir(parents=True)
    if not worktree:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True, capture_output=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():  # a deleted tracked file is still listed
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def apply(tree: Path, edits: tuple[Edit, ...]) -> None:
    for edit in edits:
        path = tree / edit.file
        text = path.read_text()
        path.write_text(text.replace(edit.old, edit.new, 1))


def check_table(tree: Path, mutants: tuple[Mutant, ...]) -> list[str]:
    """Problems: an old text that does not occur exactly once (after the
    mutant's earlier edits, as they will be applied)."""
    problems = []
    for m in mutants:
        texts: dict[str, str] = {}
        for edit in m.edits:
            path = tree / edit.file
            if edit.file not in texts:
                if not path.is_file():
                    problems.append(f"{m.name}: {edit.file} does not exist")
                    break
                texts[edit.file] = path.read_text()
            found = texts[edit.file].count(edit.old)
            if found != 1:
                first = edit.old.strip().splitlines()[0]
                problems.append(f"{m.name}: {edit.file}: {first!r} occurs {found} times, not once")
                break
            texts[edit.file] = texts[edit.file].replace(edit.old, edit.new, 1)
    return problems


# ── running the suite ─────────────────────────────────────────────────────────


def suite_env(tree: Path) -> dict[str, str]:
    """The environment of every run: the copy first on the path (also for the
    subprocesses the tests start elsewhere), the default suite (no heavy variants)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MULTIFD_HEAVY", "PYTHONPATH")}
    env["PYTHONPATH"] = str(tree)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def check_imports(python: Path, tree: Path) -> None:
    """The copy's packages are the ones imported: from its root (as pytest runs)
    and from elsewhere (as a test's subprocess may run)."""
    probe = f"import {', '.join(PACKAGES)}; print({', '.join(p + '.__file__' for p in PACKAGES)})"
    for cwd in (tree, Path("/")):
        out = subprocess.run([str(python), "-c", probe], cwd=cwd, env=suite_env(tree),
                             check=True, capture_output=True, text=True).stdout.split()
        wrong = [f for f in out if not Path(f).resolve().is_relative_to(tree.resolve())]
        if wrong or len(out) != len(PACKAGES):
            raise SystemExit(f"mutants: from {cwd} the venv imports {out}, not the copy in {tree}")


@dataclass
class Outcome:
    status: str      # killed, survived, timeout, error
    seconds: float
    detail: str      # the first failing test, or why there is none
    output: str


_FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.MULTILINE)


def run_suite(python: Path, tree: Path, extra: list[str], timeout: float) -> Outcome:
    command = [str(python), *PYTEST, *extra]
    start = time.monotonic()
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, cwd=tree, env=suite_env(tree), stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        try:
            rc: int | None = process.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            # The run's process group: pytest and anything it left behind.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
        seconds = time.monotonic() - start
        log.seek(0)
        output = log.read()
    failed = _FAILED.search(output)
    if rc is None:
        return Outcome("timeout", seconds, f"no result in {timeout:.0f} s", output)
    if rc == 0:
        return Outcome("survived", seconds, "the suite passed", output)
    if rc == 1 and failed:
        return Outcome("killed", seconds, failed.group(1), output)
    tail = output.strip().splitlines()[-1:] or ["no output"]
    return Outcome("error", seconds, f"pytest exit {rc}: {tail[0]}", output)


def judge(python: Path, tree: Path, extra: list[str], timeout: float, tries: int = 3) -> Outcome:
    """Run the suite on a mutated copy.  A kill counts once the failing test
    fails again when run alone; a test that then passes (it failed for a reason
    of its own: load, timing) is deselected and the suite runs again, at most
    `tries` times."""
    unconfirmed: list[str] = []
    seconds = 0.0
    while True:
        outcome = run_suite(python, tree, [*extra, *(f"--deselect={t}" for t in unconfirmed)], timeout)
        seconds += outcome.seconds
        if outcome.status != "killed":
            break
        again = run_suite(python, tree, [outcome.detail], timeout)
        seconds += again.seconds
        if again.status == "killed":
            break
        unconfirmed.append(outcome.detail)
        if len(unconfirmed) == tries:
            outcome = Outcome("error", seconds, f"{tries} tests failed once, then passed alone",
                              outcome.output)
            break
    outcome.seconds = seconds
    if unconfirmed:
        outcome.detail += f"  (failed once, passed alone: {', '.join(unconfirmed)})"
    return outcome


# ── main ──────────────────────────────────────────────────────────────────────


def default_venv() -> Path:
    """The venv this script runs in (make mutants uses $(BIN)/python), else ROOT/.venv."""
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix)
    return ROOT / ".venv"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="run only this mutant (repeatable)")
    parser.add_argument("--pytest-args", default="", metavar="ARGS",
                        help="more pytest arguments, e.g. a test path to narrow a quick run")
    parser.add_argument("--venv", type=Path, default=default_venv(),
                        help="virtual environment to test with (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds per suite run (default: %(default)s)")
    parser.add_argument("--worktree", action="store_true",
                        help="mutate a copy of the working tree (uncommitted files too), not HEAD")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the run of the unmutated copy")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print the end of the suite's output for every mutant")
    args = parser.parse_args(argv)

    if args.list:
        for m in MUTANTS:
            files = sorted({e.file for e in m.edits})
            print(f"{m.name:36} {', '.join(files)}\n{'':36} {m.what}")
        return 0
    selected = MUTANTS
    if args.only:
        known = {m.name for m in MUTANTS}
        unknown = [name for name in args.only if name not in known]
        if unknown:
            parser.error(f"unknown mutant {', '.join(unknown)} (see --list)")
        selected = tuple(m for m in MUTANTS if m.name in args.only)
    python = args.venv / "bin" / "python"
    if not python.exists():
        parser.error(f"no {python}: run `make test` once, or pass --venv")
    extra = shlex.split(args.pytest_args)

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="multifd-mutants-") as scratch:
        base = Path(scratch) / "base"
        snapshot_tree(base, args.worktree)
        problems = check_table(base, selected)
        if problems:
            print("mutants: the table no longer matches the source:", *problems, sep="\n  ")
            return 2
        check_imports(python, base)
        source = "working tree" if args.worktree else "HEAD"
        print(f"mutants: {len(selected)} on a copy of {source}, "
              f"pytest {' '.join(PYTEST[2:] + extra)}", flush=True)
        if not args.no_baseline:
            outcome = run_suite(python, base, extra, args.timeout)
            status = "passed" if outcome.status == "survived" else outcome.status
            print(f"{'(baseline, unmutated)':36} {status:9} {outcome.seconds:6.0f} s", flush=True)
            if outcome.status != "survived":
                print(outcome.output[-4000:])
                print("mutants: the unmutated copy does not pass; no mutant can be judged")
                return 2
        results: list[tuple[Mutant, Outcome]] = []
        for m in selected:
            tree = Path(scratch) / m.name
            shutil.copytree(base, tree)
            apply(tree, m.edits)
            outcome = judge(python, tree, extra, args.timeout)
            shutil.rmtree(tree, ignore_errors=True)
            results.append((m, outcome))
            print(f"{m.name:36} {outcome.status:9} {outcome.seconds:6.0f} s  {outcome.detail}",
                  flush=True)
            if args.verbose:
                print(outcome.output[-4000:], flush=True)

    killed = sum(outcome.status == "killed" for _, outcome in results)
    total = len(results)
    minutes = (time.monotonic() - started) / 60
    print(f"score: {killed}/{total} killed ({100 * killed / total:.0f} %), "
          f"{minutes:.1f} min in all")
    not_killed = [m.name for m, outcome in results if outcome.status != "killed"]
    if not_killed:
        print(f"not killed: {', '.join(not_killed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
