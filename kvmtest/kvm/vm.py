"""The VM fd: ``Vm`` and its guest memory (rust-vmm's ``VmFd``)."""

from __future__ import annotations

import mmap
import os
import struct
from typing import TYPE_CHECKING

from ._ffi import ffi, lib
from .errors import KvmError, check
from .fd import FdObject

if TYPE_CHECKING:
    from .system import Kvm
    from .vcpu import Vcpu

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


class GuestMemory:
    """One memslot: an anonymous private mapping the guest sees at ``gpa``.

    ``view`` is a writable memoryview of the whole slot (no copies); the
    read/write helpers take guest-physical addresses.
    """

    def __init__(self, slot: int, gpa: int, size: int, flags: int) -> None:
        self.slot, self.gpa, self.size, self.flags = slot, gpa, size, flags
        self._mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        # from_buffer pins the mmap (it cannot be closed under KVM's feet) and
        # gives us its address for KVM_SET_USER_MEMORY_REGION.
        self._cbuf = ffi.from_buffer(self._mm)
        self.hva = int(ffi.cast("uintptr_t", self._cbuf))
        self.cdata = ffi.cast("uint8_t *", self._cbuf)  # for C helpers (csrc/record.c)
        self.view = memoryview(self._mm)

    def contains(self, gpa: int, n: int = 1) -> bool:
        return self.gpa <= gpa and gpa + n <= self.gpa + self.size

    def read(self, gpa: int, n: int) -> bytes:
        off = gpa - self.gpa
        return self._mm[off : off + n]

    def write(self, gpa: int, data: bytes) -> None:
        off = gpa - self.gpa
        self._mm[off : off + len(data)] = data

    def close(self) -> None:
        if self._cbuf is not None:
            self.view.release()
            ffi.release(self._cbuf)
            self._cbuf = None
            self._mm.close()


class Vm(FdObject):
    """A VM fd from ``Kvm.create_vm()``.

    Closing it closes its vCPUs (and their kvm_run mappings), the VM fd, then
    unmaps guest memory; ``close()`` is idempotent.
    """

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self._fd = fd
        self._regions: dict[int, GuestMemory] = {}
        self._vcpus: list[Vcpu] = []
        self._nested_state_size: int | None = None

    @classmethod
    def from_fd(cls, fd: int, kvm: Kvm | None = None) -> Vm:
        """Wrap an existing fd (tests hand in bad fds)."""
        from .system import Kvm

        return cls(kvm if kvm is not None else Kvm.from_fd(-1), fd)

    def close(self) -> None:
        for vcpu in self._vcpus:
            vcpu.close()
        self._vcpus.clear()
        self._close_fd()
        # The VM is gone (its memslots with it), so the mappings may go too.
        for region in self._regions.values():
            region.close()
        self._regions.clear()

    def __repr__(self) -> str:
        return f"<Vm fd={self._fd} slots={sorted(self._regions)} vcpus={self.nr_vcpus}>"

    @property
    def nested_state_size(self) -> int:
        """KVM_CAP_NESTED_STATE's value (0: none), asked once: it is fixed
        while kvm_amd is loaded, and a VM keeps kvm_amd loaded."""
        if self._nested_state_size is None:
            self._nested_state_size = self.kvm.check_extension(lib.KVM_CAP_NESTED_STATE)
        return self._nested_state_size

    @property
    def nr_vcpus(self) -> int:
        """vCPUs created so far (KVM destroys them only with the VM)."""
        return len(self._vcpus)

    # -- memory ---------------------------------------------------------------

    def set_user_memory_region(
        self, slot: int, gpa: int, size: int, flags: int = 0
    ) -> GuestMemory:
        """KVM_SET_USER_MEMORY_REGION: back [gpa, gpa+size) with fresh anonymous memory.

        ``flags``: ``lib.KVM_MEM_READONLY`` / ``KVM_MEM_LOG_DIRTY_PAGES``.
        Replaces (and unmaps) whatever the slot held before.
        """
        if slot in self._regions:
            self.delete_memory_region(slot)
        region = GuestMemory(slot, gpa, size, flags)
        try:
            self._set_region(slot, flags, gpa, size, region.hva)
        except KvmError:
            region.close()
            raise
        self._regions[slot] = region
        return region

    def alias_memory_region(self, region: GuestMemory, address_space: int) -> None:
        """KVM_SET_USER_MEMORY_REGION: the same host memory as ``region``, in
        another address space (1 is what a vCPU in SMM sees)."""
        self._set_region(address_space << 16 | region.slot, region.flags, region.gpa,
                         region.size, region.hva)

    def delete_memory_region(self, slot: int) -> None:
        """KVM_SET_USER_MEMORY_REGION with memory_size 0: drop the slot."""
        self.forget_memory_region(slot).close()

    def forget_memory_region(self, slot: int) -> GuestMemory:
        """Delete the slot from the VM but hand its memory to the caller, who
        closes it (e.g. to read what the guest left there)."""
        region = self._regions[slot]
        self._set_region(slot, 0, region.gpa, 0, 0)
        del self._regions[slot]
        return region

    def _set_region(self, slot: int, flags: int, gpa: int, size: int, hva: int) -> None:
        r = ffi.new("struct kvm_userspace_memory_region *")
        r.slot, r.flags, r.guest_phys_addr, r.memory_size, r.userspace_addr = (
            slot, flags, gpa, size, hva)
        check(lib.kvmtest_ioctl(self._fd, lib.KVM_SET_USER_MEMORY_REGION, r),
              "KVM_SET_USER_MEMORY_REGION")

    @property
    def regions(self) -> dict[int, GuestMemory]:
        return dict(self._regions)

    def region(self, gpa: int, n: int = 1) -> GuestMemory:
        """The slot backing [gpa, gpa+n); ValueError if none does."""
        for region in self._regions.values():
            if region.contains(gpa, n):
                return region
        raise ValueError(f"GPA range [{gpa:#x}, {gpa + n:#x}) is not backed by one memslot")

    def read(self, gpa: int, n: int) -> bytes:
        return self.region(gpa, n).read(gpa, n)

    def write(self, gpa: int, data: bytes) -> None:
        self.region(gpa, len(data)).write(gpa, data)

    def read_u64(self, gpa: int) -> int:
        r = self.region(gpa, 8)
        return _U64.unpack_from(r.view, gpa - r.gpa)[0]

    def write_u64(self, gpa: int, value: int) -> None:
        r = self.region(gpa, 8)
        _U64.pack_into(r.view, gpa - r.gpa, value & 0xFFFF_FFFF_FFFF_FFFF)

    def read_u32(self, gpa: int) -> int:
        r = self.region(gpa, 4)
        return _U32.unpack_from(r.view, gpa - r.gpa)[0]

    def write_u32(self, gpa: int, value: int) -> None:
        r = self.region(gpa, 4)
        _U32.pack_into(r.view, gpa - r.gpa, value & 0xFFFF_FFFF)

    # -- other VM ioctls ----------------------------------------------------------

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (per-VM answers, KVM_CAP_CHECK_EXTENSION_VM)."""
        return check(lib.kvmtest_ioctl_int(self._fd, lib.KVM_CHECK_EXTENSION, cap),
                     "KVM_CHECK_EXTENSION")

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on the VM fd."""
        c = ffi.new("struct kvm_enable_cap *")
        c.cap, c.flags = cap, flags
        for i, a in enumerate(args):
            c.args[i] = a
        check(lib.kvmtest_ioctl(self._fd, lib.KVM_ENABLE_CAP, c), "KVM_ENABLE_CAP")

    def set_tss_addr(self, gpa: int) -> None:
        """KVM_SET_TSS_ADDR: 3 pages VMX needs for real mode (unused in long mode)."""
        check(lib.kvmtest_ioctl_int(self._fd, lib.KVM_SET_TSS_ADDR, gpa), "KVM_SET_TSS_ADDR")

    def create_vcpu(self, vcpu_id: int = 0) -> Vcpu:
        """KVM_CREATE_VCPU, then mmap its kvm_run area (KVM_GET_VCPU_MMAP_SIZE bytes)."""
        from .vcpu import Vcpu

        fd = check(lib.kvmtest_ioctl_int(self._fd, lib.KVM_CREATE_VCPU, vcpu_id),
                   "KVM_CREATE_VCPU")
        try:
            vcpu = Vcpu(fd, vcpu_id, self.kvm.vcpu_mmap_size, vm=self)
        except BaseException:
            os.close(fd)
            raise
        self._vcpus.append(vcpu)
        return vcpu
