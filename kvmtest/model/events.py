"""Interrupts, NMIs and single-step traps on the model, as KVM injects them.

The host raises them (Machine.interrupt/nmi/set_nmi_masked, the userspace
irqchip protocol of the kvm backend); KVM injects them at an instruction
boundary once the vCPU can take them (x86.c kvm_check_and_inject_events,
svm.c svm_nmi_blocked/svm_interrupt_blocked):

- an NMI needs GIF=1, no NMI blocking (set by delivering an NMI, ended by
  IRET; KVM_SET_VCPU_EVENTS can set it) and no interrupt shadow;
- an interrupt needs GIF=1, RFLAGS.IF=1 and no interrupt shadow (the
  instruction after an STI);
- in L2, an event L1 intercepts is a #VMEXIT instead (the event stays
  pending), otherwise it goes through L2's IDT.

GIF only changes on model events (STGI, CLGI, VMRUN, #VMEXIT), so the run
loop checks the window at its top.  RFLAGS.IF and NMI blocking change in
instructions Unicorn runs itself (STI, IRET): while an event waits for them,
a code hook on every instruction checks the window before each one.

Single-step (RFLAGS.TF) across an emulated VMRUN, as KVM does it: a VMRUN
that fails its consistency checks completes with kvm_skip_emulated_
instruction(), which queues #DB with DR6.BS (Linux 6.1, 6.12; Linux 7.x
skips with svm_skip_emulated_instruction: no #DB, the FIXME in
nested_svm_vmrun); a #VMEXIT to an L1 that single-stepped its VMRUN queues
#DB without a DR6 payload (nested_svm_vmexit: kvm_queue_exception(DB_VECTOR)).
Instructions Unicorn runs itself trap natively.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from unicorn import UC_HOOK_CODE
from unicorn import x86_const as x86

from ..exits import Exit, ShutdownExit
from ..layout import CR0_PE
from ..vmcb import INTERCEPT_INTR, INTERCEPT_NMI, SVM_EXIT_INTR, SVM_EXIT_NMI
from .modes import RFLAGS_IF, RFLAGS_TF

if TYPE_CHECKING:
    from .machine import ModelMachine
    from .svm import Raise, VmExit

DR6_BS = 1 << 14
NMI_VECTOR = 2
DB_VECTOR = 1
GP_VECTOR = 13
STI = 0xFB
IRET = 0xCF
INT_CTL_V_INTR_MASKING = 1 << 24
# Unicorn is QEMU TCG: an IDT limit violation in 64-bit mode is #GP with
# error code vector * 16 + 2 (do_interrupt64), what the kernels measured
# under TCG show too (kvmtest.cases.gif, the 6.1/6.12 interrupt-window bug).
IDT_LIMIT = "vector beyond the IDT limit"


class NotModelled(Exception):
    """Event state the model does not represent: the run stops with an
    EmulationError instead of a guessed observation."""


@dataclass(frozen=True)
class Deliver:
    """Inject a pending NMI or interrupt at the current RIP."""

    kind: str  # "nmi" or "intr"


@dataclass
class EventState:
    irq: int | None = None  # the interrupt line the host raised (vector)
    nmi_pending: bool = False
    nmi_masked: bool = False
    db_pending: int | None = None  # DR6 bits of a #DB KVM queued for L1
    l1_single_steps_vmrun: bool = False  # #DB due when L1 gets its #VMEXIT
    was_guest_mode: bool = False
    hook: int | None = None
    prev: int | None = None  # address of the instruction before this one

    @property
    def pending(self) -> bool:
        return (self.irq is not None or self.nmi_pending or self.nmi_masked
                or self.db_pending is not None or self.l1_single_steps_vmrun
                or self.hook is not None)


def _rflags(m: ModelMachine) -> int:
    return m.uc.reg_read(x86.UC_X86_REG_RFLAGS)


def _blocked_by_instruction(m: ModelMachine) -> bool:
    """Something only an instruction Unicorn runs can end: RFLAGS.IF for an
    interrupt, NMI blocking for an NMI (GIF is a model event)."""
    ev = m.events
    return ev.nmi_masked or (ev.irq is not None and not _rflags(m) & RFLAGS_IF)


def window(m: ModelMachine) -> Exit | None:
    """At an instruction boundary the run loop stops at: inject what can be."""
    ev, svm = m.events, m.svm
    if ev.was_guest_mode and not svm.guest_mode and ev.l1_single_steps_vmrun:
        ev.l1_single_steps_vmrun = False
        ev.db_pending = 0  # nested_svm_vmexit: #DB without a DR6 payload
    entered_l2 = svm.guest_mode and not ev.was_guest_mode
    ev.was_guest_mode = svm.guest_mode
    if ev.db_pending is not None:  # exceptions are not held by GIF
        bits, ev.db_pending = ev.db_pending, None
        dr6 = m.uc.reg_read(x86.UC_X86_REG_DR6)
        m.uc.reg_write(x86.UC_X86_REG_DR6, dr6 | bits)
        return m.raise_exception(DB_VECTOR, None)
    if entered_l2 and ev.irq is not None and m.svm.profile.irq_window_ignores_run_pending:
        # svm_interrupt_allowed() returns -EBUSY for nested_run_pending
        # before it checks the vCPU's state, and the interrupt-window exit
        # counts -EBUSY as "allowed": the host injects into L2 at once.
        return deliver(m, Deliver("intr"))
    action = _due(m)
    if action is not None:
        return deliver(m, action)
    _arm(m)
    return None


def _due(m: ModelMachine, shadow: bool = False) -> Deliver | None:
    ev, svm = m.events, m.svm
    if not svm.gif or shadow:
        return None
    if ev.nmi_pending and not ev.nmi_masked:
        return Deliver("nmi")
    if ev.irq is not None:
        if svm.guest_mode and svm.l2_int_ctl() & INT_CTL_V_INTR_MASKING:
            raise NotModelled("an interrupt for L2 with V_INTR_MASKING")
        if _rflags(m) & RFLAGS_IF:
            return Deliver("intr")
    return None


def _arm(m: ModelMachine) -> None:
    """Watch every instruction while an event waits for STI or IRET."""
    ev = m.events
    want = (m.svm.gif and _blocked_by_instruction(m)) or ev.nmi_masked
    if want and ev.hook is None:
        ev.prev = None
        ev.hook = m.uc.hook_add(UC_HOOK_CODE, _on_step, m)
        m.uc.ctl_flush_tb()  # translated blocks carry no call to the new hook
    elif not want:
        disarm(m)


def disarm(m: ModelMachine) -> None:
    ev = m.events
    if ev.hook is not None:
        m.uc.hook_del(ev.hook)
        ev.hook = None
        m.uc.ctl_flush_tb()


def _on_step(uc, addr: int, size: int, m: ModelMachine) -> None:  # type: ignore[no-untyped-def]
    ev = m.events
    prev, ev.prev = ev.prev, addr
    shadow = False
    if prev is not None:
        raw = m.read_virt(m.pc_linear - m.rip + prev, 2) or b""
        op = raw[1] if raw[:1] == b"\x48" else (raw[0] if raw else -1)
        shadow = op == STI  # the instruction after STI takes no interrupt
        if op == IRET:
            ev.nmi_masked = False  # IRET ends NMI blocking
    action = _due(m, shadow)
    if action is not None:
        m.park(action, addr)


def deliver(m: ModelMachine, action: Deliver) -> Exit | None:
    """Inject the event into the current level (or #VMEXIT to L1)."""
    from .svm import VmExit

    ev, svm = m.events, m.svm
    nmi = action.kind == "nmi"
    if svm.guest_mode and svm.intercepts(INTERCEPT_NMI if nmi else INTERCEPT_INTR):
        svm.vmexit(VmExit(SVM_EXIT_NMI if nmi else SVM_EXIT_INTR))  # stays pending
        return None
    if nmi:
        ev.nmi_pending, ev.nmi_masked = False, True
        vector = NMI_VECTOR
    else:
        vector, ev.irq = ev.irq, None
        assert vector is not None
    disarm(m)
    problem = m._deliver(vector, None)
    if problem == IDT_LIMIT:
        return m.raise_exception(GP_VECTOR, vector * 16 + 2)
    if problem is not None:
        return m.raise_exception(GP_VECTOR, 0)
    _arm(m)
    return None


def around_svm(m: ModelMachine, insn: str) -> Raise | VmExit | Exit | None:
    """An SVM instruction: the CPU's own checks, which come before KVM's
    intercept (APM vol. 2 15.7: "instruction intercepts are checked after
    simple exceptions (such as #GP -- when CPL is incorrect -- or #UD)";
    EFER.SVME is always set in the VMCB KVM runs L1 on), then KVM, with its
    single-step handling of VMRUN."""
    from .svm import GP, UD, Raise

    svm = m.svm
    if not svm.guest_mode and insn not in ("vmmcall", "skinit"):
        if not m.cr0 & CR0_PE:
            return Raise(UD)
        if m.cpl:
            return Raise(GP, 0)
    tf = bool(_rflags(m) & RFLAGS_TF)
    was_guest = svm.guest_mode
    action = svm.execute(insn)
    if insn == "vmrun" and tf and not was_guest:
        if svm.guest_mode:
            m.events.l1_single_steps_vmrun = True
        elif action is None and svm.last_failure and svm.last_failure[0] == "consistency":
            if svm.profile.vmrun_tf_trap_on_check_failure:
                m.events.db_pending = DR6_BS  # kvm_skip_emulated_instruction
        elif action is None:  # a late failure: nested_svm_vmexit
            m.events.db_pending = 0
    return action


def vmexit(m: ModelMachine, ex: VmExit) -> Exit | None:
    """nested_svm_vmexit() when VMCB12 may have gone: KVM cannot map it."""
    svm = m.svm
    if m.backed(svm.vmcb12_gpa, 0x1000):
        return svm.vmexit(ex)
    if svm.profile.unmappable_vmcb12_at_vmexit == "gp_in_l2":
        # 6.1/6.12: kvm_vcpu_map() fails with -EINVAL, kvm_inject_gp() -- while
        # still in guest mode -- and the #VMEXIT is dropped.
        return m.raise_exception(GP_VECTOR, 0)
    # 7.x: the #VMEXIT completes without writing VMCB12, then the triple
    # fault KVM requested takes L1 down (KVM_EXIT_SHUTDOWN).
    svm._back_to_l1(restore=True)
    m._resume_blocked = "the vCPU is in shutdown state"
    return ShutdownExit()
