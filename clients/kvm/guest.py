"""A KVM machine as a VMM runs it around a migration: its vCPU pool, and the checks after a move.

::

    source                                   destination (or a restore)
    KvmGuest.boot(ram, "user64").start()     KvmGuest.incoming(ram2)
      pause / resume / throttle  ──► engine    devices = [machine.device] ──► engine loads them
      dirty_source = the machine ──► engine    resume_guest = guest.start  (vCPU state loaded)
      devices = [machine.device]               after(seconds): run on, pause, check
      stop(): vCPU loop, pool, VM gone         stop()

:meth:`KvmGuest.after` is the oracle for a guest that moved: it ran on
(its loop's pages changed after the resume), its invariant holds (checked
paused), and it did not boot again (no boot character in this side's COM1).
The object has :class:`clients.guest.SyntheticGuest`'s shape (start, pause,
resume, throttle, stop), so the CLI drives either.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from clients.kvm import guests
from clients.kvm.ioctl import KvmError
from clients.kvm.machine import KvmMachine
from engine.pool import WorkerPool
from engine.shm import PAGE_SIZE, GuestRAM

__all__ = ["SAMPLES", "KvmGuest", "describe_com1", "summary_lines"]

#: Pages of the loop whose first bytes tell whether the guest ran on.
SAMPLES = 256


class KvmGuest:
    """`machine`, run on a one-thread pool of its own; stop it before the RAM closes.

    Build with :meth:`boot` (a source: a program starts) or :meth:`incoming` (a
    destination or a restore: its state comes through :attr:`devices`).
    """

    def __init__(self, machine: KvmMachine) -> None:
        self.machine = machine
        self.devices = [machine.device]
        self.dirty_source = machine            # the engine's dirty source (engine/dirty.py)
        self._pool: WorkerPool | None = WorkerPool("thread", 1, name="mfd-vcpu")
        self.paused = False
        self.resumed_at: float | None = None   # time.time() of start()
        self._at_start: np.ndarray | None = None
        self._passes_at_start = 0

    @classmethod
    def boot(cls, ram: GuestRAM, program: str = "boot", *, start: int | None = None,
             end: int | None = None, boot_image: bytes | None = None) -> KvmGuest:
        """A machine running `program` (see KvmMachine), not yet started."""
        return cls(KvmMachine(ram, program, start=start, end=end, boot_image=boot_image))

    @classmethod
    def incoming(cls, ram: GuestRAM | None = None) -> KvmGuest:
        """A machine on received RAM; :meth:`start` once its state is loaded.
        `ram` None: the RAM is handed over later (:meth:`take_ram`, local mode)."""
        return cls(KvmMachine.incoming(ram))

    def take_ram(self, ram: GuestRAM) -> None:
        """The destination's ``on_ram`` in a same-host migration: the handed-over
        pages become this incoming machine's memory slots."""
        self.machine.take_ram(ram)

    # ------------------------------------------------------------- control

    def start(self) -> None:
        """Run the vCPU (the destination's ``resume_guest``: it is downtime, so it
        only samples :data:`SAMPLES` pages of the loop).  KvmError if it runs."""
        self._at_start = self._sample()
        self._passes_at_start = self.machine.com1.count(guests.PROGRESS_CHAR)
        if self._pool is None:
            raise KvmError("this guest was stopped")
        self.machine.start(self._pool)
        self.resumed_at = time.time()

    def _sample(self) -> np.ndarray | None:
        """The first bytes of SAMPLES pages spread over the loop (a pass changes them all)."""
        loop = self.machine.loop_range
        if loop is None:
            return None
        first, last = loop[0] // PAGE_SIZE, loop[1] // PAGE_SIZE
        picks = np.linspace(first, last - 1, min(SAMPLES, last - first)).astype(np.int64) * PAGE_SIZE
        found = [self.machine.vm.locate(int(address)) for address in picks]
        return np.array([block.pages[offset] for block, offset in found], dtype=np.uint8)

    def pause(self) -> None:
        self.machine.pause()
        self.paused = True

    def resume(self) -> None:
        self.machine.resume()
        self.paused = False

    def throttle(self, percent: int) -> None:
        self.machine.throttle(percent)

    def stop(self) -> None:
        """End the guest for good (idempotent): its vCPU loop and pool, then the
        vCPU and the VM.  Before the RAM closes."""
        future = self.machine.future
        try:
            if future is not None and not future.done():
                self.machine.stop()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel=True)
                self._pool = None
            self.machine.close()

    def __enter__(self) -> KvmGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -------------------------------------------------------------- checks

    def after(self, seconds: float) -> dict[str, Any]:
        """Let the started guest run `seconds` more, pause it, and check it.

        Answers ``ran_on`` (since :meth:`start` it wrote a progress character —
        a whole pass — or its loop's pages changed: a multiple of 256 passes
        leaves every sampled byte as it was),
        ``invariant`` ('' = holds; None for a foreign boot image), ``boot_chars``
        (0 for a guest that continued), ``progress_chars``, ``com1`` and
        ``ok``.  The guest stays paused.
        """
        time.sleep(max(0.0, seconds))
        self.pause()
        machine, loop = self.machine, self.machine.loop_range
        ran_on = None
        invariant = None
        if loop is not None:
            now = self._sample()
            passed = machine.com1.count(guests.PROGRESS_CHAR) > self._passes_at_start
            ran_on = passed or (self._at_start is not None and now is not None
                                and not np.array_equal(self._at_start, now))
            invariant = machine.check_invariant()
        report = self.com1()
        report.update(ran_on=ran_on, invariant=invariant, ran_s=seconds)
        report["ok"] = bool(ran_on) and invariant == "" and report["boot_chars"] == 0
        return report

    def com1(self) -> dict[str, Any]:
        """What this side's COM1 captured: the text (its end) and character counts."""
        serial = self.machine.com1
        return {"com1": _tail(serial.text().replace("\n", "")),
                "boot_chars": serial.count(guests.BOOT_CHAR),
                "progress_chars": serial.count(guests.PROGRESS_CHAR)}


def _tail(text: str, limit: int = 48) -> str:
    return text if len(text) <= limit else f"…{text[-limit:]}"


def describe_com1(report: dict[str, Any]) -> str:
    """One summary line for a :meth:`KvmGuest.com1` (or :meth:`KvmGuest.after`) report."""
    line = (f"{report['com1']!r} ({report['boot_chars']} × {guests.BOOT_CHAR!r} boot, "
            f"{report['progress_chars']} × {guests.PROGRESS_CHAR!r} progress)")
    if "ok" in report:
        checks = [f"ran on: {'yes' if report['ran_on'] else 'NO'}",
                  "invariant: " + ("holds" if report["invariant"] == "" else
                                   "n/a" if report["invariant"] is None else report["invariant"]),
                  "booted again: " + ("no" if report["boot_chars"] == 0 else "YES")]
        line += f"; after {report['ran_s']:.1f} s: " + ", ".join(checks)
    return line


def summary_lines(extra: dict[str, Any], arrived: dict[str, Any] | None,
                  auto_converge: bool) -> dict[str, str]:
    """The CLI's lines for a moved KVM guest: each side's COM1 (`extra` is the
    source result's, with its ``guest`` report; `arrived`, the destination's
    :meth:`KvmGuest.after`), and the throttle."""
    lines = {"source COM1": describe_com1(extra["guest"])}
    if arrived is not None:
        lines["dest COM1"] = describe_com1(arrived)
    steps = ", ".join(f"{pct} % after round {r}" for r, pct in extra.get("throttle_steps", []))
    rate = extra.get("guest_dirty_pages_per_s")
    measured = f"; guest dirtying {rate / 1000:.0f} k pages/s while it runs" if rate else ""
    lines["throttle"] = (f"{extra.get('throttle_pct', 0)} % at the pause ({steps or 'never raised'}"
                         f"{measured})" if auto_converge else "off (--auto-converge)")
    return lines
