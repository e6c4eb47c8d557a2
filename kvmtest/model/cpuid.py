"""The guest CPU the model emulates: what KVM would derive from its CPUID.

KVM decides which bits of CR4/EFER are reserved and what MAXPHYADDR is from
the guest CPUID (kvm_is_valid_cr4(), kvm_valid_efer(), kvm_vcpu_is_legal_gpa()).
The model fixes one guest CPU so its answers are exact and documented:
QEMU's ``-cpu EPYC`` (Zen 1, "Naples") as seen by an L1 under KVM, which is
also what the qemu backend runs on this machine (DESIGN.md section 3).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .. import cpuid_features, layout

# QEMU TCG's default phys-bits; CPUID 0x80000008 EAX[7:0] of the EPYC model.
MAXPHYADDR = 40

# No NRIPS in the guest CPUID (TCG has no next-RIP save, DESIGN.md section 3):
# KVM then does not write VMCB12.next_rip on #VMEXIT.
GUEST_NRIPS = False

# CR4 bits the EPYC guest may set (kvm_is_valid_cr4 -> __cr4_reserved_bits()):
# VME PVI TSD DE PSE PAE MCE PGE PCE OSFXSR OSXMMEXCPT, FSGSBASE, OSXSAVE,
# SMEP, SMAP.  Zen 1 has no UMIP(11), LA57(12), VMXE(13, Intel), SMXE(14),
# PCIDE(17), PKE(22), CET(23), PKS(24); bit 15 and 25..63 are reserved on any
# CPU.  Sweeps that must fail on every guest CPU should use bit 15 or 32..63.
CR4_VALID = (
    0x7FF  # bits 0..10
    | 1 << 16  # FSGSBASE
    | 1 << 18  # OSXSAVE
    | 1 << 20  # SMEP
    | 1 << 21  # SMAP
)
CR4_RESERVED = ((1 << 64) - 1) & ~CR4_VALID

# EFER bits KVM accepts for this guest (efer_reserved_bits as opened by
# kvm_enable_efer_bits() in svm_hardware_setup(), filtered by guest CPUID in
# __kvm_valid_efer()): SCE, LME, LMA, NXE, SVME (only with SVM in CPUID),
# LMSLE (6.1 enables it together with SVME).  Not FFXSR: kvm_amd opens it
# only on a host with FXSR_OPT, which TCG's EPYC lacks (measured).  Bits
# 1..7, 9, 14..63 are reserved.
EFER_SVME = layout.EFER_SVME
EFER_LMSLE = 1 << 13
EFER_FFXSR = 1 << 14
EFER_VALID_NO_SVM = layout.EFER_SCE | layout.EFER_LME | layout.EFER_LMA | layout.EFER_NXE
EFER_VALID_SVM = EFER_VALID_NO_SVM | EFER_SVME | EFER_LMSLE


def efer_reserved(svm: bool) -> int:
    return ((1 << 64) - 1) & ~(EFER_VALID_SVM if svm else EFER_VALID_NO_SVM)


def legal_gpa(gpa: int) -> bool:
    """kvm_vcpu_is_legal_gpa(): no bit at or above MAXPHYADDR."""
    return 0 <= gpa < (1 << MAXPHYADDR)


def backed(gpa: int, size: int = 1) -> bool:
    """Is [gpa, gpa+size) inside the one memslot (layout.MEM_SIZE)?"""
    return gpa >= 0 and gpa + size <= layout.MEM_SIZE


# kvm_enable_efer_bits(EFER_FFXSR) needs the host's FXSR_OPT; the TCG EPYC
# L0 the kernels run on has none.
HOST_FFXSR = False

# Guest CPUID feature bits of the EPYC guest that matter to the checks the
# model makes (names from kvmtest.cpuid_features).  Zen 1 has no SKINIT in
# KVM's supported CPUID (KVM never enumerates it), no PCID, UMIP, PKU, LA57.
# FXSR_OPT (EFER.FFXSR) neither: TCG's EPYC lacks it, so kvm_amd never opens
# the bit (measured on every tier kernel: EFER.FFXSR fails VMRUN).
EPYC_FEATURES = frozenset({"svm", "nx", "xsave", "fsgsbase", "smep", "smap"})
# CR4 bits that are legal only with a guest CPUID feature (__cr4_reserved_bits).
CR4_FEATURE_BITS = {"umip": 1 << 11, "la57": 1 << 12, "fsgsbase": 1 << 16, "pcid": 1 << 17,
                    "xsave": 1 << 18, "smep": 1 << 20, "smap": 1 << 21, "pku": 1 << 22}
CR4_ALWAYS = 0x7FF  # VME PVI TSD DE PSE PAE MCE PGE PCE OSFXSR OSXMMEXCPT
EFER_NXE = layout.EFER_NXE


@dataclass(frozen=True)
class GuestCpu:
    """The guest CPUID KVM checks L1's and VMCB12's state against."""

    features: frozenset[str] = EPYC_FEATURES

    @classmethod
    def build(cls, svm: bool, overrides: Mapping[str, bool] | None = None) -> GuestCpu:
        """The EPYC guest, SVM as the case's family wants, then the case's bits."""
        feats = set(EPYC_FEATURES)
        if not svm:
            feats.discard("svm")
        for name, on in (overrides or {}).items():
            cpuid_features.check({name: on})
            (feats.add if on else feats.discard)(name)
        return cls(frozenset(feats))

    def has(self, name: str) -> bool:
        return name in self.features

    @property
    def svm(self) -> bool:
        return "svm" in self.features

    @property
    def cr4_reserved(self) -> int:
        valid = CR4_ALWAYS
        for name, bit in CR4_FEATURE_BITS.items():
            if name in self.features:
                valid |= bit
        return ((1 << 64) - 1) & ~valid

    @property
    def efer_reserved(self) -> int:
        """efer_reserved_bits as svm_hardware_setup() opens them, then
        __kvm_valid_efer()'s guest CPUID checks (NX, FFXSR, SVME)."""
        valid = layout.EFER_SCE | layout.EFER_LME | layout.EFER_LMA
        if "nx" in self.features:
            valid |= EFER_NXE
        if "ffxsr" in self.features and HOST_FFXSR:
            valid |= EFER_FFXSR
        if "svm" in self.features:
            valid |= EFER_SVME | EFER_LMSLE
        return ((1 << 64) - 1) & ~valid


DEFAULT_CPU = GuestCpu()
