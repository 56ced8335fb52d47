"""The minimal KVM VMM (clients/kvm) on this machine's /dev/kvm.

Each test boots a real guest on a 128 MiB GuestRAM, runs its vCPU as a job of a
``WorkerPool("thread", 1)``, and leaves nothing behind (the integration leak
check).  Figures (pause latency, pages/s, state save/load) are printed; run
with ``-s`` to see them.  Timing is reported, never asserted tightly.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from clients.kvm import guests
from clients.kvm.ioctl import GuestStoppedError, UnknownPortError, kvm_unavailable_reason
from clients.kvm.machine import BOOT_IMAGE, KvmMachine
from clients.kvm.vm import Vm
from engine.device import MigratableDevice
from engine.errors import ConfigError
from engine.pool import WorkerPool
from engine.shm import PAGE_SIZE, GuestRAM

_UNAVAILABLE = kvm_unavailable_reason()
pytestmark = pytest.mark.skipif(_UNAVAILABLE is not None,
                                reason=f"KVM tests need /dev/kvm: {_UNAVAILABLE}")

RAM = 128 << 20
START = 1 << 20


def _wait_until(predicate: Callable[[], bool], timeout: float = 30.0, poll: float = 0.002) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(poll)


@pytest.fixture
def ram() -> Iterator[GuestRAM]:
    with GuestRAM.create({"pc.ram": RAM}) as guest:
        yield guest


@pytest.fixture
def pool() -> Iterator[WorkerPool]:
    with WorkerPool("thread", 1, "vcpu") as vcpu_pool:
        yield vcpu_pool


def _sector(code: bytes) -> bytes:
    return code.ljust(510, b"\x90") + b"\x55\xaa"


def _progress(machine: KvmMachine) -> int:
    return machine.com1.count(guests.PROGRESS_CHAR)


def _copy_ram(source: GuestRAM) -> GuestRAM:
    copy = GuestRAM.create(source.layout)
    for block, other in zip(source.blocks, copy.blocks):
        other.pages[:] = block.pages
    return copy


def test_boot_sector_prints_boot_char_then_progress(ram: GuestRAM, pool: WorkerPool) -> None:
    with KvmMachine(ram, "boot") as machine:
        future = machine.start(pool)
        _wait_until(lambda: _progress(machine) >= 3)
        machine.pause()
        text = machine.com1.partial()
        assert text.startswith(guests.BOOT_CHAR) and text.count(guests.BOOT_CHAR) == 1
        assert set(text[1:]) == {guests.PROGRESS_CHAR}
        assert machine.check_invariant() == ""
        assert machine.a20.value & 0x02              # the sector opened the A20 gate
        machine.stop()
        assert future.result() == "stopped"


@pytest.mark.parametrize("program", guests.PROGRAMS)
def test_pause_stops_the_guest_and_resume_restarts_it(ram: GuestRAM, pool: WorkerPool,
                                                      program: str) -> None:
    with KvmMachine(ram, program, start=START, end=START + (8 << 20)) as machine, \
            WorkerPool("thread", 1, "control") as control:
        machine.start(pool)
        _wait_until(lambda: _progress(machine) >= 1)
        pauses, resumes = [], []
        for cycle in range(30):
            began = time.perf_counter()
            if cycle % 2:  # from any thread
                control.submit(machine.pause).result(5)
            else:
                machine.pause()
            pauses.append(time.perf_counter() - began)
            frozen = guests.first_bytes(ram, START, START + (8 << 20))
            count = _progress(machine)
            time.sleep(0.005)
            assert machine.vcpu.paused and _progress(machine) == count
            assert np.array_equal(frozen, guests.first_bytes(ram, START, START + (8 << 20)))
            assert machine.check_invariant() == ""
            began = time.perf_counter()
            machine.resume()
            _wait_until(lambda count=count: _progress(machine) > count, poll=0.0001)
            resumes.append(time.perf_counter() - began)
        ms = sorted(p * 1e3 for p in pauses)
        print(f"\n{program}: pause {statistics.median(ms):.3f} ms median, {ms[-1]:.3f} ms max; "
              f"resume to next progress char {statistics.median(resumes) * 1e3:.2f} ms median")


def test_pause_gets_a_guest_that_never_exits_out_of_kvm_run(ram: GuestRAM, pool: WorkerPool) -> None:
    with KvmMachine(ram, "user64") as machine:
        machine.vm.write(0x7C00, b"\xeb\xfe")          # jmp . at CPL3: no exit, ever
        machine.pause()                                # before start: the loop parks first
        machine.start(pool)
        _wait_until(lambda: machine.vcpu.paused)
        assert machine.vcpu.exits == 0
        machine.resume()
        time.sleep(0.05)
        latencies = []
        for _ in range(10):
            began = time.perf_counter()
            machine.pause()                            # only the signal can do this
            latencies.append((time.perf_counter() - began) * 1e3)
            assert machine.vcpu.get_regs().rip == 0x7C00
            machine.resume()
            time.sleep(0.01)
        assert machine.vcpu.exits == 0
        print(f"\nkick out of a non-exiting guest: {statistics.median(latencies):.3f} ms median, "
              f"{max(latencies):.3f} ms max")


class _PortThatStops:
    """Port 0x510: a read answers 0x5A and asks the vCPU loop to end right then."""

    ports = range(0x510, 0x511)

    def __init__(self, machine: KvmMachine) -> None:
        self.machine = machine

    def io_in(self, port: int, size: int) -> int:
        self.machine.vcpu.stop()
        return 0x5A

    def io_out(self, port: int, size: int, value: int) -> None:
        raise AssertionError("not written")


def test_pending_in_is_completed_before_the_state_is_read(ram: GuestRAM, pool: WorkerPool) -> None:
    # mov dx, 0x510; in al, dx; hlt — the loop stops while the IN is still pending in KVM
    with KvmMachine(ram, BOOT_IMAGE, boot_image=_sector(b"\xba\x10\x05\xec\xf4")) as machine:
        machine.vcpu.bus.add(_PortThatStops(machine))
        assert machine.start(pool).result(30) == "stopped"
        regs = machine.vcpu.get_regs()
        assert regs.rip == 0x7C04 and regs.rax & 0xFF == 0x5A   # past the IN, value in AL


def test_dirty_log_sees_guest_writes_not_host_writes_and_clear_rearms(ram: GuestRAM,
                                                                      pool: WorkerPool) -> None:
    block = ram.blocks[0]
    end = START + (4 << 20)
    range_pages = set(range(START // PAGE_SIZE, end // PAGE_SIZE))
    with KvmMachine(ram, "user64", start=START, end=end) as machine:
        vm = machine.vm
        loader = set(vm.dirty_pages(block).tolist())   # nothing ran yet: the log is empty
        assert loader == set()
        assert block.dirty.count() > 0                  # the VMM's own writes, marked by it
        block.dirty.clear_all()
        machine.start(pool)
        _wait_until(lambda: _progress(machine) >= 2)
        machine.pause()
        first = set(vm.dirty_pages(block).tolist())
        assert range_pages <= first                     # every page of the loop was written
        assert first - range_pages <= set(range(0, START // PAGE_SIZE))  # + CPU-written low pages
        assert vm.dirty_pages(block).size == 0          # read and cleared: nothing new while paused
        host_page = end // PAGE_SIZE + 10
        block.pages[host_page * PAGE_SIZE] = 0xEE       # a host write through the shared memory
        ram.blocks[0].pages[(START + PAGE_SIZE) + 7] = 1
        assert vm.dirty_pages(block).size == 0          # never in KVM's log
        before, count = guests.first_bytes(ram, START, end), _progress(machine)
        machine.resume()
        _wait_until(lambda: _progress(machine) >= count + 2)      # a whole pass after the CLEAR
        machine.pause()
        again = set(vm.dirty_pages(block).tolist())
        changed = np.flatnonzero(before != guests.first_bytes(ram, START, end)) + START // PAGE_SIZE
        assert set(changed.tolist()) <= again and range_pages <= again   # CLEAR re-armed them
        assert host_page not in again
        assert machine.dirty_pages(block).size == 0     # the machine's view: log ∪ VMM marks
        machine.vm.write(end + PAGE_SIZE, b"x")
        assert machine.dirty_pages(block).tolist() == [end // PAGE_SIZE + 1]


def test_a_peek_at_the_log_clears_nothing(ram: GuestRAM, pool: WorkerPool) -> None:
    """Auto-converge's rate meter peeks at the log between collects (GET_DIRTY_LOG
    only, manual-protect mode): the pages it sees must still be collected."""
    block = ram.blocks[0]
    end = START + (4 << 20)
    loop = set(range(START // PAGE_SIZE, end // PAGE_SIZE))
    with KvmMachine(ram, "user64", start=START, end=end) as machine:
        machine.dirty_pages(block)                      # the loader's marks: a clean start
        machine.start(pool)
        _wait_until(lambda: _progress(machine) >= 2)
        machine.dirty_pages(block)                      # a collect while it runs
        count = _progress(machine)
        peeks = [machine.count(block)]
        while _progress(machine) < count + 2:           # a whole pass after the collect
            peeks.append(machine.count(block))
        machine.pause()
        assert peeks == sorted(peeks), "a peek while running cleared pages"
        bits = machine.vm.dirty_bits(block)
        assert (machine.vm.dirty_bits(block) == bits).all()   # peeking twice: the same
        taken = machine.dirty_pages(block)              # the guest is paused: only a peek that
        assert set(taken.tolist()) == set(np.flatnonzero(bits).tolist())  # cleared loses pages
        assert loop <= set(taken.tolist()) and peeks[-1] <= taken.size
        assert machine.count(block) == 0                # the collect did clear


def test_user64_runs_natively_and_keeps_its_invariant(ram: GuestRAM) -> None:
    end = RAM
    rates = {}
    for program in guests.PROGRAMS:
        with KvmMachine(ram, program, start=START, end=end) as machine, \
                WorkerPool("thread", 1, "vcpu") as pool:
            machine.start(pool)
            _wait_until(lambda machine=machine: _progress(machine) >= 1)
            began, count = time.perf_counter(), _progress(machine)
            time.sleep(1.0)
            machine.pause()
            passes = _progress(machine) - count
            rates[program] = passes * (end - START) / PAGE_SIZE / (time.perf_counter() - began)
            assert machine.check_invariant() == ""
            machine.stop()
        for block in ram.blocks:                        # the next guest starts from clean RAM
            block.pages[:] = bytes(block.size)
    print(f"\npages/s: boot (emulated) {rates['boot'] / 1e6:.2f} M, "
          f"user64 (native) {rates['user64'] / 1e6:.1f} M")
    assert rates["user64"] > 10 * rates["boot"]


@pytest.mark.parametrize("program", guests.PROGRAMS)
@pytest.mark.parametrize("path", ["save_state", "device"])
def test_vcpu_state_moves_to_a_new_vm_and_the_guest_continues(ram: GuestRAM, pool: WorkerPool,
                                                             program: str, path: str) -> None:
    end = START + (16 << 20)
    with KvmMachine(ram, program, start=START, end=end) as source, _copy_ram(ram) as copy, \
            WorkerPool("thread", 1, "vcpu-dst") as pool2:
        source.start(pool)
        _wait_until(lambda: _progress(source) >= 2)
        source.pause()                                 # and it stays paused: the copy owns the guest
        began = time.perf_counter()
        if path == "save_state":
            state = source.save_state()
        else:
            assert isinstance(source.device, MigratableDevice)
            chunks = list(source.device.save_state())
            config = source.device.save_config()
        saved_ms = (time.perf_counter() - began) * 1e3
        for block, other in zip(ram.blocks, copy.blocks):
            other.pages[:] = block.pages
        assert guests.check_invariant(copy, START, end) == ""
        moved = guests.first_bytes(copy, START, end)
        began = time.perf_counter()
        if path == "save_state":
            destination = KvmMachine.restore(copy, state)
        else:
            destination = KvmMachine.incoming(copy)
            for chunk in chunks:
                destination.device.load_state(chunk)
            destination.device.load_config(config)
        loaded_ms = (time.perf_counter() - began) * 1e3
        with destination:
            assert destination.loop_range == (START, end) and destination.program == program
            destination.start(pool2)
            _wait_until(lambda: _progress(destination) >= 2)
            destination.pause()
            assert destination.com1.count(guests.BOOT_CHAR) == 0     # continued, not rebooted
            assert destination.check_invariant() == ""
            assert not np.array_equal(moved, guests.first_bytes(copy, START, end))  # ran on
            assert np.array_equal(moved, guests.first_bytes(ram, START, end))     # source did not
            print(f"\n{program} via {path}: save {saved_ms:.2f} ms, "
                  f"VM build + load {loaded_ms:.2f} ms, skipped MSRs "
                  f"{[hex(i) for i, _ in destination.vcpu.skipped_msrs]}")
        source.stop()
        assert source.future is not None and source.future.result() == "stopped"


def test_unknown_port_is_a_clear_error(ram: GuestRAM, pool: WorkerPool) -> None:
    # mov al, 0x42; out 0x80, al; hlt  (port 0x80 is POST codes on a PC; nobody serves it here)
    with KvmMachine(ram, BOOT_IMAGE, boot_image=_sector(b"\xb0\x42\xe6\x80\xf4")) as machine:
        future = machine.start(pool)
        with pytest.raises(UnknownPortError, match=r"write to unknown I/O port 0x80"):
            future.result(30)
        assert machine.loop_range is None
        with pytest.raises(ConfigError):
            machine.check_invariant()


def test_hlt_ends_the_run_loop_and_a_triple_fault_is_an_error(ram: GuestRAM) -> None:
    with KvmMachine(ram, BOOT_IMAGE, boot_image=_sector(b"\xf4")) as machine, \
            WorkerPool("thread", 1, "vcpu") as pool:
        assert machine.start(pool).result(30) == "halted"
        assert machine.vcpu.get_regs().rip == 0x7C01
    # 64-bit user mode without an IDT: ud2 raises #UD, nothing handles it, the CPU shuts down.
    with KvmMachine(ram, "user64") as machine, WorkerPool("thread", 1, "vcpu") as pool:
        machine.vm.write(0x7C00, b"\x0f\x0b")
        with pytest.raises(GuestStoppedError, match="KVM_EXIT_SHUTDOWN .triple fault. at rip 0x7c00"):
            machine.start(pool).result(30)


def test_configuration_errors(ram: GuestRAM) -> None:
    with GuestRAM.create({"small": 64 << 20}) as small, pytest.raises(ConfigError, match="128 MiB"):
        Vm(small)
    with pytest.raises(ConfigError, match="no .*offers no KVM"):
        Vm(ram, kvm_path="/nonexistent/kvm")
    with pytest.raises(ConfigError, match="55 aa"):
        KvmMachine(ram, BOOT_IMAGE, boot_image=b"\0" * 512)
    with pytest.raises(ConfigError, match="loop range"):
        KvmMachine(ram, "boot", start=0x1000)
    with KvmMachine(ram, "user64") as machine, WorkerPool("process", 1, "p") as processes, \
            pytest.raises(ConfigError, match="thread pool"):
        machine.start(processes)
