"""The KVM ABI for x86-64: ioctl numbers, ctypes structures, kvm_run offsets.

Everything here mirrors ``<linux/kvm.h>``; the sizes and numbers are that header's
for x86-64 (checked at import and in
``tests/unit/test_kvm_abi.py``).  The only function that talks to the kernel
is :func:`ioctl`, which turns ``OSError`` into :class:`KvmError` naming the
request, so no bare ``OSError`` leaves this package::

    ioctl(fd, KVM_GET_REGS, regs)      # regs: a ctypes structure, filled in place
    ioctl(fd, KVM_CREATE_VCPU, 0)      # an int argument, passed as unsigned long
    ioctl(fd, KVM_RUN, 0, eintr_ok=True) == -1   # interrupted (signal, immediate_exit)

It uses libc's ``ioctl`` through ctypes (not ``fcntl.ioctl``, whose integer
argument is a C int): ctypes releases the GIL for the call, so other threads
run while a vCPU sits in ``KVM_RUN``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from typing import Any

from engine.errors import ConfigError, MigrationError

__all__ = ["KvmError", "ioctl", "kvm_open"]


class KvmError(MigrationError):
    """A KVM ioctl failed, or the guest stopped in a way the VMM cannot go on from.

    ``errno`` is the ioctl's errno (None when the error is not a failed call).
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class UnknownPortError(KvmError):
    """The guest accessed an I/O port no device of the VMM serves."""


class GuestStoppedError(KvmError):
    """The guest shut down, failed VM entry or hit an internal error of KVM."""


# ---------------------------------------------------------------- ioctl numbers

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, nr, size)


def _iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


# ------------------------------------------------------------------ structures
# Field names and order as in <linux/kvm.h> (x86).  All little-endian, natural
# alignment, which ctypes reproduces.

class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("guest_phys_addr", ctypes.c_uint64), ("memory_size", ctypes.c_uint64),
                ("userspace_addr", ctypes.c_uint64)]


class kvm_dirty_log(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("padding1", ctypes.c_uint32),
                ("dirty_bitmap", ctypes.c_uint64)]


class kvm_clear_dirty_log(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("num_pages", ctypes.c_uint32),
                ("first_page", ctypes.c_uint64), ("dirty_bitmap", ctypes.c_uint64)]


class kvm_enable_cap(ctypes.Structure):
    _fields_ = [("cap", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("args", ctypes.c_uint64 * 4), ("pad", ctypes.c_uint8 * 64)]


_REG_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
              "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")


class kvm_regs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in _REG_NAMES]


class kvm_segment(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint32),
                ("selector", ctypes.c_uint16), ("type", ctypes.c_uint8),
                ("present", ctypes.c_uint8), ("dpl", ctypes.c_uint8), ("db", ctypes.c_uint8),
                ("s", ctypes.c_uint8), ("l", ctypes.c_uint8), ("g", ctypes.c_uint8),
                ("avl", ctypes.c_uint8), ("unusable", ctypes.c_uint8),
                ("padding", ctypes.c_uint8)]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16),
                ("padding", ctypes.c_uint16 * 3)]


SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


class kvm_sregs(ctypes.Structure):
    _fields_ = ([(name, kvm_segment) for name in SEGMENT_NAMES]
                + [("gdt", kvm_dtable), ("idt", kvm_dtable),
                   ("cr0", ctypes.c_uint64), ("cr2", ctypes.c_uint64), ("cr3", ctypes.c_uint64),
                   ("cr4", ctypes.c_uint64), ("cr8", ctypes.c_uint64), ("efer", ctypes.c_uint64),
                   ("apic_base", ctypes.c_uint64), ("interrupt_bitmap", ctypes.c_uint64 * 4)])


class kvm_fpu(ctypes.Structure):
    _fields_ = [("fpr", ctypes.c_uint8 * 128), ("fcw", ctypes.c_uint16),
                ("fsw", ctypes.c_uint16), ("ftwx", ctypes.c_uint8), ("pad1", ctypes.c_uint8),
                ("last_opcode", ctypes.c_uint16), ("last_ip", ctypes.c_uint64),
                ("last_dp", ctypes.c_uint64), ("xmm", ctypes.c_uint8 * 256),
                ("mxcsr", ctypes.c_uint32), ("pad2", ctypes.c_uint32)]


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", ctypes.c_uint32), ("reserved", ctypes.c_uint32),
                ("data", ctypes.c_uint64)]


class kvm_msrs(ctypes.Structure):
    """Header only; the entries follow it (see :func:`msrs_buffer`)."""

    _fields_ = [("nmsrs", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class kvm_msr_list(ctypes.Structure):
    """Header only; ``nmsrs`` u32 indices follow it."""

    _fields_ = [("nmsrs", ctypes.c_uint32)]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [("function", ctypes.c_uint32), ("index", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("eax", ctypes.c_uint32), ("ebx", ctypes.c_uint32),
                ("ecx", ctypes.c_uint32), ("edx", ctypes.c_uint32),
                ("padding", ctypes.c_uint32 * 3)]


class kvm_cpuid2(ctypes.Structure):
    """Header only; ``nent`` entries follow it (see :func:`cpuid_buffer`)."""

    _fields_ = [("nent", ctypes.c_uint32), ("padding", ctypes.c_uint32)]


class kvm_mp_state(ctypes.Structure):
    _fields_ = [("mp_state", ctypes.c_uint32)]


class kvm_vcpu_events(ctypes.Structure):
    # Kept as the kernel's bytes: flags (offset 20) says which parts are valid,
    # and the VMM hands back exactly what it read.
    _fields_ = [("exception", ctypes.c_uint8 * 8), ("interrupt", ctypes.c_uint8 * 4),
                ("nmi", ctypes.c_uint8 * 4), ("sipi_vector", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("smi", ctypes.c_uint8 * 4),
                ("triple_fault", ctypes.c_uint8 * 27), ("exception_has_payload", ctypes.c_uint8),
                ("exception_payload", ctypes.c_uint64)]


class kvm_debugregs(ctypes.Structure):
    _fields_ = [("db", ctypes.c_uint64 * 4), ("dr6", ctypes.c_uint64), ("dr7", ctypes.c_uint64),
                ("flags", ctypes.c_uint64), ("reserved", ctypes.c_uint64 * 9)]


class kvm_xsave(ctypes.Structure):
    """The 4 KiB legacy XSAVE area (KVM_GET_XSAVE2 may need a larger buffer)."""

    _fields_ = [("region", ctypes.c_uint32 * 1024)]


class kvm_xcr(ctypes.Structure):
    _fields_ = [("xcr", ctypes.c_uint32), ("reserved", ctypes.c_uint32),
                ("value", ctypes.c_uint64)]


class kvm_xcrs(ctypes.Structure):
    _fields_ = [("nr_xcrs", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("xcrs", kvm_xcr * 16), ("padding", ctypes.c_uint64 * 16)]


def msrs_buffer(n: int) -> ctypes.Array[ctypes.c_uint8]:
    """A zeroed buffer for a kvm_msrs header and `n` kvm_msr_entry."""
    return (ctypes.c_uint8 * (ctypes.sizeof(kvm_msrs) + n * ctypes.sizeof(kvm_msr_entry)))()


def cpuid_buffer(n: int) -> ctypes.Array[ctypes.c_uint8]:
    """A zeroed buffer for a kvm_cpuid2 header and `n` kvm_cpuid_entry2."""
    return (ctypes.c_uint8 * (ctypes.sizeof(kvm_cpuid2) + n * ctypes.sizeof(kvm_cpuid_entry2)))()


#: Sizes from kvm.md; a mismatch means this module is wrong for this ABI.
EXPECTED_SIZES: dict[type[ctypes.Structure], int] = {
    kvm_userspace_memory_region: 32, kvm_dirty_log: 16, kvm_clear_dirty_log: 24,
    kvm_enable_cap: 104, kvm_regs: 144, kvm_segment: 24, kvm_sregs: 312, kvm_fpu: 416,
    kvm_msrs: 8, kvm_msr_entry: 16, kvm_cpuid2: 8, kvm_cpuid_entry2: 40,
    kvm_vcpu_events: 64, kvm_debugregs: 128, kvm_xsave: 4096, kvm_xcrs: 392, kvm_mp_state: 4,
}
for _struct, _size in EXPECTED_SIZES.items():
    if ctypes.sizeof(_struct) != _size:  # pragma: no cover - a broken build of this module
        raise ImportError(f"{_struct.__name__} is {ctypes.sizeof(_struct)} bytes, not {_size}")
if kvm_sregs.cr0.offset != 224 or kvm_sregs.efer.offset != 264 or kvm_sregs.gdt.offset != 192:
    raise ImportError("kvm_sregs layout differs from <linux/kvm.h>")  # pragma: no cover

# ------------------------------------------------------------------- requests

KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, ctypes.sizeof(kvm_msr_list))
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, ctypes.sizeof(kvm_cpuid2))
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, ctypes.sizeof(kvm_dirty_log))
KVM_SET_USER_MEMORY_REGION = _iow(0x46, ctypes.sizeof(kvm_userspace_memory_region))
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, 8)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, ctypes.sizeof(kvm_regs))
KVM_SET_REGS = _iow(0x82, ctypes.sizeof(kvm_regs))
KVM_GET_SREGS = _ior(0x83, ctypes.sizeof(kvm_sregs))
KVM_SET_SREGS = _iow(0x84, ctypes.sizeof(kvm_sregs))
KVM_GET_MSRS = _iowr(0x88, ctypes.sizeof(kvm_msrs))
KVM_SET_MSRS = _iow(0x89, ctypes.sizeof(kvm_msrs))
KVM_GET_FPU = _ior(0x8C, ctypes.sizeof(kvm_fpu))
KVM_SET_FPU = _iow(0x8D, ctypes.sizeof(kvm_fpu))
KVM_SET_CPUID2 = _iow(0x90, ctypes.sizeof(kvm_cpuid2))
KVM_GET_MP_STATE = _ior(0x98, ctypes.sizeof(kvm_mp_state))
KVM_SET_MP_STATE = _iow(0x99, ctypes.sizeof(kvm_mp_state))
KVM_GET_VCPU_EVENTS = _ior(0x9F, ctypes.sizeof(kvm_vcpu_events))
KVM_SET_VCPU_EVENTS = _iow(0xA0, ctypes.sizeof(kvm_vcpu_events))
KVM_GET_DEBUGREGS = _ior(0xA1, ctypes.sizeof(kvm_debugregs))
KVM_SET_DEBUGREGS = _iow(0xA2, ctypes.sizeof(kvm_debugregs))
KVM_ENABLE_CAP = _iow(0xA3, ctypes.sizeof(kvm_enable_cap))
KVM_GET_XSAVE = _ior(0xA4, ctypes.sizeof(kvm_xsave))
KVM_SET_XSAVE = _iow(0xA5, ctypes.sizeof(kvm_xsave))
KVM_GET_XCRS = _ior(0xA6, ctypes.sizeof(kvm_xcrs))
KVM_SET_XCRS = _iow(0xA7, ctypes.sizeof(kvm_xcrs))
KVM_CLEAR_DIRTY_LOG = _iowr(0xC0, ctypes.sizeof(kvm_clear_dirty_log))
KVM_GET_XSAVE2 = _ior(0xCF, ctypes.sizeof(kvm_xsave))

_REQUEST_NAMES = {value: name for name, value in globals().items()
                  if name.startswith("KVM_") and isinstance(value, int)}

# ---------------------------------------------------------------- capabilities

KVM_API_VERSION = 12
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MP_STATE = 14
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_DEBUGREGS = 50
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_XSAVE2 = 208
KVM_MEM_LOG_DIRTY_PAGES = 1
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1

# ------------------------------------------------------------------- kvm_run
# Offsets into the vCPU's mmap (struct kvm_run, 2352 bytes; the page after it
# holds the data of I/O exits).

KVM_RUN_SIZE = 2352
RUN_IMMEDIATE_EXIT = 1      # u8
RUN_EXIT_REASON = 8         # u32
RUN_EXIT = 32               # the exit union
#: KVM_EXIT_IO at RUN_EXIT: direction u8 (0 in, 1 out), size u8, port u16, count u32,
#: data_offset u64 (from the start of the mmap).
RUN_IO = struct.Struct("<BBHIQ")
#: KVM_EXIT_MMIO at RUN_EXIT: phys_addr u64, data[8], len u32, is_write u8.
RUN_MMIO = struct.Struct("<Q8sIB")
#: KVM_EXIT_FAIL_ENTRY: hardware_entry_failure_reason u64, cpu u32.
RUN_FAIL_ENTRY = struct.Struct("<QI")
#: KVM_EXIT_INTERNAL_ERROR: suberror u32, ndata u32, data u64[16].
RUN_INTERNAL = struct.Struct("<II16Q")
KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT = 0, 1

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
EXIT_NAMES = {value: name for name, value in globals().items()
              if name.startswith("KVM_EXIT_") and not name.startswith("KVM_EXIT_IO_")}

KVM_MP_STATE_RUNNABLE = 0

# --------------------------------------------------------------------- calls

_libc = ctypes.CDLL(None, use_errno=True)
_libc_ioctl = _libc.ioctl
_libc_ioctl.restype = ctypes.c_int
_libc_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]

Arg = int | ctypes.Structure | ctypes.Array[Any]


def request_name(request: int) -> str:
    """``"KVM_GET_REGS"`` for its number; hex for an unknown one."""
    return _REQUEST_NAMES.get(request, f"ioctl {request:#x}")


def ioctl(fd: int, request: int, arg: Arg = 0, *, eintr_ok: bool = False) -> int:
    """Call ``ioctl(fd, request, arg)``; answer its (non-negative) result.

    `arg` is an int, passed by value, or a ctypes object, passed by address and
    filled in place.  Raises KvmError (with ``errno``) naming the request; with
    `eintr_ok` an interrupted call answers -1 instead (KVM_RUN after a kick).
    """
    pointer = arg if isinstance(arg, int) else ctypes.addressof(arg)
    result: int = _libc_ioctl(fd, request, pointer)
    if result >= 0:
        return result
    code = ctypes.get_errno()
    if code == errno.EINTR and eintr_ok:
        return -1
    raise KvmError(f"{request_name(request)} failed: {os.strerror(code)} (errno {code})", code)


def kvm_open(path: str = "/dev/kvm") -> int:
    """Open `path` read-write, close-on-exec; check the API version.

    Raises ConfigError when the device is missing or not accessible, KvmError
    when it speaks another API version.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise ConfigError(f"no {path}: this machine offers no KVM") from exc
    except PermissionError as exc:
        raise ConfigError(f"{path} is not accessible to this user ({exc.strerror})") from exc
    except OSError as exc:
        raise ConfigError(f"cannot open {path}: {exc.strerror}") from exc
    try:
        version = ioctl(fd, KVM_GET_API_VERSION)
        if version != KVM_API_VERSION:
            raise KvmError(f"{path} speaks KVM API {version}, this VMM needs {KVM_API_VERSION}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def kvm_unavailable_reason(path: str = "/dev/kvm") -> str | None:
    """None if `path` opens as a KVM device here, else why not (for test skips)."""
    try:
        os.close(kvm_open(path))
    except MigrationError as exc:
        return str(exc)
    return None
