"""VMRUN consistency checks as data: what KVM checks in software.

Each check names the AMD APM vol. 2 rule it implements (15.5.1 "Basic
Operation", the list of illegal guest-state combinations that make VMRUN
fail with VMEXIT_INVALID) and the KVM function that performs it
(arch/x86/kvm/svm/nested.c).  ``profile_switch`` names the Profile field
that enables a check that only some kernels perform; None means every
modelled kernel does.

The save-area checks run on the cached VMCB12 save area
(``__nested_vmcb_check_save``), the control checks on the cached control
area (``__nested_vmcb_check_controls``); KVM_SET_NESTED_STATE runs the same
functions (svm_set_nested_state), so does RSM upstream.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .. import layout
from ..vmcb import (
    EVTINJ_TYPE_EXEPT,
    EVTINJ_VALID,
    EVTINJ_VEC_MASK,
    INTERCEPT_VMRUN,
    NESTED_CTL_NP_ENABLE,
    TLB_CONTROL_DO_NOTHING,
    TLB_CONTROL_FLUSH_ALL_ASID,
    Vmcb,
)
from . import cpuid
from .cpuid import DEFAULT_CPU, GuestCpu
from .hwstate import DEFAULT_KVM_AMD, KvmAmd
from .profiles import TLB_CTL_REJECT, Profile

MSRPM_SIZE = 0x2000  # 8 KiB (KVM MSRPM_SIZE)
IOPM_SIZE = 0x3000  # 12 KiB (KVM IOPM_SIZE)
PAGE_MASK = ~0xFFF & ((1 << 64) - 1)

ATTR_L = 1 << 9
ATTR_DB = 1 << 10


@dataclass(frozen=True)
class Control12:
    """KVM's struct vmcb_ctrl_area_cached: the control fields it checks."""

    intercept_misc2: int
    asid: int
    nested_ctl: int
    msrpm_base_pa: int  # bits 11:0 dropped, as __nested_copy_vmcb_control_to_cache does
    iopm_base_pa: int
    tlb_ctl: int
    event_inj: int
    nested_cr3: int

    @classmethod
    def from_vmcb(cls, v: Vmcb) -> Control12:
        return cls(
            intercept_misc2=v["intercept_misc2"],
            asid=v["asid"],
            nested_ctl=v["nested_ctl"],
            msrpm_base_pa=v["msrpm_base_pa"] & PAGE_MASK,
            iopm_base_pa=v["iopm_base_pa"] & PAGE_MASK,
            tlb_ctl=v["tlb_ctl"],
            event_inj=v["event_inj"] & 0xFFFF_FFFF,
            nested_cr3=v["nested_cr3"],
        )

    @property
    def np_enabled(self) -> bool:
        return bool(self.nested_ctl & NESTED_CTL_NP_ENABLE)


@dataclass(frozen=True)
class Save12:
    """KVM's struct vmcb_save_area_cached plus CS attributes (upstream)."""

    efer: int
    cr0: int
    cr3: int
    cr4: int
    dr6: int
    dr7: int
    cs_attrib: int

    @classmethod
    def from_vmcb(cls, v: Vmcb) -> Save12:
        return cls(
            efer=v["efer"], cr0=v["cr0"], cr3=v["cr3"], cr4=v["cr4"], dr6=v["dr6"],
            dr7=v["dr7"], cs_attrib=v["cs.attrib"],
        )

    @property
    def long_mode_paging(self) -> bool:
        return bool(self.efer & layout.EFER_LME and self.cr0 & layout.CR0_PG)


@dataclass(frozen=True)
class Context:
    """What the checks are relative to: the guest CPUID and L0's kvm_amd."""

    cpu: GuestCpu = DEFAULT_CPU
    host: KvmAmd = DEFAULT_KVM_AMD

    @property
    def svm(self) -> bool:
        return self.cpu.svm


DEFAULT_CONTEXT = Context()


@dataclass(frozen=True)
class Check:
    name: str
    apm: str
    kvm: str
    profile_switch: str | None  # Profile field that enables it, None: always
    fails: Callable[..., bool]  # (state, Context) -> True when illegal

    def enabled(self, profile: Profile) -> bool:
        return self.profile_switch is None or bool(getattr(profile, self.profile_switch))


def _bitmap_illegal(pa: int, size: int) -> bool:
    # nested_svm_check_bitmap_pa(): PAGE_ALIGN(pa) and its last byte must be
    # legal GPAs (bits 11:0 are ignored by hardware).
    addr = (pa + 0xFFF) & PAGE_MASK
    return not (cpuid.legal_gpa(addr) and cpuid.legal_gpa(addr + size - 1))


# Exception vectors Linux 7.x accepts in EVENTINJ
# (nested_svm_event_inj_valid_exept): the defined exceptions; #CP only with
# SHSTK and #VC only with SEV-ES in the guest CPUID (never in the EPYC guest).
KVM7_EXCEPTIONS = frozenset({0, 1, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 16, 17, 18, 19, 28, 30})


def event_inj_invalid(event_inj: int, cpu: GuestCpu | None = None) -> bool:
    """Linux 7.x nested_svm_check_event_inj() (APM 15.20): a valid EVENTINJ
    with a reserved TYPE (1, 5, 6, 7), or TYPE exception with a vector that
    is no defined exception (NMI's 2, reserved ones, 32 and above)."""
    del cpu  # #CP/#VC would need SHSTK/SEV-ES, which no modelled guest has
    if not event_inj & EVTINJ_VALID:
        return False
    kind = (event_inj >> 8) & 7
    vector = event_inj & EVTINJ_VEC_MASK
    if kind in (1, 5, 6, 7):
        return True
    return kind << 8 == EVTINJ_TYPE_EXEPT and vector not in KVM7_EXCEPTIONS


def cpu_refuses_event(event_inj: int) -> bool:
    """The CPU's own VMRUN check of EVENTINJ, as the kernels are measured on
    it: QEMU TCG's helper_vmrun refuses a reserved TYPE and TYPE exception
    with vector 2 or 31 and above, and injects everything else."""
    if not event_inj & EVTINJ_VALID:
        return False
    kind = (event_inj >> 8) & 7
    vector = event_inj & EVTINJ_VEC_MASK
    if kind in (1, 5, 6, 7):
        return True
    return kind << 8 == EVTINJ_TYPE_EXEPT and (vector == 2 or vector >= 31)


# The predicates are named functions rather than lambdas so that mutation
# testing (scripts/mutation.sh) reaches them: (state, Context) -> illegal.

def _svme_clear(s: Save12, x: Context) -> bool:
    return not s.efer & layout.EFER_SVME


def _cd0_nw1(s: Save12, x: Context) -> bool:
    return not s.cr0 & layout.CR0_CD and bool(s.cr0 & layout.CR0_NW)


def _cr0_high(s: Save12, x: Context) -> bool:
    return bool(s.cr0 >> 32)


def _dr6_high(s: Save12, x: Context) -> bool:
    return bool(s.dr6 >> 32)


def _dr7_high(s: Save12, x: Context) -> bool:
    return bool(s.dr7 >> 32)


def _lme_pg_no_pae(s: Save12, x: Context) -> bool:
    return s.long_mode_paging and not s.cr4 & layout.CR4_PAE


def _lme_pg_no_pe(s: Save12, x: Context) -> bool:
    return s.long_mode_paging and not s.cr0 & layout.CR0_PE


def _cr3_illegal(s: Save12, x: Context) -> bool:
    return s.long_mode_paging and not cpuid.legal_gpa(s.cr3)


def _cr4_reserved(s: Save12, x: Context) -> bool:
    return bool(s.cr4 & x.cpu.cr4_reserved)


def _efer_reserved(s: Save12, x: Context) -> bool:
    return bool(s.efer & x.cpu.efer_reserved)


def _cs_l_and_d(s: Save12, x: Context) -> bool:
    return (s.long_mode_paging and bool(s.cr4 & layout.CR4_PAE)
            and bool(s.cs_attrib & ATTR_L) and bool(s.cs_attrib & ATTR_DB))


def _vmrun_not_intercepted(c: Control12, x: Context) -> bool:
    return not c.intercept_misc2 & INTERCEPT_VMRUN


def _asid0(c: Control12, x: Context) -> bool:
    return c.asid == 0


def _np_without_host_npt(c: Control12, x: Context) -> bool:
    return c.np_enabled and not x.host.npt


def _msrpm_illegal(c: Control12, x: Context) -> bool:
    return _bitmap_illegal(c.msrpm_base_pa, MSRPM_SIZE)


def _iopm_illegal(c: Control12, x: Context) -> bool:
    return _bitmap_illegal(c.iopm_base_pa, IOPM_SIZE)


def _ncr3_illegal(c: Control12, x: Context) -> bool:
    return c.np_enabled and x.host.npt and not cpuid.legal_gpa(c.nested_cr3)


def _event_inj_illegal(c: Control12, x: Context) -> bool:
    return event_inj_invalid(c.event_inj)


SAVE_CHECKS: tuple[Check, ...] = (
    Check("efer.svme=0", "15.5.1: EFER.SVME is zero", "__nested_vmcb_check_save", None,
          _svme_clear),
    Check("cr0.cd=0&&nw=1", "15.5.1: CR0.CD is zero and CR0.NW is set",
          "__nested_vmcb_check_save", None, _cd0_nw1),
    Check("cr0[63:32]", "15.5.1: CR0[63:32] are not zero", "__nested_vmcb_check_save", None,
          _cr0_high),
    Check("dr6[63:32]", "15.5.1: DR6[63:32] are not zero", "kvm_dr6_valid", None, _dr6_high),
    Check("dr7[63:32]", "15.5.1: DR7[63:32] are not zero", "kvm_dr7_valid", None, _dr7_high),
    Check("lme&&pg&&!pae", "15.5.1: EFER.LME and CR0.PG are both set and CR4.PAE is zero",
          "__nested_vmcb_check_save", None, _lme_pg_no_pae),
    Check("lme&&pg&&!pe", "15.5.1: EFER.LME and CR0.PG are both non-zero and CR0.PE is zero",
          "__nested_vmcb_check_save", None, _lme_pg_no_pe),
    Check("cr3>maxphyaddr", "15.5.1: any MBZ bit of CR3 is set (long mode)",
          "__nested_vmcb_check_save: kvm_vcpu_is_illegal_gpa(cr3) with LME&&PG", None,
          _cr3_illegal),
    Check("cr4-reserved", "15.5.1: any MBZ bit of CR4 is set", "kvm_is_valid_cr4", None,
          _cr4_reserved),
    Check("efer-reserved", "15.5.1: any MBZ bit of EFER is set", "kvm_valid_efer", None,
          _efer_reserved),
    Check("lme&&pg&&cs.l&&cs.d",
          "15.5.1: EFER.LME, CR0.PG, CR4.PAE, CS.L and CS.D are all non-zero",
          "__nested_vmcb_check_save (7.1)", "check_cs_l_d", _cs_l_and_d),
)

CONTROL_CHECKS: tuple[Check, ...] = (
    Check("vmrun-intercept", "15.5.1: the VMRUN intercept bit is clear",
          "__nested_vmcb_check_controls", None, _vmrun_not_intercepted),
    Check("asid=0", "15.5.1: ASID is equal to zero", "__nested_vmcb_check_controls", None,
          _asid0),
    # kvm_amd npt=0: L1's CPUID has no NPT.  Up to Linux 6.12 NP_ENABLE is
    # then a failed check; Linux 7.x clears it from the cached control area
    # instead (__nested_copy_vmcb_control_to_cache), and L2 runs without NP.
    Check("np-without-host-npt", "15.25.3: NP_ENABLE without nested paging support",
          "__nested_vmcb_check_controls: NP_ENABLE && !npt_enabled (6.1, 6.12)",
          "np_without_npt_rejected", _np_without_host_npt),
    Check("msrpm>maxphyaddr", "15.11: MSRPM_BASE_PA + 8 KiB beyond MAXPHYADDR",
          "nested_svm_check_bitmap_pa", None, _msrpm_illegal),
    Check("iopm>maxphyaddr", "15.10.1: IOPM_BASE_PA + 12 KiB beyond MAXPHYADDR",
          "nested_svm_check_bitmap_pa", None, _iopm_illegal),
    Check("ncr3-illegal", "15.25.4: N_CR3 beyond MAXPHYADDR with NP_ENABLE",
          "__nested_vmcb_check_controls (7.1)", "check_ncr3", _ncr3_illegal),
    Check("event_inj-invalid", "15.20: EVENTINJ with a reserved type or an impossible vector",
          "__nested_vmcb_check_controls (7.1)", "check_event_inj", _event_inj_illegal),
)


def _tlb_ctl_rejected(c: Control12, profile: Profile) -> bool:
    # nested_svm_check_tlb_ctl(): nested FLUSHBYASID is not supported, so
    # only DO_NOTHING and FLUSH_ALL_ASID pass; upstream masks instead.
    return profile.tlb_ctl == TLB_CTL_REJECT and c.tlb_ctl not in (
        TLB_CONTROL_DO_NOTHING, TLB_CONTROL_FLUSH_ALL_ASID)


# Coverage feedback for kvmtest fuzz: when set, called with the names of the
# checks that failed each time a VMCB12 is checked (VMRUN, KVM_SET_NESTED_STATE,
# RSM).  None: no cost.
on_checked: Callable[[list[str]], None] | None = None


def _context(ctx: Context | bool | None) -> Context:
    if isinstance(ctx, Context):
        return ctx
    # A bare bool: SVM in the guest CPUID or not (the EPYC guest otherwise).
    return DEFAULT_CONTEXT if ctx is None or ctx else Context(GuestCpu.build(svm=False))


def failed_save_checks(s: Save12, profile: Profile,
                       ctx: Context | bool | None = None) -> list[str]:
    x = _context(ctx)
    failed = [c.name for c in SAVE_CHECKS if c.enabled(profile) and c.fails(s, x)]
    if on_checked is not None:
        on_checked(failed)
    return failed


def failed_control_checks(c: Control12, profile: Profile,
                          ctx: Context | bool | None = None) -> list[str]:
    x = _context(ctx)
    failed = [k.name for k in CONTROL_CHECKS if k.enabled(profile) and k.fails(c, x)]
    if _tlb_ctl_rejected(c, profile):
        failed.append("tlb_ctl")
    if on_checked is not None:
        on_checked(failed)
    return failed


def failed_checks(v: Vmcb, profile: Profile, ctx: Context | bool | None = None) -> list[str]:
    """Every consistency check a VMCB12 fails under profile (empty: VMRUN
    passes KVM's software checks)."""
    return failed_save_checks(Save12.from_vmcb(v), profile, ctx) + failed_control_checks(
        Control12.from_vmcb(v), profile, ctx)
