"""Named guest CPUID feature bits a case may force on or off.

A case's legality can hinge on the guest CPUID (STGI with EFER.SVME=0 is
legal when SKINIT is enumerated, APM vol. 3 STGI; CR4 and EFER bits are
reserved unless their feature is enumerated, KVM __kvm_is_valid_cr4 and
__kvm_valid_efer).  Such a case names the bits it sets or clears, on top of
the backend's guest CPUID (KVM's supported CPUID; SVM removed for the no-SVM
family), and every backend applies the same table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Feature:
    """A guest CPUID feature bit: CPUID(leaf, subleaf).register[bit]."""
    leaf: int
    subleaf: int
    register: str  # "eax", "ebx", "ecx" or "edx"
    bit: int


# CPUID bit positions from the AMD APM vol. 3 appendix E (and KVM's
# arch/x86/include/asm/cpufeatures.h for the same bits).
FEATURES: dict[str, Feature] = {
    "svm": Feature(0x8000_0001, 0, "ecx", 2),
    "skinit": Feature(0x8000_0001, 0, "ecx", 12),
    "nx": Feature(0x8000_0001, 0, "edx", 20),
    "ffxsr": Feature(0x8000_0001, 0, "edx", 25),  # FXSR_OPT: EFER.FFXSR
    "xsave": Feature(0x1, 0, "ecx", 26),  # CR4.OSXSAVE
    "pcid": Feature(0x1, 0, "ecx", 17),  # CR4.PCIDE
    "fsgsbase": Feature(0x7, 0, "ebx", 0),  # CR4.FSGSBASE
    "smep": Feature(0x7, 0, "ebx", 7),  # CR4.SMEP
    "smap": Feature(0x7, 0, "ebx", 20),  # CR4.SMAP
    "umip": Feature(0x7, 0, "ecx", 2),  # CR4.UMIP
    "pku": Feature(0x7, 0, "ecx", 3),  # CR4.PKE
    "la57": Feature(0x7, 0, "ecx", 16),  # CR4.LA57
}


def check(overrides: dict[str, bool] | object) -> None:
    """ValueError for a feature name this table does not know."""
    unknown = set(overrides) - set(FEATURES)  # type: ignore[arg-type]
    if unknown:
        raise ValueError(f"unknown CPUID features {sorted(unknown)} (known: {', '.join(FEATURES)})")
