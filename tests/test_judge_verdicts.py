"""The judge's verdicts as users read them: every expectation kind judged
alone (the right outcome passes, each other one fails), the exact reason a
report shows for each broken clause (the values in it are the observed ones),
and the Verdict fields (profiles matched, the list of failures) on every path.

Written from docs (README's contract, kvmtest/case.py's Expect kinds), not
from judge.py: the expected texts are spelled out here.  Pure functions on
hand-made observations: no backend is involved (or mocked).
"""

from __future__ import annotations

import dataclasses

import pytest

from kvmtest import judge as j
from kvmtest import observation as o
from kvmtest import params
from kvmtest.case import INSN, SMM, Case, Expect
from kvmtest.cases import by_id
from kvmtest.payloads import load_payload
from kvmtest.vmcb import POISON, SVM_EXIT_ERR, SVM_EXIT_VMMCALL, SVM_EXIT_VMRUN

CASES = by_id()
LATE = CASES["late/msrpm-unbacked[gif1]"]  # no profiles: the contract alone
ASID0 = CASES["control/asid0[gif1]"]  # profiles: legacy keeps GIF set (known bug)
ASID0_GIF0 = CASES["control/asid0[gif0]"]
EVENTINJ_KEPT = CASES["control/eventinj-after-invalid[gif0]"]  # 6.1 keeps, 6.12+ clears
L1 = {"stage": params.STAGE_AFTER_VMRUN, "rsp": 0x1FFF8, "cr0": 0x80050033, "cr3": 0x4000,
      "cr4": 0x620, "efer": 0x1D00, "rflags": 0x2, "rax": 0x9000}
L1 |= {f"pre_{k}": v for k, v in L1.items() if k != "stage"}
ERR64 = "0xffffffffffffffff"


def good(**kw) -> o.Observation:
    base = o.Observation(outcome=o.SYNC, exit_code=SVM_EXIT_ERR, exit_info_1=0, exit_info_2=0,
                         exit_int_info=0, event_inj=0, gif=False, guest_mode=False,
                         l1=dict(L1), kernel_warnings=[], kernel_log_checked=True)
    return dataclasses.replace(base, **kw)


def reason(obs: o.Observation, case: Case = LATE, profile: str | None = None) -> str:
    v = j.judge(case, obs, profile)
    assert v.verdict == j.FAIL, v
    return v.reason


# ---- the exact reason for each broken clause --------------------------------

EXACT = [
    ({"exit_code": POISON}, f"EXITCODE {POISON:#x} != {ERR64}"),
    ({"exit_info_1": 0x10}, "EXITINFO1 0x10 != 0"),
    ({"exit_info_2": 1 << 40}, "EXITINFO2 0x10000000000 != 0"),
    ({"gif": None}, "GIF unknown (no KVM_GET_NESTED_STATE)"),
    ({"gif": True}, "GIF=1 after #VMEXIT"),
    ({"guest_mode": True}, "still in guest mode after #VMEXIT"),
    ({"l1": dict(L1, stage=params.RESULT_POISON)}, "L1 result block not written after VMRUN"),
    ({"l1": dict(L1, cr4=0x6A0)}, "L1 CR4 0x6a0 != 0x620 before VMRUN"),
    ({"l1": dict(L1, rax=0x9040)}, "L1 RAX 0x9040 != 0x9000 before VMRUN (host save area)"),
    ({"l1": dict(L1, rflags=0x202)}, "L1 RFLAGS 0x202 != 0x2 before VMRUN (host save area)"),
    ({"l1": dict(L1, pre_rax=params.RESULT_POISON)}, "L1 RAX before VMRUN not recorded"),
    ({"l1": {k: v for k, v in L1.items() if k != "pre_rflags"}},
     "L1 RFLAGS before VMRUN not recorded"),
    # An outcome without detail: no trailing blank.
    ({"outcome": o.SHUTDOWN}, "L1 did not resume after VMRUN: shutdown"),
    ({"outcome": o.UNEXPECTED_EXIT, "detail": "DONE without a report"},
     "L1 did not resume after VMRUN: unexpected_exit DONE without a report"),
    ({"exit_int_info": 1 << 31 | 3 << 8 | 14},
     "EXITINTINFO 0x8000030e reports an event L1 did not inject (EVENTINJ 0x0)"),
]


@pytest.mark.parametrize(("change", "text"), EXACT, ids=[t for _, t in EXACT])
def test_reason_names_the_clause_with_the_observed_values(change, text):
    v = j.judge(LATE, good(**change))
    assert (v.verdict, v.reason, v.failures, v.profiles) == (j.FAIL, text, [text], ())


def test_every_broken_clause_is_listed_in_order():
    """failures: one entry per broken clause; reason: them joined by '; '."""
    obs = good(exit_info_1=1, gif=True, guest_mode=True)
    want = ["EXITINFO1 0x1 != 0", "GIF=1 after #VMEXIT", "still in guest mode after #VMEXIT"]
    v = j.judge(LATE, obs)
    assert (v.failures, v.reason) == (want, "; ".join(want))


def test_kernel_warning_comes_first_and_keeps_the_behaviour_s_profiles():
    warn = "WARNING: CPU: 1 PID: 9 at arch/x86/kvm/svm/nested.c:1107"
    ok = j.judge(ASID0, good(kernel_warnings=[warn, "second"]))
    assert (ok.verdict, ok.failures) == (j.FAIL, [f"kernel log: {warn}"])
    assert ok.reason == f"kernel log: {warn}; matches fixed, 6.12-stable, 7.x"
    assert ok.profiles == ("fixed", "6.12-stable", "7.x")  # the behaviour still matched
    bad = j.judge(LATE, good(exit_info_2=2, kernel_warnings=[warn]))
    assert bad.reason == f"kernel log: {warn}; EXITINFO2 0x2 != 0"
    assert bad.failures == [f"kernel log: {warn}", "EXITINFO2 0x2 != 0"]
    # Harness errors stay errors: the warning does not turn them into verdicts.
    err = j.judge(LATE, good(outcome=o.TIMEOUT, detail="no report", kernel_warnings=[warn]))
    assert (err.verdict, err.reason) == (j.ERROR, "timeout: no report")


# ---- EVENTINJ, EXITINTINFO: the values the clause compares with ---------------

def test_eventinj_kept_means_the_value_l1_wrote_even_when_it_wrote_none():
    """event_inj_cleared=False: EVENTINJ reads back what VMCB12 held, 0 for a
    VMCB12 whose case sets no EVENTINJ."""
    kept = Expect("vmexit_invalid", event_inj_cleared=False)
    assert "event_inj" not in LATE.vmcb
    assert j.check(LATE, good(event_inj=0), kept) == []
    assert j.check(LATE, good(event_inj=1), kept) == ["EVENTINJ 0x1 != 0x0"]
    injected = EVENTINJ_KEPT.vmcb["event_inj"]
    assert j.check(EVENTINJ_KEPT, good(event_inj=0), kept) == [f"EVENTINJ 0x0 != {injected:#x}"]


def test_eventinj_taken_reason_when_vmcb12_was_not_read():
    taken = Expect("vmexit", exit_code=SVM_EXIT_VMMCALL, event_inj_taken=True)
    obs = good(exit_code=SVM_EXIT_VMMCALL, event_inj=None)
    assert j.check(LATE, obs, taken) == ["EVENTINJ 0x0 still valid after L2 took the event"]
    assert j.check(LATE, dataclasses.replace(obs, event_inj=0x8000_0B0E), taken) == [
        "EVENTINJ 0x80000b0e still valid after L2 took the event"]
    assert j.check(LATE, dataclasses.replace(obs, event_inj=0x1234 << 32 | 0x30e), taken) == []


def test_exit_int_info_after_vmexit_must_be_exactly_what_is_due():
    """After a successful #VMEXIT bits 31:0 are exactly 0 (no event was being
    delivered), or the event an expectation names: a stray TYPE/VECTOR
    without V fails too."""
    vmexit = Expect("vmexit", exit_code=SVM_EXIT_VMMCALL)
    obs = good(exit_code=SVM_EXIT_VMMCALL, exit_int_info=0x30)
    assert j.check(LATE, obs, vmexit) == ["EXITINTINFO[31:0] 0x30 != 0x0 after #VMEXIT"]
    due = Expect("vmexit", exit_code=SVM_EXIT_VMMCALL, exit_int_info=1 << 31 | 0x30)
    assert j.check(LATE, dataclasses.replace(obs, exit_int_info=7 << 32 | 1 << 31 | 0x30),
                   due) == []
    assert j.check(LATE, dataclasses.replace(obs, exit_int_info=0), due) == [
        "EXITINTINFO[31:0] 0x0 != 0x80000030 after #VMEXIT"]


# ---- each expectation kind alone ------------------------------------------------

def _case(expect: Expect, scenario: str = INSN) -> Case:
    return Case(id="t", family="t", scenario=scenario, expect=expect, source="test",
                payload="svm_insn")


KINDS = {
    "no_fault": (Expect("no_fault"), o.Observation(outcome=o.SYNC)),
    "shutdown": (Expect("shutdown"), o.Observation(outcome=o.SHUTDOWN)),
    "fail_entry": (Expect("fail_entry"),
                   o.Observation(outcome=o.FAIL_ENTRY, exit_data=[0xFFFF_FFFF])),
    "internal_error": (Expect("internal_error", suberror=1, exit_code=SVM_EXIT_VMRUN),
                       o.Observation(outcome=o.INTERNAL_ERROR,
                                     exit_data=[1, 0, SVM_EXIT_VMRUN, 0, 0, 0, 0])),
    "accepted": (Expect("accepted"), o.Observation(outcome=o.ACCEPTED, guest_mode=True)),
    "exception": (Expect("exception", vector=13, at="insn_vmrun", error_code=0),
                  o.Observation(outcome=o.EXCEPTION, vector=13, error_code=0,
                                rip=load_payload("svm_insn").sym("insn_vmrun"))),
}
OTHER_OUTCOMES = (o.SYNC, o.SHUTDOWN, o.FAIL_ENTRY, o.INTERNAL_ERROR, o.ACCEPTED, o.EINVAL,
                  o.UNEXPECTED_EXIT, o.EXCEPTION)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_kind_passes_its_outcome_and_fails_every_other(kind):
    want, obs = KINDS[kind]
    case = _case(want)
    assert j.check(case, obs, want) == []
    assert j.judge(case, obs).verdict == j.PASS
    for outcome in OTHER_OUTCOMES:
        if outcome == obs.outcome:
            continue
        other = o.Observation(outcome=outcome, detail="d", vector=6, error_code=0, rip=0,
                              guest_mode=True, exit_data=[])
        assert j.judge(case, other).verdict == j.FAIL, (kind, outcome)


FAILING_REASONS = [
    ("shutdown", o.Observation(outcome=o.SYNC, exit_code=0x81, gif=False),
     "no shutdown: exit 0x81 GIF=0"),
    ("fail_entry", o.Observation(outcome=o.SHUTDOWN, detail="triple fault"),
     "no failed entry: shutdown triple fault"),
    ("internal_error", o.Observation(outcome=o.SHUTDOWN),
     "no internal error: shutdown"),
    ("internal_error", o.Observation(outcome=o.INTERNAL_ERROR, exit_data=[3, 0, 0x80]),
     "internal error suberror [3] != 1"),
    ("internal_error", o.Observation(outcome=o.INTERNAL_ERROR, exit_data=[1, 0, 0x7B, 0x80]),
     "internal error while handling exit [123] != 0x80"),
    ("accepted", o.Observation(outcome=o.ACCEPTED, guest_mode=False),
     "accepted but not in guest mode"),
    ("accepted", o.Observation(outcome=o.EINVAL, detail="errno 22"),
     "KVM_SET_NESTED_STATE: errno 22"),
    ("exception", o.Observation(outcome=o.EXCEPTION, vector=13, error_code=0x18,
                                rip=load_payload("svm_insn").sym("insn_vmrun")),
     "error code 0x18 != 0x0"),
    ("no_fault", o.Observation(outcome=o.EXCEPTION, vector=6, error_code=0, rip=0x1000,
                               rip_symbol="insn_vmrun"),
     "exception: vector 6 ec=0x0 at insn_vmrun"),
]


@pytest.mark.parametrize(("kind", "obs", "text"), FAILING_REASONS,
                         ids=[t for _, _, t in FAILING_REASONS])
def test_kind_failure_reason(kind, obs, text):
    case = _case(KINDS[kind][0])
    v = j.judge(case, obs)
    assert (v.verdict, v.reason, v.failures) == (j.FAIL, text, [text])


def test_internal_error_without_details_asks_only_for_the_exit():
    """An expectation without suberror/exit_code accepts any internal error."""
    case = _case(Expect("internal_error"))
    assert j.judge(case, o.Observation(outcome=o.INTERNAL_ERROR, exit_data=[4])).verdict == j.PASS


def test_no_fault_with_an_exit_code_checks_it():
    case = _case(Expect("no_fault", exit_code=SVM_EXIT_VMMCALL))
    assert j.judge(case, o.Observation(outcome=o.SYNC, exit_code=0x81)).verdict == j.PASS
    v = j.judge(case, o.Observation(outcome=o.SYNC, exit_code=SVM_EXIT_ERR))
    assert v.reason == f"EXITCODE {ERR64} != 0x81"


def test_unknown_kind_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown expectation 'vmexit_ok'"):
        j.check(_case(Expect("vmexit_ok")), o.Observation(outcome=o.SYNC), Expect("vmexit_ok"))


def test_refused_nested_state_reasons():
    case = CASES["nested_state/asid0"]
    accepted = good(outcome=o.ACCEPTED, detail="errno 0", guest_mode=True)
    assert reason(accepted, case) == "KVM_SET_NESTED_STATE: errno 0"
    # EINVAL, then L1's own run never reported.
    never = good(outcome=o.EINVAL, detail="errno 22", after_outcome=None)
    assert reason(never, case) == "L1 afterwards: L1 did not resume after VMRUN:  errno 22"
    ok = good(outcome=o.EINVAL, detail="errno 22", exit_code=0x81, after_outcome=o.SYNC)
    assert j.judge(case, ok).verdict == j.PASS
    assert reason(dataclasses.replace(ok, guest_mode=True), case) == (
        "L1 afterwards: still in guest mode after #VMEXIT")


def test_smm_reason_when_the_handler_never_ran():
    case = CASES["smm/asid0"]
    assert case.scenario == SMM
    obs = o.Observation(outcome=o.SHUTDOWN, smm_handler_runs=0, kernel_warnings=[])
    assert reason(obs, case, "7.x") == "profile 7.x: the SMM handler never ran"


# ---- the Verdict on every path through the profiles ---------------------------

def test_contract_only_case_matches_every_profile_or_none():
    assert j.judge(LATE, good()) == j.Verdict(j.PASS, "", j.PROFILES, [])
    assert j.judge(LATE, good(gif=True)).profiles == ()


def test_profiled_case_without_a_chosen_profile():
    """No profile chosen: pass when some profile matches, naming them all."""
    v = j.judge(EVENTINJ_KEPT, good(event_inj=0))
    assert v == j.Verdict(j.PASS, "matches 6.12-stable, 7.x", ("6.12-stable", "7.x"), [])
    injected = EVENTINJ_KEPT.vmcb["event_inj"]
    v = j.judge(EVENTINJ_KEPT, good(event_inj=injected ^ 1))
    first = [f"EVENTINJ {injected ^ 1:#x} != {injected:#x}"]  # legacy, the first profile
    assert v == j.Verdict(j.FAIL, f"matches no known profile: {first[0]}", (), first)


def test_profiled_case_with_a_chosen_profile():
    injected = EVENTINJ_KEPT.vmcb["event_inj"]
    v = j.judge(EVENTINJ_KEPT, good(event_inj=injected), "fixed")
    assert v == j.Verdict(j.PASS, "", ("legacy", "fixed"), [])
    v = j.judge(EVENTINJ_KEPT, good(event_inj=injected), "7.x")
    bad = [f"EVENTINJ {injected:#x} != 0x0"]
    assert v == j.Verdict(j.FAIL, f"profile 7.x: {bad[0]} (matches legacy, fixed)",
                          ("legacy", "fixed"), bad)
    v = j.judge(EVENTINJ_KEPT, good(event_inj=5), "7.x")
    assert v == j.Verdict(j.FAIL, "profile 7.x: EVENTINJ 0x5 != 0x0", (), ["EVENTINJ 0x5 != 0x0"])
    two = ["EXITINFO1 0x1 != 0", "EVENTINJ 0x5 != 0x0"]
    v = j.judge(EVENTINJ_KEPT, good(event_inj=5, exit_info_1=1), "7.x")
    assert v == j.Verdict(j.FAIL, f"profile 7.x: {two[0]}; {two[1]}", (), two)
    v = j.judge(EVENTINJ_KEPT, good(event_inj=5, exit_info_1=1))
    first = ["EXITINFO1 0x1 != 0", f"EVENTINJ 0x5 != {EVENTINJ_KEPT.vmcb['event_inj']:#x}"]
    assert v == j.Verdict(j.FAIL, f"matches no known profile: {first[0]}; {first[1]}", (),
                          first)


def test_known_bug_verdict():
    """A behaviour only a known-broken profile shows fails with that bug as
    the one failure, and still fingerprints the kernel."""
    v = j.judge(ASID0, good(gif=True))
    bug = ASID0.profiles["legacy"].known_bug
    assert v == j.Verdict(j.FAIL, f"known bug (legacy): {bug}", ("legacy",), [bug])
    # With CLGI first the legacy kernels have no bug to show: the case has
    # no profiles and the contract alone decides.
    assert not ASID0_GIF0.profiles
    assert j.judge(ASID0_GIF0, good()) == j.Verdict(j.PASS, "", j.PROFILES, [])


def test_known_bug_of_several_profiles_names_them_and_keeps_one_failure():
    """RSM re-entering L2 with the corrupted VMCB12: legacy and fixed both."""
    case = CASES["smm/asid0"]
    obs = good(exit_code=SVM_EXIT_VMMCALL, exit_int_info=0, smm_handler_runs=1)
    bug = case.profiles["fixed"].known_bug
    assert bug == case.profiles["legacy"].known_bug
    v = j.judge(case, obs)
    assert v == j.Verdict(j.FAIL, f"known bug (legacy, fixed): {bug}", ("legacy", "fixed"), [bug])


# ---- the tables the judge works from, spelled out from the docs ------------------

def test_harness_outcomes_are_errors_and_the_rest_are_verdicts():
    """The harness or the guest broke (README: errors, not a kernel's
    answer): a timeout, a guest assert, an instruction the model cannot
    emulate.  Everything else is judged."""
    for outcome in (o.TIMEOUT, o.GUEST_ASSERT, o.EMULATION_ERROR):
        assert j.judge(LATE, good(outcome=outcome)).verdict == j.ERROR, outcome
    for outcome in (o.UNEXPECTED_EXIT, o.SHUTDOWN, o.INTERNAL_ERROR, o.FAIL_ENTRY, o.EXCEPTION,
                    o.EINVAL, o.ACCEPTED):
        assert j.judge(LATE, good(outcome=outcome, vector=6, error_code=0, rip=0)).verdict == \
            j.FAIL, outcome


@pytest.mark.parametrize("bit", range(32))
def test_int_ctl_write_back_bit_by_bit(bit):
    """INT_CTL after the #VMEXIT: the CPU updates V_TPR (bits 3:0, CR8),
    V_IRQ (bit 8) and V_GIF (bit 9) (APM vol. 2 15.21, 15.33); every other
    bit must read back as L1 wrote it."""
    case = CASES["control/control-write-back[gif1]"]
    want = case.profiles.get("fixed", case.expect)
    wrote = case.vmcb["int_ctl"]
    obs = good(tlb_ctl=case.vmcb["tlb_ctl"], int_ctl=wrote ^ (1 << bit))
    cpu_owned = bit in (0, 1, 2, 3, 8, 9)
    assert (j.check(case, obs, want) == []) is cpu_owned


def test_6_12_stable_behaves_like_fixed_where_a_case_does_not_say():
    """A reserved EVENTINJ TYPE: 6.1 and 6.12 leave it to the CPU (QEMU TCG
    writes VMEXIT_INVALID as 32 bits), 7.x refuses it in software (64 bits);
    the case lists no 6.12-stable expectation, so 6.12 kernels are fixed's."""
    case = CASES["eventinj/type1[gif1]"]
    assert "6.12-stable" not in case.profiles
    assert j.expectation(case, "6.12-stable") == case.profiles["fixed"]
    cpu = j.judge(case, good(exit_code=SVM_EXIT_ERR & 0xFFFF_FFFF))
    assert cpu.profiles == ("legacy", "fixed", "6.12-stable")
    assert j.judge(case, good()).profiles == j.PROFILES
