"""Compare an Observation with the contract and the kernel profiles.

The contract (DESIGN.md section 1) decides pass/fail.  Where kernel
generations legitimately differ, a case lists per-profile expectations and
the judge records which profiles the observation agrees with; the run's
fingerprint is the profile that agrees with every case.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from . import eventlog, layout, params
from . import observation as o
from .case import ANY_ERROR_CODE, SMM, VMRUN, Case, Expect
from .payloads import load_payload
from .vmcb import EVTINJ_VALID, SVM_EXIT_ERR, SVM_EXIT_VMMCALL

PASS, FAIL, ERROR, SKIP = "pass", "fail", "error", "skip"
# Oldest first; each is a booted kernel (kvmtest.model.profiles: `measured`):
# legacy = Debian 6.1.170, fixed = 6.1.192, 6.12-stable = 6.12.95 and 6.12.117,
# 7.x = 7.2.13 and 7.3.4.
PROFILES = ("legacy", "fixed", "6.12-stable", "7.x")
# A profile a case does not list behaves there like its base.
PROFILE_BASE = {"6.12-stable": "fixed"}
# Outcomes that mean the harness or the guest broke, not the kernel's answer.
HARNESS_OUTCOMES = {o.TIMEOUT, o.GUEST_ASSERT, o.EMULATION_ERROR}
L1_REGS = ("rsp", "cr0", "cr3", "cr4", "efer")
# INT_CTL bits the CPU itself updates on #VMEXIT (APM 15.21: V_TPR, V_IRQ;
# V_GIF under nested vGIF); L1 owns the rest and must get them back.
INT_CTL_CPU_OWNED = 0xF | 1 << 8 | 1 << 9
M32 = 0xFFFF_FFFF


@dataclass
class Verdict:
    verdict: str
    reason: str = ""
    profiles: tuple[str, ...] = ()  # profiles the observation agrees with
    failures: list[str] = field(default_factory=list)


def _check_vmexit(obs: o.Observation, want: Expect, case: Case) -> list[str]:
    bad: list[str] = []
    if obs.outcome != o.SYNC:
        return [f"L1 did not resume after VMRUN: {obs.outcome} {obs.detail}".rstrip()]
    code = SVM_EXIT_ERR if want.kind == "vmexit_invalid" else want.exit_code
    allowed = {code, SVM_EXIT_ERR & 0xFFFF_FFFF} if want.hw_checked else {code}
    if obs.exit_code not in allowed:
        bad.append(f"EXITCODE {obs.exit_code:#x} != {code:#x}")
    if want.kind == "vmexit_invalid":
        if obs.exit_info_1 != 0:
            bad.append(f"EXITINFO1 {obs.exit_info_1:#x} != 0")
        if obs.exit_info_2 != 0:
            bad.append(f"EXITINFO2 {obs.exit_info_2:#x} != 0")
    if obs.gif is None:
        bad.append("GIF unknown (no KVM_GET_NESTED_STATE)")
    elif obs.gif != want.gif_after:
        bad.append(f"GIF={int(obs.gif)} after #VMEXIT")
    if obs.guest_mode:
        bad.append("still in guest mode after #VMEXIT")
    l1 = obs.l1 or {}
    if l1.get("stage") != params.STAGE_AFTER_VMRUN:
        bad.append("L1 result block not written after VMRUN")
    else:
        flipped = dict(want.l1_flipped)
        for reg in L1_REGS:
            want_value = l1[f"pre_{reg}"] ^ flipped.get(reg, 0)
            if l1[reg] != want_value:
                bad.append(f"L1 {reg.upper()} {l1[reg]:#x} != {want_value:#x} before VMRUN")
        bad += _check_host_rax_rflags(l1)
    if want.event_inj_cleared is not None:
        before = case.vmcb.get("event_inj", 0)
        after = 0 if want.event_inj_cleared else before
        if obs.event_inj != after:
            bad.append(f"EVENTINJ {obs.event_inj:#x} != {after:#x}")
    if want.event_inj_taken and (obs.event_inj is None or obs.event_inj & EVTINJ_VALID):
        bad.append(f"EVENTINJ {obs.event_inj or 0:#x} still valid after L2 took the event")
    bad += _check_exit_int_info(obs, want, case)
    if case.scenario == VMRUN:
        bad += _check_control_write_back(obs, case)
        bad += _check_l2_event(l1, want, case)
    return bad


def _check_host_rax_rflags(l1: dict[str, int]) -> list[str]:
    """L1 RAX and RFLAGS: VMRUN saves them in the host save area and every
    #VMEXIT reloads them (APM vol. 2 15.5.1 and 15.6): after the VMRUN, L1
    has RAX = the VMCB12 address it ran and its RFLAGS unchanged, whether
    L2 ran or the VMRUN failed.  (Result blocks without the pre_ fields,
    from payloads that do not record them, are not judged here.)"""
    bad = []
    for reg in ("rax", "rflags"):
        before = l1.get(f"pre_{reg}")
        if before is None or before == params.RESULT_POISON:
            bad.append(f"L1 {reg.upper()} before VMRUN not recorded")
        elif l1.get(reg) != before:
            bad.append(f"L1 {reg.upper()} {l1.get(reg, 0):#x} != {before:#x} before VMRUN "
                       "(host save area)")
    return bad


def _check_exit_int_info(obs: o.Observation, want: Expect, case: Case) -> list[str]:
    """EXITINTINFO (APM vol. 2 15.7.2): V (bit 31) says an event was being
    delivered when the #VMEXIT happened.  A successful #VMEXIT writes it (an
    intercepted VMMCALL interrupts no event delivery: V=0).  Bits 63:32 are
    the event's error code, defined only with V=1 and EV=1: KVM writes
    EXITINTINFO as the u32 pair exit_int_info/exit_int_info_err and leaves
    the error-code half alone when there is none, which the contract does
    not judge.  A failed VMRUN ran no guest, so no event was interrupted;
    KVM writes nothing there at all (nested_svm_vmrun's early exit, and
    nested_svm_vmexit skips nested_save_pending_event_to_vmcb12 for
    SVM_EXIT_ERR), which the APM does not forbid: EXITINTINFO must then not
    report an event other than the one L1 asked to inject."""
    info = obs.exit_int_info
    if info is None:  # the scenario reads no VMCB12 (KVM_SET_NESTED_STATE's follow-up)
        return []
    low = info & M32
    if want.kind == "vmexit":
        expected = want.exit_int_info if want.exit_int_info is not None else 0
        if low != expected:
            return [f"EXITINTINFO[31:0] {low:#x} != {expected:#x} after #VMEXIT"]
        return []
    injected = case.vmcb.get("event_inj", 0) & M32
    if low & EVTINJ_VALID and low != injected:
        return [f"EXITINTINFO {info:#x} reports an event L1 did not inject "
                f"(EVENTINJ {injected:#x})"]
    return []


def _check_control_write_back(obs: o.Observation, case: Case) -> list[str]:
    """TLB_CTL and INT_CTL after any #VMEXIT, failed VMRUN included: the CPU
    leaves TLB_CONTROL and changes only V_TPR, V_IRQ (and V_GIF) of INT_CTL
    (APM vol. 2 15.16.1, 15.21), so L1 reads back the values it wrote."""
    bad = []
    tlb = case.vmcb.get("tlb_ctl", 0)
    if obs.tlb_ctl is not None and obs.tlb_ctl != tlb:
        bad.append(f"TLB_CTL {obs.tlb_ctl:#x} != {tlb:#x} L1 wrote")
    ctl = case.vmcb.get("int_ctl", 0) & ~INT_CTL_CPU_OWNED
    if obs.int_ctl is not None and obs.int_ctl & ~INT_CTL_CPU_OWNED != ctl:
        bad.append(f"INT_CTL {obs.int_ctl:#x} != {ctl:#x} L1 wrote (outside V_TPR/V_IRQ/V_GIF)")
    return bad


def _check_l2_event(l1: dict[str, int], want: Expect, case: Case) -> list[str]:
    """The event EVENTINJ delivered into L2, as L2's own IDT saw it
    (guest_payloads/vmrun.S l2_evt_common); only for cases with PF_L2_IDT."""
    if not case.guest_params()["flags"] & params.PF_L2_IDT or not l1:
        return []
    vector = l1.get("l2_event_vector", params.RESULT_POISON)
    if want.l2_event is None:
        if vector != params.RESULT_POISON:
            return [f"L2 took vector {vector:#x} where no event was due"]
        return []
    want_vec, want_err = want.l2_event
    if vector == params.RESULT_POISON:
        return [f"no event reached L2 (vector {want_vec:#x} was injected)"]
    if vector != want_vec:
        return [f"L2 took vector {vector:#x} != {want_vec:#x}"]
    if want_err == ANY_ERROR_CODE:
        return []
    frame = layout.L2_STACK_TOP - l1["l2_event_rsp"]
    if want_err is None and frame != 40:
        return [f"L2 vector {vector:#x}: error code pushed ({frame}-byte frame), none was due"]
    if want_err is not None:
        if frame != 48:
            return [f"L2 vector {vector:#x}: no error code pushed ({frame}-byte frame)"]
        if l1["l2_event_word"] != want_err:
            return [f"L2 vector {vector:#x}: error code {l1['l2_event_word']:#x} != {want_err:#x}"]
    return []


def _check_exception(obs: o.Observation, want: Expect, case: Case) -> list[str]:
    if obs.outcome != o.EXCEPTION:
        return [f"no exception (outcome {obs.outcome}) where {want.describe()} was due"]
    bad = []
    if obs.vector != want.vector:
        bad.append(f"vector {obs.vector} != {want.vector}")
    at = load_payload(case.payload).sym(want.at or "")
    if obs.rip != at:
        bad.append(f"RIP {obs.rip:#x} ({obs.rip_symbol}) != {at:#x} ({want.at})")
    if want.error_code is not None and obs.error_code != want.error_code:
        bad.append(f"error code {obs.error_code:#x} != {want.error_code:#x}")
    return bad


def _check_log(obs: o.Observation, want: Expect, case: Case) -> list[str]:
    if obs.outcome != o.SYNC:
        return [f"L1 did not report: {obs.outcome} {obs.detail}".rstrip()]
    bad = []
    if want.exit_code is not None and obs.exit_code != want.exit_code:
        bad.append(f"EXITCODE {obs.exit_code:#x} != {want.exit_code:#x}" if obs.exit_code
                   is not None else "EXITCODE not read")
    seen = eventlog.render(obs.log, load_payload(case.payload))
    if seen is None:
        bad.append("L1 never started its event log")
    elif want.log is not None and not eventlog.matches(seen, want.log):
        bad.append(f"event log {' '.join(seen) or '(empty)'} != {' '.join(want.log)}")
    return bad


def _check_left_l2(obs: o.Observation) -> list[str]:
    """L2 stopped: L1 resumed after its VMRUN, out of guest mode, or the vCPU
    shut down (a triple fault of L1 is KVM's documented answer when it cannot
    complete a #VMEXIT)."""
    if obs.outcome == o.SHUTDOWN:
        return []
    if obs.outcome != o.SYNC:
        return [f"L2 went on or L1 never resumed: {obs.outcome} {obs.detail}".rstrip()
                + (" (still in guest mode)" if obs.guest_mode else "")]
    bad = []
    if (obs.l1 or {}).get("stage") != params.STAGE_AFTER_VMRUN:
        bad.append("L1 result block not written after VMRUN")
    if obs.guest_mode:
        bad.append("still in guest mode")
    return bad


def matched(case: Case, obs: o.Observation, want: Expect) -> Expect | None:
    """The expectation obs keeps: want itself, or one of its alternatives
    (the first that holds), or None."""
    for e in (want, *want.alternatives):
        if not _check(case, obs, e):
            return e
    return None


def check(case: Case, obs: o.Observation, want: Expect) -> list[str]:
    """The list of ways obs breaks want and each of its alternatives (empty:
    one of them holds); the reasons are want's own."""
    bad = _check(case, obs, want)
    if bad and any(not _check(case, obs, alt) for alt in want.alternatives):
        return []
    return bad


def _check(case: Case, obs: o.Observation, want: Expect) -> list[str]:
    """The list of ways obs breaks want (empty: it holds)."""
    if want.kind in ("vmexit_invalid", "vmexit"):
        bad = _check_vmexit(obs, want, case)
    elif want.kind == "exception":
        bad = _check_exception(obs, want, case)
    elif want.kind == "no_fault":
        bad = [] if obs.outcome == o.SYNC else [f"{obs.outcome}: {obs.describe()}"]
        if not bad and want.exit_code is not None and obs.exit_code != want.exit_code:
            bad.append(f"EXITCODE {obs.exit_code:#x} != {want.exit_code:#x}")
    elif want.kind == "einval":
        bad = [] if obs.outcome == o.EINVAL else [f"KVM_SET_NESTED_STATE: {obs.detail}"]
        if not bad:  # and L1 still runs: its VMRUN of the default VMCB12 works
            after = replace(obs, outcome=obs.after_outcome or "")
            bad = [f"L1 afterwards: {b}" for b in
                   _check_vmexit(after, Expect("vmexit", exit_code=SVM_EXIT_VMMCALL), case)]
    elif want.kind == "shutdown":
        bad = [] if obs.outcome == o.SHUTDOWN else [f"no shutdown: {obs.describe()}"]
    elif want.kind == "internal_error":
        data = obs.exit_data or []
        bad = [] if obs.outcome == o.INTERNAL_ERROR else [f"no internal error: {obs.describe()}"]
        if not bad and want.suberror is not None and data[:1] != [want.suberror]:
            bad.append(f"internal error suberror {data[:1]} != {want.suberror}")
        if not bad and want.exit_code is not None and data[2:3] != [want.exit_code]:
            bad.append(f"internal error while handling exit {data[2:3]} != {want.exit_code:#x}")
    elif want.kind == "fail_entry":
        bad = [] if obs.outcome == o.FAIL_ENTRY else [f"no failed entry: {obs.describe()}"]
    elif want.kind == "accepted":
        bad = [] if obs.outcome == o.ACCEPTED else [f"KVM_SET_NESTED_STATE: {obs.detail}"]
        if not bad and not obs.guest_mode:
            bad.append("accepted but not in guest mode")
    elif want.kind == "accepted_l1":
        bad = [] if obs.outcome == o.ACCEPTED else [f"KVM_SET_NESTED_STATE: {obs.detail}"]
        if not bad and obs.guest_mode is not False:
            bad.append(f"accepted, but guest mode is {obs.guest_mode}")
    elif want.kind == "log":
        bad = _check_log(obs, want, case)
    elif want.kind == "left_l2":
        bad = _check_left_l2(obs)
    else:
        raise ValueError(f"unknown expectation {want.kind!r}")
    if case.scenario == SMM and not obs.smm_handler_runs:
        # Whatever happened, it was not RSM's answer: SMM was never reached.
        bad.append("the SMM handler never ran")
    return bad


def judge(case: Case, obs: o.Observation, profile: str | None = None) -> Verdict:
    """profile: the kernel behaviour expected (None: any known one).

    A kernel-log warning fails the case whatever it did, but does not change
    which profiles its behaviour matches."""
    v = _judge_behaviour(case, obs, profile)
    if obs.kernel_warnings and v.verdict in (PASS, FAIL):
        warn = f"kernel log: {obs.kernel_warnings[0]}"
        v = Verdict(FAIL, "; ".join(filter(None, [warn, v.reason])), v.profiles,
                    [warn, *v.failures])
    return v


def expectation(case: Case, profile: str) -> Expect:
    """What a kernel of this profile does in this case."""
    p: str | None = profile
    while p is not None:
        if p in case.profiles:
            return case.profiles[p]
        p = PROFILE_BASE.get(p)
    return case.expect


def _judge_behaviour(case: Case, obs: o.Observation, profile: str | None) -> Verdict:
    if obs.outcome in HARNESS_OUTCOMES:
        return Verdict(ERROR, f"{obs.outcome}: {obs.detail}")
    if not case.profiles:
        bad = check(case, obs, case.expect)
        return Verdict(FAIL if bad else PASS, "; ".join(bad), PROFILES if not bad else (), bad)
    wants = {p: expectation(case, p) for p in PROFILES}
    results = {p: check(case, obs, want) for p, want in wants.items()}
    agree = tuple(p for p, bad in results.items() if not bad)
    kept = {p: matched(case, obs, wants[p]) for p in agree}
    bugs = [e.known_bug for e in kept.values() if e is not None and e.known_bug]
    if bugs:  # the kernel behaves like a profile known to be broken here
        return Verdict(FAIL, f"known bug ({', '.join(agree)}): {bugs[0]}", agree, bugs[:1])
    if profile is not None and profile in results:
        bad = results[profile]
        if bad:
            seen = f" (matches {', '.join(agree)})" if agree else ""
            return Verdict(FAIL, f"profile {profile}: {'; '.join(bad)}{seen}", agree, bad)
        return Verdict(PASS, "", agree)
    if agree:
        return Verdict(PASS, f"matches {', '.join(agree)}", agree)
    first = next(iter(results.values()))
    return Verdict(FAIL, "matches no known profile: " + "; ".join(first), agree, first)


def fingerprint(verdicts: Iterable[Verdict]) -> str:
    """The profile that agrees with every judged case ("fixed or upstream"
    when the cases run cannot tell those apart), or the closest one."""
    vs = [v for v in verdicts if v.verdict in (PASS, FAIL)]
    if not any(len(v.profiles) < len(PROFILES) for v in vs):
        return "unknown (no case run tells the kernel behaviours apart)"
    misses = {p: sum(p not in v.profiles for v in vs) for p in PROFILES}
    exact = [p for p in PROFILES if misses[p] == 0]
    if exact:
        return " or ".join(exact)
    best = min(PROFILES, key=lambda p: misses[p])
    return f"unknown (closest: {best}, {misses[best]} of {len(vs)} cases disagree)"
