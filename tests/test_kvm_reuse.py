"""A reused vCPU gives the same observations as a fresh VM per case (the kvm
backend resets VM memory and vCPU state between cases)."""

import dataclasses

import pytest

from kvmtest.backends.kvm import KvmBackend
from kvmtest.case import NEED_NO_SVM
from kvmtest.cases import catalogue
from kvmtest.runner import run_case

pytestmark = pytest.mark.kvm


def observations(backend) -> list[dict]:
    cases = [c for c in catalogue() if NEED_NO_SVM in c.needs]
    # Twice round, interleaving payloads, so every case also runs after others.
    out = []
    for case in cases + cases[::-1]:
        obs = dataclasses.asdict(run_case(backend, case))
        obs.pop("exits")
        out.append(obs)
    return out


def test_reused_vcpu_observes_like_a_fresh_vm(real_kvm):
    fresh = KvmBackend(reuse=False)
    reused = KvmBackend(reuse=True)
    try:
        assert observations(reused) == observations(fresh)
        assert reused._pool, "the reusing backend kept its machine"
    finally:
        fresh.close()
        reused.close()


def test_a_timed_out_vcpu_is_not_reused(real_kvm):
    backend = KvmBackend(reuse=True)
    try:
        spin = dataclasses.replace(catalogue()[0], id="spin", payload="spin")
        assert run_case(backend, spin, timeout=0.2).outcome == "timeout"
        assert not backend._pool
        ok = run_case(backend, catalogue()[0])
        assert ok.outcome == "exception" and ok.vector == 6
    finally:
        backend.close()
