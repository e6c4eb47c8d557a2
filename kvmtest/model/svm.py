"""The reference model of KVM's nested SVM (arch/x86/kvm/svm/nested.c).

It sees L1 through the small CPU interface of machine.py and decides what
KVM (and, below it, the CPU) does for each SVM instruction, SVM MSR access
and L2 event.  Names follow KVM: vmcb12 is L1's VMCB for L2, "vmcb01" is
L1's own state saved at VMRUN, GIF, hsave_msr, nested_run_pending...

Two layers of VMRUN checks are modelled:
- KVM's software checks (checks.py; nested_svm_vmrun() ->
  nested_vmcb_check_save()/nested_vmcb_check_controls()), whose failure
  writes VMEXIT_INVALID without the #VMEXIT cleanup on kernels without
  f85a6ce06e4a (profile ``clear_gif_on_check_failure``);
- the CPU's own VMRUN checks of VMCB02 (APM 15.5.1) for state KVM passes
  through unchecked on older kernels (CS.L&&CS.D, EVENTINJ): the hardware
  VMRUN fails with VMEXIT_INVALID, svm_handle_exit() sees SVM_EXIT_ERR in
  guest mode and reflects it to L1 with the complete nested_svm_vmexit(),
  which clears GIF -- so those cases fail on every profile, only the path
  differs.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING

from unicorn import x86_const as x86

from .. import layout
from ..exits import Exit, FailEntryExit, InternalErrorExit, ShutdownExit
from ..observation import (
    KVM_STATE_NESTED_GIF_SET,
    KVM_STATE_NESTED_GUEST_MODE,
    KVM_STATE_NESTED_RUN_PENDING,
    NestedView,
)
from ..vmcb import (
    EVTINJ_TYPE_EXEPT,
    EVTINJ_TYPE_NMI,
    EVTINJ_VALID,
    INTERCEPT_HLT,
    INTERCEPT_IOIO_PROT,
    INTERCEPT_MSR_PROT,
    INTERCEPT_SHUTDOWN,
    INTERCEPT_SMI,
    SVM_EXIT_ERR,
    SVM_EXIT_EXCP_BASE,
    SVM_EXIT_HLT,
    SVM_EXIT_IOIO,
    SVM_EXIT_MSR,
    SVM_EXIT_NPF,
    SVM_EXIT_SHUTDOWN,
    SVM_EXIT_VMRUN,
    Vmcb,
)
from . import checks, cpuid, hwstate, paging
from .cpuid import GuestCpu
from .hwstate import KvmAmd
from .modes import RFLAGS_VM
from .profiles import NCR3_NPF, Profile

if TYPE_CHECKING:
    from .machine import ModelMachine
    from .smm import SmramState

MSR_EFER = 0xC000_0080
MSR_VM_CR = 0xC001_0114
MSR_VM_HSAVE_PA = 0xC001_0117
SVM_MSRS = frozenset({MSR_EFER, MSR_VM_CR, MSR_VM_HSAVE_PA})

SVM_VM_CR_VALID_MASK = 0x1F
SVM_VM_CR_SVM_LOCK = 1 << 3
SVM_VM_CR_SVM_DIS = 1 << 4

KVM_ENOSYS = 1000
KVM_INTERNAL_ERROR_EMULATION = 1
KVM_EPERM = 1

DR6_ACTIVE_LOW = 0xFFFF0FF0
DR7_FIXED_1 = 0x400
M64 = (1 << 64) - 1

UD = 6
GP = 13
EVTINJ_TYPE_MASK = 7 << 8
# Vectors QEMU's exception delivery pushes an error code for
# (target/i386/tcg seg_helper.c exception_has_error_code).
CPU_ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17})

# Intercepts of L1 for L2 (VMCB control words 3 and 4) and their exit codes.
INSN_INTERCEPTS = {  # insn: (control field, bit, exit code)
    "vmrun": ("intercept_misc2", 0, SVM_EXIT_VMRUN),
    "vmmcall": ("intercept_misc2", 1, 0x81),
    "vmload": ("intercept_misc2", 2, 0x82),
    "vmsave": ("intercept_misc2", 3, 0x83),
    "stgi": ("intercept_misc2", 4, 0x84),
    "clgi": ("intercept_misc2", 5, 0x85),
    "skinit": ("intercept_misc2", 6, 0x86),
    "invlpga": ("intercept_misc1", 26, 0x7A),
}

# MSRs KVM lets L1 access directly and so merges from the VMCB12 MSRPM at
# VMRUN (svm.c direct_access_msrs, 6.1): reading their MSRPM words is what
# fails for an MSRPM in unbacked memory (nested_svm_vmrun_msrpm).
DIRECT_ACCESS_MSRS = (0x48, 0x49, 0x174, 0x175, 0x176, 0x1DB, 0x1DC, 0x1DD, 0x1DE,
                      0xC000_0081, 0xC000_0082, 0xC000_0083, 0xC000_0084,
                      0xC000_0100, 0xC000_0101, 0xC000_0102, 0xC000_0103)
MSRPM_RANGES = ((0x0000_0000, 0x0), (0xC000_0000, 0x800), (0xC001_0000, 0x1000))
# vmcb01 save-area fields svm_copy_vmrun_state() copies besides the
# registers the model loads into L1 (_load_vmcb01): segment state.
VMCB01_SEGMENTS = (*(f"{seg}.{part}" for seg in ("es", "cs", "ss", "ds")
                      for part in ("selector", "attrib", "limit", "base")),
                   "gdtr.base", "gdtr.limit", "idtr.base", "idtr.limit")


@dataclass(frozen=True)
class Raise:
    """Inject an exception into the current level."""

    vector: int
    error_code: int | None = None
    cr2: int | None = None


@dataclass(frozen=True)
class VmExit:
    """A #VMEXIT from L2 to L1 (nested_svm_vmexit)."""

    exit_code: int
    exit_info_1: int = 0
    exit_info_2: int = 0
    rip: int | None = None  # L2 RIP to record, if not the current one


def msrpm_bit(msr: int) -> int | None:
    """Bit offset of msr's read bit in the MSRPM (APM 15.11), None if the
    MSR is outside the three ranges (always intercepted)."""
    for base, offset in MSRPM_RANGES:
        if base <= msr < base + 0x2000:
            return 8 * offset + 2 * (msr - base)
    return None


# L1 instructions KVM may leave to the CPU (vGIF: STGI/CLGI, vls:
# VMLOAD/VMSAVE); the rest are always intercepted in vmcb01 (init_vmcb).
VGIF_INSNS = ("stgi", "clgi")
VLS_INSNS = ("vmload", "vmsave")


class NestedSvm:
    """Per-vCPU nested state: KVM's struct svm_nested_state and friends."""

    def __init__(self, m: ModelMachine, profile: Profile, cpu: GuestCpu | bool,
                 host: KvmAmd | None = None) -> None:
        self.m = m
        self.profile = profile
        self.cpu = cpu if isinstance(cpu, GuestCpu) else GuestCpu.build(svm=cpu)
        self.host = host or KvmAmd()
        self.ctx = checks.Context(self.cpu, self.host)
        self.gif = True
        self.svme = False  # EFER.SVME of the current level (vcpu->arch.efer)
        self.hsave_msr = 0
        self.vm_cr_msr = 0
        self.guest_mode = False
        self.vmcb12_gpa = 0
        self.last_failure: tuple[str, list[str]] | None = None
        # Saved at VMRUN ("vmcb01"), cached from VMCB12 ("nested.ctl/save").
        self._l1_ctx: object | None = None
        # vmcb01's save area as svm_leave_smm() restored it from HSAVE + 0x400:
        # what the next #VMEXIT loads into L1 (None: L1's VMRUN-time state).
        self._vmcb01: dict[str, int] | None = None
        self._l1_svme = False
        self._ctl: Vmcb | None = None
        self._l2_static: dict[str, int] = {}
        self._event_inj = 0
        # SMM: L1's segment state as svm_enter_smm() saved it (the model
        # cannot load another), and VMCB12 as RSM cached it.
        self._smm_l1_segments: dict[str, int] = {}
        self._rsm_vmcb12: Vmcb | None = None
        self.nested_run_pending = False
        # vmcb01's intercepts of the instructions vGIF/vls can hand to the CPU.
        self.l0_intercepts: set[str] = {*VGIF_INSNS, *VLS_INSNS}
        self._init_intercepts()

    @property
    def svm_in_cpuid(self) -> bool:
        return self.cpu.svm

    def _init_intercepts(self) -> None:
        """init_vmcb() and svm_vcpu_after_set_cpuid(): vGIF/vls clear the
        intercepts; 7.x then re-sets them while EFER.SVME is clear."""
        if self.host.vgif:
            self.l0_intercepts -= set(VGIF_INSNS)
        if self.host.vls:  # the EPYC guest is AMD, never "Intel compatible"
            self.l0_intercepts -= set(VLS_INSNS)
        self._recalc_intercepts()

    def _recalc_intercepts(self) -> None:
        """svm_recalc_instruction_intercepts() (Linux 7.x): on CPUID set and
        on every EFER.SVME toggle."""
        if not self.profile.svme0_reintercepts:
            return
        if not self.svme:
            self.l0_intercepts |= {*VGIF_INSNS, *VLS_INSNS}
            return
        if self.host.vls:
            self.l0_intercepts -= set(VLS_INSNS)
        if self.host.vgif:
            self.l0_intercepts -= set(VGIF_INSNS)

    def _set_gif(self, value: bool) -> None:
        """svm_set_gif(): with vGIF, setting GIF also drops the STGI intercept
        (it is only there to catch the GIF=1 window), whatever EFER.SVME."""
        if value and self.host.vgif:
            self.l0_intercepts.discard("stgi")
        self.gif = value

    # ---- KVM_GET/SET_NESTED_STATE ---------------------------------------

    def nested_view(self) -> NestedView:
        flags = KVM_STATE_NESTED_GIF_SET if self.gif else 0
        if self.guest_mode:
            flags |= KVM_STATE_NESTED_GUEST_MODE
        return NestedView(flags, self.vmcb12_gpa if self.guest_mode else 0)

    def set_nested_state(self, flags: int, vmcb12_gpa: int, blob: Vmcb) -> int:
        """svm_set_nested_state(): the blob's control area is VMCB12's, its
        save area L1's state from before VMRUN; the vCPU's current registers
        become L2's.  Returns 0 or the errno the ioctl fails with."""
        if flags & ~(KVM_STATE_NESTED_GUEST_MODE | KVM_STATE_NESTED_RUN_PENDING
                     | KVM_STATE_NESTED_GIF_SET):
            return errno.EINVAL
        # "If in guest mode, vcpu->arch.efer actually refers to the L2
        # guest's EFER.SVME": GIF=1 and no guest mode are required if SVME=0.
        if not self.svme and flags != KVM_STATE_NESTED_GIF_SET:
            return errno.EINVAL
        if not flags & KVM_STATE_NESTED_GUEST_MODE:
            self._leave_nested()
            self._set_gif(bool(flags & KVM_STATE_NESTED_GIF_SET))
            return 0
        if vmcb12_gpa & 0xFFF or not cpuid.legal_gpa(vmcb12_gpa):  # page_address_valid
            return errno.EINVAL
        if checks.failed_control_checks(checks.Control12.from_vmcb(blob), self.profile, self.ctx):
            return errno.EINVAL
        cr0 = self.m.cr0
        if not cr0 & layout.CR0_CD and cr0 & layout.CR0_NW:
            return errno.EINVAL
        save = checks.Save12.from_vmcb(blob)
        if (not save.cr0 & layout.CR0_PG or not save.cr0 & layout.CR0_PE
                or blob["rflags"] & RFLAGS_VM
                or checks.failed_save_checks(save, self.profile, self.ctx)):
            return errno.EINVAL
        # Accepted: L1's state comes from the blob, L2 keeps the vCPU's.
        m = self.m
        l2_ctx = m.save_context()
        problem = m.load_guest_state(blob)
        if problem is not None:
            # KVM would accept it; the model cannot emulate from that L1
            # state, so the next run says so (EmulationError), never guesses.
            m.restore_context(l2_ctx, keep_gprs=False)
            m._resume_blocked = f"the model cannot hold this L1 state: {problem}"
        m.set_reg(x86.UC_X86_REG_RIP, blob["rip"])
        self._l1_ctx = m.save_context()
        m.restore_context(l2_ctx, keep_gprs=False)
        self._l1_svme = bool(save.efer & layout.EFER_SVME)
        self._ctl = Vmcb(blob.to_bytes())
        self._event_inj = blob["event_inj"]
        self._l2_static = self._static_from_current()
        self._set_gif(bool(flags & KVM_STATE_NESTED_GIF_SET))
        self.guest_mode = True
        self.vmcb12_gpa = vmcb12_gpa
        return 0

    def _static_from_current(self) -> dict[str, int]:
        """L2 segment/debug state when L2's registers are the vCPU's own."""
        v = Vmcb()
        from .. import l1  # the vCPU still has the shared L1 segment setup
        st = l1.initial_state(self.m.payload)
        for name in ("es", "cs", "ss", "ds"):
            seg = getattr(st, name)
            v[f"{name}.selector"], v[f"{name}.attrib"] = seg.selector, seg.vmcb_attrib
            v[f"{name}.limit"], v[f"{name}.base"] = seg.limit, seg.base
        v["dr7"], v["dr6"] = DR7_FIXED_1, DR6_ACTIVE_LOW
        return _static_state(v)

    def _leave_nested(self) -> None:
        """svm_leave_nested(): forcibly back to L1."""
        if self.guest_mode and self._l1_ctx is not None:
            self.m.restore_context(self._l1_ctx, keep_gprs=True)
            self.svme = self._l1_svme
        self.guest_mode = False
        self.vmcb12_gpa = 0

    # ---- instructions -------------------------------------------------------

    def owns_msr(self, index: int) -> bool:
        return index in SVM_MSRS

    def _intercepted(self, field: str, bit: int) -> bool:
        return self._ctl is not None and bool(self._ctl[field] >> bit & 1)

    def cached_control(self) -> bytes:
        """VMCB12 as KVM cached it at VMRUN (its control area is what
        svm_get_nested_state hands out)."""
        assert self._ctl is not None
        return self._ctl.to_bytes()

    def l1_saved_state(self) -> dict[str, int]:
        """L1's state saved at VMRUN (vmcb01's save area), read from the
        model's saved context without disturbing the current (L2) one."""
        assert self._l1_ctx is not None
        m = self.m
        current = m.save_context()
        m.restore_context(self._l1_ctx, keep_gprs=False)
        try:
            state = m.guest_state()
            state["efer"] = m.hw_efer | layout.EFER_SVME  # vmcb01: SVME always set
            state["cpl"] = 0
        finally:
            m.restore_context(current, keep_gprs=False)
        return state

    def intercepts(self, misc1_bit: int) -> bool:
        """VMCB12 intercepts this INTERCEPT_WORD3 event (INTR, NMI, SMI...)."""
        return self._ctl is not None and bool(self._ctl["intercept_misc1"] & misc1_bit)

    def l2_int_ctl(self) -> int:
        return self._ctl["int_ctl"] if self._ctl is not None else 0

    def check_permissions(self) -> Raise | None:
        """nested_svm_check_permissions(): EFER.SVME=0 or paging off -> #UD,
        CPL>0 -> #GP(0)."""
        if not self.svme or not self.m.cr0 & layout.CR0_PG:
            return Raise(UD)
        if self.m.cpl:
            return Raise(GP, 0)
        return None

    def execute(self, insn: str) -> Raise | VmExit | None:
        """An SVM instruction at RIP (all are 3 bytes: 0F 01 D8..DF)."""
        if self.guest_mode:
            field, bit, code = INSN_INTERCEPTS[insn]
            if self._intercepted(field, bit):
                return VmExit(code)
            if insn == "vmmcall":
                # KVM never lets L2's VMMCALL reach its hypercall handler
                # (recalc_intercepts clears it); unintercepted it is a #UD.
                return Raise(UD)
        elif insn in (*VGIF_INSNS, *VLS_INSNS) and insn not in self.l0_intercepts:
            return self._on_cpu(insn)
        return getattr(self, f"_{insn}")()

    def _on_cpu(self, insn: str) -> Raise | None:
        """An L1 instruction KVM does not intercept: the CPU runs it with the
        hardware VMCB's EFER, whose SVME bit KVM always sets (svm_set_efer),
        so EFER.SVME=0 in L1 gives no #UD.  STGI/CLGI set V_GIF in vmcb01,
        which is KVM's GIF under vGIF; VMLOAD/VMSAVE check their operand."""
        if not self.m.cr0 & layout.CR0_PE:
            return Raise(UD)
        if self.m.cpl:
            return Raise(GP, 0)
        if insn in VGIF_INSNS:
            self._set_gif(insn == "stgi")
        elif fault := self._vmcb_operand_fault(self._rax_operand()):
            return fault
        self.m.skip(3)
        return None

    def _vmmcall(self) -> None:
        """L1's VMMCALL is always intercepted by KVM: kvm_emulate_hypercall()."""
        m = self.m
        nr = m.reg(x86.UC_X86_REG_RAX)
        ret = -KVM_EPERM if m.cpl else -KVM_ENOSYS
        del nr  # no hypercall is modelled: every number is unknown
        m.set_reg(x86.UC_X86_REG_RAX, ret & M64)
        m.skip(3)

    def _skinit(self) -> Raise:
        # skinit_interception(): KVM does not emulate SKINIT.
        return Raise(UD)

    def _stgi(self) -> Raise | None:
        if fault := self.check_permissions():
            return fault
        self._set_gif(True)
        self.m.skip(3)
        return None

    def _clgi(self) -> Raise | None:
        if fault := self.check_permissions():
            return fault
        self._set_gif(False)
        self.m.skip(3)
        return None

    def _invlpga(self) -> Raise | None:
        # KVM on AMD always intercepts INVLPGA; older kernels emulated it as
        # INVLPG without any check, even with no SVM in the guest CPUID (on
        # an Intel host such as this machine's, the CPU #UDs it instead).
        if self.profile.invlpga_checks_permissions and (fault := self.check_permissions()):
            return fault
        self.m._flush_tlb()
        self.m.skip(3)
        return None

    def _rax_operand(self) -> int:
        rax = self.m.reg(x86.UC_X86_REG_RAX)
        return rax if self.m.long_mode else rax & 0xFFFF_FFFF

    def _vmcb_operand_fault(self, gpa: int) -> Raise | None:
        """rAX must be 4 KiB aligned and below MAXPHYADDR (the CPU checks this
        before the intercept, APM VMRUN/VMLOAD/VMSAVE #GP), and KVM must be
        able to map it (kvm_vcpu_map() -EINVAL -> #GP(0))."""
        if gpa & 0xFFF or not cpuid.legal_gpa(gpa) or not self.m.backed(gpa, 0x1000):
            return Raise(GP, 0)
        return None

    def _vmload(self) -> Raise | None:
        if fault := self.check_permissions() or self._vmcb_operand_fault(self._rax_operand()):
            return fault
        # The FS/GS/TR/LDTR/syscall state transfer is not modelled (payloads
        # do not depend on it); gating and operand checks are.
        self.m.skip(3)
        return None

    _vmsave = _vmload

    # ---- VMRUN ----------------------------------------------------------------

    def _vmrun(self) -> Raise | VmExit | Exit | None:
        m = self.m
        if fault := self.check_permissions():
            return fault
        gpa = self._rax_operand()
        if gpa & 0xFFF or not cpuid.legal_gpa(gpa):
            return Raise(GP, 0)
        if not self.hsave_msr:
            return Raise(GP, 0)
        if m.smm.active:
            return Raise(UD)  # nested_svm_vmrun: is_smm() -> #UD, after the HSAVE check
        if not self.m.backed(gpa, 0x1000):
            if self.profile.unbacked_vmcb12 == "internal_error":
                # 7.x: kvm_handle_memory_failure(X86EMUL_IO_NEEDED) ->
                # kvm_prepare_emulation_failure_exit(): suberror EMULATION,
                # data = flags, then get_exit_info (VMRUN's exit, no info).
                m._resume_blocked = "KVM_EXIT_INTERNAL_ERROR: VMCB12 not mappable"
                return InternalErrorExit(KVM_INTERNAL_ERROR_EMULATION,
                                         (0, SVM_EXIT_VMRUN, 0, 0, 0, 0))
            return Raise(GP, 0)  # 6.x: kvm_vcpu_map() fails -> #GP
        m.skip(3)  # kvm_skip_emulated_instruction() before any check
        raw = m.read_phys(gpa, 0x1000)
        assert raw is not None
        vmcb12 = Vmcb(raw)
        ctl = checks.Control12.from_vmcb(vmcb12)
        save = checks.Save12.from_vmcb(vmcb12)
        failed = (checks.failed_save_checks(save, self.profile, self.ctx)
                  + checks.failed_control_checks(ctl, self.profile, self.ctx))
        if failed:
            self.last_failure = ("consistency", failed)
            vmcb12["exit_code"] = SVM_EXIT_ERR
            vmcb12["exit_info_1"] = 0
            vmcb12["exit_info_2"] = 0
            if self.profile.clear_event_inj_on_vmexit:
                vmcb12["event_inj"] = 0
            if self.profile.clear_gif_on_check_failure:
                self._set_gif(False)
            m.write_phys(gpa, vmcb12.to_bytes())
            return None
        # enter_svm_guest_mode(): L1's state goes to vmcb01 first.
        self._l1_ctx = m.save_context()
        self._l1_svme = self.svme
        self._ctl = vmcb12
        self._event_inj = vmcb12["event_inj"]
        self._l2_static = _static_state(vmcb12)
        self.vmcb12_gpa = gpa
        late = self._late_failure(vmcb12, ctl, save)
        if late is not None:
            return self._fail_late(vmcb12, late)
        problem = m.load_guest_state(vmcb12)
        if problem is not None:
            m.restore_context(self._l1_ctx, keep_gprs=False)
            m._resume_blocked = f"VMRUN: {problem}"
            return None
        self.guest_mode = True
        self.svme = bool(save.efer & layout.EFER_SVME)
        self._set_gif(True)  # at the end of enter_svm_guest_mode
        hw = self._hardware_vmrun_failure(save)
        if hw is not None:
            self.last_failure = ("hardware", [hw])
            # The model's CPU is QEMU TCG's VMRUN, the CPU real kernels are
            # measured on here: its cpu_vmexit() stores the exit code from a
            # uint32_t and clears EVENTINJ; KVM copies both into VMCB12.
            self._event_inj = 0
            return VmExit(SVM_EXIT_ERR & 0xFFFF_FFFF)
        if self._event_inj & EVTINJ_VALID:
            self._inject_event()
        return None

    def _late_failure(self, v: Vmcb, ctl: checks.Control12, save: checks.Save12) -> str | None:
        """Failures after the checks passed (nested_svm_load_cr3(),
        nested_svm_vmrun_msrpm()); None if L2 can be entered."""
        if not cpuid.legal_gpa(save.cr3):
            return "cr3 beyond MAXPHYADDR"
        pae_paging = (save.cr0 & layout.CR0_PG and save.cr4 & layout.CR4_PAE
                      and not save.efer & layout.EFER_LMA)
        # 7.x with npt=0 dropped NP_ENABLE from its cache: L2 runs without NP.
        np = ctl.np_enabled and self.host.npt
        if pae_paging and not np and not paging.load_pdptrs(
                self.m.read_phys, save.cr3):
            return "PDPTRs not loadable"
        if v["intercept_misc1"] & INTERCEPT_MSR_PROT:
            for msr in DIRECT_ACCESS_MSRS:
                bit = msrpm_bit(msr)
                assert bit is not None
                word = ctl.msrpm_base_pa + (bit // 32) * 4
                if self.m.read_phys(word, 4) is None:
                    return "MSRPM not readable"
        # The shadow NPT root must be a visible GFN (mmu_check_root()); KVM
        # otherwise requests a triple fault, which in guest mode is
        # nested_svm_triple_fault(): #VMEXIT(SHUTDOWN).
        if np and not self.m.backed(ctl.nested_cr3 & ~0xFFF, 0x1000):
            return "nested CR3 not mappable"
        return None

    def _fail_late(self, v: Vmcb, reason: str) -> ShutdownExit | None:
        self.last_failure = ("late", [reason])
        if reason == "nested CR3 not mappable":
            return self._late_shutdown(v)
        # Every kernel measured (6.1 to 7.3): vmcb02 already holds L2's state
        # (enter_svm_guest_mode() prepares it before nested_svm_load_cr3()),
        # and the complete nested_svm_vmexit() writes it back into VMCB12
        # together with VMEXIT_INVALID.
        self._write_vmexit(VmExit(SVM_EXIT_ERR), _l2_state_from_vmcb(v))
        self._back_to_l1(restore=False)
        return None

    def _late_shutdown(self, v: Vmcb) -> ShutdownExit | None:
        self.guest_mode = True
        if self.profile.unbacked_ncr3 == NCR3_NPF:
            # The first L2 fetch walks L1's NPT from nCR3 and fails:
            # nested_svm_inject_npf_exit(), exit_info_1 bit 32 = fault on the
            # final GPA, error code US|ID (NPT accesses are user accesses).
            rip_gpa = v["rip"]
            self._write_vmexit(VmExit(SVM_EXIT_NPF, 1 << 32 | 0x14, rip_gpa),
                               _l2_state_from_vmcb(v))
            self._back_to_l1(restore=False)
            return None
        if v["intercept_misc1"] & INTERCEPT_SHUTDOWN:
            self._write_vmexit(VmExit(SVM_EXIT_SHUTDOWN), _l2_state_from_vmcb(v))
            self._back_to_l1(restore=False)
            return None
        self.m._resume_blocked = "the vCPU is in shutdown state"
        return ShutdownExit()

    def _hardware_vmrun_failure(self, save: checks.Save12) -> str | None:
        """The CPU's VMRUN checks on VMCB02 fields KVM copies from VMCB12."""
        if (save.long_mode_paging and save.cr4 & layout.CR4_PAE
                and save.cs_attrib & checks.ATTR_L and save.cs_attrib & checks.ATTR_DB):
            return "CS.L && CS.D with long mode"
        if checks.cpu_refuses_event(self._event_inj & 0xFFFF_FFFF):
            return "invalid EVENTINJ"
        return None

    def _inject_event(self) -> None:
        """EVENTINJ delivered into L2 on VMRUN as the CPU the kernels are
        measured on does it (QEMU TCG helper_vmrun): NMI takes vector 2
        whatever VECTOR says; an exception pushes ERRORCODE when its vector
        has one (8, 10-14, 17), whatever EV says; INTR and software
        interrupts push none.  The CPU then clears EVENTINJ."""
        ev = self._event_inj
        kind = ev & EVTINJ_TYPE_MASK
        vector = 2 if kind == EVTINJ_TYPE_NMI else ev & 0xFF
        err = None
        if kind == EVTINJ_TYPE_EXEPT and vector in CPU_ERROR_CODE_VECTORS:
            err = (ev >> 32) & 0xFFFF_FFFF
        # The CPU clears EVENTINJ (the u32 at 0xA8) and leaves EVENTINJ_ERR;
        # kernels that copy vmcb02's pair back hand L1 the error code.
        self._event_inj = ev & ~0xFFFF_FFFF
        if self.m._deliver(vector, err) is not None:
            self.m.raise_exception(8, 0)

    # ---- #VMEXIT --------------------------------------------------------------

    def vmexit(self, ex: VmExit) -> Exit | None:
        """nested_svm_vmexit(): VMCB12 gets L2's state and the exit fields,
        L1 gets its vmcb01 state back, GIF is cleared.  Returns the exit
        KVM_RUN ends with if the CPU then refuses to run L1 (else None)."""
        state = self._current_l2_state()
        if ex.rip is not None:
            state["rip"] = ex.rip
        self._write_vmexit(ex, state)
        return self._back_to_l1(restore=True)

    def _current_l2_state(self) -> dict[str, int]:
        m = self.m
        state = dict(self._l2_static)
        state.update(m.guest_state())
        state["efer"] = m.hw_efer | (layout.EFER_SVME if self.svme else 0)
        return state

    def _write_vmexit(self, ex: VmExit, state: dict[str, int]) -> None:
        raw = self.m.read_phys(self.vmcb12_gpa, 0x1000)
        if raw is None:
            return
        v = Vmcb(raw)
        for name, value in state.items():
            v[name] = value
        v["exit_code"] = ex.exit_code
        v["exit_info_1"] = ex.exit_info_1
        v["exit_info_2"] = ex.exit_info_2
        if ex.exit_code not in (SVM_EXIT_ERR, SVM_EXIT_ERR & 0xFFFF_FFFF):
            # nested_save_pending_event_to_vmcb12(): no event pending; KVM
            # writes the u32 exit_int_info only, exit_int_info_err (the upper
            # half of the 64-bit field) keeps whatever VMCB12 held.
            v["exit_int_info"] = v["exit_int_info"] & ~0xFFFF_FFFF
        v["event_inj"] = 0 if self.profile.clear_event_inj_on_vmexit else self._event_inj
        self.m.write_phys(self.vmcb12_gpa, v.to_bytes())

    def _back_to_l1(self, restore: bool) -> Exit | None:
        vmcb01, self._vmcb01 = self._vmcb01, None
        svme_before = self.svme  # L2's EFER.SVME: vcpu->arch.efer until svm_set_efer
        if restore and self._l1_ctx is not None:
            self.m.restore_context(self._l1_ctx, keep_gprs=True)
        self.svme = self._l1_svme
        self.guest_mode = False
        self.vmcb12_gpa = 0
        self.gif = False
        if restore and vmcb01 is not None:
            return self._load_vmcb01(vmcb01, svme_before)
        return None

    def _load_vmcb01(self, v: dict[str, int], svme_before: bool) -> Exit | None:
        """The end of nested_svm_vmexit() when vmcb01's save area came back
        from HSAVE + 0x400 (an SMI in L2): L1's state is whatever is there --
        KVM's hardware CR0/CR4/EFER as svm_enter_smm() saved them (the leak
        of docs/findings.md), or what an SMM handler wrote.  KVM loads it
        without checks: kvm_set_rflags, svm_set_efer, svm_set_cr0(| PE),
        svm_set_cr4, RAX/RSP/RIP, then nested_svm_load_cr3()."""
        m = self.m
        efer, cr0, cr4 = v["efer"], v["cr0"] | layout.CR0_PE, v["cr4"]
        new_svme = bool(efer & layout.EFER_SVME)
        if svme_before and not new_svme:
            self.svme_cleared(in_guest_mode=False)
        self.svme = self._l1_svme = new_svme
        hw = hwstate.save_area(cr0, cr4, efer, m.kvm_amd)
        refused = hwstate.vmrun_refuses(hw)
        if refused is not None:
            # svm_handle_exit(): SVM_EXIT_ERR for vmcb01 -> KVM_EXIT_FAIL_ENTRY
            # with the CPU's exit code (QEMU TCG writes it as 32 bits).
            self.last_failure = ("hardware", [f"L1 state from HSAVE: {refused}"])
            m._resume_blocked = f"KVM_RUN failed to enter L1: {refused}"
            return FailEntryExit(SVM_EXIT_ERR & 0xFFFF_FFFF, 0)
        if not cpuid.legal_gpa(v["cr3"]) or not cpuid.backed(v["cr3"] & ~0xFFF, 0x1000):
            from .smm import NotModelled

            raise NotModelled(f"L1 CR3 {v['cr3']:#x} from HSAVE (nested_svm_load_cr3)")
        uc = m.uc
        uc.reg_write(x86.UC_X86_REG_RFLAGS, v["rflags"] | 0x2)
        uc.reg_write(x86.UC_X86_REG_CR3, v["cr3"])
        uc.reg_write(x86.UC_X86_REG_CR4, cr4)
        uc.reg_write(x86.UC_X86_REG_CR0, cr0)
        m.set_hw_efer(efer)
        uc.reg_write(x86.UC_X86_REG_RAX, v["rax"])
        uc.reg_write(x86.UC_X86_REG_RSP, v["rsp"])
        uc.reg_write(x86.UC_X86_REG_RIP, v["rip"])
        m._flush_tlb()
        return None

    def svme_cleared(self, in_guest_mode: bool) -> None:
        """svm_set_efer() taking EFER.SVME from 1 to 0: 6.x sets GIF
        (svm_set_gif(svm, true)); 7.x only through svm_leave_nested() of a
        vCPU that was in guest mode."""
        if in_guest_mode or self.profile.svme_clear_sets_gif:
            self._set_gif(True)

    # ---- L2 events ---------------------------------------------------------------

    def on_l2_hlt(self) -> VmExit | None:
        if self._intercepted("intercept_misc1", INTERCEPT_HLT.bit_length() - 1):
            return VmExit(SVM_EXIT_HLT, rip=self.m.rip - 1)
        return None

    def on_l2_shutdown(self) -> VmExit | None:
        if self._intercepted("intercept_misc1", INTERCEPT_SHUTDOWN.bit_length() - 1):
            return VmExit(SVM_EXIT_SHUTDOWN)
        return None

    def on_l2_exception(self, vector: int, error_code: int | None,
                        cr2: int | None) -> VmExit | None:
        if not self._intercepted("intercept_exceptions", vector):
            return None
        return VmExit(SVM_EXIT_EXCP_BASE + vector, error_code or 0,
                      cr2 if cr2 is not None else 0)

    def on_l2_io(self, io: object, insn_rip: int, next_rip: int) -> VmExit | None:
        """nested_svm_intercept_ioio(): IOIO_PROT and the IOPM bits."""
        if not self._intercepted("intercept_misc1", INTERCEPT_IOIO_PROT.bit_length() - 1):
            return None
        port, size = io.port, io.size  # type: ignore[attr-defined]
        assert self._ctl is not None
        base = self._ctl["iopm_base_pa"] & ~0xFFF
        raw = self.m.read_phys(base + port // 8, 2)
        mask = ((1 << size) - 1) << (port % 8)
        if raw is not None and not int.from_bytes(raw, "little") & mask:
            return None
        info1 = (port << 16 | {1: 1 << 4, 2: 1 << 5, 4: 1 << 6}[size]
                 | (1 << 9 if self.m.long_mode else 1 << 8)
                 | (1 if io.direction == 0 else 0))  # type: ignore[attr-defined]
        return VmExit(SVM_EXIT_IOIO, info1, next_rip, rip=insn_rip)

    # ---- SMM (svm.c svm_enter_smm / svm_leave_smm, Linux 6.1) ------------------

    @property
    def l2_static(self) -> dict[str, int]:
        return self._l2_static

    def intercepts_smi(self) -> bool:
        """nested_exit_on_smi(): VMCB12 intercepts SMI."""
        return self._intercepted("intercept_misc1", INTERCEPT_SMI.bit_length() - 1)

    def enter_smm(self, s: SmramState) -> None:
        """svm_enter_smm(), SMI in guest mode: FED8h = 1 and FEE0h = the VMCB12
        GPA in the state-save area, the synthetic #VMEXIT(SVM_EXIT_SW)
        (nested_svm_simple_vmexit: VMCB12 gets L2's state, L1's comes back,
        GIF=0), then vmcb01's save area to HSAVE + 0x400
        (svm_copy_vmrun_state) since SMM runs on vmcb01."""
        from . import smm

        m = self.m
        s.put("<Q", smm.OFF_SVM_GUEST, 1)
        s.put("<Q", smm.OFF_SVM_VMCB12, self.vmcb12_gpa)
        self.vmexit(VmExit(smm.SVM_EXIT_SW))
        raw = m.read_phys(self.hsave_msr, 0x1000)
        if raw is None:
            # kvm_vcpu_map() fails: 6.1 ignores it, 6.12 kills the VM.
            raise smm.NotModelled("SMI in L2 with an unbacked VM_HSAVE_PA")
        from .. import l1

        st = l1.initial_state(m.payload)
        v = Vmcb(raw)
        for name in ("es", "cs", "ss", "ds"):
            seg = getattr(st, name)
            if m.reg(smm.SREG_UC[name]) != seg.selector:
                raise smm.NotModelled(f"L1 {name.upper()} is not the model's L1 segment")
            v[f"{name}.selector"], v[f"{name}.attrib"] = seg.selector, seg.vmcb_attrib
            v[f"{name}.limit"], v[f"{name}.base"] = seg.limit, seg.base
        l1_state = m.guest_state()
        for name in ("gdtr.base", "gdtr.limit", "idtr.base", "idtr.limit", "cr3",
                     "rax", "rsp", "rip"):
            v[name] = l1_state[name]
        v["rflags"] = l1_state["rflags"] | 0x2
        # The synthetic #VMEXIT reloaded L1's CR0/CR4/EFER through
        # svm_set_cr0/cr4/efer, which leave the *hardware* values in
        # vmcb01->save: those are what svm_copy_vmrun_state() saves.
        hw = hwstate.save_area(m.cr0, m.cr4, m.hw_efer | layout.EFER_SVME, m.kvm_amd)
        for name, value in hw.items():
            v[name] = value
        v["cpl"] = 0
        m.write_phys(self.hsave_msr, v.to_bytes())
        self._smm_l1_segments = {n: v[n] for n in VMCB01_SEGMENTS}

    def leave_smm(self, s: SmramState) -> bool:
        """svm_leave_smm(): True if RSM must fail (-> emulate_shutdown).

        With the SMI taken in guest mode, L1's vmcb01 comes back from HSAVE
        and L2 is re-entered from the VMCB12 in guest memory
        (enter_svm_guest_mode(from_vmrun=false), nested_run_pending = 1);
        be5fa8737d42 first runs the VMRUN consistency checks on it."""
        from . import smm

        m = self.m
        self._rsm_vmcb12 = None
        if not s.u64(smm.OFF_SVM_GUEST):
            return False
        if not self.svm_in_cpuid:
            self.last_failure = ("rsm", ["no SVM in the guest CPUID"])
            return True
        if not s.u64(smm.OFF_EFER) & layout.EFER_SVME:
            self.last_failure = ("rsm", ["saved EFER.SVME is clear"])
            return True
        gpa = s.u64(smm.OFF_SVM_VMCB12)
        if not self.m.backed(gpa & ~0xFFF, 0x1000):
            self.last_failure = ("rsm", ["VMCB12 not mappable"])
            return True
        if gpa & 0xFFF:
            raise smm.NotModelled(f"VMCB12 GPA {gpa:#x} in SMRAM is not page aligned")
        hsave = m.read_phys(self.hsave_msr, 0x1000)
        if hsave is None:
            self.last_failure = ("rsm", ["HSAVE not mappable"])
            return True
        if self._l1_ctx is None:
            raise smm.NotModelled("RSM into L2 without an L1 state the model saw")
        saved = Vmcb(hsave)
        # svm_copy_vmrun_state(&vmcb01->save, HSAVE + 0x400), unchecked.
        for name, value in self._smm_l1_segments.items():
            if saved[name] != value:
                raise smm.NotModelled(f"L1's {name} changed at HSAVE + 0x400 (the model "
                                      "keeps L1's segment state itself)")
        vmcb01 = {n: saved[n] for n in ("rflags", "efer", "cr0", "cr3", "cr4", "rax", "rsp",
                                        "rip")}
        raw = m.read_phys(gpa, 0x1000)
        assert raw is not None
        vmcb12 = Vmcb(raw)
        ctl = checks.Control12.from_vmcb(vmcb12)
        save = checks.Save12.from_vmcb(vmcb12)
        if self.profile.rsm_checks_vmcb12:
            failed = (checks.failed_save_checks(save, self.profile, self.ctx)
                      + checks.failed_control_checks(ctl, self.profile, self.ctx))
            if failed:
                self.last_failure = ("rsm", failed)
                return True
        late = self._late_failure(vmcb12, ctl, save)
        if late is not None:
            raise smm.NotModelled(f"RSM into L2 with a late VMRUN failure ({late})")
        # enter_svm_guest_mode(): the caches, vmcb02 from VMCB12, GIF=1.
        self._vmcb01 = vmcb01
        self._l1_svme = bool(vmcb01["efer"] & layout.EFER_SVME)
        self._ctl = vmcb12
        self._event_inj = vmcb12["event_inj"]
        self._l2_static = _static_state(vmcb12)
        self._rsm_vmcb12 = vmcb12
        self.vmcb12_gpa = gpa
        self.guest_mode = True
        self.svme = bool(save.efer & layout.EFER_SVME)
        self._set_gif(True)
        self.nested_run_pending = True
        return False

    def vmcb12_cached_save(self) -> Vmcb:
        assert self._rsm_vmcb12 is not None
        return self._rsm_vmcb12

    def l2_state_as_loaded(self) -> dict[str, int]:
        """vmcb02's state after nested_vmcb02_prepare_save() from VMCB12."""
        state = _l2_state_from_vmcb(self.vmcb12_cached_save())
        for name in ("fs", "gs", "tr", "ldtr"):
            for part in ("selector", "attrib", "limit", "base"):
                state[f"{name}.{part}"] = self.vmcb12_cached_save()[f"{name}.{part}"]
        return state

    def rsm_triple_fault(self, state: dict[str, int]) -> Exit | None:
        """RSM failed after re-entering L2 (6.1): the triple fault in guest
        mode is nested_svm_triple_fault(): #VMEXIT(SHUTDOWN) with vmcb02's
        state as far as it was loaded, or KVM_EXIT_SHUTDOWN."""
        self.nested_run_pending = False
        if not self.intercepts_shutdown():
            self.m._resume_blocked = "the vCPU is in shutdown state"
            return ShutdownExit()
        keep = {k: v for k, v in state.items() if k.split(".")[0] not in ("fs", "gs", "tr", "ldtr")}
        self._write_vmexit(VmExit(SVM_EXIT_SHUTDOWN), keep)
        self._back_to_l1(restore=True)
        return None

    def intercepts_shutdown(self) -> bool:
        return self._intercepted("intercept_misc1", INTERCEPT_SHUTDOWN.bit_length() - 1)

    def rsm_entered_l2(self, state: dict[str, int]) -> Exit | None:
        """L2 runs on the state RSM loaded from SMRAM over VMCB12's: the
        segment/debug state the model keeps for L2 follows it; then the
        CPU's VMRUN of vmcb02 (its own checks, EVENTINJ)."""
        v = Vmcb()
        for name, value in state.items():
            v[name] = value
        self._l2_static = _static_state(v)
        self._l2_static["cpl"] = (state["ss.attrib"] >> 5) & 3  # svm_set_segment(SS)
        new_svme = bool(state["efer"] & layout.EFER_SVME)
        if self.svme and not new_svme:
            from .smm import NotModelled

            # svm_set_efer() clearing SVME in guest mode leaves nested mode.
            raise NotModelled("RSM clearing EFER.SVME of L2")
        self.svme = new_svme
        self.nested_run_pending = False  # the next VMRUN of vmcb02 completes it
        hw = self._hardware_vmrun_failure(checks.Save12.from_vmcb(v))
        if hw is not None:
            self.last_failure = ("hardware", [hw])
            self._event_inj = 0
            self.vmexit(VmExit(SVM_EXIT_ERR & 0xFFFF_FFFF))
            return None
        if self._event_inj & EVTINJ_VALID:
            self._inject_event()
        return None

    # ---- MSRs ------------------------------------------------------------------

    def msr(self, addr: int, write: bool) -> Raise | VmExit | None:
        m = self.m
        index = m.reg(x86.UC_X86_REG_RCX) & 0xFFFF_FFFF
        if self.guest_mode and self._msr_intercepted(index, write):
            return VmExit(SVM_EXIT_MSR, int(write), 0, rip=addr)
        if index not in SVM_MSRS:
            m.pass_msr_through(addr)
            return None
        if write:
            value = (m.reg(x86.UC_X86_REG_RDX) & 0xFFFF_FFFF) << 32 | (
                m.reg(x86.UC_X86_REG_RAX) & 0xFFFF_FFFF)
            fault = self._wrmsr(index, value)
        else:
            value_or_fault = self._rdmsr(index)
            fault = value_or_fault if isinstance(value_or_fault, Raise) else None
            if fault is None:
                assert isinstance(value_or_fault, int)
                m.set_reg(x86.UC_X86_REG_RAX, value_or_fault & 0xFFFF_FFFF)
                m.set_reg(x86.UC_X86_REG_RDX, value_or_fault >> 32)
        if fault is None:
            m.skip(2)
        return fault

    def _msr_intercepted(self, index: int, write: bool) -> bool:
        """nested_svm_exit_handled_msr()."""
        if not self._intercepted("intercept_misc1", INTERCEPT_MSR_PROT.bit_length() - 1):
            return False
        bit = msrpm_bit(index)
        if bit is None:
            return True
        bit += int(write)
        assert self._ctl is not None
        raw = self.m.read_phys((self._ctl["msrpm_base_pa"] & ~0xFFF) + bit // 8, 1)
        return raw is None or bool(raw[0] >> (bit % 8) & 1)

    def _rdmsr(self, index: int) -> int | Raise:
        if index == MSR_EFER:
            return self.m.hw_efer | (layout.EFER_SVME if self.svme else 0)
        if not self.svm_in_cpuid:
            # This machine's KVM (Intel host) does not know the AMD SVM MSRs.
            return Raise(GP, 0)
        return self.hsave_msr if index == MSR_VM_HSAVE_PA else self.vm_cr_msr

    def _wrmsr(self, index: int, value: int) -> Raise | None:
        if index == MSR_EFER:
            return self._set_efer(value)
        if not self.svm_in_cpuid:
            return Raise(GP, 0)
        if index == MSR_VM_HSAVE_PA:
            if value & 0xFFF or not cpuid.legal_gpa(value):  # page_address_valid()
                return Raise(GP, 0)
            self.hsave_msr = value
            return None
        return self._set_vm_cr(value)

    def _set_efer(self, efer: int) -> Raise | None:
        """kvm_set_efer() + svm_set_efer()."""
        m = self.m
        if efer & self.cpu.efer_reserved:
            return Raise(GP, 0)
        old = m.hw_efer | (layout.EFER_SVME if self.svme else 0)
        if m.cr0 & layout.CR0_PG and (old ^ efer) & layout.EFER_LME:
            return Raise(GP, 0)
        efer = (efer & ~layout.EFER_LMA) | (old & layout.EFER_LMA)
        m.set_hw_efer(efer)
        new_svme = bool(efer & layout.EFER_SVME)
        if self.svme and not new_svme:
            # svm_set_efer(): clearing SVME leaves nested mode (and GIF, see
            # svme_cleared).
            was_guest = self.guest_mode
            self._leave_nested()
            self.svme_cleared(in_guest_mode=was_guest)
        toggled = self.svme != new_svme
        self.svme = new_svme
        if toggled:
            self._recalc_intercepts()
        return None

    def _set_vm_cr(self, data: int) -> Raise | None:
        """svm_set_vm_cr()."""
        if data & ~SVM_VM_CR_VALID_MASK:
            return Raise(GP, 0)
        chg = SVM_VM_CR_VALID_MASK
        if self.vm_cr_msr & SVM_VM_CR_SVM_DIS:
            chg &= ~(SVM_VM_CR_SVM_LOCK | SVM_VM_CR_SVM_DIS)
        new = (self.vm_cr_msr & ~chg) | (data & chg)
        if new & SVM_VM_CR_SVM_DIS and self.svme:
            return Raise(GP, 0)
        self.vm_cr_msr = new
        return None


def _static_state(v: Vmcb) -> dict[str, int]:
    """VMCB12 fields the model keeps for L2 rather than reading them back
    from Unicorn (segment hidden state, CPL, DR6/DR7 as KVM loads them)."""
    state = {f"{seg}.{part}": v[f"{seg}.{part}"] for seg in ("es", "cs", "ss", "ds")
             for part in ("selector", "attrib", "limit", "base")}
    state["cpl"] = v["cpl"]
    state["dr7"] = v["dr7"] | DR7_FIXED_1
    state["dr6"] = v["dr6"] | DR6_ACTIVE_LOW
    return state


def _l2_state_from_vmcb(v: Vmcb) -> dict[str, int]:
    """L2's state as nested_vmcb02_prepare_save() loaded it, for a #VMEXIT
    before L2 ran an instruction."""
    state = _static_state(v)
    for name in ("gdtr.base", "gdtr.limit", "idtr.base", "idtr.limit", "efer", "cr0", "cr2",
                 "cr3", "cr4", "rip", "rsp", "rax"):
        state[name] = v[name]
    state["rflags"] = v["rflags"] | 0x2
    return state
