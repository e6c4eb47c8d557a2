"""Parity: payloads that run on this host's real /dev/kvm without SVM give
the same observations on the model configured without SVM."""

import dataclasses

import pytest

from kvmtest.backends.model import ModelBackend
from kvmtest.case import NEED_NO_SVM, Case
from kvmtest.cases import catalogue
from kvmtest.runner import run_case

pytestmark = pytest.mark.kvm
NO_SVM = [c for c in catalogue() if NEED_NO_SVM in c.needs]
# What the payload observes must be equal.  Not the nested-state view: it is
# the host's (this host's KVM has no KVM_GET_NESTED_STATE at all, the model
# answers like a nested-capable kvm_amd), nor the exit trail or kernel log.
FIELDS = ("outcome", "vector", "error_code", "rip", "rip_symbol", "l1", "exit_code")


@pytest.fixture(scope="module")
def model():
    return ModelBackend("7.x")


def observe(backend, case: Case) -> dict:
    obs = run_case(backend, case)
    return {f: getattr(obs, f) for f in FIELDS}


@pytest.mark.parametrize("case", NO_SVM, ids=lambda c: c.id)
def test_no_svm_case_parity(case, real_kvm, model):
    assert observe(real_kvm["backend"], case) == observe(model, case)


def test_timeout_parity(real_kvm, model):
    """A payload that never reports times out on both."""
    spin = dataclasses.replace(NO_SVM[0], id="spin", payload="spin")
    for backend in (real_kvm["backend"], model):
        assert run_case(backend, spin, timeout=0.3).outcome == "timeout"
