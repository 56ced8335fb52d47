"""Two hosts on one machine: two network namespaces joined by a veth pair.

:func:`two_hosts` creates namespaces ``mfd<pid><n>s`` and ``mfd<pid><n>d``, a
veth pair between them with a /30 of 10.243.0.0/16 (addresses only inside the
namespaces it made), a ``tc qdisc ... tbf`` on both ends when a rate is given,
and deletes it all afterwards (deleting a namespace deletes its end of the
pair).  It needs root and ``ip``/``tc``: :func:`unavailable` says why not.

Run a command on a "host" with ``ip netns exec NAME ...`` (children inherit
the namespace, so channel processes do too), or enter one in a process of
your own with :func:`enter` (``setns``; Python 3.11 has no ``os.setns``).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

CLONE_NEWNET = 0x40000000
_count = itertools.count()


@dataclass(frozen=True)
class Hosts:
    source: str        # namespace names
    destination: str
    source_ip: str
    destination_ip: str

    def run(self, host: str, *argv: str) -> list[str]:
        """The argv that runs `argv` on `host` (a namespace name)."""
        return ["ip", "netns", "exec", host, *argv]


def unavailable() -> str:
    """Why two namespaces cannot be made here ("" if they can)."""
    if os.geteuid() != 0:
        return "needs root (ip netns)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the {tool} command is not installed"
    probe = f"mfdprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


@contextlib.contextmanager
def two_hosts(rate: str | None = None, burst: str = "512kb", latency: str = "50ms") -> Iterator[Hosts]:
    """Two namespaces joined by a veth pair, the link limited to `rate` (tc's
    syntax, e.g. "1gbit") in each direction when given."""
    n = next(_count)
    tag = f"mfd{os.getpid() % 100000}{n}"
    src, dst = f"{tag}s", f"{tag}d"
    net = (os.getpid() * 4 + n * 4) % 65536
    src_ip = f"10.243.{net // 256}.{net % 256 + 1}"
    dst_ip = f"10.243.{net // 256}.{net % 256 + 2}"
    made: list[str] = []
    try:
        for ns in (src, dst):
            _ip("netns", "add", ns)
            made.append(ns)
        _ip("link", "add", f"{tag}a", "netns", src, "type", "veth", "peer", "name", f"{tag}b",
            "netns", dst)
        for ns, dev, ip in ((src, f"{tag}a", src_ip), (dst, f"{tag}b", dst_ip)):
            _ip("-n", ns, "addr", "add", f"{ip}/30", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            if rate is not None:
                subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root",
                                "tbf", "rate", rate, "burst", burst, "latency", latency],
                               check=True, capture_output=True, text=True, timeout=10)
        yield Hosts(src, dst, src_ip, dst_ip)
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {path}")
    finally:
        os.close(fd)


def enter(host: str) -> None:
    """Move the calling thread (and the processes it starts) into namespace `host`."""
    _setns(f"/run/netns/{host}")


@contextlib.contextmanager
def inside(host: str) -> Iterator[None]:
    """The calling thread in namespace `host` for the block, then back where it was.
    (Sockets it opens meanwhile stay in `host`, wherever they are used.)"""
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        enter(host)
        try:
            yield
        finally:
            _setns(f"/proc/self/fd/{back}")
    finally:
        os.close(back)
