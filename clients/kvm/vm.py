"""A KVM virtual machine whose memory is a GuestRAM, with its dirty log.

::

    GuestRAM block 0 ──► slot 0 at guest physical 0
    GuestRAM block 1 ──► slot 1 right after it        (blocks are contiguous)
    ...                  each slot: LOG_DIRTY_PAGES, manual-protect dirty log

    dirty_pages(block):  GET_DIRTY_LOG (read the bits; pages stay write-tracked)
                         CLEAR_DIRTY_LOG of exactly those bits (re-arm them)
                         ──► page indices; only now may the caller read those pages

That is the get → clear → read order of engine/dirty.py: a guest write that lands
after the clear faults again and shows in the next call, so none is lost.  Only
the guest's own writes (and the CPU's, e.g. accessed bits) are logged; writes
the VMM or another process makes through the shared memory never are, so a VMM
marks those itself.

The VM, its vCPUs and the log work only in the process that created them
(kvm.md): build it in the VMM process, let channel processes touch the RAM only.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os

import numpy as np

from clients.kvm import ioctl as kvm
from clients.kvm.ioctl import KvmError, ioctl
from engine.errors import ConfigError
from engine.shm import PAGE_SIZE, GuestRAM, RamBlock

__all__ = ["MIN_RAM", "Vm"]

#: The least guest RAM a machine gets (the boot sector expects it at address 0).
MIN_RAM = 128 << 20


class _Slot:
    """One KVM memory slot over one RAM block, with its dirty-bitmap buffer."""

    def __init__(self, index: int, block: RamBlock, guest_phys_addr: int) -> None:
        self.index = index
        self.block = block
        self.guest_phys_addr = guest_phys_addr
        # Holds an export of block.pages so the RAM cannot be unmapped under KVM;
        # dropped in Vm.close(), before the RAM closes.
        self.export: ctypes.Array[ctypes.c_char] | None = (
            ctypes.c_char * block.size).from_buffer(block.pages)
        words = -(-block.n_pages // 64)
        self.bitmap = np.zeros(words, dtype=np.uint64)

    @property
    def userspace_addr(self) -> int:
        assert self.export is not None
        return ctypes.addressof(self.export)


def _check_size(ram: GuestRAM) -> None:
    if ram.size < MIN_RAM:
        raise ConfigError(f"a KVM guest needs at least {MIN_RAM >> 20} MiB of RAM, "
                          f"not {ram.size >> 20} MiB")


class Vm:
    """A KVM VM over every block of `ram` (guest physical 0 upwards).

    `ram` None builds a VM without memory yet, for RAM that arrives later
    (:meth:`add_ram`: a same-host migration hands the source's pages over).
    Raises ConfigError when /dev/kvm is missing or inaccessible, or the RAM is
    smaller than :data:`MIN_RAM`; KvmError when KVM refuses a step.  Close it
    (or use it as a context manager) before closing the RAM.  Not thread-safe
    except :meth:`dirty_pages`, which may run while the vCPU runs.
    """

    def __init__(self, ram: GuestRAM | None, *, kvm_path: str = "/dev/kvm") -> None:
        if ram is not None:
            _check_size(ram)
        self._ram: GuestRAM | None = None
        self._slots: list[_Slot] = []
        self._by_block: dict[int, _Slot] = {}
        self.kvm_fd = -1
        self.fd = -1
        with contextlib.ExitStack() as undo:
            undo.callback(self.close)
            self.kvm_fd = kvm.kvm_open(kvm_path)
            for cap in (kvm.KVM_CAP_IMMEDIATE_EXIT, kvm.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2):
                if not self.check_extension(cap):
                    raise KvmError(f"this KVM lacks capability {cap}, which the VMM needs")
            self.vcpu_mmap_size = ioctl(self.kvm_fd, kvm.KVM_GET_VCPU_MMAP_SIZE)
            self.fd = ioctl(self.kvm_fd, kvm.KVM_CREATE_VM, 0)
            # Before any slot exists: GET_DIRTY_LOG then only reads the bitmap,
            # and CLEAR_DIRTY_LOG re-arms exactly the pages it is given.
            enable = kvm.kvm_enable_cap(cap=kvm.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
            enable.args[0] = kvm.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
            ioctl(self.fd, kvm.KVM_ENABLE_CAP, enable)
            if ram is not None:
                self.add_ram(ram)
            undo.pop_all()

    @property
    def ram(self) -> GuestRAM:
        """The guest's RAM (ConfigError for a VM whose memory has not arrived)."""
        if self._ram is None:
            raise ConfigError("this VM has no memory yet: it waits for add_ram()")
        return self._ram

    def add_ram(self, ram: GuestRAM) -> None:
        """Make every block of `ram` a memory slot, guest physical 0 upwards: at
        construction, or once for a VM built without memory (the pages another
        VMM handed over, in a same-host migration).  Raises ConfigError (memory
        there already, RAM too small), KvmError."""
        if self._ram is not None:
            raise ConfigError("this VM has its memory already")
        _check_size(ram)
        self._ram = ram
        address = 0
        for block in ram.blocks:
            self._add_slot(block, address)
            address += block.size

    def _add_slot(self, block: RamBlock, guest_phys_addr: int) -> None:
        slot = _Slot(len(self._slots), block, guest_phys_addr)
        self._slots.append(slot)
        self._by_block[id(block)] = slot
        region = kvm.kvm_userspace_memory_region(
            slot=slot.index, flags=kvm.KVM_MEM_LOG_DIRTY_PAGES, guest_phys_addr=guest_phys_addr,
            memory_size=block.size, userspace_addr=slot.userspace_addr)
        ioctl(self.fd, kvm.KVM_SET_USER_MEMORY_REGION, region)

    # ------------------------------------------------------------------ queries

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on /dev/kvm: 0 when absent, else a cap-specific value."""
        return ioctl(self.kvm_fd, kvm.KVM_CHECK_EXTENSION, cap)

    def guest_address(self, block: RamBlock) -> int:
        """The guest physical address where `block` starts."""
        return self._slot(block).guest_phys_addr

    def locate(self, guest_phys_addr: int, length: int = 1) -> tuple[RamBlock, int]:
        """The block holding ``[guest_phys_addr, +length)`` and the offset in it.
        ConfigError when that range is not inside one block."""
        for slot in self._slots:
            offset = guest_phys_addr - slot.guest_phys_addr
            if 0 <= offset and offset + length <= slot.block.size:
                return slot.block, offset
        raise ConfigError(f"guest range {guest_phys_addr:#x}+{length:#x} is not in one RAM block")

    def write(self, guest_phys_addr: int, data: bytes) -> None:
        """Copy `data` into guest RAM and mark the pages in the block's DirtyMap
        (the KVM log never sees the VMM's own writes).  ConfigError outside RAM."""
        block, offset = self.locate(guest_phys_addr, len(data))
        block.pages[offset:offset + len(data)] = data
        first = offset // PAGE_SIZE
        block.dirty.mark(first, (offset + len(data) - 1) // PAGE_SIZE - first + 1)

    def _slot(self, block: RamBlock) -> _Slot:
        try:
            return self._by_block[id(block)]
        except KeyError:
            raise ConfigError(f"RAM block {block.name!r} is not a slot of this VM") from None

    # ---------------------------------------------------------------- dirty log

    def dirty_pages(self, block: RamBlock) -> np.ndarray:
        """The pages of `block` the guest wrote since the last call, re-armed.

        Answers sorted page indices (int64) within the block; the caller reads
        those pages only after this returns.  Raises KvmError, ConfigError for a
        block that is not this VM's.  Calls for one block must not overlap.
        """
        slot = self._slot(block)
        bitmap = slot.bitmap
        log = kvm.kvm_dirty_log(slot=slot.index, dirty_bitmap=bitmap.ctypes.data)
        ioctl(self.fd, kvm.KVM_GET_DIRTY_LOG, log)
        if not bitmap.any():
            return np.empty(0, dtype=np.int64)
        clear = kvm.kvm_clear_dirty_log(slot=slot.index, num_pages=block.n_pages, first_page=0,
                                        dirty_bitmap=bitmap.ctypes.data)
        ioctl(self.fd, kvm.KVM_CLEAR_DIRTY_LOG, clear)
        bits = np.unpackbits(bitmap.view(np.uint8), bitorder="little")
        return np.flatnonzero(bits[:block.n_pages])

    def dirty_bits(self, block: RamBlock) -> np.ndarray:
        """A peek at the log: one bool per page of `block`, True = written since
        its last :meth:`dirty_pages` (GET_DIRTY_LOG only reads, in manual-protect
        mode; nothing is re-armed).  Raises KvmError, ConfigError."""
        slot = self._slot(block)
        bitmap = np.zeros_like(slot.bitmap)
        ioctl(self.fd, kvm.KVM_GET_DIRTY_LOG,
              kvm.kvm_dirty_log(slot=slot.index, dirty_bitmap=bitmap.ctypes.data))
        return np.unpackbits(bitmap.view(np.uint8), bitorder="little")[:block.n_pages].view(bool)

    # ------------------------------------------------------------------- vCPUs

    def create_vcpu_fd(self, index: int) -> tuple[int, mmap.mmap]:
        """KVM_CREATE_VCPU and map its kvm_run; the caller owns both (close the
        mmap first).  Raises KvmError."""
        fd = ioctl(self.fd, kvm.KVM_CREATE_VCPU, index)
        try:
            run = mmap.mmap(fd, self.vcpu_mmap_size, mmap.MAP_SHARED,
                            mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            os.close(fd)
            raise KvmError(f"cannot map kvm_run of vCPU {index}: {exc.strerror}", exc.errno) from exc
        return fd, run

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Destroy the VM and drop the RAM exports (idempotent).  Close vCPUs first."""
        for fd in (self.fd, self.kvm_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.kvm_fd = -1
        for slot in self._slots:
            slot.export = None

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
