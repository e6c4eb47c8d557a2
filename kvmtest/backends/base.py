"""What every backend provides to the shared host loop (runner.py)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol

from ..exits import Exit
from ..nested_request import HostPrep, NestedBlob
from ..observation import NestedView
from ..payloads import Payload


class Unsupported(Exception):
    """The backend cannot run this case here; the message says why and what to do."""


class Machine(Protocol):
    """One L1 vCPU with the shared layout loaded, ready to run."""

    def read(self, gpa: int, n: int) -> bytes: ...

    def write(self, gpa: int, data: bytes) -> None: ...

    def run(self, timeout: float) -> Exit:
        """Run until the next exit to the host, or TimedOut."""
        ...

    def nested_state(self) -> NestedView | None:
        """KVM_GET_NESTED_STATE's view, or None if the backend has none."""
        ...

    def set_nested_state(self, flags: int, vmcb12_gpa: int, vmcb12: bytes) -> int:
        """KVM_SET_NESTED_STATE with vmcb12 (control area: VMCB12's; save
        area: L1's state before VMRUN); returns 0 or the errno it failed with.
        L1 has not run yet, so the machine first sets EFER.SVME and
        MSR_VM_HSAVE_PA from the host side (KVM refuses guest mode without SVME)."""
        ...

    def smi(self) -> None:
        """Queue an SMI (KVM_SMI), taken at the next run; SMRAM is guest memory."""
        ...

    # Host actions (kvmtest.actions): each returns 0 or the errno KVM gave.

    def interrupt(self, vector: int) -> int:
        """KVM_INTERRUPT: an external interrupt, injected when L1 can take it."""
        ...

    def nmi(self) -> int:
        """KVM_NMI."""
        ...

    def set_nmi_masked(self, masked: bool) -> int:
        """KVM_SET_VCPU_EVENTS: NMI blocking as after an NMI (until IRET)."""
        ...

    def add_memory(self, gpa: int, size: int) -> int:
        """A new memslot backing [gpa, gpa + size), zeroed; read/write reach it."""
        ...

    def delete_memory(self, gpa: int) -> int:
        """Delete the memslot add_memory made at gpa.  The host keeps its
        copy: read() still returns what the guest (or KVM) last wrote."""
        ...

    def get_nested(self) -> NestedBlob | None:
        """KVM_GET_NESTED_STATE as raw data (None: the backend has none)."""
        ...

    def set_nested(self, blob: NestedBlob) -> int:
        """KVM_SET_NESTED_STATE exactly as given (nothing set beforehand)."""
        ...

    def prepare_nested(self, prep: HostPrep) -> tuple[int, str]:
        """The vCPU state a KVM_SET_NESTED_STATE request needs (HostPrep);
        (0, "") or (errno, the ioctl that refused it)."""
        ...

    def set_efer_svme(self, on: bool) -> int:
        """KVM_SET_SREGS with EFER.SVME set or cleared (the host's write)."""
        ...

    def step(self) -> str:
        """Run exactly one guest instruction; "" or why not."""
        ...

    def leave_smm(self) -> int:
        """KVM_SET_VCPU_EVENTS: take the vCPU out of SMM (after prepare_nested)."""
        ...


class Backend(Protocol):
    name: str

    def capabilities(self) -> dict[str, str | None]:
        """need -> None if met, else the reason it is not (for skips)."""
        ...

    def machine(self, payload: Payload, svm: bool) -> AbstractContextManager[Machine]:
        """A vCPU in long mode running `payload`, guest CPUID with or without SVM."""
        ...

    def kernel_log(self) -> AbstractContextManager[list[str] | None]:
        """Collects new kernel-log lines that indicate a kernel bug during the
        with-block; yields a list filled on exit, or None when the log cannot
        be read (reported as 'kernel log not checked')."""
        ...

    def describe(self) -> dict[str, str]:
        """backend, kernel release, profile ... for reports."""
        ...
