"""The kvm backend: cases run on this host's /dev/kvm.

L1 is put straight into long mode by KVM_SET_SREGS (no firmware), with the
memory image of kvmtest.l1 in one memslot.  The guest CPUID is KVM's
supported CPUID, with SVM removed for the no-SVM family.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Iterator

from .. import cpuid_features, kmsg, l1, layout, record, ucall
from ..exits import DebugExit, Exit, IoExit, IrqWindowExit
from ..info import host_vendor, kvm_module
from ..kvm import (
    DEV_KVM,
    CpuidEntry,
    Deadline,
    Kvm,
    KvmError,
    KvmUnavailable,
    NestedState,
    Vcpu,
    Vm,
    ffi,
    lib,
)
from ..kvm.cpuid import pack_cpuid2
from ..kvm.deadline import SIGNAL
from ..kvm.nested import GIF_SET as KVM_STATE_NESTED_GIF_SET
from ..kvm.nested import HEADER_SIZE
from ..kvm.vm import GuestMemory
from ..kvm_amd import config_capabilities, cpu_capabilities, module_params
from ..nested_request import HostPrep, NestedBlob
from ..observation import NestedView
from ..payloads import Payload
from ..runner import MAX_EXITS

CPUID_EXT_FEATURES = 0x8000_0001
CPUID_SVM_FEATURES = 0x8000_000A
CPUID_ADDR_SIZES = 0x8000_0008
SVM_BIT = 1 << 2  # CPUID 0x80000001 ECX
MSR_VM_HSAVE_PA = 0xC001_0117
# STAR, LSTAR, CSTAR, SFMASK, KERNEL_GS_BASE, SYSENTER_CS/ESP/EIP: VMLOAD's set.
RESET_MSRS = (0xC000_0081, 0xC000_0082, 0xC000_0083, 0xC000_0084, 0xC000_0102,
              0x174, 0x175, 0x176)


def dev_kvm() -> str:
    """The KVM device: KVMTEST_DEV_KVM overrides /dev/kvm (e.g. a node made
    with mknod to test another permission setup)."""
    return os.environ.get("KVMTEST_DEV_KVM", DEV_KVM)


def has_svm(cpuid: list[CpuidEntry]) -> bool:
    return any(e.function == CPUID_EXT_FEATURES and e.ecx & SVM_BIT for e in cpuid)


def maxphyaddr(cpuid: list[CpuidEntry]) -> int:
    for e in cpuid:
        if e.function == CPUID_ADDR_SIZES:
            return e.eax & 0xFF
    return 36


def guest_cpuid(supported: list[CpuidEntry], svm: bool,
                overrides: tuple[tuple[str, bool], ...] = ()) -> list[CpuidEntry]:
    """KVM's supported CPUID, with SVM (leaf 0x8000000A and the feature bit)
    removed when the case wants a guest without SVM, then the case's own
    feature bits (kvmtest.cpuid_features) set or cleared."""
    out = []
    for e in supported:
        e = CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
        if not svm and e.function == CPUID_SVM_FEATURES:
            continue
        if not svm and e.function == CPUID_EXT_FEATURES:
            e.ecx &= ~SVM_BIT
        for name, on in overrides:
            f = cpuid_features.FEATURES[name]
            if e.function == f.leaf and (e.index == f.subleaf
                                         or not e.flags & lib.KVM_CPUID_FLAG_SIGNIFCANT_INDEX):
                value = getattr(e, f.register)
                setattr(e, f.register, value | 1 << f.bit if on else value & ~(1 << f.bit))
        out.append(e)
    return out


def _set_segment(seg, s: l1.Segment) -> None:
    seg.selector, seg.base, seg.limit, seg.type = s.selector, s.base, s.limit, s.type
    seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g, seg.avl = (
        s.present, s.dpl, s.db, s.s, s.l, s.g, s.avl)
    seg.unusable = s.unusable


_LOW_IMAGES: dict[tuple[str, bytes], bytes] = {}


def _low_image(payload: Payload) -> bytes:
    """[0, LOW_MEMORY) as L1 starts: l1.memory_image below the payload's
    code, zeros elsewhere (one copy per reset instead of a write per table).
    Keyed by name and image: the symbols come from the same build."""
    key = (payload.name, payload.image)
    low = _LOW_IMAGES.get(key)
    if low is None:
        image = bytearray(LOW_MEMORY)
        for gpa, data in l1.memory_image(payload).items():
            if gpa == layout.CODE_GPA:
                continue
            if gpa + len(data) > LOW_MEMORY:  # the reset would not wipe it
                raise ValueError(f"L1 image at {gpa:#x} ends above LOW_MEMORY")
            image[gpa:gpa + len(data)] = data
        low = _LOW_IMAGES[key] = bytes(image)
    return low


DEFAULT_STEP_TIMEOUT = 2.0  # one guest instruction under the host's single-step


def _run_signal_handlers() -> None:
    """Nothing: entering a Python function is where the interpreter runs the
    handlers of signals that arrived while C ran (its eval breaker)."""


class ResetFailed(KvmError):
    """kvmtest_reset() failed in C: the vCPU cannot be reset (replace it)."""


_NO_MASK = (1 << 64) - 1  # no KVM_SET_SIGNAL_MASK yet (a real one never has every bit)

_RESET_STEPS = ("KVM_GET_NESTED_STATE", "KVM_SET_NESTED_STATE", "KVM_SET_SREGS",
                "KVM_SET_REGS", "KVM_SET_MSRS", "KVM_SET_VCPU_EVENTS")

# Everything below the payload that a case can write (tables, ucall/params,
# HSAVE, VMCB12s, bitmaps, stacks, SMRAM), wiped when a vCPU is reused.
LOW_MEMORY = layout.SMRAM_GPA + 0x10000


class KvmMachine:
    """One VM with one vCPU in long mode, implementing backends.base.Machine.

    A machine whose case ended at a ucall (the guest stopped where kvmtest
    expected) can be reset and reused for the next case with the same guest
    CPUID: VM and vCPU creation and teardown dominate a case's cost under
    nested TCG.  reset() puts back everything a case can change.  Any other
    ending leaves a vCPU reset cannot vouch for: renew() gives the next case
    a fresh vCPU in the same VM, unless the case changed VM state (memslots)."""

    # Parked vCPUs a VM may hold before it is replaced (renew()).
    MAX_VCPUS = 64

    def __init__(self, kvm: Kvm, cpuid, payload: Payload, nested_cap: bool,
                 cpuid_key: tuple = ()) -> None:
        self._deadline: Deadline | None = None
        self.nested_cap = nested_cap
        self.cpuid_key = cpuid_key  # which guest CPUID the current vCPU has
        self.vm: Vm = kvm.create_vm()
        try:
            self.mem = self.vm.set_user_memory_region(0, 0, layout.MEM_SIZE)
            self.vcpu: Vcpu = self.vm.create_vcpu(0)
            # KVM_SET_CPUID2 must precede EFER.LME: KVM_SET_SREGS refuses an EFER
            # whose LME/SVME/NX the guest CPUID lacks (x86.c __kvm_valid_efer, 6.1).
            self.vcpu.set_cpuid2(cpuid)
            # KVM_SET_SREGS from vCPU 0's fresh sregs on every (re)load, on
            # every vCPU of this VM (the APIC base's BSP bit included): built
            # once per L1 state (segments, CRs, EFER; RIP is in regs).
            self._fresh_sregs = bytes(ffi.buffer(self.vcpu.get_sregs()))
            self._registers: dict[tuple, tuple] = {}
            self._reset_args = self._make_reset_args()
            self._reset_payload: tuple | None = None
            self._record_args = self._make_record_args()
            self._bind_vcpu()
            self._load(payload)
            self._case_args = ffi.new("struct kvmtest_case_args *",
                                      {"rec": self._record_args})
            self._finals: dict[tuple, object] = {}
        except BaseException:
            self.vm.close()
            raise
        # Extra memslots (add_memory): GPA -> (slot, memory); deleted ones
        # stay mapped here so the host can read what is left in them.
        self._extra: dict[int, tuple[int, GuestMemory]] = {}
        self._deleted: list[GuestMemory] = []

    def read(self, gpa: int, n: int) -> bytes:
        return self._memory_at(gpa, n).read(gpa, n)

    def write(self, gpa: int, data: bytes) -> None:
        self._memory_at(gpa, len(data)).write(gpa, data)

    def _memory_at(self, gpa: int, n: int) -> GuestMemory:
        if self.mem.contains(gpa, n):
            return self.mem
        for _, mem in self._extra.values():
            if mem.contains(gpa, n):
                return mem
        for mem in self._deleted:
            if mem.contains(gpa, n):
                return mem
        raise ValueError(f"GPA range [{gpa:#x}, {gpa + n:#x}) is not guest memory")

    def _load(self, payload: Payload) -> None:
        """Guest memory and vCPU state as L1 starts, wiping what the last case left."""
        self.mem.view[:LOW_MEMORY] = _low_image(payload)
        code_len = self._reset_args.clear_len  # the last payload's, kept by kvmtest_reset too
        self.mem.view[layout.CODE_GPA:layout.CODE_GPA + code_len] = bytes(code_len)
        self.mem.write(layout.CODE_GPA, payload.image)
        self._reset_args.clear_len = len(payload.image)
        sregs, regs = self._l1_registers(payload)
        self.vcpu.set_sregs(sregs)
        self.vcpu.set_regs(regs)
        self._loaded()

    def _loaded(self) -> None:
        # Did the last run stop at a ucall (the guest stopped where kvmtest
        # expected)?  Only then can reset() vouch for the vCPU.
        self.at_ucall = False
        self.run_errno = 0  # record_case(): KVM_RUN failed with it
        self.touched_nested_state = False
        self._pending_irq: int | None = None

    @property
    def reusable(self) -> bool:
        """The case ended at a ucall and left no host-made nested state."""
        return (self.at_ucall and not self.touched_nested_state and not self._extra
                and not self._deleted)

    @property
    def renewable(self) -> bool:
        """Only the vCPU is dirty: the VM can serve the next case on a fresh
        vCPU (a case's extra or deleted memslots are VM state: not renewable)."""
        return (not self.vm.closed and not self._extra and not self._deleted
                and self.vm.nr_vcpus < self.MAX_VCPUS)

    def renew(self, payload: Payload, cpuid, cpuid_key: tuple) -> None:
        """A fresh vCPU in this VM for the next case, when the last one ended
        in a state reset() cannot undo (not at a ucall, or with host-made
        nested, SMM or event state), or when the next case wants another
        guest CPUID (KVM refuses a different KVM_SET_CPUID2 after KVM_RUN,
        x86.c kvm_set_cpuid; CPUID is per vCPU, the VM does not depend on
        it).  The old vCPU is parked: KVM destroys
        vCPUs only with their VM (kvm_destroy_vm), and a VM's destruction
        waits for an RCU grace period (rcu_barrier() in
        kvm_mmu_uninit_tdp_mmu), ~10 ms of idle guest per VM under TCG.  The
        parked vCPUs go with the VM, at the end of the run (docs/qemu.md,
        section 5)."""
        self._end_deadline()
        vcpu = self.vm.create_vcpu(self.vm.nr_vcpus)
        vcpu.set_cpuid2(cpuid)
        self.vcpu, self.cpuid_key = vcpu, cpuid_key
        self._bind_vcpu()
        self._load(payload)

    def reset(self, payload: Payload) -> None:
        """Back to a fresh vCPU's state for the next case, in one C call
        (kvmtest_reset, csrc/record.c), in this order:

        1. with nested state, KVM_GET_NESTED_STATE; unless its flags are
           exactly GIF_SET, KVM_SET_NESTED_STATE to leave guest mode first (a
           case may end at a ucall from L2), so the register writes below
           reach L1's state, not VMCB02's; and GIF=1 as after reset.  Only
           then: KVM_SET_NESTED_STATE has side effects a fresh vCPU does not
           have (with vGIF, svm_set_gif(true) drops the STGI intercept even
           while EFER.SVME=0), and a reused vCPU must behave like a fresh one;
        2. the memory of _load(), then KVM_SET_SREGS (EFER without SVME: KVM
           leaves nested mode, GIF=1) and KVM_SET_REGS;
        3. KVM_SET_MSRS: the MSRs a case can change, HSAVE and what a (wrongly
           executed) VMLOAD loads, all zero;
        4. KVM_SET_VCPU_EVENTS: nothing pending or injected."""
        self._end_deadline()
        r = lib.kvmtest_reset(self._fill_reset(payload), self._reset_step)
        if r < 0:
            raise KvmError(_RESET_STEPS[self._reset_step[0]], -r)
        self._loaded()

    def _fill_reset(self, payload: Payload):
        """kvmtest_reset's arguments for PAYLOAD.  Each cffi field write costs
        ~30 us under TCG: only what changed since the last case is written
        (the vCPU's fd in _bind_vcpu; the code length by kvmtest_reset)."""
        a = self._reset_args
        key = (payload.name, payload.image)
        if key != self._reset_payload:
            sregs, regs = self._l1_registers(payload)
            low = _low_image(payload)
            # The images stay alive: _low_image's cache and the payload hold them.
            self._reset_keep_images = keep = (ffi.from_buffer("uint8_t[]", low),
                                              ffi.from_buffer("uint8_t[]", payload.image))
            a.low, a.low_len = keep[0], len(low)
            a.image, a.image_len = keep[1], len(payload.image)
            a.sregs, a.regs = sregs, regs
            self._reset_payload = key
        return a

    def _bind_vcpu(self) -> None:
        """The C helpers' arguments that follow the vCPU (a renew() changes it)."""
        vcpu = self.vcpu
        self._reset_args.vcpu_fd = vcpu.fd
        a = self._record_args
        a.vcpu_fd = vcpu.fd
        a.run, a.run_size = vcpu.run_cdata, vcpu.run_size

    def _make_reset_args(self):
        a = ffi.new("struct kvmtest_reset_args *")
        keep = [a]
        if self.nested_cap:
            size = max(self.vm.nested_state_size, HEADER_SIZE + lib.KVM_STATE_NESTED_SVM_VMCB_SIZE)
            a.nested_buf = self._nested_buf = ffi.new("uint8_t[]", size)
            a.nested_size = size
            a.gif_set = KVM_STATE_NESTED_GIF_SET
            a.gif_state = gif = NestedState.svm(KVM_STATE_NESTED_GIF_SET, 0).pack()
            keep.append(gif)
        a.mem = self.mem.cdata
        a.code_gpa = layout.CODE_GPA
        msrs = dict.fromkeys(RESET_MSRS, 0)
        if self.nested_cap:
            msrs[MSR_VM_HSAVE_PA] = 0
        c = ffi.new("struct kvm_msrs *", {"nmsrs": len(msrs), "entries": len(msrs)})
        for i, index in enumerate(msrs):
            c.entries[i].index = index
        a.msrs, a.nmsrs = c, len(msrs)
        a.events = self._no_events
        keep.append(c)
        self._reset_keep = keep  # cdata a.* points into
        self._reset_step = ffi.new("int *")
        return a

    # Nothing pending or injected: exception, interrupt, NMI (pending and
    # masked), interrupt shadow.
    _no_events = ffi.new("struct kvm_vcpu_events *", {
        "flags": lib.KVM_VCPUEVENT_VALID_NMI_PENDING | lib.KVM_VCPUEVENT_VALID_SHADOW})

    def _l1_registers(self, payload: Payload):
        """KVM_SET_SREGS's and KVM_SET_REGS's structs for L1's start in long
        mode with PAYLOAD, built once per payload (the same for every vCPU of
        this VM): sregs from vCPU 0's fresh ones, so the APIC base's BSP bit too."""
        key = (payload.name, payload.image)
        found = self._registers.get(key)
        if found is None:
            st = l1.initial_state(payload)
            sregs = ffi.new("struct kvm_sregs *")
            ffi.memmove(sregs, self._fresh_sregs, len(self._fresh_sregs))
            sregs.interrupt_bitmap = [0] * len(sregs.interrupt_bitmap)
            for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr"):
                _set_segment(getattr(sregs, name), getattr(st, name))
            _set_segment(sregs.ldt, st.ldt)
            sregs.gdt.base, sregs.gdt.limit = st.gdt
            sregs.idt.base, sregs.idt.limit = st.idt
            sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = st.cr0, st.cr3, st.cr4, st.efer
            sregs.cr2 = 0
            # Every other GPR zero: a reused vCPU must not carry the last case's.
            regs = ffi.new("struct kvm_regs *", {"rip": st.rip, "rsp": st.rsp,
                                                 "rflags": st.rflags})
            found = self._registers[key] = (sregs, regs)
        return found

    def record_case(self, compiled: record.Compiled, timeout: float,
                    reset: Payload | None) -> bytes:
        """Run an eligible case (kvmtest.record) in one C call (kvmtest_case,
        csrc/record.c): with RESET, reset() for that payload first; the
        case's deadline armed as run() arms it; its memory written, then
        KVM_RUN until it ends.  The trace (without the kernel log: the
        backend reads it around the whole case); ResetFailed if the reset
        failed (nothing ran).  run_errno tells whether KVM_RUN failed."""
        # As Timer.arm(): at least 1 ns (0 would disarm); NaN and infinity
        # raise here as they raise there.
        timeout_ns = max(1, int(timeout * 1e9))
        vcpu = self.vcpu
        c = self._case_args
        c.reset = self._fill_reset(reset) if reset is not None else ffi.NULL
        a = self._record_args
        writes = ffi.from_buffer("uint8_t[]", compiled.writes)
        a.writes, a.writes_len = writes, len(compiled.writes)
        finals = self._finals.get(compiled.final)
        if finals is None:
            finals = self._finals[compiled.final] = ffi.new(
                "uint64_t[]", [x for r in compiled.final for x in r] or [0])
        a.final_snaps, a.n_final = finals, len(compiled.final)
        a.final_nested = compiled.final_nested
        c.timer = vcpu._thread_timer().handle
        c.timeout, c.timeout_ns = timeout, timeout_ns
        c.kvm_sigmask = _NO_MASK if vcpu.signal_mask is None else vcpu.signal_mask
        try:
            n = lib.kvmtest_case(c)
            while c.paused:
                # A stray signal stopped KVM_RUN: its Python handler runs
                # now, as in drive()'s loop (a KeyboardInterrupt ends the
                # case here), then the case goes on.
                _run_signal_handlers()
                n = lib.kvmtest_case_resume(c)
        except BaseException:
            if c.paused:
                lib.kvmtest_case_end(c, 0)  # the deadline ended, as Deadline's finally
            raise
        finally:
            del writes
            if c.kvm_sigmask != _NO_MASK:
                vcpu.signal_mask = c.kvm_sigmask
        if n < 0:
            if c.failed_step >= 0:
                raise ResetFailed(_RESET_STEPS[c.failed_step], -n)
            raise KvmError("kvmtest_case", -n)
        if reset is not None:
            self._loaded()
        self.at_ucall = bool(a.at_ucall)
        self.run_errno = a.run_errno
        return bytes(ffi.buffer(self._trace, n))

    def _make_record_args(self):
        a = ffi.new("struct kvmtest_record_args *")
        a.mem, a.mem_size = self.mem.cdata, layout.MEM_SIZE
        a.max_exits = MAX_EXITS
        a.signo = SIGNAL
        a.ucall_port = ucall.UCALL_PORT
        a.ucall_args_gpa, a.ucall_args_len = record.UCALL_ARGS
        a.cmd_sync, a.cmd_ping = ucall.Ucall.SYNC, ucall.Ucall.PING
        a.cmd_assert = ucall.Ucall.ASSERT
        a.result_gpa, a.result_len = record.RESULT
        a.cstring_limit = ucall.CSTRING_LIMIT
        size = max(self.vm.nested_state_size, HEADER_SIZE + lib.KVM_STATE_NESTED_SVM_VMCB_SIZE)
        a.nested_buf = self._record_nested = ffi.new("uint8_t[]", size)
        a.nested_size = size
        a.out = self._trace = ffi.new("uint8_t[]", record.RUN_SPACE)
        a.out_cap = record.RUN_SPACE
        return a

    def run(self, timeout: float) -> Exit:
        # One deadline for the whole case, armed at its first run: arming a
        # timer per exit costs as much as the exit itself under kvm_pvm.
        if self._deadline is None:
            self._deadline = self.vcpu.deadline(timeout)
            self._deadline.__enter__()
        while True:
            ex = self.vcpu.run()
            self.at_ucall = isinstance(ex, IoExit) and ex.port == ucall.UCALL_PORT
            if isinstance(ex, IrqWindowExit) and self._pending_irq is not None:
                # The userspace-irqchip protocol: inject once KVM says the
                # vCPU can take it (GIF, RFLAGS.IF, no shadow), then go on.
                self.vcpu.interrupt(self._pending_irq)
                self._pending_irq = None
                self.vcpu.request_interrupt_window = False
                continue
            return ex

    def nested_state(self) -> NestedView | None:
        try:
            st = self.vcpu.get_nested_state()
        except KvmError:
            return None
        return NestedView(st.flags, st.vmcb12_gpa if st.guest_mode else None)

    def set_nested_state(self, flags: int, vmcb12_gpa: int, vmcb12: bytes) -> int:
        # KVM refuses guest mode unless L1 has EFER.SVME; L1 has not run yet.
        self.touched_nested_state = True
        sregs = self.vcpu.get_sregs()
        sregs.efer |= layout.EFER_SVME
        self.vcpu.set_sregs(sregs)
        self.vcpu.set_msrs({MSR_VM_HSAVE_PA: layout.HSAVE_GPA})
        try:
            self.vcpu.set_nested_state(NestedState.svm(flags, vmcb12_gpa, vmcb12))
        except KvmError as e:
            return e.errno or errno.EIO
        return 0

    def smi(self) -> None:
        # In SMM, KVM looks guest memory up in address space 1: alias the
        # memslot there (SMRAM is ordinary memory here, like the handler's
        # VMCB12).  After an SMI the vCPU is not reset for reuse.
        self.touched_nested_state = True
        self.vm.alias_memory_region(self.mem, address_space=1)
        self.vcpu.smi()

    # ---- host actions (kvmtest.actions) ----------------------------------

    def _events_call(self, fn) -> int:
        try:
            fn()
        except KvmError as e:
            return e.errno or errno.EIO
        return 0

    def interrupt(self, vector: int) -> int:
        """Raise the interrupt line: injected when KVM opens the window."""
        self.touched_nested_state = True  # pending events survive a reset
        if self._pending_irq is not None:
            return errno.EEXIST
        self._pending_irq = vector
        self.vcpu.request_interrupt_window = True
        return 0

    def nmi(self) -> int:
        self.touched_nested_state = True
        return self._events_call(self.vcpu.nmi)

    def set_nmi_masked(self, masked: bool) -> int:
        self.touched_nested_state = True

        def set_mask() -> None:
            ev = self.vcpu.get_vcpu_events()
            ev.nmi.masked = int(masked)
            ev.flags = 0  # pending NMIs, SIPI, SMM and payloads as they are
            self.vcpu.set_vcpu_events(ev)
        return self._events_call(set_mask)

    def add_memory(self, gpa: int, size: int) -> int:
        slot = 1 + len(self._extra) + len(self._deleted)
        try:
            mem = self.vm.set_user_memory_region(slot, gpa, size)
        except KvmError as e:
            return e.errno or errno.EIO
        self._extra[gpa] = (slot, mem)
        return 0

    def delete_memory(self, gpa: int) -> int:
        if gpa not in self._extra:
            return errno.EINVAL  # no memslot add_memory made there
        slot, mem = self._extra.pop(gpa)
        try:
            self.vm.forget_memory_region(slot)
        except KvmError as e:
            self._extra[gpa] = (slot, mem)
            return e.errno or errno.EIO
        self._deleted.append(mem)
        return 0

    def get_nested(self) -> NestedBlob | None:
        try:
            st = self.vcpu.get_nested_state()
        except KvmError:
            return None
        return NestedBlob(st.flags, st.format, st.size, int.from_bytes(st.hdr[:8], "little"),
                          bytes(st.data))

    def set_nested(self, blob: NestedBlob) -> int:
        self.touched_nested_state = True
        st = NestedState(blob.flags, blob.format, blob.size,
                         blob.vmcb_pa.to_bytes(8, "little"), blob.data)
        try:
            self.vcpu.set_nested_state(st)
        except KvmError as e:
            return e.errno or errno.EIO
        return 0

    def prepare_nested(self, prep: HostPrep) -> tuple[int, str]:
        self.touched_nested_state = True
        try:
            if prep.svme:  # L1 has not run yet: enable SVM for it
                sregs = self.vcpu.get_sregs()
                sregs.efer |= layout.EFER_SVME
                self.vcpu.set_sregs(sregs)
                self.vcpu.set_msrs({MSR_VM_HSAVE_PA: layout.HSAVE_GPA})
            if prep.l2_cr0 is not None:
                sregs = self.vcpu.get_sregs()
                sregs.cr0 = prep.l2_cr0
                self.vcpu.set_sregs(sregs)
            if prep.smm:
                self._set_smm(True)
        except KvmError as e:
            return e.errno or errno.EIO, e.ioctl
        return 0, ""

    def _set_smm(self, on: bool) -> None:
        if on:  # KVM looks SMRAM up in address space 1: the same memory
            self.vm.alias_memory_region(self.mem, address_space=1)
        ev = self.vcpu.get_vcpu_events()
        ev.flags = lib.KVM_VCPUEVENT_VALID_SMM
        ev.smi.smm = int(on)
        ev.smi.pending = 0
        self.vcpu.set_vcpu_events(ev)

    def set_efer_svme(self, on: bool) -> int:
        self.touched_nested_state = True

        def write() -> None:
            sregs = self.vcpu.get_sregs()
            sregs.efer = (sregs.efer | layout.EFER_SVME) if on else (
                sregs.efer & ~layout.EFER_SVME)
            self.vcpu.set_sregs(sregs)
        return self._events_call(write)

    def step(self) -> str:
        self.touched_nested_state = True
        debug = lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_SINGLESTEP
        try:
            self.vcpu.set_guest_debug(debug)
            try:  # its own deadline: the case's is armed by its first run()
                ex = self.vcpu.run(DEFAULT_STEP_TIMEOUT)
                self.at_ucall = False
            finally:
                self.vcpu.set_guest_debug(0)
        except KvmError as e:
            return str(e)
        return "" if isinstance(ex, DebugExit) else f"single-step ended with {ex!r}"

    def leave_smm(self) -> int:
        return self._events_call(lambda: self._set_smm(False))

    def _end_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.__exit__(None, None, None)
            self._deadline = None

    def close(self) -> None:
        self._end_deadline()
        self.vm.close()  # unmaps the live extra memslots too
        for mem in self._deleted:
            mem.close()
        self._deleted.clear()
        self._extra.clear()


class KvmBackend:
    name = "kvm"

    def __init__(self, profile: str | None = None, reuse: bool | None = None,
                 park: bool | None = None, records: bool | None = None,
                 kmsg_words: tuple[str, ...] = kmsg.BAD_WORDS) -> None:
        self.profile = profile
        # What a kernel-log line must hold to count against a case: kmsg's
        # BAD_WORDS (a test that plants lines watches for its own word, so
        # that tests running beside it see nothing bad).
        self.kmsg_bad = kmsg.pattern(kmsg_words)
        # kvmtest_kmsg_drain()'s words: each NUL-terminated, then an empty one.
        self._kmsg_words = ffi.new("char[]", b"".join(w.encode() + b"\0" for w in kmsg_words)
                                   + b"\0")
        # KVMTEST_RECORD=0: every case on drive()'s Python loop, none recorded
        # in C and replayed (kvmtest.record; for comparison).
        self.records = os.environ.get("KVMTEST_RECORD") != "0" if records is None else records
        # KVMTEST_FRESH_VM=1: a new VM for every case (slower, for comparison).
        self.reuse = os.environ.get("KVMTEST_FRESH_VM") != "1" if reuse is None else reuse
        # KVMTEST_PARK_VCPUS=0: a new VM after every case that leaves its vCPU
        # dirty, instead of a fresh vCPU in the same VM (KvmMachine.renew).
        self.park = os.environ.get("KVMTEST_PARK_VCPUS") != "0" if park is None else park
        self._pool: dict[tuple, KvmMachine] = {}
        self._kmsg = kmsg.Kmsg()
        self._kmsg_args = None
        self.kvm = Kvm(dev_kvm())  # raises KvmUnavailable with an actionable message
        try:
            if not self.kvm.check_extension(lib.KVM_CAP_EXT_CPUID):
                raise KvmUnavailable("host KVM lacks KVM_CAP_EXT_CPUID (KVM_GET_SUPPORTED_"
                                     "CPUID): kernel too old for kvmtest; use --backend qemu "
                                     "or model")
            self.supported = self.kvm.supported_cpuid()
        except KvmError as e:
            self.kvm.close()
            if isinstance(e, KvmUnavailable):
                raise
            raise KvmUnavailable(f"cannot read KVM's supported CPUID ({e})", e.errno) from None
        self.svm = has_svm(self.supported)
        self.nested_cap = self.kvm.check_extension(lib.KVM_CAP_NESTED_STATE)
        self.smm_cap = self.kvm.check_extension(lib.KVM_CAP_X86_SMM)
        self.maxphyaddr = maxphyaddr(self.supported)
        self.kvm_amd_params = module_params()  # the running module's, effective
        # Packing ~60 entries costs as much as KVM_SET_CPUID2: do it once
        # per guest CPUID (key: svm, the case's sorted feature overrides).
        self._cpuid = {(svm, ()): pack_cpuid2(guest_cpuid(self.supported, svm))
                       for svm in (False, True)}

    def close(self) -> None:
        # Each VM's destruction waits for an RCU grace period (rcu_barrier()
        # in kvm_mmu_uninit_tdp_mmu): closed side by side, they share it.
        errors: list[BaseException] = []

        def close(m: KvmMachine) -> None:
            try:
                m.close()
            except BaseException as e:  # re-raised below, in the caller's thread
                errors.append(e)

        closers = [threading.Thread(target=close, args=(m,)) for m in self._pool.values()]
        for t in closers:
            t.start()
        for t in closers:
            t.join()
        self._pool.clear()
        self._kmsg.close()
        self.kvm.close()
        if errors:
            raise errors[0]

    def no_svm_reason(self) -> str:
        return (f"host KVM has no SVM: {host_vendor() or 'unknown vendor'}, "
                f"{kvm_module() or 'no kvm module'}; "
                "use --backend qemu or model")

    def capabilities(self) -> dict[str, str | None]:
        return {
            "no_svm": None,
            "svm": None if self.svm else self.no_svm_reason(),
            "nested_state": None if self.nested_cap else (
                "host KVM lacks KVM_CAP_NESTED_STATE (kvm_amd nested=1, Linux 5.10+); "
                "use --backend qemu or model"),
            "smm": None if self.smm_cap else (
                "host KVM lacks KVM_CAP_X86_SMM (KVM_SMI); use --backend qemu"),
            **config_capabilities(self.kvm_amd_params),
            **cpu_capabilities(pcid=self.has_pcid()),
        }

    def has_pcid(self) -> bool:
        return self._has_feature("pcid")

    def _has_feature(self, name: str) -> bool:
        f = cpuid_features.FEATURES[name]
        return any(e.function == f.leaf and e.index == f.subleaf
                   and getattr(e, f.register) >> f.bit & 1 for e in self.supported)

    @contextlib.contextmanager
    def machine(self, payload: Payload, svm: bool,
                cpuid: dict[str, bool] | None = None) -> Iterator[KvmMachine]:
        m, _ = self._take(payload, svm, cpuid)
        try:
            yield m
        except BaseException:
            m.close()
            raise
        self._give_back(m)

    def _take(self, payload: Payload, svm: bool, cpuid: dict[str, bool] | None,
              defer_reset: bool = False) -> tuple[KvmMachine, bool]:
        """The machine for the next case, and whether its reset is still to
        do (defer_reset: kvmtest_case() does it in C, csrc/record.c)."""
        key = (svm, tuple(sorted((cpuid or {}).items())))
        if key not in self._cpuid:
            self._cpuid[key] = pack_cpuid2(guest_cpuid(self.supported, svm, key[1]))
        # Parking: one VM for every guest CPUID (a vCPU per CPUID change);
        # without it, a VM per guest CPUID.
        pool_key = () if self.park else key
        m = self._pool.pop(pool_key, None)
        if m is not None:
            try:
                if m.reusable and m.cpuid_key == key:
                    if defer_reset:
                        m._end_deadline()
                        return m, True
                    m.reset(payload)
                elif self.park and m.renewable:
                    m.renew(payload, self._cpuid[key], key)
                else:
                    m.close()
                    m = None
            except BaseException as e:
                if m is not None:
                    m.close()
                if not isinstance(e, KvmError):
                    raise
                m = None  # a vCPU that cannot be reset is replaced
        if m is None:
            m = self._new_machine(payload, key)
        return m, False

    def _new_machine(self, payload: Payload, key: tuple) -> KvmMachine:
        return KvmMachine(self.kvm, self._cpuid[key], payload, bool(self.nested_cap), key)

    def _give_back(self, m: KvmMachine) -> None:
        if self.reuse and (m.reusable or (self.park and m.renewable)):
            m._end_deadline()
            self._pool[() if self.park else m.cpuid_key] = m
        else:
            m.close()

    def record(self, payload: Payload, svm: bool, cpuid: dict[str, bool] | None,
               compiled: record.Compiled, timeout: float) -> bytes:
        """An eligible case (kvmtest.record) in one C call, reset included
        (kvmtest_case); its trace.  As run_case() does on the Python path:
        the kernel log watched from before the machine is taken until after
        it is given back (or closed); a vCPU whose reset fails replaced by a
        new VM; a machine whose KVM_RUN failed closed."""
        kmsg_fd = self._kmsg.mark()
        m, reset = self._take(payload, svm, cpuid, defer_reset=True)
        try:
            try:
                trace = m.record_case(compiled, timeout, payload if reset else None)
            except ResetFailed:
                m.close()
                m = self._new_machine(payload, m.cpuid_key)
                trace = m.record_case(compiled, timeout, None)
        except BaseException:
            m.close()
            raise
        if m.run_errno:  # machine() closes one whose run() raised KvmError
            m.close()
        else:
            self._give_back(m)
        if kmsg_fd is not None:
            trace += self._kmsg_drain(kmsg_fd)
        return trace

    def _kmsg_drain(self, fd: int) -> bytes:
        """The trace's kernel-log records (kvmtest_kmsg_drain, csrc/record.c)."""
        k = self._kmsg_args
        if k is None:
            k = self._kmsg_args = ffi.new("struct kvmtest_kmsg_args *", {
                "words": self._kmsg_words, "keep_lines": kmsg.KEEP_LINES,
                "keep_bytes": kmsg.KEEP_BYTES, "out_cap": record.KMSG_SPACE})
            self._kmsg_out = k.out = ffi.new("uint8_t[]", record.KMSG_SPACE)
        k.fd = fd
        n = lib.kvmtest_kmsg_drain(k)
        if n < 0:
            raise KvmError("kvmtest_kmsg_drain", -n)
        return bytes(ffi.buffer(self._kmsg_out, n))

    def kernel_log(self):
        return self._kmsg.watch(self.kmsg_bad)

    def describe(self) -> dict[str, str]:
        return {"backend": self.name, "kernel": os.uname().release,
                "detail": f"{host_vendor()}, {kvm_module()}"}
