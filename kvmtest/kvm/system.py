"""The /dev/kvm system fd: ``Kvm`` (rust-vmm's ``Kvm``)."""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

from ._ffi import ffi, lib
from .cpuid import CpuidEntry, unpack_cpuid2
from .errors import KvmError, KvmUnavailable, check, unavailable_reason
from .fd import FdObject

if TYPE_CHECKING:
    from .vm import Vm

DEV_KVM = "/dev/kvm"


class Kvm(FdObject):
    """An open ``/dev/kvm``.  ``with Kvm() as kvm: ...``; ``close()`` is idempotent."""

    def __init__(self, path: str = DEV_KVM) -> None:
        self._fd = -1
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise unavailable_reason(path, e) from None
        try:
            version = self.api_version
        except KvmError as e:
            self.close()
            raise KvmUnavailable(f"{path} is not a KVM device ({e})", e.errno) from None
        if version != lib.KVM_API_VERSION:
            self.close()
            raise KvmUnavailable(
                f"{path} speaks KVM API {version}, kvmtest needs {lib.KVM_API_VERSION}"
            )
        self._mmap_size: int | None = None

    @classmethod
    def from_fd(cls, fd: int) -> Kvm:
        """Wrap an existing fd without checking it (tests hand in bad fds)."""
        self = cls.__new__(cls)
        self._fd, self._mmap_size = fd, None
        return self

    def __repr__(self) -> str:
        return f"<Kvm fd={self._fd}>"

    # -- ioctls ---------------------------------------------------------------

    @property
    def api_version(self) -> int:
        """KVM_GET_API_VERSION (12 on every kernel since 2.6.22)."""
        return check(lib.kvmtest_ioctl_int(self._fd, lib.KVM_GET_API_VERSION, 0),
                     "KVM_GET_API_VERSION")

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 if ``cap`` (a ``KVM_CAP_*``) is absent, else its value."""
        return check(lib.kvmtest_ioctl_int(self._fd, lib.KVM_CHECK_EXTENSION, cap),
                     "KVM_CHECK_EXTENSION")

    @property
    def vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE: bytes to mmap on a vCPU fd (kvm_run + pio page...)."""
        if self._mmap_size is None:
            self._mmap_size = check(
                lib.kvmtest_ioctl_int(self._fd, lib.KVM_GET_VCPU_MMAP_SIZE, 0),
                "KVM_GET_VCPU_MMAP_SIZE",
            )
        return self._mmap_size

    def supported_cpuid(self, max_entries: int = 256) -> list[CpuidEntry]:
        """KVM_GET_SUPPORTED_CPUID: what KVM can expose to a guest (grows on E2BIG)."""
        while True:
            c = ffi.new("struct kvm_cpuid2 *", {"nent": max_entries, "entries": max_entries})
            r = lib.kvmtest_ioctl(self._fd, lib.KVM_GET_SUPPORTED_CPUID, c)
            if r == -errno.E2BIG and max_entries < 4096:
                max_entries *= 2
                continue
            check(r, "KVM_GET_SUPPORTED_CPUID")
            return unpack_cpuid2(c)

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: MSRs KVM saves/restores for a guest."""
        return self._msr_list(lib.KVM_GET_MSR_INDEX_LIST, "KVM_GET_MSR_INDEX_LIST")

    def msr_feature_index_list(self) -> list[int]:
        """KVM_GET_MSR_FEATURE_INDEX_LIST: feature MSRs (KVM_CAP_GET_MSR_FEATURES)."""
        return self._msr_list(lib.KVM_GET_MSR_FEATURE_INDEX_LIST, "KVM_GET_MSR_FEATURE_INDEX_LIST")

    def _msr_list(self, request: int, name: str) -> list[int]:
        # First call with nmsrs=0 fails with E2BIG and reports the needed count.
        probe = ffi.new("struct kvm_msr_list *", {"nmsrs": 0, "indices": 0})
        r = lib.kvmtest_ioctl(self._fd, request, probe)
        if r < 0 and r != -errno.E2BIG:
            check(r, name)
        n = probe.nmsrs
        c = ffi.new("struct kvm_msr_list *", {"nmsrs": n, "indices": n})
        check(lib.kvmtest_ioctl(self._fd, request, c), name)
        return [c.indices[i] for i in range(c.nmsrs)]

    def create_vm(self, vm_type: int = 0) -> Vm:
        """KVM_CREATE_VM: a new VM (type 0: the default x86 VM)."""
        from .vm import Vm

        fd = check(lib.kvmtest_ioctl_int(self._fd, lib.KVM_CREATE_VM, vm_type), "KVM_CREATE_VM")
        return Vm(self, fd)
