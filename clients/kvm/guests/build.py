"""Assemble the guest programs: ``python -m clients.kvm.guests.build``.

For each ``NAME.S`` in this folder: GNU ``as`` (32-bit for the boot sector,
64-bit for the user-mode program), then ``objcopy -O binary -j .text`` to
``NAME.bin`` (exactly 512 bytes).  No linker: the sources compute their own
absolute addresses.  Both tools' output is deterministic, so the committed
``.bin`` files must equal a rebuild (tests/unit/test_kvm_guests.py checks it).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
#: program name -> the assembler's mode flag.
PROGRAMS = {"boot": "--32", "user64": "--64"}
SIZE = 512


def tools_missing() -> list[str]:
    """The tools of the build this machine lacks (``as``, ``objcopy``)."""
    return [tool for tool in ("as", "objcopy") if shutil.which(tool) is None]


def assemble(name: str) -> bytes:
    """The bytes of program `name` built from its source now.

    Raises RuntimeError when a tool fails or the result is not SIZE bytes.
    """
    source = HERE / f"{name}.S"
    with tempfile.TemporaryDirectory(prefix="mfd-guest-") as tmp:
        obj, binary = Path(tmp, f"{name}.o"), Path(tmp, f"{name}.bin")
        for command in (["as", PROGRAMS[name], "-o", str(obj), str(source)],
                        ["objcopy", "-O", "binary", "-j", ".text", str(obj), str(binary)]):
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}")
        data = binary.read_bytes()
    if len(data) != SIZE:
        raise RuntimeError(f"{name}.S assembled to {len(data)} bytes, not {SIZE}")
    return data


def main() -> int:
    missing = tools_missing()
    if missing:
        print(f"cannot build the guests: {', '.join(missing)} not found", file=sys.stderr)
        return 1
    for name in PROGRAMS:
        (HERE / f"{name}.bin").write_bytes(assemble(name))
        print(f"{name}.bin: {SIZE} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
