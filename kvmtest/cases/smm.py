"""SMM: an SMI while L2 runs, the SMM handler corrupts VMCB12, RSM.

VMCB12 is valid at VMRUN; the handler (guest_payloads/smm.S) writes the
defect into it while the vCPU is in SMM.  svm_leave_smm() re-enters L2 from
that VMCB12.  be5fa8737d42 "KVM: SVM: check validity of VMCB controls when
returning from SMM" runs the VMRUN consistency checks there and refuses the
RSM: the vCPU shuts down (KVM_EXIT_SHUTDOWN).  Kernels without it -- Debian
6.1.170 and 6.1.192 included, measured -- enter L2 with the corrupted VMCB12:
L2 resumes and its VMMCALL reaches L1 as #VMEXIT(VMMCALL), exactly what the
negative control (the handler writes a legal value instead) shows.
"""

from __future__ import annotations

from collections.abc import Iterator

from .. import layout, params
from ..case import NEED_SMM, NEED_SVM, SHUTDOWN, SMM, Case, Expect, vmexit
from ..vmcb import INTERCEPT_VMMCALL, INTERCEPT_VMRUN, SVM_EXIT_SHUTDOWN, SVM_EXIT_VMMCALL

FIX = ("be5fa8737d42 'KVM: SVM: check validity of VMCB controls when returning from "
       "SMM' (stable 6.12.88; not in Debian 6.1.192)")
SOURCE = f"KVM svm.c svm_leave_smm: VMCB12 re-checked on RSM since {FIX}"
SMM_BUG = "RSM entered L2 with a VMCB12 that fails the VMRUN consistency checks"
EFER = layout.L1_EFER | layout.EFER_SVME
CR0 = layout.L1_CR0

# What RSM does with the corrupted VMCB12 on kernels without the re-check:
# it enters L2, L2 resumes after its SMI request and VMMCALLs (measured on
# Debian 6.1.170 and 6.1.192).  The contract (expect) is the fixed
# behaviour: no L2 with an invalid VMCB12, the RSM shuts the vCPU down.
ENTERED_L2 = Expect("vmexit", exit_code=SVM_EXIT_VMMCALL, known_bug=f"{SMM_BUG} (fixed by {FIX})")
# CR0[63:32] != 0 loaded into L2 by svm_leave_smm: the rest of the RSM
# emulation fails right after, in guest mode with nested_run_pending set,
# so L1 gets #VMEXIT(SHUTDOWN) and the kernel WARNs in nested_svm_vmexit
# (WARN_ON_ONCE(svm->nested.nested_run_pending); measured on 6.1.192).
ENTERED_L2_SHUTDOWN = Expect(
    "vmexit", exit_code=SVM_EXIT_SHUTDOWN,
    known_bug=f"{SMM_BUG}: L2 shut down at once, #VMEXIT(SHUTDOWN) to L1 with a "
    f"nested_run_pending WARN (fixed by {FIX})")


def _profiles(without_fix: Expect) -> dict[str, Expect]:
    # be5fa8737d42 reached stable 6.12.88: Debian 6.12.95 refuses the RSM.
    return {"legacy": without_fix, "fixed": without_fix, "6.12-stable": SHUTDOWN,
            "7.x": SHUTDOWN}


# (name, defect, fix, the check it breaks, profiles).  The fix writes the
# same fields legally, so the control differs from the case only by the defect.
ROWS = (
    ("efer-svme0", {"efer": EFER & ~layout.EFER_SVME}, {"efer": EFER},
     "save: EFER.SVME is zero (__nested_vmcb_check_save)", _profiles(ENTERED_L2)),
    ("cr0-cd0-nw1", {"cr0": CR0 | layout.CR0_NW}, {"cr0": CR0 | layout.CR0_NW | layout.CR0_CD},
     "save: CR0.CD is zero and CR0.NW is set (__nested_vmcb_check_save)",
     _profiles(ENTERED_L2)),
    ("cr0-hi-bit32", {"cr0": CR0 | 1 << 32}, {"cr0": CR0},
     "save: CR0[63:32] not zero (__nested_vmcb_check_save)", _profiles(ENTERED_L2_SHUTDOWN)),
    ("asid0", {"asid": 0}, {"asid": 1}, "control: ASID 0 (__nested_vmcb_check_controls)",
     _profiles(ENTERED_L2)),
    ("vmrun-intercept0", {"intercept_misc2": INTERCEPT_VMMCALL},
     {"intercept_misc2": INTERCEPT_VMRUN | INTERCEPT_VMMCALL},
     "control: VMRUN intercept clear (__nested_vmcb_check_controls)", _profiles(ENTERED_L2)),
)


def cases() -> Iterator[Case]:
    needs = frozenset({NEED_SVM, NEED_SMM})
    for name, defect, fix, why, profiles in ROWS:
        bad = f"smm/{name}"
        common = dict(scenario=SMM, payload="smm", l2_entry="l2_smi", needs=needs)
        yield Case(id=bad, family="smm", expect=SHUTDOWN, profiles=profiles,
                   source=f"{SOURCE}; {why}", smm_vmcb=defect, **common)
        yield Case(id=f"negative/smm-{name}", family="negative",
                   expect=vmexit(SVM_EXIT_VMMCALL), source=f"negative control of {bad}",
                   smm_vmcb=fix, control_of=bad, **common)


# L1's own CR4 across an SMI taken in L2.  KVM keeps CR4.MCE set in the
# hardware CR4 whatever L1 wrote; svm_enter_smm saves that hardware VMCB01
# state to HSAVE and svm_leave_smm copies it back, so the #VMEXIT after RSM
# may hand L1 a CR4 it never set.  The VMCB12 stays valid throughout; the
# control differs only in that L1 sets CR4.MCE itself (nothing to leak).
CR4_SOURCE = ("KVM svm.c svm_enter_smm/svm_leave_smm (VMCB01 save area through HSAVE); "
              "contract: L1's CR4 intact after the #VMEXIT")


def cr4_cases() -> Iterator[Case]:
    needs = frozenset({NEED_SVM, NEED_SMM})
    common = dict(scenario=SMM, payload="smm", l2_entry="l2_smi", needs=needs)
    enabled = params.PF_SET_SVME | params.PF_SET_HSAVE
    bad = "smm/l1-cr4-kept"
    yield Case(id=bad, family="smm", expect=vmexit(SVM_EXIT_VMMCALL), profiles=CR4_PROFILES,
               source=CR4_SOURCE, params={"flags": enabled | params.PF_L1_CR4_AS_IS}, **common)
    yield Case(id="negative/smm-l1-cr4-kept", family="negative",
               expect=vmexit(SVM_EXIT_VMMCALL), source=f"negative control of {bad}",
               params={"flags": enabled}, control_of=bad, **common)


CR4_MCE = 1 << 6
CR4_LEAK = Expect("vmexit", exit_code=SVM_EXIT_VMMCALL, l1_cr4_gained=CR4_MCE,
                  known_bug="an SMI in L2 leaves KVM's CR4.MCE in L1's CR4 after RSM "
                  "and the #VMEXIT (not fixed in any kernel measured)")
# Measured under QEMU TCG: Debian 6.1.170, 6.1.192 and 6.12.95 all leak
# (L1 CR4 0x620 -> 0x660).  Linux 7.1 was not measured: its profile is the
# contract.
CR4_PROFILES: dict[str, Expect] = {"legacy": CR4_LEAK, "fixed": CR4_LEAK,
                                   "6.12-stable": CR4_LEAK,
                                   "7.x": vmexit(SVM_EXIT_VMMCALL)}
