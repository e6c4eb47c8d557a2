"""The vCPU fd: ``Vcpu`` (rust-vmm's ``VcpuFd``) and KVM_RUN decoding."""

from __future__ import annotations

import errno
import mmap
import signal
import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from ..exits import (
    DebugExit,
    Exit,
    FailEntryExit,
    HltExit,
    InternalErrorExit,
    InterruptedExit,
    IoExit,
    IrqWindowExit,
    MmioExit,
    ShutdownExit,
    SystemEventExit,
    TimedOut,
    UnknownExit,
)
from ._ffi import ffi, lib
from .cpuid import CpuidEntry, pack_cpuid2, unpack_cpuid2
from .deadline import SIGNAL, Deadline, Timer
from .errors import KvmError, check
from .fd import FdObject
from .nested import HEADER_SIZE, NestedState

if TYPE_CHECKING:
    from .vm import Vm

_EINTR = errno.EINTR
_EXIT_IO = lib.KVM_EXIT_IO
_EXIT_HLT = lib.KVM_EXIT_HLT
_EXIT_MMIO = lib.KVM_EXIT_MMIO
_EXIT_INTR = lib.KVM_EXIT_INTR
_HLT = HltExit()
_INTERRUPTED = InterruptedExit()
_kvmtest_run = lib.kvmtest_run
_kvmtest_ioctl = lib.kvmtest_ioctl


class Vcpu(FdObject):
    """A vCPU fd with its mmapped ``struct kvm_run``.

    Created by ``Vm.create_vcpu()``; ``Vcpu.from_fd(fd)`` wraps a raw fd
    without a kvm_run mapping (for error-path tests).  ``close()`` unmaps
    kvm_run, deletes the timeout timer and closes the fd; it is idempotent.
    """

    def __init__(self, fd: int, vcpu_id: int, mmap_size: int | None, vm: Vm | None = None):
        self._fd = fd
        self.id = vcpu_id
        self.vm = vm
        self._deadline: Deadline | None = None
        self._timer: Timer | None = None
        self._sigmask: int | None = None
        self._tid = 0
        self._kicked = False
        self._run_mm: mmap.mmap | None = None
        self._run_buf = None
        self._run = None
        self._io = None
        if mmap_size is not None:
            self._map_run(mmap_size)

    def _map_run(self, size: int) -> None:
        try:
            self._run_mm = mmap.mmap(self._fd, size, mmap.MAP_SHARED,
                                     mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            raise KvmError("mmap(vcpu fd)", e.errno) from None
        self._run_buf = ffi.from_buffer(self._run_mm)
        self._run = ffi.cast("struct kvm_run *", self._run_buf)
        # Typed views of kvm_run's union members, made once: run() reuses them.
        self._io = ffi.cast("kvmtest_run_io *", self._run_buf + lib.KVMTEST_RUN_IO_OFFSET)

    @classmethod
    def from_fd(cls, fd: int, vcpu_id: int = 0, mmap_size: int | None = None) -> Vcpu:
        return cls(fd, vcpu_id, mmap_size)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.delete()
            self._timer = None
        if self._run_mm is not None:
            self._run = self._io = None
            ffi.release(self._run_buf)
            self._run_buf = None
            self._run_mm.close()
            self._run_mm = None
        self._close_fd()

    def __repr__(self) -> str:
        return f"<Vcpu id={self.id} fd={self._fd}>"

    def _ioctl(self, request: int, arg, name: str) -> int:
        return check(_kvmtest_ioctl(self._fd, request, arg), name)

    # -- KVM_RUN ----------------------------------------------------------------

    def run(self, timeout: float | None = None) -> Exit:
        """KVM_RUN once and decode the exit.

        With ``timeout`` (seconds), a guest that does not exit in time is
        interrupted and ``TimedOut`` is returned; the vCPU can run again.  For a
        loop of runs, arm once: ``with vcpu.deadline(t): ... vcpu.run() ...``.
        """
        if timeout is not None:
            with Deadline(self, timeout):
                return self.run()
        d = self._deadline
        if d is not None and d.expired:
            return TimedOut(d.seconds)
        r = _kvmtest_run(self._fd)
        if r < 0:
            if r == -_EINTR:
                return self._interrupted()
            raise KvmError("KVM_RUN", -r)
        run = self._run
        reason = run.exit_reason
        if reason == _EXIT_IO:
            io = self._io
            n = io.size * io.count
            off = io.data_offset
            return IoExit(io.direction, io.port, io.size, io.count, self._run_mm[off : off + n])
        if reason == _EXIT_HLT:
            return _HLT
        return self._decode_slow(reason)

    def _interrupted(self) -> Exit:
        if self._kicked:
            self._kicked = False
            self._run.immediate_exit = 0
        d = self._deadline
        if d is not None and d.interrupted():
            return TimedOut(d.seconds)
        return _INTERRUPTED

    def _decode_slow(self, reason: int) -> Exit:
        base = self._run_buf
        if reason == _EXIT_MMIO:
            m = ffi.cast("kvmtest_run_mmio *", base + lib.KVMTEST_RUN_MMIO_OFFSET)
            # For a read, data is what the host must supply: nothing yet.
            data = bytes(ffi.buffer(m.data, min(m.len, 8))) if m.is_write else b""
            return MmioExit(m.phys_addr, data, m.len, bool(m.is_write))
        if reason == lib.KVM_EXIT_SHUTDOWN:
            return ShutdownExit()
        if reason == lib.KVM_EXIT_FAIL_ENTRY:
            f = ffi.cast("kvmtest_run_fail_entry *", base + lib.KVMTEST_RUN_FAIL_ENTRY_OFFSET)
            return FailEntryExit(f.hardware_entry_failure_reason, f.cpu)
        if reason == lib.KVM_EXIT_INTERNAL_ERROR:
            i = ffi.cast("kvmtest_run_internal *", base + lib.KVMTEST_RUN_INTERNAL_OFFSET)
            n = min(i.ndata, 16)
            return InternalErrorExit(i.suberror, tuple(i.data[k] for k in range(n)))
        if reason == lib.KVM_EXIT_SYSTEM_EVENT:
            s = ffi.cast("kvmtest_run_system_event *",
                         base + lib.KVMTEST_RUN_SYSTEM_EVENT_OFFSET)
            data = ffi.cast("uint64_t *", base + lib.KVMTEST_RUN_SYSTEM_EVENT_DATA_OFFSET)
            return SystemEventExit(s.type, tuple(data[k] for k in range(min(s.ndata, 16))))
        if reason == lib.KVM_EXIT_IRQ_WINDOW_OPEN:
            return IrqWindowExit()
        if reason == lib.KVM_EXIT_DEBUG:
            d = ffi.cast("kvmtest_run_debug *", base + lib.KVMTEST_RUN_DEBUG_OFFSET)
            return DebugExit(d.exception, d.pc, d.dr6, d.dr7)
        if reason == _EXIT_INTR:
            return self._interrupted()
        return UnknownExit(reason)

    def complete_io_in(self, data: bytes) -> None:
        """Answer the last KVM_EXIT_IO IN: KVM copies kvm_run's data area into
        the guest's register/memory on the next KVM_RUN."""
        off = self._io.data_offset
        self._run_mm[off : off + len(data)] = data

    def complete_mmio_read(self, data: bytes) -> None:
        """Answer the last KVM_EXIT_MMIO read (consumed by the next KVM_RUN)."""
        m = ffi.cast("kvmtest_run_mmio *", self._run_buf + lib.KVMTEST_RUN_MMIO_OFFSET)
        ffi.memmove(m.data, data[:8], min(len(data), 8))

    @property
    def immediate_exit(self) -> bool:
        """kvm_run.immediate_exit: while set, KVM_RUN returns EINTR at once."""
        return bool(self._run.immediate_exit)

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        self._run.immediate_exit = 1 if value else 0

    @property
    def request_interrupt_window(self) -> bool:
        """kvm_run.request_interrupt_window: while set, KVM_RUN exits with
        KVM_EXIT_IRQ_WINDOW_OPEN once the vCPU can take an interrupt
        (userspace irqchip: the time to call interrupt())."""
        return bool(self._run.request_interrupt_window)

    @request_interrupt_window.setter
    def request_interrupt_window(self, value: bool) -> None:
        self._run.request_interrupt_window = 1 if value else 0

    @property
    def run_cdata(self):
        """kvm_run's mapping as ``uint8_t *`` (for C helpers, csrc/record.c)."""
        return ffi.cast("uint8_t *", self._run_buf)

    @property
    def run_size(self) -> int:
        return len(self._run_mm) if self._run_mm is not None else 0

    @property
    def kvm_run(self):
        """The raw ``struct kvm_run *`` cdata (valid until close())."""
        return self._run

    def deadline(self, seconds: float) -> Deadline:
        """A context manager bounding every run() inside it to ``seconds`` in total."""
        return Deadline(self, seconds)

    def kick(self) -> None:
        """From another thread: make the vCPU thread's current/next KVM_RUN
        return (InterruptedExit) — immediate_exit plus SIGNAL to its thread.
        Only valid inside a deadline (that is when SIGNAL is blocked there)."""
        if self._deadline is None or self._timer is None:
            raise RuntimeError("kick() needs the vCPU thread to be inside a deadline")
        self._kicked = True
        self._run.immediate_exit = 1
        signal.pthread_kill(self._tid, SIGNAL)

    def _thread_timer(self) -> Timer:
        tid = lib.kvmtest_gettid()
        if self._timer is None or self._timer.tid != tid:
            if self._timer is not None:
                self._timer.delete()
            self._timer = Timer()
            self._tid = threading.get_ident()  # for kick()'s pthread_kill
        return self._timer

    @property
    def signal_mask(self) -> int | None:
        """The KVM_SET_SIGNAL_MASK last set (None: never)."""
        return self._sigmask

    @signal_mask.setter
    def signal_mask(self, sigset: int | None) -> None:
        """Record a mask a C helper set (kvmtest_case, csrc/record.c)."""
        self._sigmask = sigset

    def _use_signal_mask(self, sigset: int) -> None:
        if sigset != self._sigmask:
            self.set_signal_mask(sigset)

    def set_signal_mask(self, sigset: int | None) -> None:
        """KVM_SET_SIGNAL_MASK: the thread's signal mask while inside KVM_RUN.

        ``sigset``: the kernel's 64-bit sigset (bit n-1 blocks signal n, see
        ``deadline.kernel_sigset``); ``None``: KVM_RUN keeps the thread's mask."""
        if sigset is None:
            self._ioctl(lib.KVM_SET_SIGNAL_MASK, ffi.NULL, "KVM_SET_SIGNAL_MASK")
        else:
            c = ffi.new("struct kvm_signal_mask *", {"len": 8, "sigset": 8})
            ffi.memmove(c.sigset, sigset.to_bytes(8, "little"), 8)
            self._ioctl(lib.KVM_SET_SIGNAL_MASK, c, "KVM_SET_SIGNAL_MASK")
        self._sigmask = sigset

    # -- registers ----------------------------------------------------------------

    def get_regs(self):
        """KVM_GET_REGS: a fresh ``struct kvm_regs *`` (rax...r15, rip, rflags)."""
        regs = ffi.new("struct kvm_regs *")
        self._ioctl(lib.KVM_GET_REGS, regs, "KVM_GET_REGS")
        return regs

    def set_regs(self, regs=None, **fields: int) -> None:
        """KVM_SET_REGS from a ``struct kvm_regs *`` and/or field overrides
        (fields not given are zero when ``regs`` is None)."""
        if regs is None:
            regs = ffi.new("struct kvm_regs *")
        for name, value in fields.items():
            setattr(regs, name, value)
        self._ioctl(lib.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self):
        """KVM_GET_SREGS: a fresh ``struct kvm_sregs *`` (segments, CRs, EFER...)."""
        sregs = ffi.new("struct kvm_sregs *")
        self._ioctl(lib.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs) -> None:
        """KVM_SET_SREGS.  On x86, set CPUID first: EFER.LME needs CPUID LM."""
        self._ioctl(lib.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    # -- MSRs -----------------------------------------------------------------------

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """KVM_GET_MSRS.  An MSR KVM refuses raises KvmError(EINVAL) naming it."""
        idx = list(indices)
        c = ffi.new("struct kvm_msrs *", {"nmsrs": len(idx), "entries": len(idx)})
        for i, index in enumerate(idx):
            c.entries[i].index = index
        n = self._ioctl(lib.KVM_GET_MSRS, c, "KVM_GET_MSRS")
        if n < len(idx):
            raise KvmError("KVM_GET_MSRS", errno.EINVAL, f"MSR {idx[n]:#x} not readable")
        return {c.entries[i].index: c.entries[i].data for i in range(n)}

    def set_msrs(self, msrs: Mapping[int, int]) -> None:
        """KVM_SET_MSRS.  KVM stops at the first MSR it refuses; that raises
        KvmError(EINVAL) naming it (the ones before it are set)."""
        items = list(msrs.items())
        c = ffi.new("struct kvm_msrs *", {"nmsrs": len(items), "entries": len(items)})
        for i, (index, value) in enumerate(items):
            c.entries[i].index = index
            c.entries[i].data = value
        n = self._ioctl(lib.KVM_SET_MSRS, c, "KVM_SET_MSRS")
        if n < len(items):
            index, value = items[n]
            raise KvmError("KVM_SET_MSRS", errno.EINVAL,
                           f"MSR {index:#x} refused value {value:#x}")

    # -- CPUID ------------------------------------------------------------------------

    def set_cpuid2(self, entries) -> None:
        """KVM_SET_CPUID2: the guest's CPUID (before EFER.LME and the first KVM_RUN).

        ``entries``: a list of CpuidEntry, or a ``struct kvm_cpuid2 *`` from
        ``pack_cpuid2()`` (pack once when creating many vCPUs: packing costs
        about as much as the ioctl)."""
        c = pack_cpuid2(entries) if isinstance(entries, list) else entries
        self._ioctl(lib.KVM_SET_CPUID2, c, "KVM_SET_CPUID2")

    def get_cpuid2(self, max_entries: int = 256) -> list[CpuidEntry]:
        """KVM_GET_CPUID2: the CPUID last set with KVM_SET_CPUID2."""
        c = ffi.new("struct kvm_cpuid2 *", {"nent": max_entries, "entries": max_entries})
        self._ioctl(lib.KVM_GET_CPUID2, c, "KVM_GET_CPUID2")
        return unpack_cpuid2(c)

    # -- events, nested state, SMI ---------------------------------------------------------

    def get_vcpu_events(self):
        """KVM_GET_VCPU_EVENTS: a fresh ``struct kvm_vcpu_events *``."""
        ev = ffi.new("struct kvm_vcpu_events *")
        self._ioctl(lib.KVM_GET_VCPU_EVENTS, ev, "KVM_GET_VCPU_EVENTS")
        return ev

    def set_vcpu_events(self, events) -> None:
        """KVM_SET_VCPU_EVENTS (``events.flags`` says which optional parts are valid)."""
        self._ioctl(lib.KVM_SET_VCPU_EVENTS, events, "KVM_SET_VCPU_EVENTS")

    def get_nested_state(self, size: int | None = None) -> NestedState:
        """KVM_GET_NESTED_STATE.  ``size`` defaults to KVM_CAP_NESTED_STATE's value
        (or header + one VMCB when the VM is unknown); KVM reports E2BIG if short."""
        if size is None:
            size = 0 if self.vm is None else self.vm.nested_state_size
            size = max(size, HEADER_SIZE + lib.KVM_STATE_NESTED_SVM_VMCB_SIZE)
        buf = ffi.new("char[]", size)
        ffi.cast("struct kvm_nested_state *", buf).size = size
        self._ioctl(lib.KVM_GET_NESTED_STATE, buf, "KVM_GET_NESTED_STATE")
        return NestedState.unpack(buf)

    def set_nested_state(self, state: NestedState) -> None:
        """KVM_SET_NESTED_STATE."""
        self._ioctl(lib.KVM_SET_NESTED_STATE, state.pack(), "KVM_SET_NESTED_STATE")

    def smi(self) -> None:
        """KVM_SMI: queue an SMI (needs KVM_CAP_X86_SMM)."""
        self._ioctl(lib.KVM_SMI, ffi.NULL, "KVM_SMI")

    def interrupt(self, vector: int) -> None:
        """KVM_INTERRUPT: inject an external interrupt at the next entry.
        Without an in-kernel irqchip KVM injects it unconditionally
        (x86.c kvm_vcpu_ioctl_interrupt): call it only when the vCPU can
        take one, i.e. on KVM_EXIT_IRQ_WINDOW_OPEN (request_interrupt_window)."""
        c = ffi.new("struct kvm_interrupt *", {"irq": vector})
        self._ioctl(lib.KVM_INTERRUPT, c, "KVM_INTERRUPT")

    def nmi(self) -> None:
        """KVM_NMI: queue an NMI (meaningful without an in-kernel local APIC)."""
        self._ioctl(lib.KVM_NMI, ffi.NULL, "KVM_NMI")

    def set_guest_debug(self, control: int, debugregs: Iterable[int] = ()) -> None:
        """KVM_SET_GUEST_DEBUG: ``control`` is KVM_GUESTDBG_* (0 turns host
        debugging off); a single-stepping host gets KVM_EXIT_DEBUG."""
        c = ffi.new("struct kvm_guest_debug *")
        c.control = control
        for i, value in enumerate(debugregs):
            c.arch.debugreg[i] = value
        self._ioctl(lib.KVM_SET_GUEST_DEBUG, c, "KVM_SET_GUEST_DEBUG")
