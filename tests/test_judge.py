"""The judge on hand-made observations: a pure function, so no backend is
needed (nor mocked): each test builds the observation a kernel would give."""

import dataclasses

from kvmtest import judge as j
from kvmtest import observation as o
from kvmtest import params
from kvmtest.cases import by_id
from kvmtest.vmcb import POISON, SVM_EXIT_ERR

CASES = by_id()
CC = CASES["control/asid0[gif1]"]
OBSERVATION_CASE = CASES["control/eventinj-after-invalid[gif0]"]
L1 = {"stage": params.STAGE_AFTER_VMRUN, "rsp": 0x1FFF8, "cr0": 0x80050033, "cr3": 0x4000,
      "cr4": 0x620, "efer": 0x1500, "rflags": 2, "rax": 0x9000}
L1 |= {f"pre_{k}": L1[k] for k in ("rsp", "cr0", "cr3", "cr4", "efer", "rflags", "rax")}


def invalid(**kw) -> o.Observation:
    base = o.Observation(outcome=o.SYNC, exit_code=SVM_EXIT_ERR, exit_info_1=0, exit_info_2=0,
                         exit_int_info=0, event_inj=0, gif=False, guest_mode=False,
                         l1=dict(L1), kernel_warnings=[])
    return dataclasses.replace(base, **kw)


def test_contract_holds():
    v = j.judge(CC, invalid())
    assert (v.verdict, v.failures) == (j.PASS, [])


def test_gif_left_set_fails_and_points_at_legacy():
    v = j.judge(CC, invalid(gif=True))
    assert v.verdict == j.FAIL and "GIF left set" in v.reason
    assert v.profiles == ("legacy",)
    assert j.fingerprint([v]) == "legacy"
    # With CLGI first, GIF=0 either way: nothing tells legacy apart.
    v0 = j.judge(CASES["control/asid0[gif0]"], invalid())
    assert v0.verdict == j.PASS and v0.profiles == j.PROFILES
    assert j.judge(CASES["control/asid0[gif0]"], invalid(gif=True)).verdict == j.FAIL


def test_missing_exit_code_write_is_caught():
    v = j.judge(CC, invalid(exit_code=POISON))
    assert v.verdict == j.FAIL and "EXITCODE" in v.reason


def test_exit_info_must_be_zero():
    assert j.judge(CC, invalid(exit_info_2=POISON)).verdict == j.FAIL


def test_l1_state_must_survive():
    l1 = dict(L1, cr3=0x5000)
    v = j.judge(CC, invalid(l1=l1))
    assert v.verdict == j.FAIL and "CR3" in v.reason


def test_unwritten_result_block_fails():
    l1 = {k: params.RESULT_POISON for k in L1}
    assert j.judge(CC, invalid(l1=l1)).verdict == j.FAIL


def test_kernel_warning_fails():
    v = j.judge(CC, invalid(kernel_warnings=["WARNING: CPU: 0 PID: 1 at nested.c:42"]))
    assert v.verdict == j.FAIL and "kernel log" in v.reason


def test_harness_trouble_is_an_error_not_a_verdict():
    v = j.judge(CC, o.Observation(outcome=o.TIMEOUT, detail="no report within 5 s"))
    assert v.verdict == j.ERROR


def test_profile_dependent_case():
    ud = OBSERVATION_CASE.vmcb["event_inj"]
    kept, cleared = invalid(event_inj=ud), invalid(event_inj=0)
    assert j.judge(OBSERVATION_CASE, kept).profiles == ("legacy", "fixed")
    assert j.judge(OBSERVATION_CASE, cleared).profiles == ("6.12-stable", "7.x")
    assert j.judge(OBSERVATION_CASE, kept, "7.x").verdict == j.FAIL
    assert j.judge(OBSERVATION_CASE, kept, "fixed").verdict == j.PASS
    assert j.judge(OBSERVATION_CASE, invalid(event_inj=POISON)).verdict == j.FAIL


def test_fingerprint_fixed_vs_upstream():
    a = j.judge(CC, invalid())
    b = j.judge(OBSERVATION_CASE, invalid(event_inj=OBSERVATION_CASE.vmcb["event_inj"]))
    assert j.fingerprint([a, b]) == "fixed"
    assert j.fingerprint([a]) == "fixed or 6.12-stable or 7.x"  # only legacy ruled out


def test_exception_case_checks_vector_and_rip():
    case = CASES["insn/nosvm-vmrun"]
    from kvmtest.payloads import load_payload

    rip = load_payload("svm_insn").sym("insn_vmrun")
    good = o.Observation(outcome=o.EXCEPTION, vector=6, error_code=0, rip=rip)
    assert j.judge(case, good).verdict == j.PASS
    assert j.judge(case, dataclasses.replace(good, vector=13)).verdict == j.FAIL
    assert j.judge(case, dataclasses.replace(good, rip=rip + 3)).verdict == j.FAIL
    assert j.judge(case, o.Observation(outcome=o.SYNC)).verdict == j.FAIL


def test_refused_nested_state_needs_l1_to_vmrun_afterwards():
    case = CASES["nested_state/asid0"]
    ok = invalid(outcome=o.EINVAL, detail="errno 22", exit_code=0x81, after_outcome=o.SYNC)
    assert j.judge(case, ok).verdict == j.PASS
    # EINVAL, but L1's VMRUN afterwards fails (or never reports): not a pass.
    assert j.judge(case, dataclasses.replace(ok, exit_code=SVM_EXIT_ERR)).verdict == j.FAIL
    assert j.judge(case, dataclasses.replace(ok, after_outcome=o.TIMEOUT)).verdict == j.FAIL
    assert j.judge(case, dataclasses.replace(ok, gif=True)).verdict == j.FAIL


def test_smm_answer_counts_only_if_smm_was_reached():
    case = CASES["smm/asid0"]
    refused = o.Observation(outcome=o.SHUTDOWN, smm_handler_runs=1, kernel_warnings=[])
    assert j.judge(case, refused, "7.x").verdict == j.PASS
    never = dataclasses.replace(refused, smm_handler_runs=0)
    assert j.judge(case, never, "7.x").verdict == j.FAIL


def test_vmrun_ok_needs_the_l2_exit():
    case = CASES["insn/vmrun-ok"]
    assert j.judge(case, o.Observation(outcome=o.SYNC, exit_code=0x81)).verdict == j.PASS
    assert j.judge(case, o.Observation(outcome=o.SYNC, exit_code=SVM_EXIT_ERR)).verdict == j.FAIL
