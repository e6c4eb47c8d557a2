"""KVM_GET/SET_NESTED_STATE on the model, header to VMCB.

x86.c kvm_arch_vcpu_ioctl(KVM_SET_NESTED_STATE) checks the size against
the header and the flags it knows; svm_set_nested_state() (nested.c) the
format, its own flags, EFER.SVME, SMM, vmcb_pa and the VMCB size, then the
VMCB12 control area and L1's saved state -- that last part is
NestedSvm.set_nested_state (svm.py).  svm_get_nested_state() hands out the
flags, vmcb12_gpa and, in guest mode, VMCB12's cached control area with L1's
saved state (vmcb01).  Linux 6.1, 6.12 and 7.3 sources; differences are
Profile fields.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from unicorn import x86_const as x86

from .. import l1, layout
from ..nested_request import (
    EVMCS,
    FORMAT_SVM,
    GIF_SET,
    GUEST_MODE,
    HEADER_SIZE,
    MTF_PENDING,
    RUN_PENDING,
    SVM_VMCB_SIZE,
    HostPrep,
    NestedBlob,
)
from ..vmcb import SAVE_AREA, Vmcb
from . import cpuid

if TYPE_CHECKING:
    from .machine import ModelMachine

EINVAL = errno.EINVAL
X86_FLAGS = RUN_PENDING | GUEST_MODE | EVMCS | MTF_PENDING | GIF_SET
SVM_FLAGS = GUEST_MODE | RUN_PENDING | GIF_SET


def prepare(m: ModelMachine, prep: HostPrep) -> tuple[int, str]:
    """What the kvm backend does with KVM_SET_SREGS/MSRS/VCPU_EVENTS."""
    svm = m.svm
    if prep.svme:
        svm.svme = True
        svm.hsave_msr = layout.HSAVE_GPA
    if prep.l2_cr0 is not None:
        cr0 = prep.l2_cr0
        # x86.c kvm_is_valid_sregs -> kvm_is_valid_cr0
        if (cr0 >> 32 or (cr0 & layout.CR0_NW and not cr0 & layout.CR0_CD)
                or (cr0 & layout.CR0_PG and not cr0 & layout.CR0_PE)):
            return EINVAL, "KVM_SET_SREGS"
        m.uc.reg_write(x86.UC_X86_REG_CR0, cr0)
    if prep.smm:
        m.smm.active = True  # kvm_smm_changed(vcpu, true)
    return 0, ""


def set_efer_svme(m: ModelMachine, on: bool) -> int:
    """KVM_SET_SREGS changing only EFER.SVME: kvm_set_efer -> svm_set_efer,
    whose KVM_REQ_RECALC_INTERCEPTS (7.x) re-decides STGI/CLGI."""
    svm = m.svm
    if on and not svm.svm_in_cpuid:
        return EINVAL
    efer = m.hw_efer | (layout.EFER_SVME if on else 0)
    # A change recalculates vGIF's intercepts (7.x, svm._recalc_intercepts).
    if bool(on) != svm.svme and svm._set_efer(efer) is not None:
        return EINVAL
    return 0


def set_state(m: ModelMachine, blob: NestedBlob) -> int:
    svm, profile = m.svm, m.svm.profile
    # x86.c
    if blob.size < HEADER_SIZE or blob.flags & ~X86_FLAGS:
        return EINVAL
    if blob.flags & RUN_PENDING and not blob.flags & GUEST_MODE:
        return EINVAL
    # svm_set_nested_state()
    if blob.format != FORMAT_SVM or blob.flags & ~SVM_FLAGS:
        return EINVAL
    if not svm.svme:
        ok = (GIF_SET, 0) if profile.nested_state_svme0_gif0 else (GIF_SET,)
        if blob.flags not in ok:
            return EINVAL
    if m.smm.active and blob.flags & GUEST_MODE:
        return EINVAL
    if not blob.flags & GUEST_MODE:
        svm._leave_nested()
        svm._set_gif(bool(blob.flags & GIF_SET))  # with vGIF: drops the STGI intercept
        return 0
    if blob.vmcb_pa & 0xFFF or not cpuid.legal_gpa(blob.vmcb_pa):  # page_address_valid
        return EINVAL
    if blob.size < HEADER_SIZE + SVM_VMCB_SIZE or len(blob.data) < SVM_VMCB_SIZE:
        return EINVAL
    vmcb = Vmcb(blob.data[:SVM_VMCB_SIZE])
    efer = vmcb["efer"]
    if profile.nested_state_lma_needs_lme and efer & layout.EFER_LMA and not (
            efer & layout.EFER_LME):
        return EINVAL
    return svm.set_nested_state(blob.flags, blob.vmcb_pa, vmcb)


def get_state(m: ModelMachine) -> NestedBlob:
    svm = m.svm
    flags = GIF_SET if svm.gif else 0
    if not svm.guest_mode:
        return NestedBlob(flags, FORMAT_SVM, HEADER_SIZE, 0, b"")
    flags |= GUEST_MODE | (RUN_PENDING if svm.nested_run_pending else 0)
    return NestedBlob(flags, FORMAT_SVM, HEADER_SIZE + SVM_VMCB_SIZE, svm.vmcb12_gpa,
                      _vmcb(m))


def _vmcb(m: ModelMachine) -> bytes:
    """VMCB12's control area as cached at VMRUN, L1's state (vmcb01) as the
    save area, as svm_get_nested_state() copies them."""
    svm = m.svm
    ctl = svm.cached_control()
    v = Vmcb()
    raw = bytearray(v.to_bytes())
    raw[:SAVE_AREA] = ctl[:SAVE_AREA]
    v = Vmcb(bytes(raw))
    st = l1.initial_state(m.payload)
    for name in ("es", "cs", "ss", "ds"):
        seg = getattr(st, name)
        v[f"{name}.selector"], v[f"{name}.attrib"] = seg.selector, seg.vmcb_attrib
        v[f"{name}.limit"], v[f"{name}.base"] = seg.limit, seg.base
    for name, value in svm.l1_saved_state().items():
        v[name] = value
    return v.to_bytes()
