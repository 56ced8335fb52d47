"""Port-I/O devices of the minimal VMM: COM1, the 0x92 A20 gate, and the bus.

The vCPU's run loop hands every KVM_EXIT_IO to :meth:`PortBus.read` or
:meth:`PortBus.write`; a port no
device claims raises :class:`UnknownPortError` naming the port and direction,
which ends the run loop (a clear error, never a hang).  Devices are sans-IO:
they see port numbers and values, never KVM.

COM1 is a 16550 UART reduced to what a guest that only prints needs: writes to
THR are captured line by line with a wall-clock timestamp (a line ends at
``\\n`` or after :data:`MAX_LINE` characters), LSR always says "transmitter
empty", the other registers read back what was written.  Its register file is
its migratable state (:meth:`Serial.save_state`); the captured output stays
with the side that saw it.
"""

from __future__ import annotations

import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from clients.kvm.ioctl import KvmError, UnknownPortError
from engine.errors import DeviceStateError

__all__ = ["COM1", "A20Gate", "PortBus", "PortDevice", "Serial", "SerialLine"]

COM1 = 0x3F8
MAX_LINE = 256          # a guest that never prints '\n' still produces lines
MAX_LINES = 10_000      # kept lines (older ones are dropped, counted in `dropped`)

_LSR_THRE_TEMT = 0x60   # transmitter holding register empty, transmitter empty
_MSR_DCD_DSR_CTS = 0xB0


class PortDevice(Protocol):
    """A device on the port bus; `ports` is the range it claims."""

    ports: range

    def io_in(self, port: int, size: int) -> int:
        """The value the guest reads from `port` (`size` bytes: 1, 2 or 4)."""
        ...

    def io_out(self, port: int, size: int, value: int) -> None:
        """The guest wrote `value` to `port`."""
        ...


class PortBus:
    """Routes port accesses to devices; a port claimed twice is a KvmError at :meth:`add`."""

    def __init__(self, devices: list[PortDevice] | None = None) -> None:
        self._devices: dict[int, PortDevice] = {}
        for device in devices or []:
            self.add(device)

    def add(self, device: PortDevice) -> None:
        for port in device.ports:
            if port in self._devices:
                raise KvmError(f"port {port:#x} is claimed twice")
        for port in device.ports:
            self._devices[port] = device

    def read(self, port: int, size: int) -> int:
        """The value the guest reads from `port` (`size` bytes: 1, 2 or 4).
        UnknownPortError for a port no device claims."""
        return self._device(port, size, "read from").io_in(port, size) & ((1 << 8 * size) - 1)

    def write(self, port: int, size: int, value: int) -> None:
        """The guest wrote `value` (`size` bytes) to `port`.  UnknownPortError for
        a port no device claims."""
        self._device(port, size, "write to").io_out(port, size, value)

    def _device(self, port: int, size: int, direction: str) -> PortDevice:
        device = self._devices.get(port)
        if device is None:
            raise UnknownPortError(f"guest {direction} unknown I/O port {port:#x} "
                                   f"({size} byte{'s' if size > 1 else ''})")
        return device


@dataclass(frozen=True, slots=True)
class SerialLine:
    """One line of guest output: when it ended (``time.time()``) and its text."""

    time: float
    text: str


class Serial:
    """A 16550-like UART at `base` (COM1 by default) that captures output.

    Thread-safe: the vCPU thread writes, any thread reads.  `on_line` (optional)
    is called in the vCPU thread with each completed line.
    """

    # Register file, in save order: IER, LCR, MCR, SCR, DLL, DLM.
    _STATE = struct.Struct(">4sBBBBBB")
    _MAGIC = b"UART"

    def __init__(self, base: int = COM1, *,
                 on_line: Callable[[SerialLine], None] | None = None) -> None:
        self.ports = range(base, base + 8)
        self._base = base
        self._on_line = on_line
        self._lock = threading.Lock()
        self._lines: deque[SerialLine] = deque(maxlen=MAX_LINES)
        self._partial: list[str] = []
        self._counts: dict[str, int] = {}
        self.dropped = 0
        self.ier = self.lcr = self.mcr = self.scr = self.dll = self.dlm = 0

    # ------------------------------------------------------------ guest side

    def io_in(self, port: int, size: int) -> int:
        reg = port - self._base
        dlab = self.lcr & 0x80
        values = {0: self.dll if dlab else 0, 1: self.dlm if dlab else self.ier,
                  2: 0x01,  # IIR: no interrupt pending
                  3: self.lcr, 4: self.mcr, 5: _LSR_THRE_TEMT, 6: _MSR_DCD_DSR_CTS, 7: self.scr}
        return values[reg]

    def io_out(self, port: int, size: int, value: int) -> None:
        reg, value = port - self._base, value & 0xFF
        dlab = self.lcr & 0x80
        if reg == 0 and dlab:
            self.dll = value
        elif reg == 0:
            self._transmit(chr(value))
        elif reg == 1:
            if dlab:
                self.dlm = value
            else:
                self.ier = value & 0x0F
        elif reg == 3:
            self.lcr = value
        elif reg == 4:
            self.mcr = value & 0x1F
        elif reg == 7:
            self.scr = value
        # FCR (2) and the read-only LSR/MSR (5, 6): writes are ignored.

    def _transmit(self, char: str) -> None:
        line = None
        with self._lock:
            self._counts[char] = self._counts.get(char, 0) + 1
            if char == "\n":
                line = self._end_line_locked()
            elif char != "\r":
                self._partial.append(char)
                if len(self._partial) >= MAX_LINE:
                    line = self._end_line_locked()
        if line is not None and self._on_line is not None:
            self._on_line(line)

    def _end_line_locked(self) -> SerialLine:
        line = SerialLine(time.time(), "".join(self._partial))
        self._partial.clear()
        if len(self._lines) == self._lines.maxlen:
            self.dropped += 1
        self._lines.append(line)
        return line

    # ------------------------------------------------------------- VMM side

    def lines(self) -> list[SerialLine]:
        """The completed lines kept so far, oldest first."""
        with self._lock:
            return list(self._lines)

    def partial(self) -> str:
        """The characters of the line not yet ended."""
        with self._lock:
            return "".join(self._partial)

    def text(self) -> str:
        """Every kept line and the partial one, joined with newlines."""
        with self._lock:
            return "\n".join([line.text for line in self._lines] + ["".join(self._partial)])

    def count(self, char: str) -> int:
        """How many times the guest sent `char` (over all output, dropped lines too)."""
        with self._lock:
            return self._counts.get(char, 0)

    def save_state(self) -> bytes:
        """The register file (the captured output is not state)."""
        return self._STATE.pack(self._MAGIC, self.ier, self.lcr, self.mcr, self.scr,
                                self.dll, self.dlm)

    def load_state(self, data: bytes) -> None:
        """Restore what :meth:`save_state` made; DeviceStateError for other bytes."""
        if len(data) != self._STATE.size or data[:4] != self._MAGIC:
            raise DeviceStateError(f"not a UART state: {len(data)} bytes {bytes(data[:4])!r}")
        _, self.ier, self.lcr, self.mcr, self.scr, self.dll, self.dlm = self._STATE.unpack(data)


class A20Gate:
    """Port 0x92, "system control port A": bit 1 is the A20 gate.

    KVM never masks A20, so the bit is only remembered.  Bit 0 asks for a fast
    CPU reset, which this VMM does not do: KvmError.
    """

    ports = range(0x92, 0x93)

    def __init__(self) -> None:
        self.value = 0x02  # A20 enabled, as firmware leaves it

    def io_in(self, port: int, size: int) -> int:
        return self.value

    def io_out(self, port: int, size: int, value: int) -> None:
        if value & 0x01:
            raise KvmError("guest asked for a CPU reset through port 0x92; this VMM cannot reset")
        self.value = value & 0xFE
