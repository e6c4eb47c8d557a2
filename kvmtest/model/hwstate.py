"""What KVM puts in the hardware VMCB for an L1 state, under kvm_amd's parameters.

KVM keeps a vCPU's architectural CR0/CR4/EFER in vcpu->arch and writes a
*hardware* value into the VMCB save area the CPU runs on (Linux 6.1.192,
6.12.117 and 7.3.4 alike, arch/x86/kvm/svm/svm.c):

- ``svm_set_cr0()``: with !npt_enabled "hcr0 |= X86_CR0_PG | X86_CR0_WP"
  (shadow paging needs paging and write protection on); under
  KVM_X86_QUIRK_CD_NW_CLEARED, on unless userspace disables it,
  "hcr0 &= ~(X86_CR0_CD | X86_CR0_NW)";
- ``svm_set_cr4()``: "cr4 |= host_cr4_mce" (the host's CR4.MCE, always);
  with !npt_enabled also CR4.PAE, and SMEP/SMAP/PKE cleared without paging;
- ``svm_set_efer()``: "svm->vmcb->save.efer = efer | EFER_SVME"; with
  !npt_enabled "efer |= EFER_NX" and LME cleared without LMA.

Both the model's VMRUN path (npt=0 shadow paging) and its SMM path (the
hardware VMCB01 save area copied to HSAVE + 0x400 by svm_enter_smm) use
these, so what differs between npt settings lives here only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .. import layout

CR4_MCE = 1 << 6
CR4_SMEP = 1 << 20
CR4_SMAP = 1 << 21
CR4_PKE = 1 << 22
ON = ("Y", "y", "1")


# kvm_amd parameters the model emulates.  Others (avic, lbrv ...) change
# nothing the catalogue observes or are not modelled: refused, not ignored.
EMULATED = ("nested", "npt", "vgif", "vls")
OFF = ("N", "n", "0")


class ConfigError(ValueError):
    """A kvm_amd parameter the model does not emulate, or a bad value."""


@dataclass(frozen=True)
class KvmAmd:
    """The kvm_amd parameters (and host facts) the model honours.

    npt:  nested paging for L1 (npt=0: shadow paging, NP_ENABLE unavailable)
    vgif: virtual GIF; KVM stops intercepting STGI/CLGI (svm.c init_vmcb)
    vls:  virtual VMLOAD/VMSAVE; KVM stops intercepting VMLOAD/VMSAVE
    """

    npt: bool = True
    vgif: bool = False
    vls: bool = False
    # The host kernel's CR4.MCE (cr4_read_shadow() & X86_CR4_MCE): set on
    # every host measured (QEMU's EPYC models have MCE, Linux enables it).
    host_cr4_mce: bool = True
    # KVM_X86_QUIRK_CD_NW_CLEARED: kvmtest never disables quirks.
    cd_nw_quirk: bool = True

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> KvmAmd:
        """The effective configuration for these parameters (missing ones at
        kvm_amd's defaults on TCG's EPYC: npt on, no vGIF, no vls); a
        parameter the model cannot emulate is a ConfigError."""
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


def cr0(arch: int, kvm: KvmAmd) -> int:
    """svm_set_cr0(): the hardware CR0 for L1's architectural CR0."""
    hw = arch
    if not kvm.npt:
        hw |= layout.CR0_PG | layout.CR0_WP
    if kvm.cd_nw_quirk:
        hw &= ~(layout.CR0_CD | layout.CR0_NW)
    return hw


def cr4(arch: int, kvm: KvmAmd, paging: bool = True) -> int:
    """svm_set_cr4(): the hardware CR4 for L1's architectural CR4."""
    hw = arch
    if not kvm.npt:
        hw |= layout.CR4_PAE
        if not paging:
            hw &= ~(CR4_SMEP | CR4_SMAP | CR4_PKE)
    if kvm.host_cr4_mce:
        hw |= CR4_MCE
    return hw


def efer(arch: int, kvm: KvmAmd) -> int:
    """svm_set_efer(): the hardware EFER for L1's architectural EFER."""
    hw = arch
    if not kvm.npt:
        hw |= layout.EFER_NXE
        if not hw & layout.EFER_LMA:
            hw &= ~layout.EFER_LME
    return hw | layout.EFER_SVME


def save_area(arch_cr0: int, arch_cr4: int, arch_efer: int, kvm: KvmAmd) -> dict[str, int]:
    """The CR0/CR4/EFER of a VMCB save area KVM filled from this state."""
    paging = bool(arch_cr0 & layout.CR0_PG)
    return {"cr0": cr0(arch_cr0, kvm), "cr4": cr4(arch_cr4, kvm, paging),
            "efer": efer(arch_efer, kvm)}


def vmrun_refuses(hw: Mapping[str, int]) -> str | None:
    """Why the CPU's VMRUN (APM 15.5.1) refuses a hardware CR0/CR4/EFER KVM
    is about to enter, or None.  KVM loads L1's state on #VMEXIT without
    checking it (nested_svm_vmexit: svm_set_efer/cr0/cr4 of vmcb01's values),
    so a bad value there ends KVM_RUN in KVM_EXIT_FAIL_ENTRY (svm_handle_exit)."""
    from . import cpuid

    cr0_, cr4_, efer_ = hw["cr0"], hw["cr4"], hw["efer"]
    if cr0_ >> 32:
        return f"CR0 {cr0_:#x}: bits 63:32 set"
    if cr0_ & layout.CR0_NW and not cr0_ & layout.CR0_CD:
        return "CR0.NW without CR0.CD"
    if cr4_ & cpuid.CR4_RESERVED:
        return f"CR4 {cr4_:#x}: reserved bits"
    if efer_ & cpuid.efer_reserved(True):
        return f"EFER {efer_:#x}: reserved bits"
    if efer_ & layout.EFER_LME and cr0_ & layout.CR0_PG:
        if not cr4_ & layout.CR4_PAE:
            return "EFER.LME and CR0.PG with CR4.PAE clear"
        if not cr0_ & layout.CR0_PE:
            return "EFER.LME and CR0.PG with CR0.PE clear"
    return None


DEFAULT_KVM_AMD = KvmAmd()
