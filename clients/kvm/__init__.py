"""A minimal VMM on /dev/kvm, written with the stdlib (ctypes, mmap, signal).

Layers, each importing only those below it::

    guest     KvmGuest: a machine with its vCPU pool around a migration; the checks after a move
    machine   KvmMachine: a VM + vCPU + devices + guest program; VcpuDevice (MigratableDevice);
              the engine's dirty source (KVM log + VMM marks) and throttle
    firmware  what a BIOS / loader does: boot sector hand-over, 64-bit user-mode entry
    vcpu      Vcpu: run loop (a WorkerPool job), pause/resume by kick, throttle, state save/load
    timer     a per-thread POSIX timer: the throttle's time slice
    vm        Vm: memory slots over a GuestRAM, the manual-protect dirty log
    devices   port I/O: COM1 (captured output), A20 gate, the port bus
    state     the saved-state record stream (sans-IO)
    ioctl     the KVM ABI: numbers, structs, kvm_run offsets, ioctl() -> KvmError
    guests/   our guest programs (.S sources, committed .bin) and their invariant

What KVM on these machines does: docs/architecture.md, "A real guest: the KVM VMM".
"""
