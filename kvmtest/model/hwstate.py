"""The host configuration (kvm_amd parameters) and the hardware VMCB state
KVM derives from L1's state under it.

KVM keeps two views of L1's control registers: the guest's own
(vcpu->arch.efer/cr0/cr4) and what it writes into the hardware VMCB
(svm_set_efer(), svm_set_cr0(), svm_set_cr4() in arch/x86/kvm/svm/svm.c,
the same in Linux 6.1, 6.12 and 7.3).  L1 never sees the hardware values
through VMRUN and #VMEXIT (nested_svm_vmrun() saves the guest's own view in
vmcb01), but paths that copy the hardware VMCB01 save area elsewhere do:
svm_enter_smm() writes it to L1's HSAVE page and svm_leave_smm() copies it
back, so the #VMEXIT after RSM restores L1 from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .. import layout

CR4_PAE = layout.CR4_PAE
CR4_MCE = 1 << 6
CR4_SMEP = 1 << 20
CR4_SMAP = 1 << 21
CR4_PKE = 1 << 22

# kvm_amd parameters the model emulates, and how.  Others (avic, lbrv,
# nrips ...) change nothing the catalogue observes or are not modelled: the
# model refuses them rather than silently ignoring them.
EMULATED = ("nested", "npt", "vgif", "vls")
ON = ("Y", "y", "1")
OFF = ("N", "n", "0")


class ConfigError(ValueError):
    """A kvm_amd parameter the model does not emulate, or a bad value."""


@dataclass(frozen=True)
class HostConfig:
    """kvm_amd's effective parameters as they shape L1's nested SVM.

    npt:  nested paging for L1 (npt=0: shadow paging, NP_ENABLE unavailable)
    vgif: virtual GIF; KVM stops intercepting STGI/CLGI (svm.c init_vmcb)
    vls:  virtual VMLOAD/VMSAVE; KVM stops intercepting VMLOAD/VMSAVE
    """

    npt: bool = True
    vgif: bool = False
    vls: bool = False

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> HostConfig:
        values: dict[str, bool] = {}
        for name, value in params.items():
            if name not in EMULATED:
                raise ConfigError(f"the model does not emulate kvm_amd parameter {name!r} "
                                  f"(it emulates {', '.join(EMULATED)})")
            if value not in ON + OFF:
                raise ConfigError(f"kvm_amd parameter {name}={value!r}: want 0/1 or N/Y")
            values[name] = value in ON
        if values.get("nested") is False:
            raise ConfigError("nested=0: kvm_amd then has no nested SVM to test")
        npt = values.get("npt", True)
        # svm_hardware_setup(): vls needs NPT (and the CPU feature).
        return cls(npt=npt, vgif=values.get("vgif", False), vls=values.get("vls", False) and npt)


def hw_efer(efer: int, npt: bool) -> int:
    """svm_set_efer(): the VMCB's EFER for a guest EFER."""
    if not npt:
        efer |= layout.EFER_NXE  # shadow paging assumes NX
        if not efer & layout.EFER_LMA:
            efer &= ~layout.EFER_LME
    return efer | layout.EFER_SVME


def hw_cr0(cr0: int, npt: bool) -> int:
    """svm_set_cr0(), KVM_X86_QUIRK_CD_NW_CLEARED on (KVM's default)."""
    if not npt:
        cr0 |= layout.CR0_PG | layout.CR0_WP
    return cr0 & ~(layout.CR0_CD | layout.CR0_NW)


def hw_cr4(cr4: int, npt: bool, paging: bool, host_mce: bool = True) -> int:
    """svm_set_cr4(): shadow paging runs L1 with PAE paging; the host's
    CR4.MCE is always kept."""
    if not npt:
        cr4 |= CR4_PAE
        if not paging:
            cr4 &= ~(CR4_SMEP | CR4_SMAP | CR4_PKE)
    return cr4 | (CR4_MCE if host_mce else 0)


DEFAULT_HOST = HostConfig()
