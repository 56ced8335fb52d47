"""A minimal KVM machine on a GuestRAM: one vCPU, COM1, the A20 gate, a guest program.

::

    KvmMachine(ram, "user64")          KvmMachine.incoming(ram2)  (or .restore(ram2, state))
      Vm (slots over ram's blocks)       Vm over the received RAM, vCPU not yet set
      Vcpu 0 ── PortBus: Serial (COM1), A20Gate
      start(pool) ─► pool job: Vcpu.run   device.load_state(chunks) ... load_config(config)
      pause() / resume() / stop()          └─► vCPU + COM1 state set, then start(pool)
      throttle(percent)
      take(block) / count(block): dirty source (KVM log ∪ VMM marks)
      device.save_state() ──── chunks ────►
      device.save_config() ─── config ────►

The vCPU runs as a job of a ``WorkerPool("thread", ...)`` the VMM owns and
passes to :meth:`KvmMachine.start`; nothing here starts a thread.  The saved
state is one record stream (``clients/kvm/state.py``): the vCPU's records, the
UART's registers, and CONF (program and loop range, for the oracle).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import numpy as np

from clients.kvm import firmware, guests
from clients.kvm.devices import A20Gate, PortBus, Serial
from clients.kvm.ioctl import KvmError
from clients.kvm.state import decode_config, decode_state, encode_config, encode_state
from clients.kvm.vcpu import Vcpu
from clients.kvm.vm import Vm
from engine.errors import ConfigError, DeviceStateError
from engine.pool import WorkerPool
from engine.shm import PAGE_SIZE, GuestRAM, RamBlock

__all__ = ["BOOT_IMAGE", "KvmMachine", "VcpuDevice"]

#: `program` for a caller's own boot sector (``boot_image=``): no loop range is known.
BOOT_IMAGE = "boot-image"
MAX_STATE = 4 << 20     # a machine's state is ~6 KiB; anything near this is garbage
_VCPU_TAGS = (b"REGS", b"XSAV", b"FPU_", b"XCRS", b"SREG", b"MSRS", b"MPST", b"EVTS", b"DBGR")


class KvmMachine:
    """A VM on `ram` running `program` ("boot" or "user64", our loop guests; or
    :data:`BOOT_IMAGE` with `boot_image`, any 512-byte boot sector).

    The loop range defaults to ``[1 MiB, RAM size)`` (below 4 GiB).  `program`
    None builds an *incoming* machine whose state comes from :attr:`device` or
    :meth:`load_state`.  Raises ConfigError (no KVM, RAM under 128 MiB, a bad
    program or range), KvmError.  Close it before the RAM.
    """

    def __init__(self, ram: GuestRAM | None, program: str | None = "boot", *, start: int | None = None,
                 end: int | None = None, boot_image: bytes | None = None) -> None:
        if ram is None and program is not None:
            raise ConfigError("a machine that runs a program needs its RAM now")
        self.program = program
        self.loop_range: tuple[int, int] | None = None
        self.com1 = Serial()
        self.a20 = A20Gate()
        self._future: Future[str] | None = None
        self.vm = Vm(ram)
        try:
            self.vcpu = Vcpu(self.vm, 0, PortBus([self.com1, self.a20]))
        except BaseException:
            self.vm.close()
            raise
        try:
            if program is not None:
                self._load_program(program, start, end, boot_image)
        except BaseException:
            self.close()
            raise
        self.device = VcpuDevice(self)

    @classmethod
    def incoming(cls, ram: GuestRAM | None = None) -> KvmMachine:
        """A machine on received RAM, waiting for its state (through :attr:`device`).
        `ram` None: the RAM comes later, handed over (:meth:`take_ram`)."""
        return cls(ram, None)

    @property
    def ram(self) -> GuestRAM:
        """The guest's RAM (ConfigError before an incoming machine has it)."""
        return self.vm.ram

    def take_ram(self, ram: GuestRAM) -> None:
        """An incoming machine built without RAM takes `ram` as its memory slots:
        the destination's ``on_ram`` in a same-host migration (the source's own
        pages, handed over), before its state loads or it starts.  ConfigError, KvmError."""
        self.vm.add_ram(ram)

    @classmethod
    def restore(cls, ram: GuestRAM, state: bytes) -> KvmMachine:
        """A machine on `ram` (a copy of a paused machine's) continuing from `state`
        (:meth:`save_state`).  DeviceStateError for state it cannot load."""
        machine = cls(ram, None)
        try:
            machine.load_state(state)
        except BaseException:
            machine.close()
            raise
        return machine

    def _load_program(self, program: str, start: int | None, end: int | None,
                      boot_image: bytes | None) -> None:
        if program == BOOT_IMAGE:
            if boot_image is None:
                raise ConfigError(f"program {BOOT_IMAGE!r} needs boot_image")
            firmware.enter_boot_sector(self.vm, self.vcpu, boot_image)
            return
        if boot_image is not None:
            raise ConfigError(f"boot_image goes with program {BOOT_IMAGE!r}, not {program!r}")
        start = 1 << 20 if start is None else start
        end = min(self.ram.size, (1 << 32) - PAGE_SIZE) if end is None else end
        if start < firmware.LOOP_MIN or end > self.ram.size:
            raise ConfigError(f"loop range [{start:#x}, {end:#x}) must lie in "
                              f"[{firmware.LOOP_MIN:#x}, {self.ram.size:#x})")
        image = guests.with_range(guests.image(program), start, end)
        self.loop_range = (start, end)
        if program == "boot":
            firmware.enter_boot_sector(self.vm, self.vcpu, image)
        else:
            firmware.enter_user64(self.vm, self.vcpu, image)

    # --------------------------------------------------------------- running

    def start(self, pool: WorkerPool) -> Future[str]:
        """Run the vCPU as a job of `pool` (a thread pool with a free worker); its
        future answers "stopped" or "halted", or holds the error that ended the
        guest.  ConfigError for a process pool, KvmError when already started."""
        if pool.backend != "thread":
            raise ConfigError("a KVM vCPU runs on a thread pool: its fds work only in this process")
        if self._future is not None and not self._future.done():
            raise KvmError("this machine's vCPU is running already")
        self._future = pool.submit(self.vcpu.run, pool.token)
        return self._future

    @property
    def future(self) -> Future[str] | None:
        """The run loop's future (None before :meth:`start`)."""
        return self._future

    def pause(self, timeout: float = 5.0) -> None:
        """Stop the guest, pending I/O completed, from any thread (see Vcpu.pause).
        A loop that ended with an error raises KvmError from it."""
        self.vcpu.pause(timeout)
        future = self._future
        if future is not None and future.done() and future.exception() is not None:
            raise KvmError("the guest is not running: its vCPU loop failed") from future.exception()

    def resume(self) -> None:
        """Let the guest run again."""
        self.vcpu.resume()

    def stop(self, timeout: float = 5.0) -> None:
        """End the run loop and wait for it (its outcome stays in :attr:`future`).
        KvmError when it has not ended after `timeout` seconds."""
        self.vcpu.stop()
        if self._future is not None:
            done, _ = concurrent.futures.wait([self._future], timeout)
            if not done:
                raise KvmError(f"the vCPU loop did not end within {timeout}s")

    # ------------------------------------------------------------ dirty pages

    def dirty_pages(self, block: RamBlock) -> np.ndarray:
        """Pages of `block` written since the last call, by the guest (KVM's log)
        or by the VMM (the block's DirtyMap); both re-armed before this returns."""
        return np.union1d(self.vm.dirty_pages(block), block.dirty.take())

    # The machine is the engine's dirty source (engine/dirty.py): SourceMigration(...,
    # dirty_source=machine).  Call from this process; one call at a time.
    take = dirty_pages

    def count(self, block: RamBlock) -> int:
        """How many pages of `block` are dirty now, log and VMM marks (a peek)."""
        return int(np.count_nonzero(self.vm.dirty_bits(block) | block.dirty.snapshot().view(bool)))

    def throttle(self, percent: int) -> None:
        """Hold the vCPU out of KVM_RUN `percent` % of the time (0..99; 0 = full
        speed): the engine's ``throttle_guest`` for auto-converge."""
        self.vcpu.throttle(percent)

    def check_invariant(self) -> str:
        """The loop guest's oracle on its range ('' = holds); pause first.
        ConfigError when no loop range is known (a foreign boot image)."""
        if self.loop_range is None:
            raise ConfigError("this machine does not run one of the project's loop guests")
        return guests.check_invariant(self.ram, *self.loop_range)

    # ----------------------------------------------------------------- state

    def config(self) -> dict[str, Any]:
        """What the destination needs besides CPU state: program and loop range."""
        start, end = self.loop_range if self.loop_range else (None, None)
        return {"program": self.program, "start": start, "end": end}

    def save_records(self) -> dict[bytes, bytes]:
        """The vCPU's and COM1's records (the vCPU must be paused or not started)."""
        records = self.vcpu.save_state()
        records[b"UART"] = self.com1.save_state()
        return records

    def save_state(self) -> bytes:
        """The whole machine state, config included, for :meth:`restore`."""
        records = self.save_records()
        records[b"CONF"] = encode_config(self.config())
        return encode_state(records)

    def load_state(self, state: bytes) -> None:
        """Set the vCPU, COM1 and config from :meth:`save_state`'s bytes (before start)."""
        self.load_records(decode_state(state))

    def load_records(self, records: dict[bytes, bytes]) -> None:
        """Set what `records` holds.  DeviceStateError without the vCPU's records."""
        if self._future is not None and not self._future.done():
            raise KvmError("load state before starting the vCPU")
        if b"CONF" in records:
            config = decode_config(records[b"CONF"])
            program, start, end = config.get("program"), config.get("start"), config.get("end")
            if program is not None and not isinstance(program, str) or not (
                    isinstance(start, int) and isinstance(end, int) or start is end is None):
                raise DeviceStateError(f"KVM machine config is malformed: {config}")
            self.program = program
            self.loop_range = (start, end) if isinstance(start, int) and isinstance(end, int) \
                else None
        self.vcpu.load_state({tag: data for tag, data in records.items() if tag in _VCPU_TAGS})
        if b"UART" in records:
            self.com1.load_state(records[b"UART"])

    # ----------------------------------------------------------------- close

    def close(self) -> None:
        """Stop the loop if it runs, then destroy the vCPU and VM (idempotent)."""
        if self._future is not None and not self._future.done():
            self.stop()
        self.vcpu.close()
        self.vm.close()

    def __enter__(self) -> KvmMachine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VcpuDevice:
    """The machine's vCPU and COM1 as an ``engine.device.MigratableDevice``.

    Source (guest paused): one chunk, the vCPU and UART records; config, the
    CONF record.  Destination (an :meth:`KvmMachine.incoming` machine): chunks
    are buffered, and :meth:`load_config` decodes and sets everything, so chunk
    boundaries do not matter.  DeviceStateError for malformed or oversized state.
    """

    idstr = "kvm-vcpu0"
    instance_id = 0

    def __init__(self, machine: KvmMachine) -> None:
        self._machine = machine
        self._incoming = bytearray()

    def save_state(self) -> Iterator[bytes]:
        yield encode_state(self._machine.save_records())

    def save_config(self) -> bytes:
        return encode_state({b"CONF": encode_config(self._machine.config())})

    def load_state(self, chunk: bytes) -> None:
        if len(self._incoming) + len(chunk) > MAX_STATE:
            raise DeviceStateError(f"KVM vCPU state over {MAX_STATE} bytes")
        self._incoming += chunk

    def load_config(self, config: bytes) -> None:
        state, self._incoming = bytes(self._incoming), bytearray()
        records = decode_state(state)
        for tag, data in decode_state(config).items():
            if tag in records:
                raise DeviceStateError(f"record {tag.decode()} is in both state and config")
            records[tag] = data
        self._machine.load_records(records)
