"""SMM: an SMI while L2 runs, what the SMM handler changes, RSM.

Three families, all on the smm payload (guest_payloads/smm.S): L1 VMRUNs a
valid VMCB12, L2 asks for an SMI, the handler writes what the case says
(kvmtest/smm.py write_target), RSM, and L1 reports after the next #VMEXIT.

1. VMCB12 corrupted in SMM.  svm_leave_smm() re-enters L2 from that VMCB12.
   be5fa8737d42 "KVM: SVM: check validity of VMCB controls when returning
   from SMM" runs the VMRUN consistency checks there and refuses the RSM:
   the vCPU shuts down (KVM_EXIT_SHUTDOWN).  Kernels without it -- Debian
   6.1.170 and 6.1.192, measured -- enter L2 with the corrupted VMCB12.
2. L1's state after the round trip (the state-leak family).  KVM keeps L1's
   state in the hardware VMCB01 with bits of its own; svm_enter_smm() saves
   that hardware save area to HSAVE + 0x400 and svm_leave_smm() restores
   it, so the #VMEXIT after RSM loads L1's registers from hardware values.
3. Beyond VMCB12: the handler changes L1's saved state at HSAVE + 0x400,
   the state-save-area fields svm_leave_smm() reads, or VM_HSAVE_PA.

Every case has a negative control: the same handler writing the value that
is already there (families 1 and 3), or L1 already holding the hardware
value (family 2).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace

from .. import layout
from ..case import (
    NEED_NO_NPT,
    NEED_NPT,
    NEED_SMM,
    NEED_SVM,
    SHUTDOWN,
    SMM,
    Case,
    Expect,
    exception,
    vmexit,
)
from ..vmcb import INTERCEPT_VMMCALL, INTERCEPT_VMRUN, SVM_EXIT_SHUTDOWN, SVM_EXIT_VMMCALL

UD = 6
CR0_WP, CR0_NW, CR0_CD = layout.CR0_WP, layout.CR0_NW, layout.CR0_CD
CR4_MCE = 1 << 6
EFER_NX = layout.EFER_NXE
EFER = layout.L1_EFER | layout.EFER_SVME
CR0 = layout.L1_CR0
NEEDS = frozenset({NEED_SVM, NEED_SMM})
COMMON = dict(scenario=SMM, payload="smm", l2_entry="l2_smi")
# L1's state made equal to what KVM holds in the hardware VMCB01 under
# either npt setting (CR4.MCE of the host; EFER.NX, which npt=0 forces;
# CR0.WP set and CR0.CD/NW clear already), so that families 1 and 3 see
# only their own defect, not the leak of family 2.
HW_EQUAL = {"l1_cr4_xor": CR4_MCE, "l1_efer_xor": EFER_NX}
VMCB_SOURCE = "KVM svm.c svm_leave_smm: VMCB12 re-checked on RSM since "

FIX = ("be5fa8737d42 'KVM: SVM: check validity of VMCB controls when returning from "
       "SMM' (stable 6.12.88; not in Debian 6.1.192)")
SOURCE = f"{VMCB_SOURCE}{FIX}"
SMM_BUG = "RSM entered L2 with a VMCB12 that fails the VMRUN consistency checks"

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
    ("cr0-cd0-nw1", {"cr0": CR0 | CR0_NW}, {"cr0": CR0 | CR0_NW | CR0_CD},
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


def _pair(name: str, expect: Expect, profiles: Mapping[str, Expect], source: str,
          bad: Mapping[str, int], good: Mapping[str, int],
          params: Mapping[str, int] = HW_EQUAL, control_params: Mapping[str, int] | None = None,
          needs: frozenset[str] = NEEDS, memory: Mapping[int, bytes] | None = None,
          ) -> Iterator[Case]:
    """A case and its negative control (the handler writes `good` instead of
    `bad`, or L1 starts from `control_params` instead of `params`)."""
    case_id = f"smm/{name}"
    extra = dict(needs=needs, memory=memory or {}, **COMMON)
    yield Case(id=case_id, family="smm", expect=expect, profiles=profiles, source=source,
               smm_vmcb=bad, params=params, **extra)
    yield Case(id=f"negative/smm-{name}", family="negative", expect=vmexit(SVM_EXIT_VMMCALL),
               source=f"negative control of {case_id}", smm_vmcb=good,
               params=control_params if control_params is not None else params,
               control_of=case_id, **extra)


def cases() -> Iterator[Case]:
    for name, defect, fix, why, profiles in ROWS:
        yield from _pair(name, SHUTDOWN, profiles, f"{SOURCE}; {why}", defect, fix)


# ---- 2. the state-leak family ------------------------------------------------
#
# What KVM writes into the hardware VMCB01 for L1's architectural state
# (Linux 6.1.192, 6.12.117 and 7.3.4 alike, arch/x86/kvm/svm/svm.c):
# - svm_set_cr4(): "cr4 |= host_cr4_mce" -- the host's CR4.MCE, always;
# - svm_set_cr0(): "hcr0 &= ~(X86_CR0_CD | X86_CR0_NW)" under
#   KVM_X86_QUIRK_CD_NW_CLEARED (on unless userspace disables it), and
#   "hcr0 |= X86_CR0_PG | X86_CR0_WP" when !npt_enabled;
# - svm_set_efer(): "efer |= EFER_NX" when !npt_enabled (and SVME, always).
# nested_svm_vmrun() stores L1's *architectural* CR0/CR4/EFER in vmcb01, but
# the SMI's synthetic #VMEXIT (svm_enter_smm -> nested_svm_simple_vmexit ->
# nested_svm_vmexit) reloads them through svm_set_efer/cr0/cr4, which leave
# the hardware values in vmcb01->save; svm_copy_vmrun_state() copies those
# to HSAVE + 0x400, svm_leave_smm() copies them back into vmcb01, and the
# #VMEXIT after RSM makes them L1's architectural state (nested_svm_vmexit:
# svm_set_efer(vcpu, vmcb01->save.efer), svm_set_cr0(.. | X86_CR0_PE),
# svm_set_cr4(..)).  CR0.PG cannot be seen: VMRUN needs CR0.PG=1 already
# (nested_svm_check_permissions).  docs/findings.md has the details.
LEAK_SOURCE = ("KVM svm.c svm_enter_smm/svm_leave_smm copy the hardware VMCB01 save area "
               "through HSAVE + 0x400; nested_svm_vmexit loads L1's state from it; "
               "contract: L1's {reg} intact after the #VMEXIT")
LEAK_BUG = ("an SMI in L2 leaves KVM's hardware {what} in L1's {reg} after RSM and the "
            "#VMEXIT (docs/findings.md; every kernel measured)")


def _leak(flipped: tuple[tuple[str, int], ...], what: str, reg: str) -> Expect:
    return Expect("vmexit", exit_code=SVM_EXIT_VMMCALL, l1_flipped=flipped,
                  known_bug=LEAK_BUG.format(what=what, reg=reg))


INTACT = vmexit(SVM_EXIT_VMMCALL)
CR4_LEAK = _leak((("cr4", CR4_MCE),), "CR4.MCE", "CR4")
CD_NW_LEAK = _leak((("cr0", CR0_CD | CR0_NW),), "CR0.CD/NW (cleared)", "CR0")
NX_LEAK = _leak((("efer", EFER_NX),), "EFER.NX (npt=0)", "EFER")
WP_LEAK = _leak((("cr0", CR0_WP),), "CR0.WP (npt=0)", "CR0")


def _everywhere(want: Expect) -> dict[str, Expect]:
    # Measured on every kernel of the tier (Debian 6.1.170, 6.1.192, 6.12.95,
    # 6.12.117, 7.2.13, 7.3.4): the same mechanism, unchanged since 6.1.
    return {p: want for p in ("legacy", "fixed", "6.12-stable", "7.x")}


# (name, L1's flips in the case, in its control, expectation, needs, register)
LEAK_ROWS = (
    # CR4.MCE of the host, under either npt setting.
    ("l1-cr4-kept", {"l1_efer_xor": EFER_NX}, HW_EQUAL, CR4_LEAK, NEEDS, "CR4"),
    # L1 runs with CR0.CD and NW set; KVM's hardware CR0 has them clear.
    ("l1-cr0-cd-kept", {**HW_EQUAL, "l1_cr0_xor": CR0_CD | CR0_NW}, HW_EQUAL, CD_NW_LEAK,
     NEEDS, "CR0"),
    # L1 without EFER.NX: shadow paging forces it into the hardware EFER;
    # nested paging does not, so under npt=1 L1's EFER must come back intact.
    ("l1-efer-kept-npt", {"l1_cr4_xor": CR4_MCE}, HW_EQUAL, INTACT, NEEDS | {NEED_NPT}, "EFER"),
    ("l1-efer-kept-shadow", {"l1_cr4_xor": CR4_MCE}, HW_EQUAL, NX_LEAK,
     NEEDS | {NEED_NO_NPT}, "EFER"),
    # L1 with CR0.WP clear: shadow paging forces CR0.WP (and PG) on.
    ("l1-cr0-wp-kept-npt", {**HW_EQUAL, "l1_cr0_xor": CR0_WP}, HW_EQUAL, INTACT,
     NEEDS | {NEED_NPT}, "CR0"),
    ("l1-cr0-wp-kept-shadow", {**HW_EQUAL, "l1_cr0_xor": CR0_WP}, HW_EQUAL, WP_LEAK,
     NEEDS | {NEED_NO_NPT}, "CR0"),
)


def leak_cases() -> Iterator[Case]:
    for name, flips, control, want, needs, reg in LEAK_ROWS:
        profiles = {} if want is INTACT else _everywhere(want)
        yield from _pair(name, INTACT, profiles, LEAK_SOURCE.format(reg=reg), {}, {},
                         params=flips, control_params=control, needs=needs)


# ---- 3. beyond VMCB12 -----------------------------------------------------------
#
# HSAVE + 0x400 holds L1's state while SMM runs; svm_leave_smm() copies it
# back into vmcb01 (svm_copy_vmrun_state) without any check, and the next
# #VMEXIT makes it L1's.  The APM leaves the host save area's format to the
# implementation; KVM's is the VMCB save area ("APM guarantees that the
# format of the area is identical to guest save area offsetted by 0x400",
# svm_enter_smm), so what the handler writes there is what L1 gets.
HSAVE_SOURCE = ("KVM svm.c svm_leave_smm: L1's state restored from HSAVE + 0x400 as found "
                "(svm_copy_vmrun_state), loaded into L1 by nested_svm_vmexit")
L1_CR3_MOVED = 0xB000  # layout.L2_PAGING_GPA: a copy of L1's PML4 (same mappings)
SMRAM_SOURCE = ("KVM svm.c svm_leave_smm: the SMRAM fields FED8h (SVM guest), FEE0h "
                "(VMCB12 GPA) and FED0h (EFER) decide whether and where RSM re-enters L2")
MSR_SOURCE = ("KVM svm.c svm_leave_smm: HSAVE mapped at RSM (kvm_vcpu_map of "
              "svm->nested.hsave_msr); failure makes RSM fail")


def beyond_cases() -> Iterator[Case]:
    pml4 = layout.page_tables()[layout.PML4_GPA]
    # L1's CR3 moved to an equivalent page table: L1 resumes on it.
    yield from _pair(
        "hsave-l1-cr3", Expect("vmexit", exit_code=SVM_EXIT_VMMCALL,
                               l1_flipped=(("cr3", layout.L1_CR3 ^ L1_CR3_MOVED),)),
        {}, HSAVE_SOURCE, {"hsave.cr3": L1_CR3_MOVED}, {"hsave.cr3": layout.L1_CR3},
        memory={L1_CR3_MOVED: pml4})
    # L1's EFER.SVME cleared in its saved state: L1 gets it so.  What GIF
    # is then differs, and the architecture does not decide it (a host
    # EFER.SVME=0 loaded by a #VMEXIT only exists because SMM software
    # edited the host save area): 6.x svm_set_efer() clearing SVME calls
    # svm_set_gif(svm, true) (6.1.192, 6.12.117 svm.c), 7.x (7.3.4 svm.c)
    # leaves GIF as the #VMEXIT left it, 0 -- measured on all six kernels.
    svme0 = Expect("vmexit", exit_code=SVM_EXIT_VMMCALL,
                   l1_flipped=(("efer", layout.EFER_SVME),))
    yield from _pair(
        "hsave-l1-efer-svme0", svme0,
        {"legacy": replace(svme0, gif_after=True), "fixed": replace(svme0, gif_after=True),
         "6.12-stable": replace(svme0, gif_after=True), "7.x": svme0},
        HSAVE_SOURCE, {"hsave.efer": layout.L1_EFER | EFER_NX},
        {"hsave.efer": EFER | EFER_NX})
    # L1's saved CR0 with bits 63:32 set.  nested_svm_vmexit() loads it
    # unchecked (svm_set_cr0(vcpu, vmcb01->save.cr0 | X86_CR0_PE)) and the
    # CPU's VMRUN of vmcb01 refuses it: svm_handle_exit() sees SVM_EXIT_ERR
    # outside guest mode and ends KVM_RUN with KVM_EXIT_FAIL_ENTRY (plus a
    # dump_vmcb in the log, no WARN).  L1 never runs with the bad CR0, which
    # is what matters; measured the same on every kernel of the tier.
    yield from _pair(
        "hsave-l1-cr0-hi", Expect("fail_entry"), {}, HSAVE_SOURCE,
        {"hsave.cr0": CR0 | 1 << 32}, {"hsave.cr0": CR0})
    # "SVM guest" cleared: RSM does not re-enter L2 but loads L2's saved
    # state into L1: L2's VMMCALL is then L1's hypercall, and the UD2 after it
    # is L1's #UD.
    yield from _pair(
        "smram-svm-guest0", exception(UD, "l2_smi_ud2"), {}, SMRAM_SOURCE,
        {"smram.svm_guest": 0}, {"smram.svm_guest": 1})
    # The VMCB12 GPA pointing at no memslot: svm_leave_smm cannot map it.
    yield from _pair(
        "smram-vmcb12-unbacked", SHUTDOWN, {}, SMRAM_SOURCE,
        {"smram.svm_vmcb12": layout.UNBACKED_GPA}, {"smram.svm_vmcb12": layout.VMCB12_GPA})
    # The saved EFER without SVME: svm_leave_smm refuses.
    yield from _pair(
        "smram-efer-svme0", SHUTDOWN, {}, SMRAM_SOURCE,
        {"smram.efer": layout.L1_EFER}, {"smram.efer": EFER})
    # VM_HSAVE_PA moved to a GPA no memslot backs: svm_leave_smm cannot map HSAVE.
    yield from _pair(
        "hsave-unbacked-at-rsm", SHUTDOWN, {}, MSR_SOURCE,
        {"msr.vm_hsave_pa": layout.UNBACKED_GPA}, {"msr.vm_hsave_pa": layout.HSAVE_GPA})


def all_cases() -> Iterator[Case]:
    yield from cases()
    yield from leak_cases()
    yield from beyond_cases()

