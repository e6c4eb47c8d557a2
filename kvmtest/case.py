"""A case is data: payload + parameters + VMCB12 changes + expectations.

Backends never look at expectations; they turn a Case into an Observation.
The judge (judge.py) compares the two.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from . import cpuid_features, layout, params

# GIF modes for VMRUN cases: GIF=1 at VMRUN (as after reset) or CLGI first.
GIF1 = "gif1"
GIF0 = "gif0"

# Scenarios: what the host loop does with the payload.
VMRUN = "vmrun"  # payload vmrun: L1 runs VMRUN on a prepared VMCB12
INSN = "insn"  # payload svm_insn: one instruction, exception or not
SET_NESTED_STATE = "set_nested_state"  # KVM_SET_NESTED_STATE with a bad VMCB12
SMM = "smm"  # payload smm: SMI while in L2, the SMM handler patches VMCB12, RSM
# L1 runs as in VMRUN/INSN; on SYNC(stage) the host carries out the case's
# on_sync actions (kvmtest/actions.py: interrupts, NMI, SMI, memslot deletion,
# nested-state round trips) and resumes; L1's event log is read at the end.
SCRIPT = "script"

# Capabilities a case needs from its backend (backends report theirs).
NEED_SVM = "svm"  # SVM in the guest CPUID, nested SVM in the host
NEED_NO_SVM = "no_svm"  # guest CPUID without SVM (runs on any KVM)
NEED_NESTED_STATE = "nested_state"  # KVM_CAP_NESTED_STATE
NEED_SMM = "smm"  # KVM_CAP_X86_SMM (KVM_SMI, RSM)
# Configuration needs: kvm_amd's effective parameters (kvmtest.kvm_amd).
NEED_NPT = "npt"  # kvm_amd npt=1: L1 may set NP_ENABLE
NEED_NO_NPT = "no_npt"  # kvm_amd npt=0: L1 runs on shadow paging
NEED_VGIF = "vgif"  # vGIF on: STGI/CLGI not intercepted
NEED_NO_VGIF = "no_vgif"  # vGIF off
NEED_VLS = "vls"  # virtual VMLOAD/VMSAVE on: VMLOAD/VMSAVE not intercepted
NEED_NO_VLS = "no_vls"  # vls off
# The CPU model (--cpu) is part of the configuration too.
NEED_CPU_PCID = "cpu_pcid"  # the CPU has PCID (CR4.PCIDE can reach hardware)
CONFIG_NEEDS = (NEED_NPT, NEED_NO_NPT, NEED_VGIF, NEED_NO_VGIF, NEED_VLS, NEED_NO_VLS,
                NEED_CPU_PCID)


@dataclass(frozen=True)
class Expect:
    """What a correct kernel does.

    kind: "vmexit_invalid"  failed VMRUN: the contract (README.md, items 1 to 3)
          "vmexit"          VMRUN succeeds and L2 exits with exit_code
          "exception"       L1 takes `vector` at symbol `at` (error_code if set)
          "no_fault"        the instruction completes (with exit_code: a VMRUN that
                            then sees that #VMEXIT)
          "einval"          KVM_SET_NESTED_STATE fails with EINVAL and L1 still runs
          "accepted"        KVM_SET_NESTED_STATE succeeds and the vCPU is in guest mode
          "shutdown"        the vCPU shuts down (KVM_EXIT_SHUTDOWN), e.g. RSM refusing
                            to re-enter L2 with an invalid VMCB12
          "log"             L1 reports after VMRUN (EXITCODE exit_code if set) and its
                            event log reads exactly `log`
          "left_l2"         L2 does not go on: L1 resumes after VMRUN out of guest
                            mode, or the vCPU shuts down
          "accepted_l1"     KVM_SET_NESTED_STATE succeeds and the vCPU is not in guest
                            mode (a state without GUEST_MODE)
          "internal_error"  KVM_RUN ends in KVM_EXIT_INTERNAL_ERROR with `suberror`
                            (and, with exit_code set, while handling that SVM exit)
          "fail_entry"      KVM_RUN ends in KVM_EXIT_FAIL_ENTRY: the CPU refused the
                            state KVM tried to enter (hardware_entry_failure_reason)
    """

    kind: str
    exit_code: int | None = None
    vector: int | None = None
    at: str | None = None
    error_code: int | None = None
    suberror: int | None = None  # internal_error: KVM_INTERNAL_ERROR_*
    # After the #VMEXIT: True = EVENTINJ must read 0, False = must be kept,
    # None = not part of this expectation.
    event_inj_cleared: bool | None = None
    # After a #VMEXIT from an L2 that took the injected event: EVENTINJ.V
    # must read 0 (the CPU clears it once the event is delivered, APM 15.20;
    # the other bits are then meaningless: 6.1 leaves ERRORCODE there).
    event_inj_taken: bool = False
    # The failure is detected by the CPU's own VMRUN checks and reflected to
    # L1 by KVM (kernels without the software check).  KVM copies the CPU's
    # exit code, and QEMU's TCG writes VMEXIT_INVALID as 32 bits
    # (cpu_vmexit takes a uint32_t), so 0xFFFFFFFF is also a faithful copy.
    hw_checked: bool = False
    # A profile's behaviour that breaks the contract (e.g. a CVE fixed in a
    # later stable release): matching it fingerprints the kernel, but the
    # case still fails.
    known_bug: str | None = None
    # GIF after the #VMEXIT: architecturally 0; a legacy kernel leaves it set.
    gif_after: bool = False
    # L1 register bits that come back flipped after the #VMEXIT, as
    # (register, mask) pairs over params.RESULT's pre_* registers: a bug's
    # signature (KVM's hardware bits leaking into L1), or what an SMM
    # handler wrote into L1's saved state.  () = L1's state intact, as the
    # contract says.
    l1_flipped: tuple[tuple[str, int], ...] = ()
    # The event L2 takes through its own IDT (cases with PF_L2_IDT):
    # (vector, error code pushed or None for none, or ANY_ERROR_CODE when
    # the CPU model decides); None: no event may reach L2.
    l2_event: tuple[int, int | None] | None = None
    # EXITINTINFO[31:0] a successful #VMEXIT must write (None: V=0, no event
    # was being delivered).
    exit_int_info: int | None = None
    # Other outcomes this kernel generation shows now and then, each judged
    # as a whole (a known bug among them still fails): for a race in the
    # kernel that no case can steer (cases/eventinj.py, reserved TYPEs).
    alternatives: tuple[Expect, ...] = ()
    # kind "log": L1's event log, rendered by kvmtest.eventlog.render.
    log: tuple[str, ...] | None = None

    def describe(self) -> str:
        if self.kind == "vmexit" and self.l2_event is None:
            return f"vmexit {self.exit_code:#x}"
        if self.kind == "exception":
            ec = "" if self.error_code is None else f" ec={self.error_code:#x}"
            return f"{_VECTOR_NAMES.get(self.vector or 0, self.vector)}{ec} at {self.at}"
        text = self.kind.replace("_", " ")
        if self.kind == "vmexit":
            text = f"vmexit {self.exit_code:#x}"
        if self.kind == "internal_error" and self.suberror is not None:
            text += f" (suberror {self.suberror})"
        if self.kind == "no_fault" and self.exit_code is not None:
            text += f", then vmexit {self.exit_code:#x}"
        if self.kind == "log" and self.exit_code is not None:
            text += f" (exit {self.exit_code:#x})"
        if self.log is not None:
            text += ": " + " ".join(self.log)
        if self.known_bug:
            text += f" (bug: {self.known_bug})"
        if self.event_inj_cleared is not None:
            text += ", EVENTINJ " + ("cleared" if self.event_inj_cleared else "kept")
        if self.l2_event is not None:
            vec, err = self.l2_event
            text += f", L2 takes vector {vec:#x}" + (
                "" if err == ANY_ERROR_CODE else " without error code" if err is None
                else f" ec={err:#x}")
        return text


_VECTOR_NAMES = {0: "#DE", 6: "#UD", 13: "#GP", 14: "#PF", 8: "#DF"}
# l2_event error code: pushed or not is the CPU's choice (see cases/eventinj.py).
ANY_ERROR_CODE = -1

VMEXIT_INVALID = Expect("vmexit_invalid")
VMEXIT_INVALID_HW = Expect("vmexit_invalid", hw_checked=True)


def vmexit(code: int) -> Expect:
    return Expect("vmexit", exit_code=code)


def exception(vector: int, at: str, error_code: int | None = None) -> Expect:
    return Expect("exception", vector=vector, at=at, error_code=error_code)


NO_FAULT = Expect("no_fault")
EINVAL = Expect("einval")
ACCEPTED = Expect("accepted")
SHUTDOWN = Expect("shutdown")


_EMPTY: Mapping = MappingProxyType({})
_PARAM_NAMES = frozenset(params.PARAMS)


def _frozen(m: Mapping | None) -> Mapping:
    return MappingProxyType(dict(m)) if m else _EMPTY


@dataclass(frozen=True)
class Case:
    """One test case: the VMCB12 and L1 setup, the scenario, what to expect."""
    id: str  # e.g. "save/cr0-cd0-nw1[gif1]"
    family: str  # insn, save, control, late, negative, nested_state, smm
    scenario: str  # VMRUN, INSN, SET_NESTED_STATE, SMM
    expect: Expect  # what every correct kernel does (the contract)
    source: str  # APM section or KVM check this case comes from
    payload: str = "vmrun"
    gif_mode: str | None = None
    params: Mapping[str, int] = field(default_factory=dict)
    vmcb: Mapping[str, int] = field(default_factory=dict)  # VMCB12 field -> value
    l2_entry: str = "l2_vmmcall"
    memory: Mapping[int, bytes] = field(default_factory=dict)  # extra guest memory
    # SMM scenario: what the SMM handler writes (VMCB12 at VMRUN is valid):
    # VMCB12 fields, or "hsave."/"smram."/"msr." targets (kvmtest.smm.write_target).
    smm_vmcb: Mapping[str, int] = field(default_factory=dict)
    needs: frozenset[str] = frozenset({NEED_SVM})
    # Kernel generations that legitimately differ: profile -> expectation.
    # When set, `expect` is ignored and the case passes if the observation
    # matches the selected (or, with none selected, any known) profile.
    profiles: Mapping[str, Expect] = field(default_factory=dict)
    # The case it is the negative control of (same VMCB minus the defect).
    control_of: str | None = None
    # Guest CPUID feature bits forced on (True) or off (False) on top of the
    # backend's guest CPUID (names: kvmtest.cpuid_features), for checks
    # whose legality follows the guest CPUID.
    cpuid: Mapping[str, bool] = field(default_factory=dict)

    # SCRIPT (and any drive()): SYNC stage tag -> host actions, in order
    # (kvmtest.actions, e.g. ("irq 48",), ("delete_memory 0x40000000",)).
    on_sync: Mapping[int, tuple[str, ...]] = field(default_factory=dict)
    # Where VMCB12 is written, read back and poisoned (VMRUN's rAX is params').
    vmcb12_gpa: int = layout.VMCB12_GPA
    # Extra memslots created before the run: GPA -> size (page multiples).
    extra_memory: Mapping[int, int] = field(default_factory=dict)
    # SET_NESTED_STATE: the request beyond the VMCB12 (kvmtest.nested_request).
    nested: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("params", "vmcb", "memory", "profiles", "smm_vmcb", "cpuid", "on_sync",
                     "extra_memory", "nested"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))
        unknown = self.params.keys() - _PARAM_NAMES
        if unknown:
            raise ValueError(f"{self.id}: unknown params {sorted(unknown)}")
        if self.cpuid:
            cpuid_features.check(self.cpuid)

    @property
    def configs(self) -> list[str]:
        """The configuration needs of this case (empty: any configuration)."""
        return sorted(self.needs & set(CONFIG_NEEDS))

    @property
    def consistency_check(self) -> bool:
        """A VMRUN consistency-check failure (not a late failure)."""
        return self.family in ("save", "control") and self.expect.kind == "vmexit_invalid"

    def guest_params(self) -> dict[str, int]:
        """The params block: defaults for the scenario, then the case's own."""
        flags = params.PF_SET_SVME | params.PF_SET_HSAVE
        if self.gif_mode == GIF0:
            flags |= params.PF_CLGI
        elif self.gif_mode == GIF1:
            flags |= params.PF_STGI
        base = {"flags": flags, "vmrun_rax": layout.VMCB12_GPA, "hsave_pa": layout.HSAVE_GPA}
        return {**base, **self.params}
