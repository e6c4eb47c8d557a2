"""Kernel generations the model reproduces, as data.

A profile is a frozen set of switches; the model consults them at the few
places where kernels legitimately differ, so a profile difference is one
field here, never an ``if kernel == ...`` elsewhere.

Every profile is a kernel that was booted: ``measured`` names the Debian
packages whose observations it reproduces field by field
(tests/qemu/test_kernels.py compares them in CI).  A switch no measurement
can see is set from that kernel's source (Debian linux-source-6.1 6.1.192,
linux-source-6.12 6.12.117, linux-source-7.3 7.3.4).

Sources (public):
- KVM ``arch/x86/kvm/svm/nested.c``: ``nested_svm_vmrun()``,
  ``__nested_vmcb_check_controls()``, ``__nested_vmcb_check_save()``,
  ``nested_svm_check_tlb_ctl()``, ``nested_svm_vmexit()``,
  ``svm_set_nested_state()`` of Linux 6.1 (torvalds/linux at the 6.1-era
  snapshot 00f08d99dd7d) and the 2026 upstream/stable patches below.
- f85a6ce06e4a "KVM: nSVM: Clear GIF on nested #VMEXIT(INVALID)" (Yosry
  Ahmed, Cc stable; in 6.1-stable review as "[PATCH 6.1 240/969]", 2026-05-30:
  adds ``svm_set_gif(svm, false)`` to the early consistency-check path).
- "KVM: nSVM: Set exit_code_hi to -1 when synthesizing SVM_EXIT_ERR (failed
  VMRUN)" (stable, e.g. Linux 6.6.120, 2026-01-11): before it the early path
  wrote exit_code_hi = 0, i.e. EXITCODE 0x00000000ffffffff.  Debian's 6.1.170
  is newer than that backport, so every profile here writes the full -1.
- The stable patches that came with the GIF fix: Debian's linux 6.1.176-1
  changelog lists, together, "KVM: SVM: Inject #UD for INVLPGA if
  EFER.SVME=0" (CVE-2026-46082), "KVM: nSVM: Always inject a #GP if mapping
  VMCB12 fails on nested VMRUN", "KVM: nSVM: Clear GIF on nested
  #VMEXIT(INVALID)", "KVM: nSVM: Add missing consistency check for EFER, CR0,
  CR4, and CS" and "... for nCR3 validity"; linux-source-6.1 (6.1.192)
  nested.c has all of them.  Measured: Debian 6.1.170 (linux-image-6.1.0-47)
  and 6.1.192 (linux-image-6.1.0-56) under QEMU TCG agree with `legacy` and
  `fixed` case by case (tests/qemu/test_kernels.py).
- a484755ab252 "KVM: nSVM: Revert KVM's made-up consistency check on SVM's
  TLB control" (Linux 6.7, backported to 6.6/6.1 stable).
- The "nSVM: unify VMRUN failures" series (v7 merged for Linux 7.1): nCR3,
  EVENTINJ and CS.L&&CS.D checks, EVENTINJ cleared on every #VMEXIT
  (``nested_svm_vmexit_update_vmcb12``: ``vmcb12->control.event_inj = 0``),
  TLB_CTL masked instead of rejected, consistency checks added to
  ``svm_leave_smm()`` (be5fa8737d42).  What 7.2.13/7.3.4 do where that
  series' description and their source differ is the source's (7.3.4
  nested.c): a VMCB12 that cannot be mapped is KVM_EXIT_INTERNAL_ERROR, not
  #GP; late failures (CR3 load, MSRPM merge) still come after vmcb02 is
  prepared, so the #VMEXIT writes L2's state into VMCB12.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

# tlb_ctl handling
# nested_svm_check_tlb_ctl() (174a921b6975, 5.13) accepted only DO_NOTHING
# and FLUSH_ALL_ASID; a484755ab252 "Revert KVM's made-up consistency check on
# SVM's TLB control" (6.7, Cc stable: in 6.6-stable and 6.1-stable) removed
# it.  No modelled kernel rejects; "reject" is kept for older kernels.
TLB_CTL_REJECT = "reject"
TLB_CTL_ACCEPT = "accept"  # any value passes; KVM ignores it for VMCB02
TLB_CTL_MASK = "mask"  # 7.1: accepted, reserved bits dropped from the cache

# What L1 sees when NP is enabled and nCR3 is legal-looking but no memslot
# backs it (or, before 7.1, when it is beyond MAXPHYADDR: no check).
# 6.1: mmu_alloc_shadow_roots() -> mmu_check_root() requests a triple
# fault for an invisible root GFN; in guest mode that is
# nested_svm_triple_fault(): #VMEXIT(SHUTDOWN).  Newer kernels run L2 on a
# dummy root and reflect the failed NPT walk as #VMEXIT(NPF).
NCR3_SHUTDOWN = "shutdown"
NCR3_NPF = "npf"


@dataclass(frozen=True)
class Profile:
    name: str
    kernels: str
    summary: str
    # The kernels booted and measured for this profile, as kvmtest kernel
    # specs (debian:PACKAGE[@SUITE]).
    measured: tuple[str, ...]
    # Early consistency-check failure (nested_svm_vmrun's "goto out" path)
    # clears GIF, as every #VMEXIT does architecturally (f85a6ce06e4a).
    clear_gif_on_check_failure: bool
    # Checks only upstream (7.1) performs in software; older kernels pass
    # the state to hardware, whose own VMRUN checks then fail (see svm.py).
    check_ncr3: bool
    check_event_inj: bool
    check_cs_l_d: bool
    tlb_ctl: str
    unbacked_ncr3: str
    # invlpga_interception() calls nested_svm_check_permissions(): before
    # "KVM: SVM: Inject #UD for INVLPGA if EFER.SVME=0" (CVE-2026-46082) KVM
    # emulated INVLPGA as INVLPG whatever EFER.SVME, CPL or the guest CPUID.
    invlpga_checks_permissions: bool
    # EVENTINJ/EVENTINJ_ERR written as 0 into VMCB12 on every #VMEXIT,
    # including a failed VMRUN.  Older kernels copy back the cached value.
    clear_event_inj_on_vmexit: bool
    # svm_leave_smm() runs nested_vmcb_check_save()/nested_vmcb_check_controls()
    # on the VMCB12 it re-enters L2 from, and a failure makes RSM shut the
    # vCPU down (be5fa8737d42 "KVM: SVM: check validity of VMCB controls when
    # returning from SMM"; measured: in Debian 6.12.95, not in 6.1.170/6.1.192).
    rsm_checks_vmcb12: bool
    # kvm_amd npt=0 (no NPT in L1's CPUID): NP_ENABLE in VMCB12 fails the
    # consistency checks up to 6.12 (__nested_vmcb_check_controls:
    # NP_ENABLE && !npt_enabled); Linux 7.x clears it when copying VMCB12's
    # controls to its cache instead, and L2 runs without nested paging.
    np_without_npt_rejected: bool = True
    # Under vGIF (vls) KVM stops intercepting STGI/CLGI (VMLOAD/VMSAVE) in
    # init_vmcb(), so the CPU -- which always sees EFER.SVME=1, svm_set_efer()
    # -- runs them without the #UD EFER.SVME=0 calls for.  Linux 7.x
    # intercepts them again while L1's EFER.SVME is clear
    # (svm_recalc_instruction_intercepts, "KVM: SVM: Recalc instructions
    # intercepts when EFER.SVME is toggled").
    svme0_reintercepts: bool = False
    # svm_set_efer() taking EFER.SVME from 1 to 0 outside guest mode sets GIF
    # (6.1.192 and 6.12.117 svm.c: "svm_leave_nested(vcpu); svm_set_gif(svm,
    # true);"); 7.3.4 only sets it through svm_leave_nested() of a vCPU in
    # guest mode.  Seen when an SMM handler clears EFER.SVME in L1's saved
    # state (smm/hsave-l1-efer-svme0).
    svme_clear_sets_gif: bool = True
    # VMRUN on a legal GPA no memslot backs: "gp" (kvm_vcpu_map() fails ->
    # #GP, 6.x) or "internal_error" (7.x: kvm_handle_memory_failure() ->
    # KVM_EXIT_INTERNAL_ERROR, emulation; kvmtest/cases/insn.py).
    unbacked_vmcb12: str = "gp"
    # --- catalogue depth (model/events.py, model/nested.py) ---
    # A VMRUN that fails its consistency checks with RFLAGS.TF set ends in a
    # #DB with DR6.BS (kvm_skip_emulated_instruction); Linux 7.x skips it
    # with svm_skip_emulated_instruction: no #DB ("FIXME" in nested_svm_vmrun).
    vmrun_tf_trap_on_check_failure: bool = True
    # svm_interrupt_allowed() returns -EBUSY for nested_run_pending before
    # looking at GIF/RFLAGS.IF, and the interrupt-window exit takes -EBUSY as
    # "allowed": right after a VMRUN the host is told to inject, into L2.
    # Linux 7.x checks svm_interrupt_blocked() first.
    irq_window_ignores_run_pending: bool = True
    # nested_svm_vmexit() when VMCB12 cannot be mapped: "gp_in_l2" (6.1, 6.12:
    # kvm_inject_gp while still in guest mode, the #VMEXIT dropped) or
    # "triple_fault" (7.x: #VMEXIT without VMCB12, then L1 shuts down).
    unmappable_vmcb12_at_vmexit: str = "gp_in_l2"
    # svm_set_nested_state(): EFER.SVME=0 with flags == 0 (GIF=0) accepted
    # (7.x: "clearing SVME does NOT set GIF"); older kernels want GIF_SET.
    nested_state_svme0_gif0: bool = False
    # svm_set_nested_state(): L1's EFER.LMA without EFER.LME refused (7.x).
    nested_state_lma_needs_lme: bool = False

    def describe(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)) for f in fields(self)}


LEGACY = Profile(
    name="legacy",
    kernels="Debian 6.1.170 (bookworm; 6.1 stable before the 2026 nSVM fixes of 6.1.176)",
    summary="consistency-check failure writes VMEXIT_INVALID but leaves GIF unchanged",
    measured=("debian:linux-image-6.1.0-47-amd64-unsigned",),
    clear_gif_on_check_failure=False,
    check_ncr3=False,
    check_event_inj=False,
    check_cs_l_d=False,
    tlb_ctl=TLB_CTL_ACCEPT,
    unbacked_ncr3=NCR3_SHUTDOWN,
    invlpga_checks_permissions=False,
    clear_event_inj_on_vmexit=False,
    rsm_checks_vmcb12=False,
)

# Each newer profile is the one before it plus what changed: the lineage
# itself is data.
FIXED = replace(
    LEGACY,
    name="fixed",
    kernels="Debian 6.1.192 (bookworm)",
    summary="legacy + GIF cleared on #VMEXIT(INVALID) from a consistency check, "
    "nCR3 and CS.L&&CS.D checked, INVLPGA gated",
    measured=("debian:linux-image-6.1.0-56-amd64-unsigned",),
    clear_gif_on_check_failure=True,
    check_ncr3=True,
    check_cs_l_d=True,
    invlpga_checks_permissions=True,
)

# Measured on Debian 6.12.95 (bookworm-backports) and 6.12.117 (trixie) under
# QEMU TCG, observation for observation the same: fixed, plus EVENTINJ
# cleared on every #VMEXIT and be5fa8737d42's RSM checks (stable 6.12.88);
# EVENTINJ validity is still left to the CPU.
STABLE_612 = replace(
    FIXED,
    name="6.12-stable",
    kernels="Debian 6.12.95 (bookworm-backports) and 6.12.117 (trixie)",
    summary="fixed + EVENTINJ cleared on #VMEXIT, consistency checks on RSM into L2",
    measured=("debian:linux-image-6.12.95+deb12-amd64-unsigned@bookworm-backports",
              "debian:linux-image-6.12.117+deb13-amd64-unsigned@trixie"),
    clear_event_inj_on_vmexit=True,
    rsm_checks_vmcb12=True,
)

# Measured on Debian 7.2.13 (sid) and 7.3.4 (trixie-backports), observation
# for observation the same.
V7 = replace(
    STABLE_612,
    name="7.x",
    kernels="Debian 7.2.13 (sid) and 7.3.4 (trixie-backports)",
    summary="6.12-stable + EVENTINJ validity checked, TLB_CTL masked, an unbacked "
    "VMCB12 handed to userspace, GIF kept when EFER.SVME is cleared",
    measured=("debian:linux-image-7.2.13+deb14-amd64@sid",
              "debian:linux-image-7.3.4+deb13-amd64@trixie-backports"),
    check_event_inj=True,
    tlb_ctl=TLB_CTL_MASK,
    unbacked_ncr3=NCR3_NPF,
    np_without_npt_rejected=False,
    svme0_reintercepts=True,
    svme_clear_sets_gif=False,
    unbacked_vmcb12="internal_error",
    vmrun_tf_trap_on_check_failure=False,
    irq_window_ignores_run_pending=False,
    unmappable_vmcb12_at_vmexit="triple_fault",
    nested_state_svme0_gif0=True,
    nested_state_lma_needs_lme=True,
)

PROFILES: dict[str, Profile] = {p.name: p for p in (LEGACY, FIXED, STABLE_612, V7)}
DEFAULT_PROFILE = V7.name


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(
            f"unknown model profile {name!r} (known: {', '.join(PROFILES)})"
        ) from None
