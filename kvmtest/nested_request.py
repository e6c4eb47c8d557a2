"""A KVM_SET_NESTED_STATE request as data, independent of the binding.

``struct kvm_nested_state`` (arch/x86/include/uapi/asm/kvm.h): flags, format,
size, a 120-byte header union (SVM: ``vmcb_pa`` first) and, for SVM, one VMCB
(control area = VMCB12's, save area = L1's state from before VMRUN).  The
model backend uses these values without the cffi binding, so the uapi
constants are written out here; tests/test_kvm_binding.py checks them against
the compiled <linux/kvm.h>.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from . import layout

GUEST_MODE = 0x1
RUN_PENDING = 0x2
EVMCS = 0x4
MTF_PENDING = 0x8
GIF_SET = 0x100
FORMAT_VMX = 0
FORMAT_SVM = 1
HEADER_SIZE = 128  # flags, format, size + the 120-byte hdr union
SVM_VMCB_SIZE = 0x1000
FULL_SIZE = HEADER_SIZE + SVM_VMCB_SIZE

# Case.nested keys (all ints, plain data for the case codec).
KEYS = ("flags", "format", "size", "vmcb_pa", "svme", "l2_cr0", "smm")


@dataclass(frozen=True)
class NestedBlob:
    """What KVM_GET_NESTED_STATE returns and KVM_SET_NESTED_STATE takes."""

    flags: int
    format: int
    size: int  # the header's size field (may lie: the buffer holds data)
    vmcb_pa: int
    data: bytes  # the SVM VMCB (control + save), possibly short or empty

    @property
    def guest_mode(self) -> bool:
        return bool(self.flags & GUEST_MODE)


@dataclass(frozen=True)
class HostPrep:
    """What the host sets on the vCPU before KVM_SET_NESTED_STATE."""

    svme: bool = True  # EFER.SVME and MSR_VM_HSAVE_PA (L1 has not run yet)
    l2_cr0: int | None = None  # KVM_SET_SREGS: the vCPU's CR0, which becomes L2's
    smm: bool = False  # KVM_SET_VCPU_EVENTS: the vCPU in SMM


def from_case(nested: Mapping[str, int], vmcb12: bytes) -> tuple[HostPrep, NestedBlob]:
    unknown = set(nested) - set(KEYS)
    if unknown:
        raise ValueError(f"unknown nested-state keys {sorted(unknown)}")
    prep = HostPrep(svme=bool(nested.get("svme", 1)), l2_cr0=nested.get("l2_cr0"),
                    smm=bool(nested.get("smm", 0)))
    flags = nested.get("flags", GUEST_MODE | GIF_SET)
    # A state without guest mode carries no VMCB (as KVM_GET_NESTED_STATE gives it).
    data = vmcb12 if flags & GUEST_MODE or "size" in nested else b""
    blob = NestedBlob(flags=flags, format=nested.get("format", FORMAT_SVM),
                      size=nested.get("size", HEADER_SIZE + len(data)),
                      vmcb_pa=nested.get("vmcb_pa", layout.VMCB12_GPA), data=data)
    return prep, blob
