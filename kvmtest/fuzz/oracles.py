"""The oracles: what makes a scenario's outcome a finding.

- contract: the architectural contract (README, kvmtest.judge) wherever it
  applies.  A VMRUN that fails must look like VMEXIT_INVALID with GIF=0 and
  L1's state intact; any #VMEXIT must leave L1 sane (GIF=0, out of guest
  mode, its registers back); a VMCB12 that breaks an APM 15.5.1 check must
  not run L2; the APM's VMRUN exceptions (#UD with EFER.SVME=0, #GP for an
  unaligned or illegal rAX) must be raised.
- differential (model, against): every observation field where two targets
  differ (kvmtest.parity).
- warn / crash: kernel WARN/BUG lines, a kernel that died.

Each oracle emits Signals.  A signal's ``signature`` names the behaviour,
not the scenario: failure texts with their numbers blanked, or the set of
fields that differ (with the values of the few categorical fields).  The
campaign groups findings by (oracle, signature) and the shrinker keeps a
signal's exact signature while it removes changes.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

from .. import layout
from ..case import VMEXIT_INVALID_HW, Case, Expect, exception, vmexit
from ..judge import HARNESS_OUTCOMES, check
from ..model import checks
from ..model.cpuid import MAXPHYADDR
from ..model.profiles import TLB_CTL_ACCEPT, V7
from ..observation import ACCEPTED, EXCEPTION, SHUTDOWN, SYNC, Observation
from ..parity import Difference, diff
from ..vmcb import POISON, SVM_EXIT_ERR, Vmcb
from . import known
from .spec import KIND_NSTATE, KIND_SMM, KIND_VMRUN, Scenario

ERR32 = SVM_EXIT_ERR & 0xFFFF_FFFF
M32 = 0xFFFF_FFFF
UD, GP = 6, 13

# Every VMRUN consistency check the APM lists (vol. 2 15.5.1), whichever
# kernel performs it: the newest profile's switches, minus TLB_CTL (the APM
# defines no failure for reserved TLB_CONTROL values).
ARCH_PROFILE = replace(V7, name="architecture", tlb_ctl=TLB_CTL_ACCEPT)

# Observation fields whose values (not only the fact that they differ) name
# the behaviour.
CATEGORICAL = frozenset({"outcome", "exit_code", "gif", "guest_mode", "after_outcome",
                         "vector", "smm_handler_runs", "l1.stage"})


@dataclass(frozen=True)
class Signal:
    oracle: str  # contract | model | against | warn | crash (":" + target for warn/crash)
    signature: str
    details: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[str, str]:
        return (self.oracle, self.signature)

    def describe(self) -> str:
        return f"{self.oracle}: {self.signature}"


def arch_failures(v: Vmcb) -> list[str]:
    """The APM 15.5.1 checks this VMCB12 fails (model check names)."""
    return checks.failed_checks(v, ARCH_PROFILE)


_NUMBER = re.compile(r"0x[0-9a-fA-F]+|\b\d+\b")


def blank_numbers(text: str) -> str:
    return _NUMBER.sub("#", text)


def show(field: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        if field == "exit_code":
            return {SVM_EXIT_ERR: "ERR", ERR32: "ERR32", POISON: "POISON"}.get(value, hex(value))
        return hex(value) if value > 9 else str(value)
    return str(value)


# ---- contract ------------------------------------------------------------------


def _vmrun_operand_fault(s: Scenario) -> str | None:
    """The exception the APM makes L1 take before any VMCB12 check, from
    L1's own state; None if VMRUN must execute.  With EFER.SVME=0 the first
    SVM instruction #UDs (the payload's STGI/CLGI, before VMRUN: APM vol. 3
    STGI, CLGI, VMRUN); an unaligned or illegal rAX makes VMRUN #GP."""
    l1 = s.l1_state()
    if not l1["svme"]:
        return "#UD"
    rax = l1["rax"]
    if rax & 0xFFF or rax >= 1 << MAXPHYADDR:
        return "#GP"
    return None


# Where L1's own code runs before and at VMRUN (vmrun.S, smm.S, and the
# flag-driven set-up in common.S): an exception reported from anywhere else
# was taken by L2 itself (not intercepted), through the IDT it shares with L1.
L1_CODE = ("l1_main", "vmrun_l1_main", "insn_vmrun", "l1_svm_setup")


def _in_l2(obs: Observation) -> bool:
    return obs.outcome == EXCEPTION and not (obs.rip_symbol or "").startswith(L1_CODE)


def _check_fault(case: Case, obs: Observation, fault: str) -> list[str]:
    if fault == "#UD":
        if obs.outcome != EXCEPTION or obs.vector != UD:
            return [f"no #UD from SVM instructions with EFER.SVME=0: {obs.describe()}"]
        return []
    return check(case, obs, exception(GP, "insn_vmrun", 0))


def contract(s: Scenario, case: Case, obs: Observation) -> list[Signal]:
    """The ways obs breaks the architectural contract (one signal each)."""
    if obs.outcome in HARNESS_OUTCOMES - {"timeout"}:
        return []  # the target could not answer: no verdict either way
    bad: list[str] = []
    if s.kind == KIND_VMRUN:
        bad = _contract_vmrun(s, case, obs)
    elif s.kind == KIND_SMM:
        bad = _contract_smm(s, case, obs)
    elif s.kind == KIND_NSTATE:
        bad = _contract_nstate(s, case, obs)
    return [Signal("contract", blank_numbers(b), (b,)) for b in bad]


def _sane_exit(obs: Observation) -> Expect:
    """The expectation any #VMEXIT meets, whatever caused it: its own exit
    code, and EXITINTINFO as the kernel reported it (an exit during an event's
    delivery reports that event: which one is for the differential oracles),
    so judge.check tests GIF, guest mode, L1's registers and the control
    fields L1 wrote."""
    return replace(vmexit(obs.exit_code or 0), exit_int_info=(obs.exit_int_info or 0) & M32)


def _after_vmexit(case: Case, obs: Observation) -> list[str]:
    """A #VMEXIT (including VMEXIT_INVALID) seen by L1: judge.check with the
    exit code L1 saw."""
    if obs.exit_code == POISON:
        return ["EXITCODE not written by the #VMEXIT (still poisoned)"]
    if obs.exit_code in (SVM_EXIT_ERR, ERR32):
        return check(case, obs, VMEXIT_INVALID_HW)
    return check(case, obs, _sane_exit(obs))


def _contract_vmrun(s: Scenario, case: Case, obs: Observation) -> list[str]:
    fault = _vmrun_operand_fault(s)
    if fault is not None:
        return _check_fault(case, obs, fault)
    if not l1_rax_default(s) or dict(s.l1).keys() & {"hsave", "hsave_pa"}:
        # VMRUN ran on another page than the VMCB12 the runner reads back,
        # or KVM's own rules (no host save area: #GP) apply.  Only L1's
        # sanity after a #VMEXIT is architectural there.
        # The exit fields L1 found are not in our VMCB12: check L1 itself.
        if obs.outcome != SYNC:
            return []
        other = replace(obs, exit_int_info=None, tlb_ctl=None, int_ctl=None)
        return check(replace(case, vmcb={}), other, _sane_exit(other))
    illegal = arch_failures(s.vmcb12_image())
    if illegal:
        if obs.outcome == SYNC and obs.exit_code in (SVM_EXIT_ERR, ERR32):
            return check(case, obs, VMEXIT_INVALID_HW)
        return [f"VMRUN accepted a VMCB12 failing {name}" for name in illegal]
    if obs.outcome == SYNC:
        return _after_vmexit(case, obs)
    if obs.outcome == EXCEPTION and not _in_l2(obs):
        return [f"L1 took vector {obs.vector} at {obs.rip_symbol} where VMRUN had to run"]
    return []  # L2 runs on (an I/O exit to the host, a HLT, its own fault)


def l1_rax_default(s: Scenario) -> bool:
    return s.l1_state()["rax"] == layout.VMCB12_GPA


def _contract_smm(s: Scenario, case: Case, obs: Observation) -> list[str]:
    if obs.outcome == SHUTDOWN or not obs.smm_handler_runs:
        return []  # RSM refused, or L2 never got to the SMI (the VMRUN failed)
    v = s.vmcb12_image()
    for name, value in s.smm:
        v[name] = value
    bad = [f"RSM did not refuse a VMCB12 failing {name}" for name in arch_failures(v)]
    if obs.outcome == SYNC:
        bad += _after_vmexit(case, obs)
    return bad  # otherwise L2 runs on after RSM (its own fault, an I/O exit)


def _contract_nstate(s: Scenario, case: Case, obs: Observation) -> list[str]:
    illegal = arch_failures(s.vmcb12_image())
    if illegal:
        return [f"KVM_SET_NESTED_STATE accepted a VMCB12 failing {name}" for name in illegal
                ] if obs.outcome == ACCEPTED else check(case, obs, Expect("einval"))
    if obs.outcome == ACCEPTED:
        return check(case, obs, Expect("accepted"))
    return []  # refused for a reason the APM does not name: the model judges


# ---- differential ------------------------------------------------------------------


def diff_signature(differences: list[Difference]) -> str:
    by_field = {d.field: d for d in differences}
    if "outcome" in by_field:  # everything else follows from it
        d = by_field["outcome"]
        return f"outcome={show('outcome', d.left)}|{show('outcome', d.right)}"
    parts = []
    for d in differences:
        if d.field in CATEGORICAL:
            parts.append(f"{d.field}={show(d.field, d.left)}|{show(d.field, d.right)}")
        else:
            parts.append(d.field)
    return " ".join(parts)


def differential(oracle: str, left: Observation, right: Observation,
                 scenario: Scenario | None = None,
                 known_out: Counter[str] | None = None) -> Signal | None:
    """Where two targets' observations of one scenario differ (None: nowhere,
    one side could not answer, or known.py explains every difference; the
    rules that did are counted in known_out)."""
    if left.outcome in HARNESS_OUTCOMES - {"timeout"} or \
            right.outcome in HARNESS_OUTCOMES - {"timeout"}:
        return None
    differences = diff(left, right)
    if not differences:
        return None
    explained: dict[str, str] = {}
    if scenario is not None:
        rest, explained = known.split(oracle, scenario, left, right,
                                      [d.field for d in differences])
        if known_out is not None:
            known_out.update(set(explained.values()))
        differences = [d for d in differences if d.field in rest]
        if not differences:
            return None
    details = tuple(d.describe() for d in differences) + tuple(
        f"{f}: explained ({why})" for f, why in explained.items())
    return Signal(oracle, diff_signature(differences), details)


# ---- kernel log ---------------------------------------------------------------------

_WARN_NOISE = [
    (re.compile(r"^\[\s*\d+\.\d+\]\s*"), ""),
    (re.compile(r"CPU: \d+ PID: \d+ "), ""),
    (re.compile(r"\+0x[0-9a-f]+/0x[0-9a-f]+"), ""),
    (re.compile(r"\[[a-z_0-9]+\]$"), ""),
]


def warn_signature(line: str) -> str:
    for pattern, repl in _WARN_NOISE:
        line = pattern.sub(repl, line)
    return line.strip()


def warnings(target: str, obs: Observation) -> list[Signal]:
    lines = obs.kernel_warnings or []
    first = [w for w in lines if re.search(r"WARNING|BUG|Oops|UBSAN|KASAN", w)] or lines
    if not first:
        return []
    return [Signal(f"warn:{target}", warn_signature(first[0]), tuple(lines[:20]))]


def crash(target: str, console: str) -> Signal:
    head = next((ln for ln in console.splitlines()
                 if re.search(r"qemu: fatal|Kernel panic|BUG:|Oops|general protection", ln)),
                console.splitlines()[0] if console else "no answer")
    return Signal(f"crash:{target}", warn_signature(head), (console[-4000:],))
