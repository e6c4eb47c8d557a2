"""Instruction-level checks: L1 sees an exception (or none)."""

from __future__ import annotations

from collections.abc import Iterator

from .. import layout, params
from ..case import (
    INSN,
    NEED_NO_SVM,
    NEED_SVM,
    NO_FAULT,
    Case,
    Expect,
    exception,
)
from ..vmcb import SVM_EXIT_VMMCALL

UD, GP = 6, 13
MSR_EFER = 0xC000_0080
APM_INSN = "APM vol. 3 (SVM instruction reference: exceptions)"
# Instructions whose only gate is EFER.SVME (then #UD).  VMMCALL is KVM's
# hypercall instruction and SKINIT is always #UD under KVM: listed apart.
GATED = ("vmrun", "vmload", "vmsave", "stgi", "clgi", "invlpga")


def _insn(id_: str, insn: str, expect: Expect, source: str, needs: str, flags: int = 0,
          profiles: dict[str, Expect] | None = None, **extra: int) -> Case:
    p = {"flags": flags, "insn": params.INSNS.index(insn), "vmrun_rax": layout.VMCB12_GPA,
         "hsave_pa": layout.HSAVE_GPA, **extra}
    return Case(id=id_, family="insn", scenario=INSN, payload="svm_insn", expect=expect,
                source=source, params=p, needs=frozenset({needs}), profiles=profiles or {})


# Before "KVM: SVM: Inject #UD for INVLPGA if EFER.SVME=0" (CVE-2026-46082;
# Debian 6.1.176) KVM emulated INVLPGA for any L1: no #UD.
INVLPGA_BUG = Expect("no_fault", known_bug="INVLPGA without #UD when EFER.SVME=0 "
                     "(CVE-2026-46082, fixed by 'KVM: SVM: Inject #UD for INVLPGA if EFER.SVME=0')")


def _gated_profiles(insn: str) -> dict[str, Expect]:
    if insn != "invlpga":
        return {}
    ud = exception(UD, "insn_invlpga")
    return {"legacy": INVLPGA_BUG, "fixed": ud, "7.x": ud}


def no_svm_cases() -> Iterator[Case]:
    """Guest CPUID without SVM: these run on any KVM host."""
    for insn in (*GATED, "skinit"):
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
                "KVM nested.c nested_svm_vmrun: VMCB12 GPA that cannot be mapped -> #GP",
                NEED_SVM, flags=enabled, vmrun_rax=layout.UNBACKED_GPA)
    yield _insn("insn/vmrun-no-hsave", "vmrun", exception(GP, "insn_vmrun", 0),
                "KVM nested.c nested_svm_vmrun: MSR_VM_HSAVE_PA never written -> #GP",
                NEED_SVM, flags=params.PF_SET_SVME)
    yield _insn("insn/vmrun-ok", "vmrun", Expect("no_fault", exit_code=SVM_EXIT_VMMCALL),
                "negative control of insn/vmrun-*: aligned, backed VMCB12 with HSAVE set",
                NEED_SVM, flags=enabled)
