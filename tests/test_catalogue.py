"""The failed-VMRUN catalogue as pytest tests (parametrized by the plugin).

Same verdicts as `kvmtest run`: the test fails exactly when the judge says
fail or error.  One exception, on the model only: a case that reproduces a
kernel's known bug (every profile has some: the SMM state leaks of
docs/findings.md) is an expected failure there -- the model doing its job;
the same verdict on a real kernel fails.
"""

import pytest

from kvmtest import judge
from kvmtest.runner import run_case


def test_case(kvm_case, kvm_backend, kvm_profile):
    obs = run_case(kvm_backend, kvm_case)
    v = judge.judge(kvm_case, obs, kvm_profile)
    if (v.verdict == judge.FAIL and kvm_backend.name == "model"
            and v.reason.startswith("known bug (")):
        pytest.xfail(v.reason)
    assert v.verdict == judge.PASS, f"{v.verdict}: {v.reason} (observed {obs.describe()})"
