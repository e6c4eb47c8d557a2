"""The oracles on observations from the model (real Unicorn runs) and on
hand-made observations where no backend here produces the case (a kernel
WARN)."""

from __future__ import annotations

import pytest

from kvmtest.fuzz import oracles
from kvmtest.fuzz.campaign import judge
from kvmtest.fuzz.runners import ModelRunner, RunResult
from kvmtest.fuzz.spec import parse
from kvmtest.observation import Observation

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def models():
    m = {p: ModelRunner(p) for p in ("legacy", "fixed", "7.x")}
    yield m
    for r in m.values():
        r.close()


def signals(models, spec: str, kernel: str, against: str | None = None):
    s = parse(spec)
    results = {"kernel": models[kernel].run_one(s)}
    if against:
        results["against"] = models[against].run_one(s)
    return {sig.key for sig in judge(s, results)}


def test_the_default_scenario_raises_nothing(models):
    for p in models:
        assert signals(models, "gif1", p, "7.x") == set()


def test_gif_left_set_breaks_the_contract_and_differs(models):
    got = signals(models, "gif1 vmcb:asid=0x0", "legacy", "fixed")
    assert ("contract", "GIF=# after #VMEXIT") in got
    assert ("against", "gif=1|0") in got
    assert signals(models, "gif0 vmcb:asid=0x0", "legacy", "fixed") == set()


def test_an_illegal_vmcb12_that_runs_l2_breaks_the_contract(models):
    spec = "gif1 vmcb:nested_cr3=0x10000000000,nested_ctl=0x1"
    got = signals(models, spec, "legacy", "fixed")
    assert ("contract", "VMRUN accepted a VMCB12 failing ncr3-illegal") in got
    assert any(o == "against" and "exit_code=0x7f|ERR" in sig for o, sig in got)
    assert signals(models, spec, "fixed") == set()


def test_l2s_own_exception_is_not_l1s(models):
    # L2 runs UD2 with #UD not intercepted: L2 takes it through the shared
    # IDT; L1 never resumed, and that is not a contract breach.
    s = parse("gif1 l2=l2_ud")
    obs = models["fixed"].run_one(s).observation
    assert obs.outcome == "exception" and obs.rip_symbol == "l2_ud"
    assert oracles.contract(s, s.to_case(), obs) == []


def test_l1_fault_rules_from_the_apm(models):
    got = signals(models, "gif0 l1:svme=0", "fixed")
    assert got == set()  # #UD at CLGI: as the APM says
    s = parse("gif1 l1:rax=0x9010")
    obs = models["fixed"].run_one(s).observation
    assert oracles.contract(s, s.to_case(), obs) == []
    # The same #GP where the APM wants VMRUN to run is a breach.
    bad = parse("gif1")
    sig = oracles.contract(bad, bad.to_case(), obs)
    assert sig and "where VMRUN had to run" in sig[0].signature


def test_a_leaked_cr4_bit_breaks_the_contract(models):
    # L1 without CR4.MCE: KVM's hardware CR4 has it, and the SMI in L2 hands
    # it to L1 (every profile: measured on every kernel).  By default L1 sets
    # it itself, and nothing leaks.
    for p in models:
        got = signals(models, "smm gif1 l1:cr4_xor=0x0", p)
        assert ("contract", "L1 CR4 # != # before VMRUN") in got
        assert signals(models, "smm gif1", p) == set()


def test_rsm_into_an_invalid_vmcb12(models):
    got = signals(models, "smm gif1 smm:asid=0x0", "fixed", "7.x")
    assert ("contract", "RSM did not refuse a VMCB12 failing asid=#") in got
    assert ("against", "outcome=sync|shutdown") in got


def test_differential_signature_names_fields_and_categorical_values():
    a = Observation(outcome="sync", exit_code=0x7F, exit_info_1=1, gif=False)
    b = Observation(outcome="sync", exit_code=2**64 - 1, exit_info_1=0, gif=False)
    sig = oracles.differential("model", a, b)
    assert sig.signature == "exit_code=0x7f|ERR exit_info_1"
    assert oracles.differential("model", a, a) is None
    c = Observation(outcome="timeout")
    assert oracles.differential("model", a, c).signature == "outcome=sync|timeout"
    assert oracles.differential("model", a, Observation(outcome="emulation_error")) is None


def test_a_model_that_ran_out_of_time_has_no_verdict(models):
    s = parse("gif1")
    k = models["fixed"].run_one(s)
    slow = RunResult(observation=Observation(outcome="timeout"))
    assert judge(s, {"kernel": k, "model": slow}, frozenset({"model"})) == []
    assert judge(s, {"kernel": k, "against": slow})[0].signature == "outcome=sync|timeout"


def test_kernel_warnings_and_crashes():
    """Hand-made: no backend here produces a kernel WARN (the model has no
    kernel log; this host's KVM has no SVM)."""
    line = ("WARNING: CPU: 0 PID: 104 at arch/x86/kvm/svm/nested.c:940 "
            "nested_svm_vmexit+0x6d7/0x710 [kvm_amd]")
    obs = Observation(outcome="sync", exit_code=0x7F, gif=False, kernel_warnings=[line])
    (sig,) = oracles.warnings("kernel", obs)
    assert sig.signature == "WARNING: at arch/x86/kvm/svm/nested.c:940 nested_svm_vmexit"
    s = parse("gif1")
    keys = {x.oracle for x in judge(s, {"kernel": RunResult(observation=obs)})}
    assert "warn:kernel" in keys
    crash = judge(s, {"kernel": RunResult(crash="Kernel panic - not syncing: Fatal exception")})
    assert [x.oracle for x in crash] == ["crash:kernel"]
