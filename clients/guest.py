"""A synthetic guest: a separate process that writes guest RAM like a running VM.

Used by the demo, the tests and the benchmarks in place of real vCPUs.  It runs
as a job on the process backend of the engine's worker pool and follows the
guest contract (engine/shm.py, "Dirty tracking"): write the page first, then mark it dirty.

Workloads:

* ``idle``        — writes nothing.
* ``random``      — writes random pages at a target dirty rate (bytes/s),
                    optionally only inside a hot set (a fraction of the pages).
* ``incrementer`` — walks every page in order incrementing its first byte, at
                    the dirty rate (0 = as fast as it can).  After a correct
                    migration every page's first byte equals its neighbour's,
                    except at one point where the walk was paused
                    (:func:`check_incrementer`) — the oracle QEMU's tests use.

Fills (:func:`fill_ram`): ``random`` (incompressible), ``zero``, ``text``
(compressible, word-like content, ratio ~2–4 for lz4/zstd), and a
``zero_fraction`` of pages left zero.

Pause/resume go over a control socket: :meth:`SyntheticGuest.pause` returns
only once the guest has finished its current batch and stopped writing.
:meth:`SyntheticGuest.throttle` (auto-converge) scales a rate-limited
workload's dirty rate to (100 − percent) %; an unthrottled incrementer idles
after each batch so that it writes only (100 − percent) % of the time.
"""

from __future__ import annotations

import socket
import time
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from engine.errors import ConfigError, MigrationError
from engine.pool import CancelToken, WorkerPool
from engine.shm import PAGE_SIZE, GuestRAM, RamHandle
from engine.sync import wait_readable

WORKLOADS = ("idle", "random", "incrementer")
FILLS = ("random", "zero", "text")
_TICK_S = 0.005          # how often a rate-limited workload writes a batch
_FAST_BATCH = 256        # pages per batch when unthrottled
_FILL_STEP = 64 << 20    # fill in pieces to bound temporary memory


# ---------------------------------------------------------------------------
# Filling RAM before the guest runs.


def _text_corpus(rng: np.random.Generator, size: int) -> np.ndarray:
    """`size` bytes of word-like text: Zipf-distributed words from a fixed vocabulary."""
    letters = np.frombuffer(b"etaoinshrdlucmfwypvbgkjqxz", dtype=np.uint8)
    vocabulary = []
    for length in rng.integers(2, 11, size=4000):
        vocabulary.append(bytes(rng.choice(letters, size=length, p=None)) + b" ")
    ranks = np.minimum(rng.zipf(1.3, size=size // 4), len(vocabulary)) - 1
    text = b"".join(vocabulary[r] for r in ranks.tolist())
    return np.frombuffer(text[:size].ljust(size, b" "), dtype=np.uint8)


def fill_ram(ram: GuestRAM, fill: str = "random", zero_fraction: float = 0.0, seed: int = 1) -> None:
    """Fill every block: `fill` content, then zero a `zero_fraction` of the pages."""
    if fill not in FILLS:
        raise ConfigError(f"unknown fill {fill!r}; choose from {FILLS}")
    if not 0.0 <= zero_fraction <= 1.0:
        raise ConfigError("zero_fraction must be between 0 and 1")
    rng = np.random.default_rng(seed)
    bits = np.random.SFC64(seed)
    corpus = _text_corpus(rng, 1 << 20) if fill == "text" else None
    for block in ram.blocks:
        data = np.frombuffer(block.pages, dtype=np.uint8)
        for start in range(0, block.size, _FILL_STEP):
            end = min(start + _FILL_STEP, block.size)
            if fill == "random":
                data[start:end] = bits.random_raw((end - start) // 8).view(np.uint8)
            elif fill == "text":
                assert corpus is not None
                # Pieces of the corpus at random offsets, so the text never repeats exactly.
                for piece in range(start, end, 64 << 10):
                    n = min(64 << 10, end - piece)
                    at = int(rng.integers(0, corpus.size - n))
                    data[piece:piece + n] = corpus[at:at + n]
            else:
                data[start:end] = 0
        if zero_fraction > 0:
            pages = data.reshape(block.n_pages, PAGE_SIZE)
            chosen = rng.random(block.n_pages) < zero_fraction
            pages[chosen] = 0
            del pages
        del data


# ---------------------------------------------------------------------------
# The guest process.


@dataclass(frozen=True)
class GuestSpec:
    ram: RamHandle
    workload: str = "random"
    dirty_rate: float = 64 << 20        # bytes/s; 0 = unthrottled (incrementer only)
    hot_fraction: float = 1.0           # random: write only inside this fraction of pages
    seed: int = 1


@dataclass(frozen=True)
class GuestReport:
    pages_written: int
    batches: int


class _Workload:
    """Yields batches of (block, page indices) writes."""

    def __init__(self, ram: GuestRAM, spec: GuestSpec) -> None:
        self.ram = ram
        self.spec = spec
        self.rng = np.random.default_rng(spec.seed)
        self.arrays = [block.array() for block in ram.blocks]
        self.sequence = 0
        self.cursor = 0  # incrementer: next global page
        total = ram.n_pages
        self.hot: np.ndarray | None = None
        if spec.workload == "random":
            hot = max(1, int(total * spec.hot_fraction))
            self.hot = np.sort(self.rng.choice(total, size=hot, replace=False)) if hot < total else None
        if spec.workload == "incrementer":
            # Start from a uniform state so the oracle holds: every first byte = 1.
            for block, array in zip(ram.blocks, self.arrays):
                array[:, 0] = 1
                block.dirty.mark(0, block.n_pages)
        self.starts = np.cumsum([0] + [b.n_pages for b in ram.blocks])

    def write(self, n_pages: int) -> int:
        if self.spec.workload == "random":
            return self._write_random(n_pages)
        if self.spec.workload == "incrementer":
            return self._write_incrementing(n_pages)
        return 0

    def _write_random(self, n_pages: int) -> int:
        total = int(self.starts[-1])
        picks = self.rng.integers(0, total if self.hot is None else self.hot.size, size=n_pages)
        pages = np.unique(picks if self.hot is None else self.hot[picks])
        self.sequence += 1
        stamp = np.frombuffer(np.uint64(self.sequence).tobytes(), dtype=np.uint8)
        for index, block in enumerate(self.ram.blocks):
            lo, hi = self.starts[index], self.starts[index + 1]
            local = pages[(pages >= lo) & (pages < hi)] - lo
            if local.size:
                self.arrays[index][local, 8:16] = stamp      # write the pages...
                block.dirty.mark_pages(local)                 # ...then mark them dirty
        return int(pages.size)

    def _write_incrementing(self, n_pages: int) -> int:
        written = 0
        total = int(self.starts[-1])
        while written < n_pages:
            index = int(np.searchsorted(self.starts, self.cursor, side="right")) - 1
            block, array = self.ram.blocks[index], self.arrays[index]
            first = self.cursor - int(self.starts[index])
            count = min(n_pages - written, block.n_pages - first)
            array[first:first + count, 0] += 1                # write the pages...
            block.dirty.mark(first, count)                    # ...then mark them dirty
            written += count
            self.cursor = (self.cursor + count) % total
        return written

    def close(self) -> None:
        self.arrays.clear()


def run_guest(spec: GuestSpec, ctrl: socket.socket, token: CancelToken) -> GuestReport:
    """Pool job: run the workload until told to stop, or `token` (its pool's) is set.
    Control bytes: P, R, S."""
    ram = GuestRAM.attach(spec.ram)
    workload = _Workload(ram, spec)
    pages_per_s = spec.dirty_rate / PAGE_SIZE
    running = spec.workload != "idle"
    written = batches = 0
    owed = 0.0
    share = 1.0   # the share of its speed the guest runs at (throttle)
    hold = 0.0    # unthrottled workload: idle this long before the next batch
    last = time.perf_counter()
    try:
        ctrl.send(b"+")  # started: initial state written
        while True:
            throttled = pages_per_s > 0 or spec.workload == "random"
            timeout = (_TICK_S if throttled else hold) if running else None
            ready = wait_readable([ctrl.fileno(), token.fileno()], timeout)
            if token.fileno() in ready:
                break
            if ctrl.fileno() in ready:
                command = ctrl.recv(1)
                if command in (b"", b"S"):
                    break
                if command == b"T":
                    share, hold = (100 - ctrl.recv(1)[0]) / 100, 0.0
                else:
                    running = command == b"R"
                    last = time.perf_counter()
                    owed = 0.0
                ctrl.send(command.lower())  # acknowledge: nothing is written after a pause ack
                continue
            now = time.perf_counter()
            if throttled:
                owed += (now - last) * pages_per_s * share
                batch = int(owed)
                owed -= batch
            else:
                batch = _FAST_BATCH
            last = now
            if batch:
                written += workload.write(batch)
                batches += 1
                if not throttled:
                    hold = (time.perf_counter() - now) * (1 - share) / share
    finally:
        workload.close()
        ram.close()
        ctrl.close()
    return GuestReport(written, batches)


class SyntheticGuest:
    """Run a workload over `ram` in its own process; pause, resume, throttle and stop it."""

    dirty_source = None  # it marks each block's own DirtyMap: the engine's default source

    def __init__(
        self,
        ram: GuestRAM,
        workload: str = "random",
        dirty_rate: float = 64 << 20,
        hot_fraction: float = 1.0,
        seed: int = 1,
    ) -> None:
        if workload not in WORKLOADS:
            raise ConfigError(f"unknown workload {workload!r}; choose from {WORKLOADS}")
        if dirty_rate < 0 or (workload == "random" and dirty_rate == 0):
            raise ConfigError("dirty_rate must be positive (0 means unthrottled: incrementer only)")
        if not 0 < hot_fraction <= 1:
            raise ConfigError("hot_fraction must be in (0, 1]")
        self.spec = GuestSpec(ram.handle, workload, dirty_rate, hot_fraction, seed)
        self._pool: WorkerPool | None = None
        self._ctrl: socket.socket | None = None
        self._future: Future[GuestReport] | None = None
        self.paused = False

    def start(self, timeout: float = 30.0) -> None:
        """Start the guest process; returns once its workload is running."""
        self._pool = WorkerPool("process", 1, name="mfd-guest")
        main_end, guest_end = socket.socketpair()
        self._ctrl = main_end
        try:
            self._future = self._pool.submit(run_guest, self.spec, guest_end, self._pool.token)
        finally:
            guest_end.close()
        self._expect(b"+", timeout)

    def pause(self, timeout: float = 10.0) -> None:
        """Stop the vCPUs: returns once the guest has stopped writing."""
        self._command(b"P", timeout)
        self.paused = True

    def resume(self, timeout: float = 10.0) -> None:
        self._command(b"R", timeout)
        self.paused = False

    def throttle(self, percent: int, timeout: float = 10.0) -> None:
        """Run at (100 − `percent`) % of its speed from now on (0..99; 0 = full
        speed): the engine's ``throttle_guest`` for auto-converge."""
        if not isinstance(percent, int) or not 0 <= percent <= 99:
            raise ConfigError(f"a throttle is a percentage in 0..99, not {percent!r}")
        if self._ctrl is None:
            raise MigrationError("the guest is not running")
        self._ctrl.send(b"T" + bytes([percent]))
        self._expect(b"t", timeout)

    def stop(self) -> GuestReport | None:
        """End the guest process (idempotent); returns its report if it ran."""
        report = None
        if self._ctrl is not None:
            try:
                self._ctrl.send(b"S")
            except OSError:
                pass
        if self._future is not None:
            try:
                report = self._future.result(timeout=10)
            except Exception:
                report = None
            self._future = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel=True)
            self._pool = None
        if self._ctrl is not None:
            self._ctrl.close()
            self._ctrl = None
        return report

    def _command(self, command: bytes, timeout: float) -> None:
        if self._ctrl is None:
            raise MigrationError("the guest is not running")
        self._ctrl.send(command)
        self._expect(command.lower(), timeout)

    def _expect(self, reply: bytes, timeout: float) -> None:
        assert self._ctrl is not None
        ready = wait_readable([self._ctrl], timeout)
        answer = self._ctrl.recv(1) if ready else b""
        if answer != reply:
            error = self._future.exception(timeout=0) if self._future and self._future.done() else None
            raise MigrationError(f"the synthetic guest did not answer {reply!r}") from error

    def __enter__(self) -> SyntheticGuest:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def check_incrementer(ram: GuestRAM) -> str:
    """'' if the incrementer oracle holds on `ram`, else what is wrong.

    Walking all pages in order, each first byte equals the previous one except
    at most one place where it is exactly one less (mod 256): where the walk
    was interrupted.  A lost or stale page breaks this.
    """
    firsts = np.concatenate([block.array()[:, 0].copy() for block in ram.blocks])
    steps = (firsts[:-1].astype(np.int16) - firsts[1:].astype(np.int16)) % 256
    bad = np.flatnonzero((steps != 0) & (steps != 1))
    drops = np.flatnonzero(steps == 1)
    if bad.size:
        page = int(bad[0])
        return (f"page {page + 1} has first byte {int(firsts[page + 1])} after "
                f"{int(firsts[page])}: a stale or lost page ({bad.size} such places)")
    if drops.size > 1:
        return f"{drops.size} interruption points (at pages {drops[:4].tolist()}...), expected ≤ 1"
    return ""
