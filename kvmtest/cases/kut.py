"""Parity with kvm-unit-tests' svm_guest_state_test (x86/svm_tests.c):
values VMRUN must accept as well as refuse.

The consistency checks themselves are in save.py/control.py; this family
adds what a check must *not* reject (APM vol. 2 15.5.1 lists illegal state
only), the reserved-bit sweeps kvm-unit-tests runs with L2 outside long
mode, and CR4/EFER bits whose legality follows the guest CPUID (KVM
__kvm_is_valid_cr4 / __kvm_valid_efer): each such row forces the CPUID
feature off (the bit must fail, the control clears the bit) and on (the
bit must be accepted).
"""

from __future__ import annotations

from .. import layout
from ..case import NEED_CPU_PCID, Expect, vmexit
from ..vmcb import INTERCEPT_IOIO_PROT, INTERCEPT_MSR_PROT, INTERCEPT_SHUTDOWN, SVM_EXIT_VMMCALL
from ._build import APM_CC, Row
from .late import PAE_L2, PAE_PDPT, pae_tables

FAMILY = "kut"
KUT = "kvm-unit-tests x86/svm_tests.c svm_guest_state_test"
CR3 = layout.L1_CR3
CR4 = layout.L1_CR4
EFER = layout.L1_EFER | layout.EFER_SVME
CR4_PCIDE = 1 << 17
MSRPM_SIZE = 0x2000
IOPM_SIZE = 0x3000
NONCANONICAL = 0x8000_0000_0000_0000  # bit 63 set, bits 62:47 clear


def accepted(maxphyaddr: int) -> list[Row]:
    """VMCB12 values that must pass every check: VMRUN, then L2's VMMCALL."""
    top = 1 << maxphyaddr
    out = []
    # Long mode, CR4.PCIDE=0: CR3 bits 2:0 and 11:5 are ignored, not MBZ.
    for bit in (0, 1, 2, 5, 6, 7, 8, 9, 10, 11):
        out.append(Row(f"cr3-long-pcide0-bit{bit}", {"cr3": CR3 | 1 << bit}, {},
                       f"APM vol. 2 3.1.2 (CR3 bits 11:5, 2:0 ignored without PCIDE); {KUT} "
                       "test_cr3", expect=_ok()))
    # CR4.PCIDE=1: CR3 bits 11:0 are the PCID.  Needs PCID in the CPU.
    for bit in (0, 5, 11):
        out.append(Row(f"cr3-long-pcide1-bit{bit}", {"cr3": CR3 | 1 << bit,
                                                     "cr4": CR4 | CR4_PCIDE}, {},
                       f"APM vol. 2 3.1.2 (CR3[11:0] = PCID with CR4.PCIDE); {KUT} test_cr3",
                       expect=_ok(), cpuid={"pcid": True},
                       needs=frozenset({NEED_CPU_PCID})))
    # Legacy PAE: CR3 bits 4:0 are ignored (the PDPT is 32-byte aligned).
    for bit in (0, 1, 2):
        out.append(Row(f"cr3-pae-bit{bit}", {**PAE_L2, "cr3": PAE_PDPT | 1 << bit}, {},
                       f"APM vol. 2 3.1.2 (PAE CR3 bits 4:0 ignored); {KUT} test_cr3",
                       expect=_ok(), l2_entry="l2_vmmcall32", memory=pae_tables()))
    # Bits 11:0 of MSRPM_BASE_PA/IOPM_BASE_PA are ignored (APM 15.10.1,
    # 15.11): in use (the PROT intercepts on, bitmaps backed) and at the
    # last legal page (unused), low bits set.
    msr_prot = INTERCEPT_SHUTDOWN | INTERCEPT_MSR_PROT
    io_prot = INTERCEPT_SHUTDOWN | INTERCEPT_IOIO_PROT
    out += [
        Row("msrpm-low-bits", {"intercept_misc1": msr_prot,
                               "msrpm_base_pa": layout.MSRPM_GPA | 0xFFF}, {},
            f"APM vol. 2 15.11 (MSRPM_BASE_PA bits 11:0 ignored); {KUT} "
            "test_msrpm_iopm_bitmap_addrs", expect=_ok()),
        Row("iopm-low-bits", {"intercept_misc1": io_prot,
                              "iopm_base_pa": layout.IOPM_GPA | 0xFFF}, {},
            f"APM vol. 2 15.10.1 (IOPM_BASE_PA bits 11:0 ignored); {KUT} "
            "test_msrpm_iopm_bitmap_addrs", expect=_ok()),
        Row("msrpm-last-page-low-bits", {"msrpm_base_pa": top - MSRPM_SIZE + 0x800}, {},
            f"{APM_CC} with bits 11:0 ignored: the MSRPM ends below MAXPHYADDR",
            expect=_ok()),
        Row("iopm-last-page-low-bits", {"iopm_base_pa": top - IOPM_SIZE + 0xFFF}, {},
            f"{APM_CC} with bits 11:0 ignored: the IOPM ends below MAXPHYADDR",
            expect=_ok()),
    ]
    # Non-canonical segment bases: VMRUN canonicalizes them, no check fails
    # (kvm-unit-tests test_canonicalization).
    for seg in ("es", "cs", "ss", "ds", "gdtr", "idtr"):
        out.append(Row(f"noncanonical-{seg}-base", {f"{seg}.base": NONCANONICAL}, {},
                       f"APM vol. 2 15.5.1 (no canonical check on segment bases); {KUT} "
                       "test_canonicalization", expect=_ok()))
    # CR4/EFER bits legal because the guest CPUID enumerates their feature.
    # Not SMEP: L2 runs on L1's identity map, whose pages are all user pages
    # (they double as nested page tables), so CR4.SMEP faults its first fetch.
    for name, change, feature in CPUID_BITS:
        if feature == "smep":
            continue
        out.append(Row(f"{name}-with-{feature}", change, {}, _cpuid_source(name, feature),
                       expect=_ok(), cpuid={feature: True}))
    return out


# (row name, VMCB12 change, CPUID feature that makes it legal)
CPUID_BITS = (
    ("cr4-fsgsbase", {"cr4": CR4 | 1 << 16}, "fsgsbase"),
    ("cr4-osxsave", {"cr4": CR4 | 1 << 18}, "xsave"),
    ("cr4-smep", {"cr4": CR4 | 1 << 20}, "smep"),
    ("cr4-smap", {"cr4": CR4 | 1 << 21}, "smap"),
    ("efer-nxe", {"efer": EFER | layout.EFER_NXE}, "nx"),
    # Not EFER.FFXSR: kvm_amd opens it only when the host CPU has FXSR_OPT
    # (svm_hardware_setup), which QEMU's EPYC under TCG lacks (measured: the
    # bit fails whatever the guest CPUID), so no CPUID makes it legal here.
)


def _cpuid_source(name: str, feature: str) -> str:
    reg = name.split("-")[0].upper()
    fn = "__kvm_is_valid_cr4" if reg == "CR4" else "__kvm_valid_efer"
    return (f"{APM_CC}: {reg} MBZ bits follow the CPU's features; KVM {fn} against the "
            f"guest CPUID ({feature})")


def rows(maxphyaddr: int) -> list[Row]:
    """VMCB12 values that must fail, each with its control."""
    del maxphyaddr
    out = []
    # CR4/EFER bits whose feature the guest CPUID does not enumerate: the
    # same bit that must be accepted above, now illegal.
    for name, change, feature in CPUID_BITS:
        fix = {k: (CR4 if k == "cr4" else EFER) for k in change}
        out.append(Row(f"{name}-without-{feature}", change, fix, _cpuid_source(name, feature),
                       cpuid={feature: False}))
    # CR4 reserved bits with L2 in legacy PAE mode (EFER.LME=0): the
    # kvm-unit-tests sweep test_cr4 (SVM_CR4_LEGACY_RESERVED_MASK).
    for bit in (13, 14, 15, 19, 25, 28, 31):
        out.append(Row(f"legacy-cr4-rsvd-bit{bit}",
                       {**PAE_L2, "cr3": PAE_PDPT, "cr4": PAE_L2["cr4"] | 1 << bit},
                       {**PAE_L2, "cr3": PAE_PDPT, "cr4": PAE_L2["cr4"]},
                       f"{APM_CC}: CR4 MBZ bit set, L2 in legacy PAE mode; {KUT} test_cr4; "
                       "KVM __kvm_is_valid_cr4",
                       l2_entry="l2_vmmcall32", memory=pae_tables()))
    return out


def _ok() -> Expect:
    return vmexit(SVM_EXIT_VMMCALL)
