"""Instruction-level checks: L1 sees an exception (or none)."""

from __future__ import annotations

from collections.abc import Iterator

from .. import layout, params
from ..case import (
    INSN,
    NEED_NO_SVM,
    NEED_NO_VGIF,
    NEED_NO_VLS,
    NEED_SVM,
    NEED_VGIF,
    NEED_VLS,
    NO_FAULT,
    Case,
    Expect,
    exception,
)
from ..vmcb import SVM_EXIT_VMMCALL, SVM_EXIT_VMRUN

UD, GP = 6, 13
MSR_EFER = 0xC000_0080
APM_INSN = "APM vol. 3 (SVM instruction reference: exceptions)"
# Instructions whose only gate is EFER.SVME (then #UD).  VMMCALL is KVM's
# hypercall instruction and SKINIT is always #UD under KVM: listed apart.
GATED = ("vmrun", "vmload", "vmsave", "stgi", "clgi", "invlpga")


def _insn(id_: str, insn: str, expect: Expect, source: str, needs: str, flags: int = 0,
          profiles: dict[str, Expect] | None = None, config: frozenset[str] = frozenset(),
          cpuid: dict[str, bool] | None = None, **extra: int) -> Case:
    p = {"flags": flags, "insn": params.INSNS.index(insn), "vmrun_rax": layout.VMCB12_GPA,
         "hsave_pa": layout.HSAVE_GPA, **extra}
    return Case(id=id_, family="insn", scenario=INSN, payload="svm_insn", expect=expect,
                source=source, params=p, needs=frozenset({needs, *config}),
                profiles=profiles or {}, cpuid=cpuid or {})


# What L0's kvm_amd hands to the CPU: vGIF clears the STGI/CLGI intercepts,
# vls the VMLOAD/VMSAVE ones (svm.c init_vmcb).  The CPU then runs them with
# the hardware VMCB's EFER, where KVM always sets SVME (svm_set_efer), so
# L1's EFER.SVME=0 gives no #UD.  Linux 7.x intercepts them again while
# L1's EFER.SVME is clear ("KVM: SVM: Recalc instructions intercepts when
# EFER.SVME is toggled"), and then nested_svm_check_permissions() #UDs.
UNINTERCEPTED = {"stgi": NEED_VGIF, "clgi": NEED_VGIF, "vmload": NEED_VLS, "vmsave": NEED_VLS}
CONFIG_OFF = {NEED_VGIF: NEED_NO_VGIF, NEED_VLS: NEED_NO_VLS}
HANDED_TO_CPU = ("KVM leaves {insn} to the CPU under {cfg} (init_vmcb), which sees EFER.SVME=1 "
                 "(svm_set_efer): no #UD with L1's EFER.SVME=0 (fixed in 7.x by 'KVM: SVM: "
                 "Recalc instructions intercepts when EFER.SVME is toggled')")
# With SKINIT in the guest CPUID, STGI at EFER.SVME=0 is legal (APM), but
# KVM's stgi_interception -> nested_svm_check_permissions #UDs it whatever
# the CPUID says.  KVM supports no SKINIT at all (never in
# KVM_GET_SUPPORTED_CPUID; skinit_interception #UDs SKINIT itself), so a VMM
# that enumerates it runs outside KVM's contract: recorded per kernel, not
# failed (docs/findings.md, "Measured, and judged not to contradict ...").
# 7.x under vGIF: a KVM_SET_NESTED_STATE that sets GIF (as a VMM does at
# reset) drops the STGI intercept again (svm_set_gif); the kvm backend only
# sets nested state where a case left some, so a case sees a fresh vCPU.
KVM_PERM = "KVM svm.c stgi/clgi/vmload/vmsave_interception -> nested_svm_check_permissions"


def architectural_ud(insn: str, skinit: bool) -> bool:
    """#UD with EFER.SVME=0 (AMD APM vol. 3): STGI is still legal when the
    guest CPUID enumerates SKINIT (DEV; SVM-Lock, the other condition, is
    never in KVM's guest CPUID); the others need EFER.SVME=1."""
    return not (insn == "stgi" and skinit)


def svme0_profiles(insn: str, skinit: bool, config_on: bool) -> dict[str, Expect]:
    """What each kernel does with insn at EFER.SVME=0 (SVM in CPUID or not):
    intercepted, KVM #UDs (nested_svm_check_permissions); handed to the
    CPU, no #UD.  Differences from the APM are known bugs."""
    ud = architectural_ud(insn, skinit)
    cfg = "vGIF" if insn in ("stgi", "clgi") else "vls"
    out = {}
    for profile, reintercepts in (("legacy", False), ("fixed", False), ("7.x", True)):
        kvm_ud = reintercepts or not config_on
        if kvm_ud == ud:
            out[profile] = exception(UD, f"insn_{insn}") if ud else NO_FAULT
        elif kvm_ud:  # SKINIT enumerated but not supported by KVM: see above
            out[profile] = exception(UD, f"insn_{insn}")
        else:
            out[profile] = Expect("no_fault", known_bug=HANDED_TO_CPU.format(
                insn=insn.upper(), cfg=cfg))
    return out


# Before "KVM: SVM: Inject #UD for INVLPGA if EFER.SVME=0" (CVE-2026-46082;
# Debian 6.1.176) KVM emulated INVLPGA for any L1: no #UD.
INVLPGA_BUG = Expect("no_fault", known_bug="INVLPGA without #UD when EFER.SVME=0 "
                     "(CVE-2026-46082, fixed by 'KVM: SVM: Inject #UD for INVLPGA if EFER.SVME=0')")


def _gated_profiles(insn: str) -> dict[str, Expect]:
    if insn != "invlpga":
        return {}
    ud = exception(UD, "insn_invlpga")
    return {"legacy": INVLPGA_BUG, "fixed": ud, "7.x": ud}


# VMRUN on a legal, aligned GPA that no memslot backs.  The APM's VMRUN #GP
# conditions are rAX unaligned or beyond MAXPHYADDR (the two cases above it,
# #GP on every kernel); what VMRUN does when no memory answers at a legal
# address is a platform matter the architecture does not define.  So each
# kernel's answer passes, as a profile:
# - 6.1.x and 6.12.x (Debian 6.1.170, 6.1.192, 6.12.95, 6.12.117): nested.c
#   nested_svm_vmrun(): kvm_vcpu_map() fails -> kvm_inject_gp(vcpu, 0) (since
#   "KVM: nSVM: Always inject a #GP if mapping VMCB12 fails on nested VMRUN",
#   Debian 6.1.176; measured: 6.1.170, before it, gives #GP here as well);
# - 7.x (Debian 7.2.13, 7.3.4): nested_svm_vmrun(): after page_address_valid()
#   passed, nested_svm_copy_vmcb12_to_cache() returns -EFAULT and KVM calls
#   kvm_handle_memory_failure(vcpu, X86EMUL_IO_NEEDED, NULL), i.e.
#   kvm_prepare_emulation_failure_exit(): KVM_EXIT_INTERNAL_ERROR, suberror
#   KVM_INTERNAL_ERROR_EMULATION, data = flags 0 then the exit being handled
#   (SVM_EXIT_VMRUN).  KVM hands an access to memory it cannot emulate
#   (MMIO) to the VMM, as it does for other instructions' memory operands;
#   the guest can only stop itself this way, and L1 never runs on.
UNBACKED_VMCB12 = {
    "legacy": exception(GP, "insn_vmrun", 0), "fixed": exception(GP, "insn_vmrun", 0),
    "6.12-stable": exception(GP, "insn_vmrun", 0),
    "7.x": Expect("internal_error", suberror=1, exit_code=SVM_EXIT_VMRUN),
}


def _config_variants(prefix: str, insn: str, needs: str, flags: int, why: str,
                     ) -> Iterator[Case]:
    """insn at EFER.SVME=0 in every configuration that changes its path:
    L0 intercepting it or not (vGIF/vls), SKINIT in the guest CPUID or not
    (STGI, CLGI).  The expectation follows the APM for that guest CPUID."""
    cfg = UNINTERCEPTED.get(insn)
    # SKINIT variants with SVM in the guest CPUID only: they need an AMD host
    # (on an Intel one STGI is no instruction at all, whatever the CPUID).
    skinits = (False, True) if insn in ("stgi", "clgi") and needs == NEED_SVM else (False,)
    for skinit in skinits:
        for on in ((False, True) if cfg else (False,)):
            name = f"insn/{prefix}-{insn}" + ("-skinit" if skinit else "") + (
                f"-{cfg}" if on else "")
            ud = architectural_ud(insn, skinit)
            expect = exception(UD, f"insn_{insn}") if ud else NO_FAULT
            config = frozenset({cfg if on else CONFIG_OFF[cfg]}) if cfg else frozenset()
            profiles = svme0_profiles(insn, skinit, on) if cfg else _gated_profiles(insn)
            if all(e == expect for e in profiles.values()):
                profiles = {}  # every kernel keeps the contract here
            cpuid = {"skinit": True} if skinit else None
            yield _insn(name, insn, expect,
                        f"{APM_INSN}: {why}" + (", SKINIT enumerated (STGI stays legal)"
                                                if skinit else "") + f"; {KVM_PERM}",
                        needs, flags=flags, profiles=profiles, config=config, cpuid=cpuid)


def no_svm_cases() -> Iterator[Case]:
    """Guest CPUID without SVM: these run on any KVM host."""
    for insn in (*GATED, "skinit"):
        if insn in UNINTERCEPTED:
            yield from _config_variants("nosvm", insn, NEED_NO_SVM, 0,
                                        "#UD when SVM is not available")
            continue
        yield _insn(f"insn/nosvm-{insn}", insn, exception(UD, f"insn_{insn}"),
                    f"{APM_INSN}: #UD when SVM is not available; KVM svm.c / vmx.c",
                    NEED_NO_SVM, profiles=_gated_profiles(insn))
    yield _insn("insn/nosvm-wrmsr-efer-svme", "wrmsr", exception(GP, "insn_wrmsr", 0),
                "APM vol. 2 3.1.7: setting a reserved EFER bit #GP; KVM kvm_valid_efer "
                "(EFER.SVME needs SVM in guest CPUID)", NEED_NO_SVM,
                msr_index=MSR_EFER, msr_value=layout.L1_EFER | layout.EFER_SVME)
    yield _insn("insn/nosvm-wrmsr-efer-same", "wrmsr", NO_FAULT,
                "negative control of insn/nosvm-wrmsr-efer-svme: EFER rewritten unchanged",
                NEED_NO_SVM, msr_index=MSR_EFER, msr_value=layout.L1_EFER)


def svm_cases(maxphyaddr: int) -> Iterator[Case]:
    for insn in GATED:
        if insn in UNINTERCEPTED:
            yield from _config_variants("svme0", insn, NEED_SVM, params.PF_SET_HSAVE,
                                        "#UD when EFER.SVME=0")
            continue
        yield _insn(f"insn/svme0-{insn}", insn, exception(UD, f"insn_{insn}"),
                    f"{APM_INSN}: #UD when EFER.SVME=0; KVM nested_svm_check_permissions",
                    NEED_SVM, flags=params.PF_SET_HSAVE, profiles=_gated_profiles(insn))
    yield _insn("insn/skinit", "skinit", exception(UD, "insn_skinit"),
                "KVM svm.c skinit_interception: SKINIT is always #UD in a guest", NEED_SVM,
                flags=params.PF_SET_SVME | params.PF_SET_HSAVE)
    enabled = params.PF_SET_SVME | params.PF_SET_HSAVE
    yield _insn("insn/vmrun-rax-unaligned", "vmrun", exception(GP, "insn_vmrun", 0),
                f"{APM_INSN} VMRUN: #GP if rAX is not 4 KiB aligned; KVM svm.c gp_interception",
                NEED_SVM, flags=enabled, vmrun_rax=layout.VMCB12_GPA + 0x10)
    yield _insn("insn/vmrun-rax-above-maxphyaddr", "vmrun", exception(GP, "insn_vmrun", 0),
                f"{APM_INSN} VMRUN: #GP if rAX is above MAXPHYADDR", NEED_SVM,
                flags=enabled, vmrun_rax=1 << maxphyaddr)
    yield _insn("insn/vmrun-rax-unbacked", "vmrun", exception(GP, "insn_vmrun", 0),
                "KVM nested.c nested_svm_vmrun: a VMCB12 GPA no memslot backs (6.x: #GP, "
                "7.x: KVM_EXIT_INTERNAL_ERROR to userspace; both legitimate, see insn.py)",
                NEED_SVM, flags=enabled, profiles=UNBACKED_VMCB12,
                vmrun_rax=layout.UNBACKED_GPA)
    yield _insn("insn/vmrun-no-hsave", "vmrun", exception(GP, "insn_vmrun", 0),
                "KVM nested.c nested_svm_vmrun: MSR_VM_HSAVE_PA never written -> #GP",
                NEED_SVM, flags=params.PF_SET_SVME)
    yield _insn("insn/vmrun-ok", "vmrun", Expect("no_fault", exit_code=SVM_EXIT_VMMCALL),
                "negative control of insn/vmrun-*: aligned, backed VMCB12 with HSAVE set",
                NEED_SVM, flags=enabled)
