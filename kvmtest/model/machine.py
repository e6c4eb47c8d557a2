"""One L1 vCPU on Unicorn: the Machine protocol of backends/base.py.

Unicorn executes the payload bytes at the shared layout; everything KVM or
the CPU does that Unicorn cannot is done here or in svm.py:

- SVM instructions: the CPU model has no SVM, so they raise #UD into
  UC_HOOK_INSN_INVALID and svm.py emulates them (Unicorn 2.1.4 offers
  no CPU model with SVM).
- RDMSR/WRMSR cannot be hooked as instructions in Unicorn 2.1.4: the payload
  image is scanned once for 0F 30 / 0F 32 and a code hook sits on each hit;
  the SVM MSRs (EFER.SVME, VM_HSAVE_PA, VM_CR) and every MSR access of L2
  go to the model, the rest execute natively.
- Exceptions: Unicorn reports the vector only (UC_HOOK_INTR) and never uses
  the guest IDT, so the model delivers them in software through the IDT
  gate, and the payload's own stubs report them, as on KVM.
- Port I/O, HLT, unbacked memory and triple faults become the exits KVM
  would give (exits.py), so runner.py serves both backends.
- SMM (smm.py): ``smi()`` queues an SMI, taken at the next instruction
  boundary the way KVM takes it; RSM (#UD in Unicorn) is emulated there.

Hooks never change guest state themselves: they record one event and stop
the emulation; ``run()`` handles it and resumes.  That keeps every world
switch (VMRUN, #VMEXIT, exception delivery) outside translated code.
"""

from __future__ import annotations

import errno
import struct
import time

from unicorn import (
    UC_ARCH_X86,
    UC_CTL_IO_WRITE,
    UC_CTL_TLB_FLUSH,
    UC_HOOK_CODE,
    UC_HOOK_INSN,
    UC_HOOK_INSN_INVALID,
    UC_HOOK_INTR,
    UC_HOOK_MEM_FETCH,
    UC_HOOK_MEM_READ,
    UC_HOOK_MEM_UNMAPPED,
    UC_HOOK_MEM_WRITE,
    UC_MEM_FETCH,
    UC_MEM_FETCH_UNMAPPED,
    UC_MEM_WRITE,
    UC_MEM_WRITE_UNMAPPED,
    UC_MODE_64,
    UC_QUERY_TIMEOUT,
    Uc,
    UcError,
)
from unicorn import x86_const as x86

from .. import l1, layout
from ..exits import (
    KVM_EXIT_IO_IN,
    KVM_EXIT_IO_OUT,
    EmulationError,
    Exit,
    HltExit,
    IoExit,
    MmioExit,
    ShutdownExit,
    TimedOut,
)
from ..nested_request import HostPrep, NestedBlob
from ..observation import NestedView
from ..payloads import Payload
from ..vmcb import Vmcb
from . import events, modes, nested, paging, smm
from .cpuid import GuestCpu
from .hwstate import KvmAmd
from .modes import RFLAGS_IF, RFLAGS_NT, RFLAGS_RF, RFLAGS_TF, RFLAGS_VM
from .profiles import Profile
from .svm import NestedSvm, Raise, VmExit
from .unicorn_fixups import OldExceptionReset
from .watchdog import TIMER_UNICORN, TIMER_WATCHDOG, Watchdog

UNTIL = 0xFFFF_FFFF_FFFF_FFFF  # never reached: runs end on events only
# Identity-mapped for L1 but backed by no memslot: fetching there stops
# emulation (see _on_msr_site).  Under other paging it faults, which stops too.
PARK_RIP = layout.UNBACKED_GPA
MSR_EFER = 0xC000_0080

# A model-private GDT used only while loading L2's segment state from
# VMCB12 (KVM loads hidden segment state from the VMCB, Unicorn only by
# selector through a GDT).  It sits in the last 64 KiB of L1's identity map,
# a GPA range no memslot backs; guest accesses to it are reported as they
# would be on KVM (MMIO), see _on_scratch.
SCRATCH_GDT = 0x3FFF_0000
SCRATCH_SIZE = 0x1_0000

# Guest memory written before each case is restored from a pristine image;
# pages above it are tracked when written (guest: write hook, host: write()).
LOW_REGION = 0x3_0000

# Invalid opcodes a real CPU also raises #UD for (UD2, UD1, UD0): everything
# else Unicorn rejects may be an instruction KVM would run, so it is an
# EmulationError, not a guessed #UD.
UD_OPCODES = (b"\x0f\x0b", b"\x0f\xb9", b"\x0f\xff")
SVM_OPCODES = {0xD8: "vmrun", 0xD9: "vmmcall", 0xDA: "vmload", 0xDB: "vmsave",
               0xDC: "stgi", 0xDD: "clgi", 0xDE: "skinit", 0xDF: "invlpga"}

# Exceptions whose error code Unicorn does not expose; the model reports 0,
# which is what the CPU pushes for the #GP/#SS/#TS/#NP the payloads can
# cause (privileged/non-canonical/reserved-bit faults).  #PF's is rebuilt
# from a page walk (P bit and I/D; W is unknown and reported as 0).
GPRS = (x86.UC_X86_REG_RBX, x86.UC_X86_REG_RCX, x86.UC_X86_REG_RDX, x86.UC_X86_REG_RSI,
        x86.UC_X86_REG_RDI, x86.UC_X86_REG_RBP, x86.UC_X86_REG_R8, x86.UC_X86_REG_R9,
        x86.UC_X86_REG_R10, x86.UC_X86_REG_R11, x86.UC_X86_REG_R12, x86.UC_X86_REG_R13,
        x86.UC_X86_REG_R14, x86.UC_X86_REG_R15)


VEC_DF = 8
VEC_GP = 13
VEC_PF = 14


class _Stop(Exception):
    """A hook's event, carried from the hook to run()."""


def msr_sites(image: bytes) -> list[int]:
    """GPAs of every 0F 30 (WRMSR) / 0F 32 (RDMSR) byte pair in the image.

    Some hits may lie inside other instructions; a code hook there never
    fires, so over-approximating is harmless."""
    sites = []
    for op in (b"\x0f\x30", b"\x0f\x32"):
        i = image.find(op)
        while i >= 0:
            sites.append(layout.CODE_GPA + i)
            i = image.find(op, i + 1)
    return sorted(sites)


def _descriptor(attrib: int, base: int, limit: int) -> int:
    """An 8-byte GDT descriptor from VMCB attrib/base/limit (APM 4.7, B-2)."""
    g = (attrib >> 11) & 1
    lim = limit >> 12 if g else limit
    access = attrib & 0xFF
    flags = (attrib >> 8) & 0xF
    return ((lim & 0xFFFF) | (base & 0xFFFFFF) << 16 | access << 40 | ((lim >> 16) & 0xF) << 48
            | flags << 52 | ((base >> 24) & 0xFF) << 56)


class ModelMachine:
    """Implements backends.base.Machine for one payload; reused across cases."""

    def __init__(self, payload: Payload, profile: Profile, timer: str = TIMER_WATCHDOG,
                 kvm_amd: KvmAmd | None = None) -> None:
        if timer not in (TIMER_WATCHDOG, TIMER_UNICORN):
            raise ValueError(f"timer must be {TIMER_WATCHDOG!r} or {TIMER_UNICORN!r}")
        self.payload = payload
        self.timer = timer
        self.kvm_amd = kvm_amd or KvmAmd()  # the kvm_amd parameters modelled
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        # Haswell has no SVM: SVM opcodes #UD into the hook.
        self.uc.ctl_set_cpu_model(x86.UC_CPU_X86_HASWELL)
        self.uc.mem_map(0, layout.MEM_SIZE)
        self.uc.mem_map(SCRATCH_GDT, SCRATCH_SIZE)
        self._low_image = self._build_low_image()
        self._code_end = layout.CODE_GPA + len(payload.image)
        self._dirty: set[int] = set()  # page numbers above LOW_REGION
        self._msr_sites = msr_sites(payload.image) + smm.handler_msr_sites(payload)
        self._event: tuple | None = None
        self._loading_l2 = False
        self._msr_passthrough: int | None = None
        self._parked: tuple | None = None
        self._resume_blocked: str | None = None
        self.smm = smm.SmmState()
        self.events = events.EventState()
        # Extra memslots (add_memory): GPA -> size; deleted ones keep their
        # last contents for the host (delete_memory).
        self._extra: dict[int, int] = {}
        self._deleted: dict[int, bytes] = {}
        self._install_hooks()
        self._load_memory(full=True)
        self._load_l1_state(l1.initial_state(payload))
        self._initial = self.uc.context_save()
        self._reset_old_exception = OldExceptionReset(self.uc)
        self._watchdog = Watchdog(self.uc.emu_stop) if timer == TIMER_WATCHDOG else None
        self.svm = NestedSvm(self, profile, GuestCpu.build(svm=True), self.kvm_amd)

    # ---- setup -----------------------------------------------------------

    def _build_low_image(self) -> bytes:
        low = bytearray(LOW_REGION)
        for gpa, data in l1.memory_image(self.payload).items():
            if gpa < LOW_REGION:
                low[gpa : gpa + len(data)] = data
        return bytes(low)

    def _load_memory(self, full: bool) -> None:
        self.uc.mem_write(0, self._low_image)
        if full:
            self.uc.mem_write(layout.CODE_GPA, self.payload.image)
            return
        for page in sorted(self._dirty):
            gpa = page << 12
            data = bytearray(0x1000)
            lo, hi = max(gpa, layout.CODE_GPA), min(gpa + 0x1000, self._code_end)
            if lo < hi:
                off = lo - layout.CODE_GPA
                data[lo - gpa : hi - gpa] = self.payload.image[off : off + hi - lo]
            self.uc.mem_write(gpa, bytes(data))
        self._dirty.clear()

    def _load_l1_state(self, st: l1.L1State) -> None:
        uc = self.uc
        uc.reg_write(x86.UC_X86_REG_GDTR, (0, st.gdt[0], st.gdt[1], 0))
        uc.reg_write(x86.UC_X86_REG_IDTR, (0, st.idt[0], st.idt[1], 0))
        uc.reg_write(x86.UC_X86_REG_CR3, st.cr3)
        uc.reg_write(x86.UC_X86_REG_CR4, st.cr4)
        uc.msr_write(MSR_EFER, st.efer)
        uc.reg_write(x86.UC_X86_REG_CR0, st.cr0)
        uc.reg_write(x86.UC_X86_REG_CS, st.cs.selector)
        for reg, seg in ((x86.UC_X86_REG_SS, st.ss), (x86.UC_X86_REG_DS, st.ds),
                         (x86.UC_X86_REG_ES, st.es), (x86.UC_X86_REG_FS, st.fs),
                         (x86.UC_X86_REG_GS, st.gs)):
            uc.reg_write(reg, seg.selector)
        flags = st.tr.type << 8 | st.tr.present << 15
        uc.reg_write(x86.UC_X86_REG_TR, (st.tr.selector, st.tr.base, st.tr.limit, flags))
        uc.reg_write(x86.UC_X86_REG_RSP, st.rsp)
        uc.reg_write(x86.UC_X86_REG_RFLAGS, st.rflags)
        uc.reg_write(x86.UC_X86_REG_RIP, st.rip)

    def _install_hooks(self) -> None:
        uc = self.uc
        uc.hook_add(UC_HOOK_INSN_INVALID, self._on_invalid)
        uc.hook_add(UC_HOOK_INTR, self._on_intr)
        uc.hook_add(UC_HOOK_INSN, self._on_out, None, 1, 0, x86.UC_X86_INS_OUT)
        uc.hook_add(UC_HOOK_INSN, self._on_in, None, 1, 0, x86.UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_MEM_UNMAPPED, self._on_unmapped)
        uc.hook_add(UC_HOOK_MEM_READ | UC_HOOK_MEM_WRITE | UC_HOOK_MEM_FETCH, self._on_scratch,
                    None, SCRATCH_GDT, SCRATCH_GDT + SCRATCH_SIZE - 1)
        uc.hook_add(UC_HOOK_MEM_WRITE, self._on_high_write, None, LOW_REGION,
                    layout.MEM_SIZE - 1)
        for site in self._msr_sites:
            uc.hook_add(UC_HOOK_CODE, self._on_msr_site, None, site, site)

    # ---- per-case reset --------------------------------------------------

    def reset(self, profile: Profile, svm_in_cpuid: bool,
              cpuid: dict[str, bool] | None = None) -> None:
        """Back to the state right after construction: the same case then
        gives byte-identical observations (nothing survives but the TB cache)."""
        self.uc.context_restore(self._initial)
        self._flush_tlb()
        self._load_memory(full=False)
        self._event = None
        self._msr_passthrough = None
        self._parked = None
        self._resume_blocked = None
        self.smm = smm.SmmState()
        events.disarm(self)
        self.events = events.EventState()
        for gpa, size in self._extra.items():
            self.uc.mem_unmap(gpa, size)
        self._extra.clear()
        self._deleted.clear()
        self.svm = NestedSvm(self, profile, GuestCpu.build(svm_in_cpuid, cpuid), self.kvm_amd)

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.close()

    # ---- Machine protocol -----------------------------------------------

    def read(self, gpa: int, n: int) -> bytes:
        for base, data in self._deleted.items():
            if base <= gpa and gpa + n <= base + len(data):
                return data[gpa - base:gpa - base + n]
        if not self.backed(gpa, n):
            raise ValueError(f"read of unbacked GPA range {gpa:#x}+{n:#x}")
        return bytes(self.uc.mem_read(gpa, n))

    def write(self, gpa: int, data: bytes) -> None:
        if not self.backed(gpa, len(data)):
            raise ValueError(f"write to unbacked GPA range {gpa:#x}+{len(data):#x}")
        self.uc.mem_write(gpa, bytes(data))
        end = gpa + len(data)
        if LOW_REGION < end <= layout.MEM_SIZE:
            self._dirty.update(range(max(gpa, LOW_REGION) >> 12, ((end - 1) >> 12) + 1))

    def nested_state(self) -> NestedView:
        return self.svm.nested_view()

    def set_nested_state(self, flags: int, vmcb12_gpa: int, vmcb12: bytes) -> int:
        # As the kvm backend does with KVM_SET_SREGS/KVM_SET_MSRS: L1 has not
        # run yet, so the host enables EFER.SVME and VM_HSAVE_PA itself.
        self.svm.svme = True
        self.svm.hsave_msr = layout.HSAVE_GPA
        return self.svm.set_nested_state(flags, vmcb12_gpa, Vmcb(vmcb12))

    def smi(self) -> None:
        """KVM_SMI: process_smi() sets smi_pending; taken at the next run."""
        self.smm.pending = True

    # ---- host actions (kvmtest.actions; model/events.py, nested.py) --------

    def interrupt(self, vector: int) -> int:
        if self.events.irq is not None:
            return errno.EEXIST
        self.events.irq = vector
        return 0

    def nmi(self) -> int:
        self.events.nmi_pending = True
        return 0

    def set_nmi_masked(self, masked: bool) -> int:
        self.events.nmi_masked = masked
        return 0

    def add_memory(self, gpa: int, size: int) -> int:
        clash = self.backed(gpa, 1) or gpa <= SCRATCH_GDT < gpa + size
        if gpa & 0xFFF or size & 0xFFF or not size or clash or not gpa >> 22:
            return errno.EINVAL
        self.uc.mem_map(gpa, size)
        self._extra[gpa] = size
        return 0

    def delete_memory(self, gpa: int) -> int:
        size = self._extra.pop(gpa, None)
        if size is None:
            return errno.EINVAL
        self._deleted[gpa] = bytes(self.uc.mem_read(gpa, size))
        self.uc.mem_unmap(gpa, size)
        self._flush_tlb()
        return 0

    def get_nested(self) -> NestedBlob | None:
        return nested.get_state(self)

    def set_nested(self, blob: NestedBlob) -> int:
        return nested.set_state(self, blob)

    def prepare_nested(self, prep: HostPrep) -> tuple[int, str]:
        return nested.prepare(self, prep)

    def set_efer_svme(self, on: bool) -> int:
        return nested.set_efer_svme(self, on)

    def step(self) -> str:
        """One instruction Unicorn runs itself (a model event in it -- an SVM
        instruction, I/O, a fault -- is not modelled for a host step)."""
        # As KVM steps for the host: RFLAGS.TF for one instruction, the #DB
        # taken by the host (Unicorn's trap reaches _on_intr), TF and DR6 put
        # back as the guest had them.
        uc = self.uc
        rflags, dr6 = uc.reg_read(x86.UC_X86_REG_RFLAGS), uc.reg_read(x86.UC_X86_REG_DR6)
        self._event = None
        uc.reg_write(x86.UC_X86_REG_RFLAGS, rflags | RFLAGS_TF)
        try:
            uc.emu_start(self.rip, UNTIL)
        except UcError as e:
            return f"model step: {e}"
        finally:
            uc.reg_write(x86.UC_X86_REG_RFLAGS,
                         (uc.reg_read(x86.UC_X86_REG_RFLAGS) & ~RFLAGS_TF) | (rflags & RFLAGS_TF))
            uc.reg_write(x86.UC_X86_REG_DR6, dr6)
        if self._event is None or self._event[:2] != ("intr", 1) or self._parked is not None:
            self._resume_blocked = "a host single-step into a model event (not modelled)"
            return self._resume_blocked
        self._event = None
        return ""

    def leave_smm(self) -> int:
        self.smm.active = False
        return 0

    def backed(self, gpa: int, size: int = 1) -> bool:
        """Is [gpa, gpa+size) guest memory (a live memslot)?"""
        if gpa >= 0 and gpa + size <= layout.MEM_SIZE:
            return True
        return any(b <= gpa and gpa + size <= b + n for b, n in self._extra.items())

    def park(self, action: object, rip: int) -> None:
        """From a code hook: stop before the instruction at rip and carry out
        action there (see _on_msr_site for why stopping goes this way)."""
        self._parked = (action, rip)
        self.uc.reg_write(x86.UC_X86_REG_RIP, PARK_RIP)

    def run(self, timeout: float) -> Exit:
        if self._resume_blocked:
            return EmulationError(self._resume_blocked, self.rip)
        deadline = time.monotonic() + timeout
        if self._watchdog is not None:
            self._watchdog.arm(timeout)
        try:
            return self._run(timeout, deadline)
        finally:
            if self._watchdog is not None:
                self._watchdog.disarm()

    # ---- the run loop ----------------------------------------------------

    def _run(self, timeout: float, deadline: float) -> Exit:
        uc = self.uc
        while True:
            if self._watchdog is not None and self._watchdog.expired:
                return TimedOut(timeout)
            if self.smm.pending:
                result = self._smm_step(smm.smi_window)
                if result is not None:
                    return result
            if self.events.pending:
                result = self._events_step(events.window)
                if result is not None:
                    return result
            self._event = None
            error: UcError | None = None
            self._reset_old_exception()
            start = self.rip
            try:
                if self._watchdog is not None:
                    uc.emu_start(start, UNTIL)
                else:
                    left = max(deadline - time.monotonic(), 1e-6)
                    uc.emu_start(start, UNTIL, timeout=int(left * 1e6))
            except UcError as e:
                error = e
            event = self._event
            if self._parked is not None:
                action, addr = self._parked
                self._parked = None
                uc.reg_write(x86.UC_X86_REG_RIP, addr)
                result = self._apply(action)
                if result is not None:
                    return result
                continue
            if event is None:
                timed_out = (self._watchdog.expired if self._watchdog is not None
                             else bool(uc.query(UC_QUERY_TIMEOUT)))
                if timed_out:
                    return TimedOut(timeout)
                if error is not None:
                    return EmulationError(f"Unicorn stopped: {error}", self.rip)
                result = self._after_plain_stop()
            else:
                result = self._handle(event)
            if result is not None:
                return result

    def _smm_step(self, step) -> Exit | None:  # type: ignore[no-untyped-def]
        """Run an SMM transition (smm.py); state the model cannot represent
        stops the vCPU with an EmulationError, never a guessed observation."""
        try:
            return step(self)
        except smm.NotModelled as e:
            self._resume_blocked = f"SMM: {e} (not modelled)"
            return EmulationError(self._resume_blocked, self.rip)

    def _events_step(self, step, *args) -> Exit | None:  # type: ignore[no-untyped-def]
        try:
            return step(self, *args)
        except events.NotModelled as e:
            self._resume_blocked = f"events: {e} (not modelled)"
            return EmulationError(self._resume_blocked, self.rip)

    def _after_plain_stop(self) -> Exit | None:
        """emu_start returned without a hook event: HLT is the only cause."""
        rip = self.rip
        prev = self.read_virt(self.pc_linear - 1, 1)
        if prev == b"\xf4":
            if self.svm.guest_mode:
                return self._vmexit_or_exit(self.svm.on_l2_hlt(), HltExit())
            return HltExit()
        return EmulationError("emulation stopped without an exit", rip)

    def _vmexit_or_exit(self, action: VmExit | Raise | None, default: Exit) -> Exit | None:
        return default if action is None else self._apply(action)

    def _apply(self, action: VmExit | Raise | Exit | None) -> Exit | None:
        """Carry out what the model decided; None means keep running."""
        if action is None:
            return None
        if isinstance(action, VmExit):
            return events.vmexit(self, action)
        if isinstance(action, events.Deliver):
            return self._events_step(events.deliver, action)
        if isinstance(action, Raise):
            return self.raise_exception(action.vector, action.error_code, action.cr2)
        return action

    def _handle(self, event: tuple) -> Exit | None:
        kind = event[0]
        if kind == "svm":
            return self._apply(events.around_svm(self, event[1]))
        if kind == "msr":
            return self._apply(self.svm.msr(event[1], write=event[2]))
        if kind == "ud":
            return self.raise_exception(6, None)
        if kind == "rsm":
            return self._smm_step(smm.rsm)
        if kind == "intr":
            return self._on_cpu_exception(event[1], event[2])
        if kind in ("out", "in"):
            _, port, size, value, insn_rip = event
            if kind == "out":
                io = IoExit(KVM_EXIT_IO_OUT, port, size, 1, value.to_bytes(size, "little"))
            else:
                io = IoExit(KVM_EXIT_IO_IN, port, size, 1, bytes(size))
            if self.svm.guest_mode:
                # The hook ran inside the instruction; RIP is now past it.
                action = self.svm.on_l2_io(io, insn_rip=insn_rip, next_rip=self.rip)
                if action is not None:
                    return self._apply(action)
            if kind == "in":
                self._resume_blocked = "resuming after an IN exit is not modelled"
            return io
        if kind == "mmio":
            _, addr, size, value, is_write = event
            self._resume_blocked = "resuming after an MMIO exit is not modelled"
            data = value.to_bytes(8, "little")[:size] if is_write else bytes(size)
            return MmioExit(addr, data, size, is_write)
        if kind == "fetch":
            return EmulationError(f"instruction fetch from unbacked GPA {event[1]:#x}", event[1])
        if kind == "unknown":
            _, rip, raw = event
            return EmulationError(
                f"instruction {raw.hex(' ')} is not supported by the model (Unicorn #UD)", rip)
        raise AssertionError(f"unknown event {event!r}")

    # ---- hooks (record, stop) ---------------------------------------------

    def _stop(self, event: tuple) -> None:
        if self._event is None:
            self._event = event
        self.uc.emu_stop()

    def _on_invalid(self, uc: Uc, _user: object) -> bool:
        pc = self.pc_linear
        raw = self.read_virt(pc, 3) or b""
        if raw[:2] == b"\x0f\x01" and len(raw) == 3 and raw[2] in SVM_OPCODES:
            self._stop(("svm", SVM_OPCODES[raw[2]]))
        elif raw[:2] == b"\x0f\xaa":
            # RSM: Unicorn never sets QEMU's HF_SMM, so it is always #UD here;
            # in SMM the model emulates it as KVM does (em_rsm), else #UD.
            self._stop(("rsm",) if self.smm.active else ("ud",))
        elif raw[:2] in UD_OPCODES:
            self._stop(("ud",))
        else:
            raw = self.read_virt(pc, 15) or raw
            self._stop(("unknown", pc, raw))
        return True

    def _on_intr(self, uc: Uc, vector: int, _user: object) -> None:
        self._stop(("intr", vector, self.uc.reg_read(x86.UC_X86_REG_CR2)))

    def _on_out(self, uc: Uc, port: int, size: int, value: int, _user: object) -> None:
        self._stop(("out", port, size, value, self.rip))

    def _on_in(self, uc: Uc, port: int, size: int, _user: object) -> int:
        self._stop(("in", port, size, 0, self.rip))
        return 0

    def _on_unmapped(self, uc: Uc, access: int, addr: int, size: int, value: int,
                     _user: object) -> bool:
        if access == UC_MEM_FETCH_UNMAPPED:
            self._stop(("fetch", addr))
        else:
            self._stop(("mmio", addr, size, value, access == UC_MEM_WRITE_UNMAPPED))
        return False

    def _on_scratch(self, uc: Uc, access: int, addr: int, size: int, value: int,
                    _user: object) -> None:
        if self._loading_l2:
            return
        if access == UC_MEM_FETCH:
            self._stop(("fetch", addr))
        else:
            self._stop(("mmio", addr, size, value, access == UC_MEM_WRITE))

    def _on_high_write(self, uc: Uc, access: int, addr: int, size: int, value: int,
                       _user: object) -> None:
        self._dirty.add(addr >> 12)
        self._dirty.add((addr + size - 1) >> 12)

    def _on_msr_site(self, uc: Uc, addr: int, size: int, _user: object) -> None:
        if self._msr_passthrough == addr:
            self._msr_passthrough = None
            return
        raw = bytes(uc.mem_read(addr, 2)) if addr < layout.MEM_SIZE else b""
        if raw not in (b"\x0f\x30", b"\x0f\x32"):
            return
        index = uc.reg_read(x86.UC_X86_REG_RCX) & 0xFFFF_FFFF
        if not (self.svm.guest_mode or self.svm.owns_msr(index)):
            return
        # Emulated here, inside the hook: in Unicorn 2.1.4 an emu_stop() from
        # a code hook leaves the vCPU in a state where a later invalid opcode
        # (the next SVM instruction) silently ends emulation instead of
        # reaching UC_HOOK_INSN_INVALID.  Register writes (RIP included)
        # from the hook are safe.  What needs a world switch or an exception
        # is parked and reached by sending RIP to an unbacked page: the
        # fetch fault stops emulation through the ordinary path.
        action = self.svm.msr(addr, write=raw == b"\x0f\x30")
        if action is not None:
            self._parked = (action, addr)
            uc.reg_write(x86.UC_X86_REG_RIP, PARK_RIP)

    def pass_msr_through(self, addr: int) -> None:
        """Let Unicorn execute the RDMSR/WRMSR at addr natively once."""
        self._msr_passthrough = addr

    # ---- CPU state helpers used by svm.py --------------------------------

    @property
    def rip(self) -> int:
        return self.uc.reg_read(x86.UC_X86_REG_RIP)

    def reg(self, reg: int) -> int:
        return self.uc.reg_read(reg)

    def set_reg(self, reg: int, value: int) -> None:
        self.uc.reg_write(reg, value)

    @property
    def pc_linear(self) -> int:
        """The linear address of RIP: CS.base + IP in real mode (SMM), where
        CS.base is selector << 4; flat segments elsewhere."""
        if self.cr0 & layout.CR0_PE:
            return self.rip
        return ((self.uc.reg_read(x86.UC_X86_REG_CS) << 4) + (self.rip & 0xFFFF)) & 0xFFFF_FFFF

    @property
    def cr0(self) -> int:
        return self.uc.reg_read(x86.UC_X86_REG_CR0)

    @property
    def cr3(self) -> int:
        return self.uc.reg_read(x86.UC_X86_REG_CR3)

    @property
    def cr4(self) -> int:
        return self.uc.reg_read(x86.UC_X86_REG_CR4)

    @property
    def hw_efer(self) -> int:
        """EFER as Unicorn holds it (never SVME: the model keeps that bit)."""
        return self.uc.msr_read(MSR_EFER)

    def set_hw_efer(self, value: int) -> None:
        self.uc.msr_write(MSR_EFER, value & ~layout.EFER_SVME)

    @property
    def cpl(self) -> int:
        # SVM's CPL is SS.DPL (APM 15.5.1); QEMU keeps it in hflags and
        # mirrors it in the CS selector's RPL for the flat GDTs used here.
        # Real mode is CPL 0 whatever CS holds.
        if not self.cr0 & layout.CR0_PE:
            return 0
        return self.uc.reg_read(x86.UC_X86_REG_CS) & 3

    @property
    def long_mode(self) -> bool:
        return bool(self.hw_efer & layout.EFER_LMA)

    def skip(self, length: int) -> None:
        self.uc.reg_write(x86.UC_X86_REG_RIP, self.rip + length)

    def read_phys(self, gpa: int, n: int) -> bytes | None:
        """Guest-physical read; None where no memslot backs it."""
        if not self.backed(gpa, n):
            return None
        return bytes(self.uc.mem_read(gpa, n))

    def write_phys(self, gpa: int, data: bytes) -> bool:
        if not self.backed(gpa, len(data)):
            return False
        self.uc.mem_write(gpa, data)
        if LOW_REGION < gpa + len(data) <= layout.MEM_SIZE:
            self._dirty.update(range(max(gpa, LOW_REGION) >> 12,
                                     ((gpa + len(data) - 1) >> 12) + 1))
        return True

    def translate(self, linear: int, write: bool = False,
                  fetch: bool = False) -> int | paging.Fault:
        return paging.translate(self.read_phys, self.cr0, self.cr3, self.cr4, self.hw_efer,
                                linear, write=write, fetch=fetch)

    def read_virt(self, linear: int, n: int) -> bytes | None:
        out = b""
        while n > 0:
            chunk = min(n, 0x1000 - (linear & 0xFFF))
            pa = self.translate(linear)
            if isinstance(pa, paging.Fault):
                return None
            data = self.read_phys(pa, chunk)
            if data is None:
                return None
            out += data
            linear, n = linear + chunk, n - chunk
        return out

    def _write_virt(self, linear: int, data: bytes) -> paging.Fault | None:
        pa = self.translate(linear, write=True)
        if isinstance(pa, paging.Fault):
            return pa
        if (linear & 0xFFF) + len(data) > 0x1000:
            first = 0x1000 - (linear & 0xFFF)
            return self._write_virt(linear, data[:first]) or self._write_virt(
                linear + first, data[first:])
        if not self.write_phys(pa, data):
            return paging.Fault(linear, paging.PTE_P)
        return None

    def _flush_tlb(self) -> None:
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)

    # ---- world switches ------------------------------------------------------

    def save_context(self) -> object:
        return self.uc.context_save()

    def restore_context(self, ctx: object, keep_gprs: bool) -> None:
        """Restore a saved register context; with keep_gprs the GPRs other
        than RAX/RSP/RIP keep their current values, as on #VMEXIT (VMRUN
        swaps only RAX, RSP, RIP, RFLAGS and the segment/control state)."""
        gprs = [self.uc.reg_read(r) for r in GPRS] if keep_gprs else None
        self.uc.context_restore(ctx)
        if gprs is not None:
            for r, v in zip(GPRS, gprs, strict=True):
                self.uc.reg_write(r, v)
        self._flush_tlb()

    def load_guest_state(self, v: Vmcb) -> str | None:
        """Load L2's state from a VMCB save area into Unicorn.

        Segment hidden state comes from the VMCB (as KVM copies it into
        VMCB02), through the scratch GDT; returns why it could not, or None.
        """
        uc = self.uc
        entries: dict[int, int] = {}
        loads = []
        for name, reg in (("cs", x86.UC_X86_REG_CS), ("ss", x86.UC_X86_REG_SS),
                          ("ds", x86.UC_X86_REG_DS), ("es", x86.UC_X86_REG_ES)):
            sel = v[f"{name}.selector"]
            if sel & 4:
                return f"{name} selector {sel:#x} refers to the LDT (not modelled)"
            desc = _descriptor(v[f"{name}.attrib"], v[f"{name}.base"], v[f"{name}.limit"])
            if sel >> 3:
                if entries.setdefault(sel >> 3, desc) != desc:
                    return f"{name} selector {sel:#x} shared by segments with other attributes"
            elif name == "cs":
                return "null CS selector in VMCB12 (not modelled)"
            loads.append((reg, sel))
        efer = v["efer"]
        cr0, cr3, cr4 = v["cr0"], v["cr3"], v["cr4"]
        l2_long = bool(efer & layout.EFER_LME and cr0 & layout.CR0_PG)
        self._loading_l2 = True
        try:
            table = bytearray(8 * (max(entries, default=0) + 1))
            for idx, desc in entries.items():
                struct.pack_into("<Q", table, 8 * idx, desc)
            uc.mem_write(SCRATCH_GDT, bytes(table))
            uc.reg_write(x86.UC_X86_REG_GDTR, (0, SCRATCH_GDT, len(table) - 1, 0))
            # Loaded while still in L1's long mode, so a 64-bit CS becomes
            # CS64; leaving long mode below keeps a 32-bit CS's D bit.
            for reg, sel in loads:
                uc.reg_write(reg, sel)
            if l2_long:
                uc.reg_write(x86.UC_X86_REG_CR4, cr4)
                uc.reg_write(x86.UC_X86_REG_CR3, cr3)
                uc.reg_write(x86.UC_X86_REG_CR0, cr0)
                self.set_hw_efer(efer | layout.EFER_LMA)
            else:
                uc.reg_write(x86.UC_X86_REG_CR0, cr0 & ~layout.CR0_PG)
                self.set_hw_efer(efer & ~(layout.EFER_LME | layout.EFER_LMA))
                uc.reg_write(x86.UC_X86_REG_CR3, cr3)
                uc.reg_write(x86.UC_X86_REG_CR4, cr4)
                uc.reg_write(x86.UC_X86_REG_CR0, cr0)
        except UcError as e:
            return f"Unicorn refused L2 state: {e}"
        finally:
            self._loading_l2 = False
        uc.reg_write(x86.UC_X86_REG_GDTR, (0, v["gdtr.base"], v["gdtr.limit"], 0))
        uc.reg_write(x86.UC_X86_REG_IDTR, (0, v["idtr.base"], v["idtr.limit"], 0))
        uc.reg_write(x86.UC_X86_REG_CR2, v["cr2"])
        uc.reg_write(x86.UC_X86_REG_RFLAGS, v["rflags"] | 0x2)
        uc.reg_write(x86.UC_X86_REG_RSP, v["rsp"])
        uc.reg_write(x86.UC_X86_REG_RAX, v["rax"])
        rip = v["rip"] if l2_long else v["rip"] & 0xFFFF_FFFF
        uc.reg_write(x86.UC_X86_REG_RIP, rip)
        self._flush_tlb()
        return None

    def run_scratch_stub(self, code: bytes, count: int) -> None:
        """Execute `count` model-private instructions from the end of the
        scratch page (no memslot: invisible to the guest), for CPU state
        Unicorn only lets instructions set (segment hidden state)."""
        addr = SCRATCH_GDT + SCRATCH_SIZE - 0x100
        self._loading_l2 = True
        try:
            self.uc.mem_write(addr, code)
            self.uc.emu_start(addr, UNTIL, count=count)
        finally:
            self._loading_l2 = False
            self.uc.mem_write(addr, bytes(len(code)))

    def guest_state(self) -> dict[str, int]:
        """The registers #VMEXIT writes into the VMCB12 save area."""
        uc = self.uc
        gdtr = uc.reg_read(x86.UC_X86_REG_GDTR)
        idtr = uc.reg_read(x86.UC_X86_REG_IDTR)
        return {
            "gdtr.base": gdtr[1], "gdtr.limit": gdtr[2],
            "idtr.base": idtr[1], "idtr.limit": idtr[2],
            "cr0": self.cr0, "cr2": uc.reg_read(x86.UC_X86_REG_CR2), "cr3": self.cr3,
            "cr4": self.cr4, "rflags": uc.reg_read(x86.UC_X86_REG_RFLAGS),
            "rip": self.rip, "rsp": uc.reg_read(x86.UC_X86_REG_RSP),
            "rax": uc.reg_read(x86.UC_X86_REG_RAX),
        }

    # ---- exceptions -------------------------------------------------------------

    def _on_cpu_exception(self, vector: int, cr2: int) -> Exit | None:
        """An exception Unicorn raised (it gives the vector only)."""
        error_code: int | None = None
        if vector in l1.ERROR_CODE_VECTORS:
            error_code = 0
            if vector == VEC_PF:
                walk = self.translate(cr2)
                error_code = (0 if isinstance(walk, paging.Fault) else paging.PTE_P) | (
                    0x10 if cr2 == self.rip else 0)
        return self.raise_exception(vector, error_code, cr2 if vector == VEC_PF else None)

    def raise_exception(self, vector: int, error_code: int | None,
                        cr2: int | None = None) -> Exit | None:
        """Deliver an exception to the current level: a #VMEXIT when L1
        intercepts it for L2, else through the guest IDT (escalating to #DF
        and a triple fault the way the CPU does)."""
        if cr2 is not None:
            self.uc.reg_write(x86.UC_X86_REG_CR2, cr2)
        if self.svm.guest_mode:
            action = self.svm.on_l2_exception(vector, error_code, cr2)
            if action is not None:
                return self.svm.vmexit(action)
        problem = self._deliver(vector, error_code)
        if problem is None:
            return None
        if problem == "real mode":
            return EmulationError(f"{self._resume_blocked} (vector {vector})", self.rip)
        if vector == VEC_DF:
            return self._shutdown()
        problem = self._deliver(VEC_DF, 0)
        return None if problem is None else self._shutdown()

    def triple_fault(self) -> Exit | None:
        """A triple fault KVM requests itself (e.g. RSM's emulate_shutdown)."""
        return self._shutdown()

    def _shutdown(self) -> Exit | None:
        if self.svm.guest_mode:
            action = self.svm.on_l2_shutdown()
            if action is not None:
                return self.svm.vmexit(action)
        self._resume_blocked = "the vCPU is in shutdown state"
        return ShutdownExit()

    def _deliver(self, vector: int, error_code: int | None) -> str | None:
        """Push the 64-bit interrupt frame and enter the IDT handler (APM
        8.9.3); returns why delivery failed (-> #DF/triple fault)."""
        uc = self.uc
        if not self.cr0 & layout.CR0_PE:
            # Real mode (SMM included: its IDT limit is 0, so any exception
            # there is #GP -> #DF -> shutdown).
            return modes.deliver_real(self, vector)
        if not self.long_mode:
            return modes.deliver_legacy32(self, vector, error_code)
        _, idt_base, idt_limit, _ = uc.reg_read(x86.UC_X86_REG_IDTR)
        if 16 * vector + 15 > idt_limit:
            return "vector beyond the IDT limit"
        gate_raw = self.read_virt(idt_base + 16 * vector, 16)
        if gate_raw is None:
            return "IDT not readable"
        lo, hi = struct.unpack("<QQ", gate_raw)
        gate_type, present = (lo >> 40) & 0xF, (lo >> 47) & 1
        if not present or gate_type not in (0xE, 0xF) or (lo >> 32) & 7:
            return "IDT gate not present, not a 64-bit gate, or uses an IST"
        selector = (lo >> 16) & 0xFFFF
        handler = (lo & 0xFFFF) | ((lo >> 48) & 0xFFFF) << 16 | (hi & 0xFFFF_FFFF) << 32
        rflags = uc.reg_read(x86.UC_X86_REG_RFLAGS)
        rsp = uc.reg_read(x86.UC_X86_REG_RSP)
        frame = [uc.reg_read(x86.UC_X86_REG_SS), rsp, rflags,
                 uc.reg_read(x86.UC_X86_REG_CS), self.rip]
        if error_code is not None:
            frame.append(error_code)
        stack = rsp
        if self.cpl and not selector & 3:
            # To CPL 0: the stack comes from TSS.RSP0 (modes.to_cpl0 switches
            # Unicorn first: the switch itself uses that stack).
            rsp0 = modes.tss_rsp0(self)
            if rsp0 is None:
                return "TSS.RSP0 not readable"
            problem = modes.to_cpl0(self, selector)
            if problem is not None:
                return problem
            stack = rsp0
        elif selector != uc.reg_read(x86.UC_X86_REG_CS):
            try:
                uc.reg_write(x86.UC_X86_REG_CS, selector)
            except UcError:
                return "IDT gate selector not loadable"
        new_rsp = (stack & ~0xF) - 8 * len(frame)
        data = b"".join(struct.pack("<Q", x & 0xFFFF_FFFF_FFFF_FFFF) for x in reversed(frame))
        if self._write_virt(new_rsp, data) is not None:
            return "stack not writable"
        rflags &= ~(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM)
        if gate_type == 0xE:
            rflags &= ~RFLAGS_IF
        uc.reg_write(x86.UC_X86_REG_RSP, new_rsp)
        uc.reg_write(x86.UC_X86_REG_RFLAGS, rflags)
        uc.reg_write(x86.UC_X86_REG_RIP, handler)
        return None
