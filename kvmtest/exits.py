"""Typed vCPU exits, shared by every backend (KVM_EXIT_* in KVM's terms).

The kvm backend builds these from ``struct kvm_run``; the model backend builds
the same ones from Unicorn hooks, so one host loop serves both.
"""

from __future__ import annotations

from dataclasses import dataclass

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1


@dataclass(frozen=True)
class IoExit:
    """KVM_EXIT_IO: a port access (the ucall port among others)."""
    direction: int  # KVM_EXIT_IO_IN / KVM_EXIT_IO_OUT
    port: int
    size: int
    count: int
    data: bytes

    @property
    def value(self) -> int:
        return int.from_bytes(self.data[: self.size], "little")


@dataclass(frozen=True)
class HltExit:
    """KVM_EXIT_HLT."""


@dataclass(frozen=True)
class ShutdownExit:
    """Triple fault (or an exception with no usable IDT)."""


@dataclass(frozen=True)
class FailEntryExit:
    """KVM_EXIT_FAIL_ENTRY: the hardware refused the entry."""
    reason: int
    cpu: int


@dataclass(frozen=True)
class InternalErrorExit:
    """KVM_EXIT_INTERNAL_ERROR: KVM gave up (suberror, data)."""
    suberror: int
    data: tuple[int, ...]


@dataclass(frozen=True)
class MmioExit:
    """KVM_EXIT_MMIO: an access to a GPA no memslot backs."""
    phys_addr: int
    data: bytes
    len: int
    is_write: bool


@dataclass(frozen=True)
class InterruptedExit:
    """KVM_RUN returned EINTR or KVM_EXIT_INTR: a signal, not the guest."""


@dataclass(frozen=True)
class SystemEventExit:
    """KVM_EXIT_SYSTEM_EVENT (shutdown, reset, crash)."""
    type: int
    data: tuple[int, ...]


@dataclass(frozen=True)
class DebugExit:
    """KVM_EXIT_DEBUG (KVM_SET_GUEST_DEBUG): the vCPU stopped for the host."""

    exception: int
    pc: int
    dr6: int
    dr7: int


@dataclass(frozen=True)
class IrqWindowExit:
    """KVM_EXIT_IRQ_WINDOW_OPEN: the vCPU can take an interrupt now
    (requested with kvm_run.request_interrupt_window)."""


@dataclass(frozen=True)
class UnknownExit:
    """Any other KVM exit reason."""
    reason: int


@dataclass(frozen=True)
class TimedOut:
    """The guest did not exit within the run's timeout and was interrupted."""

    seconds: float


@dataclass(frozen=True)
class EmulationError:
    """The model backend cannot go on (unknown instruction, unmapped fetch)."""

    message: str
    rip: int


Exit = (
    IoExit | HltExit | ShutdownExit | FailEntryExit | InternalErrorExit | MmioExit
    | InterruptedExit | SystemEventExit | DebugExit | IrqWindowExit | UnknownExit | TimedOut
    | EmulationError
)
