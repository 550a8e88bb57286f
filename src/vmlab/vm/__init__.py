"""The hypervisor layer: choosing the accelerator, owning QEMU processes, driving them over QMP.

    accel.py    choose_accel(): KVM only if it really runs guest code fast, else TCG (cached)
    process.py  spawn()/kill_group(): own process group + parent-death signal, no orphans
    qemu.py     VmConfig/NicConfig, build_argv(), QemuVm (asyncio, QMP)
"""
from .accel import AccelChoice, choose_accel, qemu_binary
from .qemu import NicConfig, QemuVm, VmConfig, VmState, build_argv

__all__ = ["QemuVm", "VmConfig", "NicConfig", "VmState", "build_argv",
           "choose_accel", "AccelChoice", "qemu_binary"]
