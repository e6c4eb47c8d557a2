"""Control-area consistency checks (KVM: __nested_vmcb_check_controls)."""

from __future__ import annotations

from .. import layout
from ..case import NEED_NO_NPT, NEED_NPT, VMEXIT_INVALID, VMEXIT_INVALID_HW, Expect, vmexit
from ..vmcb import (
    EVTINJ_TYPE_EXEPT,
    EVTINJ_VALID,
    INTERCEPT_VMMCALL,
    INTERCEPT_VMRUN,
    NESTED_CTL_NP_ENABLE,
    SVM_EXIT_SHUTDOWN,
    SVM_EXIT_VMMCALL,
    TLB_CONTROL_FLUSH_ALL_ASID,
)
from ._build import APM_CC, Row

KVM = "KVM nested.c __nested_vmcb_check_controls"
MSRPM_SIZE = 0x2000
IOPM_SIZE = 0x3000
UD_VECTOR = 6
NMI_VECTOR = 2


# Checks KVM does in software only since Linux 7.1: older kernels pass the
# VMCB on and the CPU's VMRUN fails it, which KVM reflects with a full #VMEXIT.
SW_CHECK_SINCE_7_1 = {"legacy": VMEXIT_INVALID_HW, "fixed": VMEXIT_INVALID_HW,
                      "7.x": VMEXIT_INVALID}


# 6.1.170 under TCG: L2 runs on the illegal root, dies with #VMEXIT(SHUTDOWN)
# and the first time nested_svm_vmexit() WARNs (nested.c:940).
NCR3_BUG = Expect("vmexit", exit_code=SVM_EXIT_SHUTDOWN,
                  known_bug="VMRUN accepted an illegal nCR3 (fixed by 'KVM: nSVM: Add missing "
                  "consistency check for nCR3 validity')")


# V_INTR_PRIO 3, V_IGN_TPR, V_INTR_MASKING, V_TPR 5; a reserved TLB_CTL
# encoding that no kernel refuses.
WRITE_BACK = {"int_ctl": 3 << 16 | 1 << 20 | 1 << 24 | 0x5, "int_vector": 0x41, "tlb_ctl": 0x80}


def rows(maxphyaddr: int) -> list[Row]:
    top = 1 << maxphyaddr  # first illegal GPA
    return [
        Row("vmrun-intercept0", {"intercept_misc2": INTERCEPT_VMMCALL},
            {"intercept_misc2": INTERCEPT_VMMCALL | INTERCEPT_VMRUN},
            f"{APM_CC}: the VMRUN intercept bit is clear; {KVM}"),
        Row("asid0", {"asid": 0}, {"asid": 1},
            f"{APM_CC}: the ASID is equal to zero; {KVM}"),
        # KVM checks the page-aligned base and base + size - 1 against
        # MAXPHYADDR (nested_svm_check_bitmap_pa); the fix is the last legal
        # base, which is unbacked but never read (MSR_PROT/IOIO_PROT clear).
        Row("msrpm-end-above-maxphyaddr", {"msrpm_base_pa": top - 0x1000},
            {"msrpm_base_pa": top - MSRPM_SIZE},
            f"{APM_CC}: MSRPM_BASE_PA + size above MAXPHYADDR; {KVM}"),
        Row("msrpm-above-maxphyaddr", {"msrpm_base_pa": top}, {"msrpm_base_pa": top - MSRPM_SIZE},
            f"{APM_CC}: MSRPM_BASE_PA above MAXPHYADDR; {KVM}"),
        Row("iopm-end-above-maxphyaddr", {"iopm_base_pa": top - 0x2000},
            {"iopm_base_pa": top - IOPM_SIZE},
            f"{APM_CC}: IOPM_BASE_PA + size above MAXPHYADDR; {KVM}"),
        Row("iopm-above-maxphyaddr", {"iopm_base_pa": top}, {"iopm_base_pa": top - IOPM_SIZE},
            f"{APM_CC}: IOPM_BASE_PA above MAXPHYADDR; {KVM}"),
        # With NP the same identity tables serve as L2's nested page tables.
        # Checked since "KVM: nSVM: Add missing consistency check for nCR3
        # validity" (Debian 6.1.176).  Before, L2 ran on the illegal nested
        # root and died: #VMEXIT(SHUTDOWN), measured on 6.1.170 under TCG.
        # Needs kvm_amd npt=1: without it NP_ENABLE is itself illegal (6.1,
        # 6.12) or ignored (7.x), so the control would not be one.
        Row("np-ncr3-above-maxphyaddr",
            {"nested_ctl": NESTED_CTL_NP_ENABLE, "nested_cr3": top},
            {"nested_ctl": NESTED_CTL_NP_ENABLE, "nested_cr3": layout.PML4_GPA},
            f"{APM_CC}: nCR3 illegal with NP_ENABLE; KVM nested.c (nested_cr3 legality)",
            profiles={"legacy": NCR3_BUG, "fixed": VMEXIT_INVALID, "7.x": VMEXIT_INVALID},
            needs=frozenset({NEED_NPT})),
        # kvm_amd npt=0: L1's CPUID has no NPT.  6.1 and 6.12 fail NP_ENABLE
        # (__nested_vmcb_check_controls: NP_ENABLE && !npt_enabled); 7.x clears
        # it from its cache of VMCB12's controls (__nested_copy_vmcb_control_to
        # _cache: no X86_FEATURE_NPT in the guest) and runs L2 without NP.  The
        # APM has no VMRUN check for NP_ENABLE on a CPU without NP, so both are
        # kernel behaviours, not contract breaks.
        Row("np-enable-without-npt",
            {"nested_ctl": NESTED_CTL_NP_ENABLE, "nested_cr3": layout.PML4_GPA},
            {"nested_ctl": 0, "nested_cr3": layout.PML4_GPA},
            "APM vol. 2 15.25.3 (NP_ENABLE needs CPUID Fn8000_000A_EDX[NP]); KVM nested.c "
            "__nested_vmcb_check_controls (6.1, 6.12) / __nested_copy_vmcb_control_to_cache "
            "(7.x)",
            profiles={"legacy": VMEXIT_INVALID, "fixed": VMEXIT_INVALID,
                      "7.x": vmexit(SVM_EXIT_VMMCALL)},
            needs=frozenset({NEED_NO_NPT})),
        # An exception event with the NMI vector is an illegal injection.
        Row("eventinj-exept-nmi",
            {"event_inj": EVTINJ_VALID | EVTINJ_TYPE_EXEPT | NMI_VECTOR}, {"event_inj": 0},
            f"{APM_CC} and 15.20: EVENTINJ holds an illegal event; Linux 7.1 nested.c "
            "(EVENTINJ validity)", profiles=SW_CHECK_SINCE_7_1),
        # INT_CTL, INT_VECTOR and TLB_CTL as L1 wrote them must come back after
        # the #VMEXIT, failed (ASID 0) or not (the control): the CPU only
        # updates V_TPR/V_IRQ/V_GIF and leaves TLB_CONTROL (APM 15.21,
        # 15.16.1).  6.1 writes its cached copies back (nested_svm_vmexit),
        # 7.x masks TLB_CTL in its cache but no longer writes it back.
        Row("control-write-back", {**WRITE_BACK, "asid": 0}, {**WRITE_BACK, "asid": 1},
            f"{APM_CC}: the ASID is equal to zero; APM vol. 2 15.21 (INT_CTL), 15.16.1 "
            "(TLB_CONTROL): L1's values survive the #VMEXIT"),
        # The reserved EVENTINJ TYPEs and the other encodings: eventinj.py.
    ]


def observation_rows(maxphyaddr: int) -> list[Row]:
    """Profile-dependent observations: recorded and fingerprinted."""
    ud = EVTINJ_VALID | EVTINJ_TYPE_EXEPT | UD_VECTOR
    out = [
        # A legal pending event on a VMCB12 that fails (ASID 0): Linux 7.1
        # clears EVENTINJ on #VMEXIT, older kernels write the cached value back.
        Row("eventinj-after-invalid", {"asid": 0, "event_inj": ud}, {"asid": 1, "event_inj": 0},
            "Linux 7.1 nested.c: EVENTINJ cleared on #VMEXIT; APM 15.20",
            profiles={
                "legacy": Expect("vmexit_invalid", event_inj_cleared=False),
                "fixed": Expect("vmexit_invalid", event_inj_cleared=False),
                # Measured: Debian 6.12.95 clears it too.
                "6.12-stable": Expect("vmexit_invalid", event_inj_cleared=True),
                "7.x": Expect("vmexit_invalid", event_inj_cleared=True),
            }),
    ]
    # TLB_CONTROL: reserved encodings.  Linux 7.1 masks them (VMRUN goes on);
    # no kernel we model rejects them.  Control: FLUSH_ALL_ASID.
    for value in (2, 4, 0x80):
        out.append(Row(
            f"tlb-ctl-{value:#x}", {"tlb_ctl": value}, {"tlb_ctl": TLB_CONTROL_FLUSH_ALL_ASID},
            "APM vol. 2 15.16.1 TLB_CONTROL encodings; Linux 7.1 nested.c masks TLB_CTL",
            expect=vmexit(SVM_EXIT_VMMCALL)))
    return out

