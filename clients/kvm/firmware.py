"""What firmware does before a guest's first instruction: memory set-up and CPU entry state.

Two hand-overs:

* :func:`enter_boot_sector` — the PC BIOS one: a 512-byte sector with the
  0x55AA signature at 0x7c00, real mode, CS:IP = 0000:7c00, DL = 0x80 (the
  boot drive), from the vCPU's reset state with every segment's base and
  selector set to 0.  There is no BIOS behind it: a sector that calls ``int``
  services will not work.
* :func:`enter_user64` — 64-bit mode at CPL3 (natively run by kvm_pvm): the
  VMM builds identity-mapped page tables (2 MiB pages, user-accessible) over
  the RAM's first 4 GiB, a GDT and a TSS, and sets sregs and regs directly.

Low guest memory used (both programs loop above :data:`LOOP_MIN`)::

    0x1000 PML4 · 0x2000 PDPT · 0x3000–0x6fff page directories (4 GiB) ·
    0x7000 GDT · 0x7080 TSS and I/O bitmap · stack below 0x7c00 · 0x7c00 the program (512 bytes)

Writes go through :meth:`Vm.write`, which marks them dirty in the RAM's own
DirtyMap (the KVM log never sees the VMM's writes).
"""

from __future__ import annotations

import struct

from clients.kvm.ioctl import kvm_regs, kvm_segment
from clients.kvm.vcpu import Vcpu
from clients.kvm.vm import Vm
from engine.errors import ConfigError

__all__ = ["LOAD_ADDRESS", "LOOP_MIN", "enter_boot_sector", "enter_user64"]

LOAD_ADDRESS = 0x7C00
SECTOR_SIZE = 512
LOOP_MIN = 0x8000       # the first page above the program
PML4, PDPT, PD = 0x1000, 0x2000, 0x3000
GDT, TSS = 0x7000, 0x7080
IO_BITMAP_OFFSET = 0x68           # the I/O permission bitmap right after the 64-bit TSS
IO_BITMAP_PORTS = 0x400           # ports it covers; any above is denied by the limit
TSS_LIMIT = IO_BITMAP_OFFSET + IO_BITMAP_PORTS // 8  # incl. the 0xff byte the CPU reads past
_HUGE = 2 << 20
_PTE_P_RW_US = 0x7
_PDE_PS = 0x80

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_AM, CR0_PG = (
    1, 2, 0x10, 0x20, 1 << 16, 1 << 18, 1 << 31)
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 0x20, 0x200, 0x400
EFER_LME, EFER_LMA = 0x100, 0x400
RFLAGS_RESERVED = 0x2

_GDT_ENTRIES = (
    0,
    0x00AF9A000000FFFF,  # 0x08 kernel code, 64-bit (unused; for completeness)
    0x00CF92000000FFFF,  # 0x10 kernel data
    0x00AFFA000000FFFF,  # 0x18 user code, 64-bit, DPL 3
    0x00CFF2000000FFFF,  # 0x20 user data, DPL 3
)
_REG_FIELDS = [field[0] for field in kvm_regs._fields_]
USER_CS, USER_DS, TSS_SELECTOR = 0x18 | 3, 0x20 | 3, 0x28


def enter_boot_sector(vm: Vm, vcpu: Vcpu, sector: bytes) -> None:
    """Load `sector` at 0x7c00 and set the vCPU as a PC BIOS leaves it.
    ConfigError unless it is 512 bytes ending in 0x55 0xAA."""
    if len(sector) != SECTOR_SIZE or sector[510:] != b"\x55\xaa":
        raise ConfigError(f"a boot sector is {SECTOR_SIZE} bytes ending in 55 aa; "
                          f"got {len(sector)} bytes ending in {sector[-2:].hex(' ')}")
    vm.write(LOAD_ADDRESS, sector)
    sregs = vcpu.get_sregs()
    for name in ("cs", "ds", "es", "fs", "gs", "ss"):
        segment = getattr(sregs, name)
        segment.base = 0
        segment.selector = 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    for field in _REG_FIELDS:
        setattr(regs, field, 0)
    regs.rip, regs.rflags, regs.rdx, regs.rsp = LOAD_ADDRESS, RFLAGS_RESERVED, 0x80, LOAD_ADDRESS
    vcpu.set_regs(regs)


def _page_tables(ram_size: int) -> list[tuple[int, bytes]]:
    """(address, bytes) of an identity map of min(ram_size, 4 GiB), 2 MiB pages."""
    huge_pages = -(-min(ram_size, 4 << 30) // _HUGE)
    directories = -(-huge_pages // 512)
    pde = [i * _HUGE | _PDE_PS | _PTE_P_RW_US for i in range(huge_pages)]
    pdpt = [PD + i * 0x1000 | _PTE_P_RW_US for i in range(directories)]
    return [(PML4, struct.pack("<Q", PDPT | _PTE_P_RW_US)),
            (PDPT, struct.pack(f"<{len(pdpt)}Q", *pdpt)),
            (PD, struct.pack(f"<{len(pde)}Q", *pde))]


def _gdt() -> bytes:
    low = (TSS_LIMIT & 0xFFFF) | (TSS & 0xFFFFFF) << 16 | 0x89 << 40 | (TSS >> 24 & 0xFF) << 56
    return struct.pack("<7Q", *_GDT_ENTRIES, low, TSS >> 32)


def _tss(ports: range) -> bytes:
    """A 64-bit TSS whose I/O bitmap lets CPL3 code use `ports` and nothing else.
    (kvm_pvm ignores IOPL for CPL3 code but honours this bitmap.)"""
    tss = bytearray(TSS_LIMIT + 1)
    struct.pack_into("<H", tss, 0x66, IO_BITMAP_OFFSET)
    tss[IO_BITMAP_OFFSET:] = b"\xff" * (IO_BITMAP_PORTS // 8 + 1)
    for port in ports:
        tss[IO_BITMAP_OFFSET + port // 8] &= ~(1 << port % 8) & 0xFF
    return bytes(tss)


def _segment(selector: int, type_: int, *, code: bool = False, system: bool = False,
             base: int = 0, limit: int = 0xFFFFFFFF) -> kvm_segment:
    return kvm_segment(base=base, limit=limit, selector=selector, type=type_, present=1,
                       dpl=0 if system else 3, db=0 if code or system else 1,
                       s=0 if system else 1, l=1 if code else 0,
                       g=0 if system else 1, avl=0, unusable=0)


def enter_user64(vm: Vm, vcpu: Vcpu, program: bytes, ports: range = range(0x3F8, 0x400)) -> None:
    """Load `program` at 0x7c00, build page tables, GDT and TSS, and set the vCPU
    to start it in 64-bit mode at CPL3, its TSS letting it use `ports` (COM1)
    and no other, and no IDT (any exception is a triple fault:
    KVM_EXIT_SHUTDOWN).  ConfigError when the program is over 512 bytes or a
    port is above 0x3ff."""
    if len(program) > SECTOR_SIZE:
        raise ConfigError(f"a user64 program is at most {SECTOR_SIZE} bytes, not {len(program)}")
    if ports and (ports.start < 0 or ports.stop > IO_BITMAP_PORTS):
        raise ConfigError(f"user64 guests may use ports below {IO_BITMAP_PORTS:#x} only")
    for address, data in _page_tables(vm.ram.size):
        vm.write(address, data)
    vm.write(GDT, _gdt())
    vm.write(TSS, _tss(ports))
    vm.write(LOAD_ADDRESS, program)
    sregs = vcpu.get_sregs()
    sregs.cs = _segment(USER_CS, 0xB, code=True)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, _segment(USER_DS, 0x3))
    sregs.tr = _segment(TSS_SELECTOR, 0xB, system=True, base=TSS, limit=TSS_LIMIT)
    sregs.ldt = kvm_segment(type=2, unusable=1)
    sregs.gdt.base, sregs.gdt.limit = GDT, 7 * 8 - 1
    sregs.idt.base, sregs.idt.limit = 0, 0
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG
    sregs.cr3 = PML4
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    sregs.efer = EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    for field in _REG_FIELDS:
        setattr(regs, field, 0)
    regs.rip, regs.rsp, regs.rflags = LOAD_ADDRESS, LOAD_ADDRESS, RFLAGS_RESERVED
    vcpu.set_regs(regs)
