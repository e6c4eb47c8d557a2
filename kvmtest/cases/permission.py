"""Permission checks of the SVM instructions (payloads perm.S, smm_vmrun.S).

The APM: VMRUN "is available only at CPL 0. A #GP(0) exception is raised if
the CPL is greater than 0. Furthermore, the processor must be in protected
mode and EFER.SVME must be set to 1, otherwise, a #UD exception is raised"
(vol. 2 15.5.1); VMLOAD/VMSAVE likewise (15.5.2), and the same holds for
STGI, CLGI and INVLPGA (vol. 3, their exception tables).  Those checks come
before the instruction intercepts (15.7: "instruction intercepts are checked
after simple exceptions (such as #GP -- when CPL is incorrect -- or #UD)").
Paging is not among them.

KVM (nested.c nested_svm_check_permissions, every kernel measured) raises
#UD when "!(vcpu->arch.efer & EFER_SVME) || !is_paging(vcpu)": protected
mode without paging gets #UD too.  The [no-paging] cases hold KVM to the
APM; every kernel fails them (docs/findings.md).  With vGIF (kvm_amd vgif=1)
KVM does not intercept STGI and CLGI at all, nor VMLOAD and VMSAVE with vls:
the CPU runs them, with the APM's checks only, so
perm/{stgi,clgi}-no-paging-vgif and perm/{vmload,vmsave}-no-paging-vls pass
where their intercepted twins fail.

VMRUN in SMM: "VMRUN is not supported inside the SMM handler and the
behavior is undefined" (APM vol. 2 15.5); KVM's nested_svm_vmrun() answers
#UD (is_smm), after its MSR_VM_HSAVE_PA check.
"""

from __future__ import annotations

from collections.abc import Iterator

from .. import layout, params
from ..case import (
    INSN,
    NEED_NO_VGIF,
    NEED_NO_VLS,
    NEED_SMM,
    NEED_SVM,
    NEED_VGIF,
    NEED_VLS,
    NO_FAULT,
    SCRIPT,
    Case,
    Expect,
    exception,
)
from ..vmcb import SVM_EXIT_VMMCALL

UD, GP = 6, 13
INSNS = ("vmrun", "vmload", "vmsave", "stgi", "clgi", "invlpga")
APM = "APM vol. 2 15.5.1/15.5.2, vol. 3 (SVM instruction exceptions), 15.7 (priority)"
KVM = "KVM nested.c nested_svm_check_permissions"
ENABLED = params.PF_SET_SVME | params.PF_SET_HSAVE
SITE = {params.PERM_CPL0: "perm64", params.PERM_CPL3: "perm64",
        params.PERM_COMPAT: "perm32", params.PERM_NO_PAGING: "perm32",
        params.PERM_REAL: "perm16"}


# Instructions KVM leaves to the CPU under a kvm_amd feature: the CPU makes
# the APM's checks only, so with paging off they run.  insn -> (feature, need
# off, need on, where KVM clears the intercept).
VLS_CLEARS = ("vls clears INTERCEPT_VMLOAD/VMSAVE: 7.x svm.c "
              "svm_recalc_instruction_intercepts at EFER.SVME=1, 6.1 svm_vcpu_after_set_cpuid")
CPU_HANDLED = {
    "stgi": ("vgif", NEED_NO_VGIF, NEED_VGIF, "svm.c init_vmcb: vgif clears INTERCEPT_STGI"),
    "clgi": ("vgif", NEED_NO_VGIF, NEED_VGIF, "svm.c init_vmcb: vgif clears INTERCEPT_CLGI"),
    "vmload": ("vls", NEED_NO_VLS, NEED_VLS, VLS_CLEARS),
    "vmsave": ("vls", NEED_NO_VLS, NEED_VLS, VLS_CLEARS),
}


def _no_fault(insn: str) -> Expect:
    """The instruction completes: VMRUN of the default VMCB12 then sees L2's VMMCALL."""
    return Expect("no_fault", exit_code=SVM_EXIT_VMMCALL) if insn == "vmrun" else NO_FAULT


def _case(id_: str, insn: str, mode: int, expect: Expect, source: str, family: str = "perm",
          profiles: dict[str, Expect] | None = None, control_of: str | None = None,
          needs: frozenset[str] = frozenset()) -> Case:
    p = {"flags": ENABLED, "insn": params.INSNS.index(insn), "mode": mode,
         "vmrun_rax": layout.VMCB12_GPA, "hsave_pa": layout.HSAVE_GPA}
    return Case(id=id_, family=family, scenario=INSN, payload="perm", expect=expect,
                source=source, params=p, needs=frozenset({NEED_SVM}) | needs,
                profiles=profiles or {}, control_of=control_of)


# Measured: every kernel #UDs with paging off (is_paging), except that
# 6.1.170 emulates INVLPGA without any check (CVE-2026-46082, insn.py).
def _no_paging_profiles(insn: str) -> dict[str, Expect]:
    ud = Expect("exception", vector=UD, at=f"perm32_{insn}", known_bug=(
        "#UD for an SVM instruction in protected mode with paging off (KVM's "
        "nested_svm_check_permissions tests is_paging; the APM asks protected mode only)"))
    legacy = _no_fault(insn) if insn == "invlpga" else ud
    return {"legacy": legacy, "fixed": ud, "7.x": ud}


def cases() -> Iterator[Case]:
    for insn in INSNS:
        cpl3 = f"perm/{insn}-cpl3"
        yield _case(cpl3, insn, params.PERM_CPL3, exception(GP, f"perm64_{insn}", 0),
                    f"{APM}: #GP(0) at CPL > 0; {KVM}")
        yield _case(f"negative/perm-{insn}-cpl0", insn, params.PERM_CPL0, _no_fault(insn),
                    f"negative control of {cpl3}: the same GDT, at CPL 0", "negative",
                    control_of=cpl3)
        nopg = f"perm/{insn}-no-paging"
        feature = CPU_HANDLED.get(insn)
        yield _case(nopg, insn, params.PERM_NO_PAGING, _no_fault(insn),
                    f"{APM}: protected mode without paging is allowed; {KVM} (is_paging)",
                    profiles=_no_paging_profiles(insn),
                    needs=frozenset({feature[1]}) if feature else frozenset())
        if feature:
            name, _, on, why = feature
            yield _case(f"{nopg}-{name}", insn, params.PERM_NO_PAGING, NO_FAULT,
                        f"{APM}; with {name} KVM does not intercept {insn.upper()} ({why}); "
                        f"control: negative/perm-{insn}-compat", needs=frozenset({on}))
        yield _case(f"negative/perm-{insn}-compat", insn, params.PERM_COMPAT, _no_fault(insn),
                    f"negative control of {nopg}: the same 32-bit code with paging on",
                    "negative", control_of=nopg)
        real = f"perm/{insn}-real-mode"
        yield _case(real, insn, params.PERM_REAL, exception(UD, f"perm16_{insn}"),
                    f"{APM}: #UD outside protected mode (checked before the intercept)")
    yield from _vgif_restored_cases()
    yield _case("negative/perm-vmmcall-real-mode", "vmmcall", params.PERM_REAL, NO_FAULT,
                "negative control of perm/*-real-mode: VMMCALL has no mode check (APM vol. "
                "2 15.18) and KVM handles it (kvm_emulate_hypercall): the real-mode path "
                "reaches the instruction site and reports", "negative",
                control_of="perm/vmrun-real-mode")


# With vGIF, 6.x never intercept STGI/CLGI and 7.x re-intercepts them while
# EFER.SVME=0 (the insn family: insn/*-{stgi,clgi}-vgif, docs/findings.md
# 4).  7.x's svm_set_gif(svm, true) drops the STGI intercept again, e.g. when
# a VMM restores the vCPU with KVM_SET_NESTED_STATE(GIF_SET), and nothing
# re-arms it until EFER.SVME changes: STGI then runs without #UD.  The host
# drives that path before L1 runs (STAGE_BEFORE_L1): an EFER.SVME change
# requests the intercept recalculation, one guest instruction lets KVM do it
# (l1_entry's MOV to RSP, single-stepped), then GIF=1 is restored.  Measured
# on 6.1.170 .. 7.3.4 (docs/findings.md D6).
RESTORED = ("efer_svme 1", "efer_svme 0", "step", "nested_gif1")
RESTORED_BUG = Expect("no_fault", known_bug=(
    "STGI without #UD while EFER.SVME=0 (vGIF): the CPU runs it and sees KVM's EFER.SVME=1 "
    "(6.x: never intercepted; 7.x: svm_set_gif(true) dropped the intercept)"))


def _vgif_restored_cases() -> Iterator[Case]:
    bad = "perm/stgi-svme0-vgif-restored"
    p = {"flags": params.PF_SET_HSAVE, "insn": params.INSNS.index("stgi"),
         "mode": params.PERM_CPL0, "vmrun_rax": layout.VMCB12_GPA,
         "hsave_pa": layout.HSAVE_GPA}
    common = dict(scenario=INSN, payload="perm", needs=frozenset({NEED_SVM, NEED_VGIF}),
                  on_sync={params.STAGE_BEFORE_L1: RESTORED})
    yield Case(id=bad, family="perm", expect=exception(UD, "perm64_stgi"), params=p,
               profiles={"legacy": RESTORED_BUG, "fixed": RESTORED_BUG, "7.x": RESTORED_BUG},
               source=f"{APM}: #UD with EFER.SVME=0; KVM svm.c svm_set_gif (vgif), "
               "svm_recalc_instruction_intercepts, nested.c svm_set_nested_state", **common)
    yield Case(id="negative/perm-stgi-svme1-vgif-restored", family="negative",
               expect=NO_FAULT, params={**p, "flags": ENABLED},
               source=f"negative control of {bad}: EFER.SVME=1", control_of=bad, **common)


def smm_cases() -> Iterator[Case]:
    """VMRUN in SMM (payload smm_vmrun.S): the SMI handler enters long mode
    with EFER.SVME and L1's IDT, then executes the instruction."""
    common = dict(scenario=SCRIPT, payload="smm_vmrun",
                  on_sync={params.STAGE_HOST_ACTION: ("smi",)},
                  needs=frozenset({NEED_SVM, NEED_SMM}))

    def p(insn: str, mode: int) -> dict[str, int]:
        return {"flags": ENABLED, "insn": params.INSNS.index(insn), "mode": mode}

    bad = "perm/vmrun-smm"
    yield Case(id=bad, family="perm", expect=exception(UD, "smm_vmrun"),
               source="APM vol. 2 15.5 (VMRUN in SMM undefined); KVM nested.c "
               "nested_svm_vmrun (is_smm -> #UD)", params=p("vmrun", params.PERM_SMM),
               **common)
    # The same code outside SMM: VMRUN works, so SMM is what #UDs it.
    yield Case(id="negative/perm-vmrun-smm", family="negative",
               expect=Expect("no_fault", exit_code=SVM_EXIT_VMMCALL),
               source=f"negative control of {bad}: the handler's code called by L1 outside "
               "SMM", params=p("vmrun", params.PERM_CPL0), control_of=bad, **common)
    # In SMM, VMLOAD has no SMM check: the handler's set-up is sound.
    yield Case(id="negative/perm-vmload-smm", family="negative", expect=NO_FAULT,
               source=f"negative control of {bad}: VMLOAD in the same SMM handler "
               "(vmload_interception has no SMM check)", params=p("vmload", params.PERM_SMM),
               **common)
