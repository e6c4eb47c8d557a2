"""A cffi binding to /dev/kvm in the spirit of rust-vmm's kvm-ioctls.

One class per file descriptor (``Kvm`` -> ``Vm`` -> ``Vcpu``), every wrapper
names its ioctl, every failure is a ``KvmError`` (an OSError with ``.ioctl``),
``Vcpu.run()`` returns the typed exits of ``kvmtest.exits``.

    with Kvm() as kvm, kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        mem = vm.set_user_memory_region(0, 0, 4 << 20)
        ...
        exit = vcpu.run(timeout=1.0)
"""

from ._ffi import ffi, lib
from .cpuid import CpuidEntry, pack_cpuid2, unpack_cpuid2
from .deadline import Deadline
from .errors import KvmError, KvmUnavailable
from .nested import NestedState
from .system import DEV_KVM, Kvm
from .vcpu import Vcpu
from .vm import GuestMemory, Vm

__all__ = [
    "DEV_KVM",
    "CpuidEntry",
    "Deadline",
    "GuestMemory",
    "Kvm",
    "KvmError",
    "KvmUnavailable",
    "NestedState",
    "Vcpu",
    "Vm",
    "ffi",
    "lib",
    "pack_cpuid2",
    "unpack_cpuid2",
]
