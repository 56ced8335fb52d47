"""The KVM ABI layer (clients/kvm/ioctl.py) against <linux/kvm.h>'s x86-64 values: pure, no /dev/kvm."""

from __future__ import annotations

import ctypes

import pytest

from clients.kvm import ioctl as kvm
from clients.kvm.ioctl import KvmError
from engine.errors import ConfigError, MigrationError

# (name in this module, number from kvm.md)
KVM_MD_NUMBERS = [
    ("KVM_GET_API_VERSION", 0xAE00), ("KVM_CREATE_VM", 0xAE01),
    ("KVM_GET_MSR_INDEX_LIST", 0xC004AE02), ("KVM_CHECK_EXTENSION", 0xAE03),
    ("KVM_GET_VCPU_MMAP_SIZE", 0xAE04), ("KVM_GET_SUPPORTED_CPUID", 0xC008AE05),
    ("KVM_CREATE_VCPU", 0xAE41), ("KVM_GET_DIRTY_LOG", 0x4010AE42),
    ("KVM_SET_USER_MEMORY_REGION", 0x4020AE46), ("KVM_SET_TSS_ADDR", 0xAE47),
    ("KVM_SET_IDENTITY_MAP_ADDR", 0x4008AE48), ("KVM_RUN", 0xAE80),
    ("KVM_GET_REGS", 0x8090AE81), ("KVM_SET_REGS", 0x4090AE82),
    ("KVM_GET_SREGS", 0x8138AE83), ("KVM_SET_SREGS", 0x4138AE84),
    ("KVM_GET_MSRS", 0xC008AE88), ("KVM_SET_MSRS", 0x4008AE89),
    ("KVM_GET_FPU", 0x81A0AE8C), ("KVM_SET_FPU", 0x41A0AE8D), ("KVM_SET_CPUID2", 0x4008AE90),
    ("KVM_GET_MP_STATE", 0x8004AE98), ("KVM_SET_MP_STATE", 0x4004AE99),
    ("KVM_GET_VCPU_EVENTS", 0x8040AE9F), ("KVM_SET_VCPU_EVENTS", 0x4040AEA0),
    ("KVM_GET_DEBUGREGS", 0x8080AEA1), ("KVM_SET_DEBUGREGS", 0x4080AEA2),
    ("KVM_ENABLE_CAP", 0x4068AEA3), ("KVM_GET_XSAVE", 0x9000AEA4), ("KVM_SET_XSAVE", 0x5000AEA5),
    ("KVM_GET_XCRS", 0x8188AEA6), ("KVM_SET_XCRS", 0x4188AEA7),
    ("KVM_CLEAR_DIRTY_LOG", 0xC018AEC0),
]

KVM_MD_SIZES = [
    (kvm.kvm_userspace_memory_region, 32), (kvm.kvm_dirty_log, 16), (kvm.kvm_clear_dirty_log, 24),
    (kvm.kvm_enable_cap, 104), (kvm.kvm_regs, 144), (kvm.kvm_segment, 24), (kvm.kvm_sregs, 312),
    (kvm.kvm_fpu, 416), (kvm.kvm_msrs, 8), (kvm.kvm_msr_entry, 16), (kvm.kvm_cpuid2, 8),
    (kvm.kvm_cpuid_entry2, 40), (kvm.kvm_vcpu_events, 64), (kvm.kvm_debugregs, 128),
    (kvm.kvm_xsave, 4096), (kvm.kvm_xcrs, 392),
]


@pytest.mark.parametrize(("name", "number"), KVM_MD_NUMBERS, ids=[n for n, _ in KVM_MD_NUMBERS])
def test_ioctl_numbers_match_kvm_md(name: str, number: int) -> None:
    assert getattr(kvm, name) == number, f"{name} = {getattr(kvm, name):#x}, kvm.md says {number:#x}"


@pytest.mark.parametrize(("struct", "size"), KVM_MD_SIZES, ids=[s.__name__ for s, _ in KVM_MD_SIZES])
def test_struct_sizes_match_kvm_md(struct: type[ctypes.Structure], size: int) -> None:
    assert ctypes.sizeof(struct) == size


def test_struct_field_offsets() -> None:
    assert kvm.kvm_sregs.gdt.offset == 192
    assert kvm.kvm_sregs.cr0.offset == 224
    assert kvm.kvm_sregs.efer.offset == 264
    assert kvm.kvm_regs.rip.offset == 128 and kvm.kvm_regs.rflags.offset == 136
    assert kvm.kvm_vcpu_events.flags.offset == 20
    assert kvm.kvm_vcpu_events.exception_payload.offset == 56
    assert kvm.kvm_segment.unusable.offset == 22
    assert kvm.kvm_xcrs.xcrs.offset == 8


def test_kvm_run_offsets_match_kvm_md() -> None:
    assert (kvm.RUN_IMMEDIATE_EXIT, kvm.RUN_EXIT_REASON, kvm.RUN_EXIT) == (1, 8, 32)
    assert kvm.RUN_IO.size == 16  # direction, size, port, count, data_offset: 32..48
    assert (kvm.KVM_EXIT_IO, kvm.KVM_EXIT_HLT, kvm.KVM_EXIT_SHUTDOWN, kvm.KVM_EXIT_FAIL_ENTRY,
            kvm.KVM_EXIT_INTR, kvm.KVM_EXIT_INTERNAL_ERROR) == (2, 5, 8, 9, 10, 17)
    assert kvm.KVM_RUN_SIZE == 2352
    assert kvm.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 == 168
    assert kvm.KVM_MEM_LOG_DIRTY_PAGES == 1


def test_buffers_have_header_and_entries() -> None:
    assert ctypes.sizeof(kvm.msrs_buffer(3)) == 8 + 3 * 16
    assert ctypes.sizeof(kvm.cpuid_buffer(2)) == 8 + 2 * 40


def test_failed_ioctl_is_a_kvm_error_naming_the_request() -> None:
    with pytest.raises(KvmError, match="KVM_GET_REGS failed: Bad file descriptor") as info:
        kvm.ioctl(-1, kvm.KVM_GET_REGS, kvm.kvm_regs())
    assert info.value.errno == 9
    assert isinstance(info.value, MigrationError)


def test_kvm_error_pickles() -> None:
    import pickle

    error = pickle.loads(pickle.dumps(KvmError("boom", 5)))
    assert isinstance(error, KvmError) and error.errno == 5 and str(error) == "boom"


def test_missing_device_is_a_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no .*: this machine offers no KVM"):
        kvm.kvm_open(str(tmp_path / "kvm"))
    assert "offers no KVM" in (kvm.kvm_unavailable_reason(str(tmp_path / "kvm")) or "")
