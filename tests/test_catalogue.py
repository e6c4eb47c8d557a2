"""The failed-VMRUN catalogue as pytest tests (parametrized by the plugin).

Same verdicts as `kvmtest run`: the test fails exactly when the judge says
fail or error.
"""

from kvmtest import judge
from kvmtest.runner import run_case


def test_case(kvm_case, kvm_backend, kvm_profile):
    obs = run_case(kvm_backend, kvm_case)
    v = judge.judge(kvm_case, obs, kvm_profile)
    assert v.verdict == judge.PASS, f"{v.verdict}: {v.reason} (observed {obs.describe()})"
