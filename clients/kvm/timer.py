"""A periodic POSIX timer that signals one thread: the throttle's time slice.

A guest that never exits stays inside ``KVM_RUN`` for as long as it likes; to
hold a throttled vCPU out for a share of the time, its run loop must regain
control every slice.  ``timer_create`` with ``SIGEV_THREAD_ID`` sends the kick
signal to the vCPU thread alone every `interval` seconds (KVM_RUN returns
EINTR), and only while the vCPU is throttled.  No thread is started: the
kernel delivers the signal.  glibc (>= 2.34 has the timer calls in libc).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from clients.kvm.ioctl import KvmError

__all__ = ["ThreadTimer"]

_CLOCK_MONOTONIC = 1
_SIGEV_THREAD_ID = 4


class _Sigevent(ctypes.Structure):
    # struct sigevent (x86-64, 64 bytes): value, signo, notify, then the union
    # whose first int is the target thread's id for SIGEV_THREAD_ID.
    _fields_ = [("sigev_value", ctypes.c_void_p), ("sigev_signo", ctypes.c_int),
                ("sigev_notify", ctypes.c_int), ("tid", ctypes.c_int),
                ("_pad", ctypes.c_int * 11)]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.timer_create.argtypes = [ctypes.c_int, ctypes.POINTER(_Sigevent), ctypes.POINTER(ctypes.c_void_p)]
_libc.timer_settime.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(_Itimerspec),
                                ctypes.c_void_p]
_libc.timer_delete.argtypes = [ctypes.c_void_p]


def _timespec(seconds: float) -> _Timespec:
    ns = max(1, round(seconds * 1e9))
    return _Timespec(ns // 1_000_000_000, ns % 1_000_000_000)


class ThreadTimer:
    """Send `signo` to thread `tid` (a native id) every `interval` seconds until
    :meth:`close`.  KvmError when the kernel refuses the timer."""

    def __init__(self, tid: int, signo: int, interval: float) -> None:
        event = _Sigevent(sigev_signo=signo, sigev_notify=_SIGEV_THREAD_ID, tid=tid)
        self._id = ctypes.c_void_p()
        if _libc.timer_create(_CLOCK_MONOTONIC, ctypes.byref(event), ctypes.byref(self._id)) != 0:
            errno = ctypes.get_errno()
            raise KvmError(f"timer_create for thread {tid}: {os.strerror(errno)}", errno)
        self._armed = True
        period = _timespec(interval)
        spec = _Itimerspec(period, period)
        if _libc.timer_settime(self._id, 0, ctypes.byref(spec), None) != 0:
            errno = ctypes.get_errno()
            self.close()
            raise KvmError(f"timer_settime: {os.strerror(errno)}", errno)

    def close(self) -> None:
        """Delete the timer (idempotent); no signal comes after this returns."""
        if self._armed:
            self._armed = False
            _libc.timer_delete(self._id)
