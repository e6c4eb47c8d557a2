"""What a backend saw when it ran a case: data only, no verdicts."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

# KVM_STATE_NESTED_* flags (arch/x86/include/uapi/asm/kvm.h); the model uses
# the same values so nested-state views compare directly.
KVM_STATE_NESTED_GUEST_MODE = 0x1
KVM_STATE_NESTED_RUN_PENDING = 0x2
KVM_STATE_NESTED_GIF_SET = 0x100


@dataclass(frozen=True)
class NestedView:
    """The part of KVM_GET_NESTED_STATE the contract needs."""

    flags: int
    vmcb12_gpa: int | None  # hdr.svm.vmcb_pa, meaningful in guest mode

    @property
    def gif(self) -> bool:
        return bool(self.flags & KVM_STATE_NESTED_GIF_SET)

    @property
    def guest_mode(self) -> bool:
        return bool(self.flags & KVM_STATE_NESTED_GUEST_MODE)


# Outcomes of the host loop.
SYNC = "sync"  # L1 reported after VMRUN (or after a non-faulting insn)
EXCEPTION = "exception"  # L1's IDT stub reported an exception
EINVAL = "einval"  # KVM_SET_NESTED_STATE refused the state
ACCEPTED = "accepted"  # KVM_SET_NESTED_STATE accepted it
TIMEOUT = "timeout"
SHUTDOWN = "shutdown"
GUEST_ASSERT = "guest_assert"
UNEXPECTED_EXIT = "unexpected_exit"
EMULATION_ERROR = "emulation_error"
INTERNAL_ERROR = "internal_error"  # KVM_EXIT_INTERNAL_ERROR: exit_data = [suberror, *data]
FAIL_ENTRY = "fail_entry"  # KVM_EXIT_FAIL_ENTRY: exit_data = [hardware_entry_failure_reason]
ACTION_FAILED = "action_failed"  # a host action (kvmtest.actions) was refused


@dataclass
class Observation:
    """What one run of a case showed, as every backend reports it."""
    outcome: str
    detail: str = ""
    # L1 exception (EXCEPTION outcome)
    vector: int | None = None
    error_code: int | None = None
    rip: int | None = None
    rip_symbol: str | None = None
    # VMCB12 after the run (exit fields were poisoned before)
    exit_code: int | None = None
    exit_info_1: int | None = None
    exit_info_2: int | None = None
    exit_int_info: int | None = None
    event_inj: int | None = None
    int_ctl: int | None = None
    tlb_ctl: int | None = None
    # nested state at L1's report (None: backend cannot tell)
    gif: bool | None = None
    guest_mode: bool | None = None
    # L1's own report: after VMRUN and just before it (result block)
    l1: dict[str, int] | None = None
    exits: list[str] = field(default_factory=list)
    # SET_NESTED_STATE refused: the outcome of L1's run afterwards (its VMRUN
    # of the default VMCB12; exit_code, gif, guest_mode, l1 are from it)
    after_outcome: str | None = None
    # KVM_EXIT_INTERNAL_ERROR / KVM_EXIT_FAIL_ENTRY: what KVM reported
    exit_data: list[int] | None = None
    # SMM scenario: how often the SMM handler ran (proves the SMI and RSM path)
    smm_handler_runs: int | None = None
    # L1's event log (kvmtest.eventlog): [kind, value, ...]; None: no log
    log: list[int] | None = None
    # host actions carried out (kvmtest.actions), in order
    actions: list[str] = field(default_factory=list)
    # new kernel-log lines that indicate a kernel bug; None: not checked
    kernel_warnings: list[str] | None = None
    kernel_log_checked: bool = False

    def describe(self) -> str:
        if self.outcome == EXCEPTION:
            where = self.rip_symbol or hex(self.rip or 0)
            return f"vector {self.vector} ec={self.error_code:#x} at {where}"
        if self.outcome == SYNC and self.exit_code is not None:
            gif = {None: "?", True: "1", False: "0"}[self.gif]
            return f"exit {self.exit_code:#x} GIF={gif}"
        return f"{self.outcome} {self.detail}".rstrip()

    def to_json(self) -> dict[str, Any]:
        # asdict() without its deep recursion: every field is a plain value,
        # a list or a dict of plain values (the host writes 500 per run).
        out: dict[str, Any] = {}
        for name in _FIELD_NAMES:
            v = getattr(self, name)
            if v is None or v == [] or v == "":
                continue
            out[name] = list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v
        return out


_FIELD_NAMES = tuple(f.name for f in fields(Observation))
