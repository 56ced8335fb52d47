"""A KVM vCPU: its run loop, pause/resume from any thread, and its state.

Threads::

    pool thread (the VMM's WorkerPool("thread", 1))      any other thread
    run(): loop                                          pause(): want_pause, immediate_exit = 1,
      ├─ parked?  wait on the condition  ◄────────────── pthread_kill(SIGUSR1), wait "parked"
      ├─ throttled? after each slice of   ◄───────────── throttle(p): notify
      │    guest time t, wait t·p/(100-p)
      ├─ KVM_RUN (GIL released) ── EINTR ──► loop        resume(): immediate_exit = 0, notify
      └─ exit: I/O → PortBus, HLT → return "halted",     stop(): want_stop, kick, (caller joins
               SHUTDOWN/FAIL_ENTRY/INTERNAL_ERROR/             the job's future)
               MMIO/other → GuestStoppedError

``immediate_exit`` makes a kick that lands before ``KVM_RUN`` starts still
count; the signal gets a vCPU out of a guest that never exits by itself.

Throttling (auto-converge) is QEMU's: a throttled vCPU runs a slice
(:data:`THROTTLE_SLICE_S`) of guest time, then is held out of ``KVM_RUN`` for
``slice × p / (100 − p)``, so it runs (100 − p) % of the time.  While
throttled, a per-thread timer (clients/kvm/timer.py) kicks the vCPU thread
every slice, so a guest that never exits is held too.  A pause or a new
throttle ends a hold at once.
Before the loop parks or ends it re-enters ``KVM_RUN`` once with
``immediate_exit = 1``: KVM then completes the last I/O exit (an IN's value
lands in RAX, an OUT's RIP moves past the instruction) without running guest
code, so the state read afterwards is between two instructions.

State (:meth:`Vcpu.save_state` / :meth:`Vcpu.load_state`) is a dict of
records, tag -> the kernel's struct bytes (see ``clients/kvm/state.py``),
loaded in kvm.md's order.  Both need the vCPU out of ``KVM_RUN`` (paused, or
its loop not running); they raise KvmError otherwise.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import struct
import threading
import time
from types import FrameType

from clients.kvm import ioctl as kvm
from clients.kvm.devices import PortBus
from clients.kvm.ioctl import GuestStoppedError, KvmError, ioctl
from clients.kvm.state import encode_msrs, msr_entries
from clients.kvm.timer import ThreadTimer
from clients.kvm.vm import Vm
from engine.errors import CancelledError, ConfigError, DeviceStateError
from engine.pool import CancelToken

__all__ = ["KICK_SIGNAL", "THROTTLE_SLICE_S", "Vcpu", "install_kick_handler"]

KICK_SIGNAL = signal.SIGUSR1
_U32 = struct.Struct("<I")
_PARK_POLL_S = 0.05     # how often a parked loop looks at the pool's cancel token
THROTTLE_SLICE_S = 0.01  # guest time between two throttle holds (QEMU's 10 ms)


def _on_kick(signum: int, frame: FrameType | None) -> None:
    """Does nothing: the signal's only job is to make KVM_RUN return EINTR."""


def install_kick_handler() -> None:
    """Install the no-op SIGUSR1 handler (once per process; main thread only).

    Without a handler the kick would kill the process; an ignored signal would
    not interrupt KVM_RUN.  ConfigError when called first from another thread
    or when SIGUSR1 already has someone else's handler.
    """
    current = signal.getsignal(KICK_SIGNAL)
    if current is _on_kick:
        return
    if current not in (signal.SIG_DFL, signal.SIG_IGN, None):
        raise ConfigError(f"SIGUSR1 already has a handler ({current!r}); the KVM vCPU kick needs it")
    if threading.current_thread() is not threading.main_thread():
        raise ConfigError("create the first vCPU in the main thread: only it can install "
                          "the SIGUSR1 handler that kicks vCPUs out of KVM_RUN")
    signal.signal(KICK_SIGNAL, _on_kick)


class Vcpu:
    """vCPU `index` of `vm`; port I/O goes to `bus`.

    Sets the guest CPUID to everything KVM supports (upstream KVM refuses
    EFER.LME without the LM bit; kvm_pvm here does not check).  Raises
    KvmError, ConfigError (see :func:`install_kick_handler`).
    """

    def __init__(self, vm: Vm, index: int, bus: PortBus) -> None:
        install_kick_handler()
        self.vm = vm
        self.index = index
        self.bus = bus
        self._cond = threading.Condition()
        self._thread: int | None = None   # ident of the thread inside run()
        self._parked = False
        self._want_pause = self._want_stop = False
        self._exit_pending = False        # last KVM_RUN returned an exit: complete it first
        self._throttle = 0                # percent of the time held out of KVM_RUN
        self.exits = 0
        # The throttle's own accounting (its mechanism, not a wall-clock share):
        # each hold is counted, and lasts at least run_s's share since the last one.
        self.holds = 0                    # throttle holds begun, in all
        self.held_s = 0.0                 # time spent held by the throttle, in all
        self.run_s = 0.0                  # time spent inside KVM_RUN, in all
        self.fd, self._run = vm.create_vcpu_fd(index)
        try:
            self._set_cpuid()
            self._msr_indices = self._msr_index_list()
            xsave2 = vm.check_extension(kvm.KVM_CAP_XSAVE2)
            self._xsave_size = max(ctypes.sizeof(kvm.kvm_xsave), xsave2) \
                if vm.check_extension(kvm.KVM_CAP_XSAVE) else 0
            self._has_xcrs = bool(vm.check_extension(kvm.KVM_CAP_XCRS))
        except BaseException:
            self.close()
            raise
        #: MSRs the last load_state() could not set, and why that was harmless.
        self.skipped_msrs: list[tuple[int, str]] = []

    # --------------------------------------------------------------- set-up

    def _set_cpuid(self) -> None:
        count = 128
        while True:
            buf = kvm.cpuid_buffer(count)
            kvm.kvm_cpuid2.from_buffer(buf).nent = count
            try:
                ioctl(self.vm.kvm_fd, kvm.KVM_GET_SUPPORTED_CPUID, buf)
                break
            except KvmError as exc:
                if exc.errno != errno.E2BIG or count >= 4096:  # the table is bigger
                    raise
                count *= 2
        ioctl(self.fd, kvm.KVM_SET_CPUID2, buf)

    def _msr_index_list(self) -> list[int]:
        header = kvm.kvm_msr_list(nmsrs=0)
        try:
            ioctl(self.vm.kvm_fd, kvm.KVM_GET_MSR_INDEX_LIST, header)
        except KvmError as exc:
            if exc.errno != errno.E2BIG:  # nmsrs now holds the count
                raise
        buf = (ctypes.c_uint32 * (1 + header.nmsrs))(header.nmsrs)
        ioctl(self.vm.kvm_fd, kvm.KVM_GET_MSR_INDEX_LIST, buf)
        return list(buf[1:1 + buf[0]])

    # ------------------------------------------------------------ registers

    def get_regs(self) -> kvm.kvm_regs:
        regs = kvm.kvm_regs()
        ioctl(self.fd, kvm.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: kvm.kvm_regs) -> None:
        ioctl(self.fd, kvm.KVM_SET_REGS, regs)

    def get_sregs(self) -> kvm.kvm_sregs:
        sregs = kvm.kvm_sregs()
        ioctl(self.fd, kvm.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: kvm.kvm_sregs) -> None:
        ioctl(self.fd, kvm.KVM_SET_SREGS, sregs)

    # -------------------------------------------------------------- run loop

    def run(self, token: CancelToken) -> str:
        """The run loop (a pool job; `token`: the pool's): answers "stopped" after
        :meth:`stop`, "halted" when the guest executes HLT.  Raises UnknownPortError,
        GuestStoppedError, KvmError, or CancelledError once `token` is set while parked."""
        with self._cond:
            if self._thread is not None or self.fd < 0:
                raise KvmError(f"vCPU {self.index} is running already, or closed")
            self._thread = threading.get_ident()
        timer: ThreadTimer | None = None  # armed while throttled
        ran = 0.0                         # guest time since the last throttle hold
        try:
            while True:
                with self._cond:
                    while self._want_pause and not self._want_stop:
                        self._complete_pending_locked()
                        self._parked = True
                        self._cond.notify_all()
                        self._cond.wait(_PARK_POLL_S)
                        if token.is_set():
                            raise CancelledError(f"vCPU {self.index}: the pool was cancelled")
                    self._parked = False
                    if self._want_stop:
                        self._complete_pending_locked()
                        return "stopped"
                    percent = self._throttle
                    if not percent:
                        ran = 0.0
                    elif ran >= THROTTLE_SLICE_S:
                        self._hold_locked(ran * percent / (100 - percent), percent, token)
                        ran = 0.0
                        continue
                if bool(percent) != (timer is not None):
                    if timer is not None:
                        timer.close()
                    timer = ThreadTimer(threading.get_native_id(), KICK_SIGNAL, THROTTLE_SLICE_S) \
                        if percent else None
                began = time.perf_counter()
                result = ioctl(self.fd, kvm.KVM_RUN, 0, eintr_ok=True)
                slice_s = time.perf_counter() - began
                ran += slice_s
                self.run_s += slice_s
                if result < 0:
                    continue  # kicked, or immediate_exit: look at the flags
                self._exit_pending = True
                self.exits += 1
                if self._handle_exit():
                    with self._cond:
                        self._complete_pending_locked()
                    return "halted"
        finally:
            if timer is not None:
                timer.close()
            with self._cond:
                self._thread = None
                self._parked = False
                self._cond.notify_all()

    def _hold_locked(self, seconds: float, percent: int, token: CancelToken) -> None:
        """Stay out of KVM_RUN for `seconds`, or until a pause, a stop or another
        throttle; `token` (the pool's) set raises CancelledError."""
        began = time.monotonic()
        deadline = began + seconds
        self.holds += 1
        try:
            while self._throttle == percent and not (self._want_pause or self._want_stop):
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(min(left, _PARK_POLL_S))
                if token.is_set():
                    raise CancelledError(f"vCPU {self.index}: the pool was cancelled")
        finally:
            self.held_s += time.monotonic() - began

    def _complete_pending_locked(self) -> None:
        if not self._exit_pending:
            return
        self._run[kvm.RUN_IMMEDIATE_EXIT] = 1
        result = ioctl(self.fd, kvm.KVM_RUN, 0, eintr_ok=True)
        self._exit_pending = False
        if result >= 0:  # pragma: no cover - KVM ran guest code despite immediate_exit
            raise KvmError(f"vCPU {self.index}: KVM_RUN with immediate_exit did not return EINTR")
        if not (self._want_pause or self._want_stop):
            self._run[kvm.RUN_IMMEDIATE_EXIT] = 0

    def _handle_exit(self) -> bool:
        """Serve one exit; True when the guest halted.  Raises for fatal exits."""
        run = self._run
        reason = _U32.unpack_from(run, kvm.RUN_EXIT_REASON)[0]
        if reason == kvm.KVM_EXIT_IO:
            direction, size, port, count, offset = kvm.RUN_IO.unpack_from(run, kvm.RUN_EXIT)
            # Bytes and ints only: a view of the mmap kept alive by an error's
            # traceback would stop close() from unmapping it.
            for start in range(offset, offset + count * size, size):
                if direction == kvm.KVM_EXIT_IO_OUT:
                    self.bus.write(port, size, int.from_bytes(run[start:start + size], "little"))
                else:
                    run[start:start + size] = self.bus.read(port, size).to_bytes(size, "little")
            return False
        if reason == kvm.KVM_EXIT_INTR:
            return False
        if reason == kvm.KVM_EXIT_HLT:
            return True
        raise GuestStoppedError(self._describe_exit(reason))

    def _describe_exit(self, reason: int) -> str:
        run, name = self._run, kvm.EXIT_NAMES.get(reason, f"exit {reason}")
        detail = ""
        if reason == kvm.KVM_EXIT_MMIO:
            address, _, length, is_write = kvm.RUN_MMIO.unpack_from(run, kvm.RUN_EXIT)
            detail = (f": guest {'wrote' if is_write else 'read'} {length} bytes at unbacked "
                      f"guest-physical {address:#x}")
        elif reason == kvm.KVM_EXIT_FAIL_ENTRY:
            detail = f": hardware entry failure reason {kvm.RUN_FAIL_ENTRY.unpack_from(run, 32)[0]:#x}"
        elif reason == kvm.KVM_EXIT_INTERNAL_ERROR:
            suberror, ndata, *data = kvm.RUN_INTERNAL.unpack_from(run, kvm.RUN_EXIT)
            detail = f": suberror {suberror}, data {[hex(d) for d in data[:min(ndata, 16)]]}"
        elif reason == kvm.KVM_EXIT_SHUTDOWN:
            detail = " (triple fault)"
        try:
            regs = self.get_regs()
            where = f" at rip {regs.rip:#x}"
        except KvmError:
            where = ""
        return f"vCPU {self.index} stopped: KVM_EXIT_{name.removeprefix('KVM_EXIT_')}{detail}{where}"

    # ---------------------------------------------------- control from anywhere

    def _kick_locked(self) -> None:
        if self._run is None:  # closed
            return
        self._run[kvm.RUN_IMMEDIATE_EXIT] = 1
        if self._thread is not None and self._thread != threading.get_ident():
            signal.pthread_kill(self._thread, KICK_SIGNAL)

    def pause(self, timeout: float = 5.0) -> None:
        """Get the vCPU out of KVM_RUN and park its loop; return once it is parked
        (at once when no loop runs: one that starts later parks first).
        KvmError after `timeout` seconds (a deadlock guard)."""
        with self._cond:
            self._want_pause = True
            self._kick_locked()
            self._cond.notify_all()  # ends a throttle hold
            if self._thread == threading.get_ident():
                raise KvmError("pause() called from the vCPU's own thread")
            if not self._cond.wait_for(lambda: self._parked or self._thread is None, timeout):
                raise KvmError(f"vCPU {self.index} did not leave KVM_RUN within {timeout}s")

    def resume(self) -> None:
        """Let a paused loop run the guest again (no-op when not paused)."""
        with self._cond:
            self._want_pause = False
            if not self._want_stop and self._run is not None:
                self._run[kvm.RUN_IMMEDIATE_EXIT] = 0
            self._cond.notify_all()

    def throttle(self, percent: int) -> None:
        """Hold the vCPU out of KVM_RUN `percent` % of the time (0: never), from
        any thread; takes effect within a slice.  ConfigError outside 0..99."""
        if not isinstance(percent, int) or not 0 <= percent <= 99:
            raise ConfigError(f"a vCPU throttle is a percentage in 0..99, not {percent!r}")
        with self._cond:
            self._throttle = percent
            self._cond.notify_all()

    @property
    def throttle_pct(self) -> int:
        """The throttle now (percent of the time held out of KVM_RUN)."""
        return self._throttle

    def stop(self) -> None:
        """Ask the loop to end (it answers "stopped"); does not wait: join the job."""
        with self._cond:
            self._want_stop = True
            self._kick_locked()
            self._cond.notify_all()

    @property
    def paused(self) -> bool:
        """True while the loop is parked."""
        return self._parked

    def _check_still(self) -> None:
        if self._thread is not None and not self._parked:
            raise KvmError(f"vCPU {self.index} is running: pause it before touching its state")

    # ----------------------------------------------------------------- state

    def save_state(self) -> dict[bytes, bytes]:
        """Every part of the vCPU's state as records (tag -> struct bytes)."""
        self._check_still()
        records: dict[bytes, bytes] = {}
        parts: list[tuple[bytes, int, ctypes.Structure | ctypes.Array[ctypes.c_uint8]]] = [
            (b"REGS", kvm.KVM_GET_REGS, kvm.kvm_regs()),
            (b"SREG", kvm.KVM_GET_SREGS, kvm.kvm_sregs()),
            (b"MPST", kvm.KVM_GET_MP_STATE, kvm.kvm_mp_state()),
            (b"EVTS", kvm.KVM_GET_VCPU_EVENTS, kvm.kvm_vcpu_events()),
            (b"DBGR", kvm.KVM_GET_DEBUGREGS, kvm.kvm_debugregs())]
        if self._xsave_size:
            request = kvm.KVM_GET_XSAVE if self._xsave_size == 4096 else kvm.KVM_GET_XSAVE2
            parts.append((b"XSAV", request, (ctypes.c_uint8 * self._xsave_size)()))
        else:
            parts.append((b"FPU_", kvm.KVM_GET_FPU, kvm.kvm_fpu()))
        if self._has_xcrs:
            parts.append((b"XCRS", kvm.KVM_GET_XCRS, kvm.kvm_xcrs()))
        for tag, request, buf in parts:
            ioctl(self.fd, request, buf)
            records[tag] = bytes(buf)
        records[b"MSRS"] = encode_msrs(self._get_msrs(self._msr_indices))
        return records

    def _get_msrs(self, indices: list[int]) -> list[tuple[int, int]]:
        """Values of the MSRs in `indices` this vCPU can read (GET_MSRS stops at
        the first it cannot: that one is left out and the rest read again)."""
        entries: list[tuple[int, int]] = []
        todo = list(indices)
        while todo:
            buf = kvm.msrs_buffer(len(todo))
            payload = encode_msrs([(index, 0) for index in todo])
            ctypes.memmove(buf, payload, len(payload))
            done = ioctl(self.fd, kvm.KVM_GET_MSRS, buf)
            entries += msr_entries(bytes(buf))[:done]
            todo = todo[done + 1:]
        return entries

    def load_state(self, records: dict[bytes, bytes]) -> None:
        """Set every part present in `records`, in kvm.md's order.  DeviceStateError
        when REGS or SREG is missing or an MSR that matters is refused; KvmError
        when KVM refuses another part."""
        self._check_still()
        for tag in (b"REGS", b"SREG"):
            if tag not in records:
                raise DeviceStateError(f"KVM vCPU state lacks its {tag.decode()} record")
        setters = [(b"REGS", kvm.KVM_SET_REGS), (b"XSAV", kvm.KVM_SET_XSAVE),
                   (b"FPU_", kvm.KVM_SET_FPU), (b"XCRS", kvm.KVM_SET_XCRS),
                   (b"SREG", kvm.KVM_SET_SREGS), (b"MSRS", kvm.KVM_SET_MSRS),
                   (b"MPST", kvm.KVM_SET_MP_STATE), (b"EVTS", kvm.KVM_SET_VCPU_EVENTS),
                   (b"DBGR", kvm.KVM_SET_DEBUGREGS)]
        for tag, request in setters:
            if tag not in records:
                continue
            if tag == b"MSRS":
                self._set_msrs(msr_entries(records[tag]))
                continue
            if tag == b"XSAV" and len(records[tag]) != max(self._xsave_size, 4096):
                raise DeviceStateError(f"XSAVE state is {len(records[tag])} bytes; this vCPU's "
                                       f"is {self._xsave_size}")
            buf = (ctypes.c_uint8 * len(records[tag])).from_buffer_copy(records[tag])
            ioctl(self.fd, request, buf)
        with self._cond:
            self._exit_pending = False

    def _set_msrs(self, entries: list[tuple[int, int]]) -> None:
        """SET_MSRS stops at the first MSR it rejects and answers how many it set.
        A rejected MSR is skipped when it held 0 (a feature this vCPU lacks) or
        already holds the value; any other is DeviceStateError."""
        self.skipped_msrs = []
        while entries:
            payload = encode_msrs(entries)
            buf = (ctypes.c_uint8 * len(payload)).from_buffer_copy(payload)
            done = ioctl(self.fd, kvm.KVM_SET_MSRS, buf)
            if done >= len(entries):
                return
            index, value = entries[done]
            current = dict(self._get_msrs([index])).get(index)
            if value == 0 and current in (None, 0):
                self.skipped_msrs.append((index, "0, and this vCPU has no such MSR"))
            elif current == value:
                self.skipped_msrs.append((index, "read-only here, and already holds the value"))
            else:
                raise DeviceStateError(f"KVM refused MSR {index:#x} = {value:#x} "
                                       f"(it holds {current if current is None else hex(current)})")
            entries = entries[done + 1:]

    # ----------------------------------------------------------------- close

    def close(self) -> None:
        """Unmap kvm_run and close the vCPU (idempotent).  Its loop must have ended."""
        with self._cond:
            if self._thread is not None:
                raise KvmError(f"vCPU {self.index} is still in its run loop: stop it first")
            run, self._run = self._run, None  # type: ignore[assignment]
            fd, self.fd = self.fd, -1
        if run is not None:
            run.close()
        if fd >= 0:
            os.close(fd)

