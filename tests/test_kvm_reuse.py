"""A reused vCPU gives the same observations as a fresh VM per case (the kvm
backend resets VM memory and vCPU state between cases)."""

import dataclasses
import os

import pytest

from kvmtest.backends.kvm import KvmBackend, KvmMachine, guest_cpuid
from kvmtest.case import NEED_NO_SVM
from kvmtest.cases import catalogue
from kvmtest.cpuid_features import FEATURES
from kvmtest.kvm import Vcpu, ffi
from kvmtest.kvm.cpuid import pack_cpuid2
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


def _spin():
    return dataclasses.replace(catalogue()[0], id="spin", payload="spin")


def test_a_timed_out_vcpu_is_parked_and_the_vm_serves_on_a_fresh_one(real_kvm):
    """A vCPU reset cannot vouch for (stopped mid-run) is not reused: the next
    case gets a fresh vCPU in the same VM and observes what a fresh VM does."""
    backend = KvmBackend(reuse=True)
    fresh = KvmBackend(reuse=False)
    try:
        assert run_case(backend, _spin(), timeout=0.2).outcome == "timeout"
        (m,) = backend._pool.values()
        vm, vcpu = m.vm, m.vcpu
        assert not m.reusable and m.renewable
        ok = run_case(backend, catalogue()[0])
        assert ok.outcome == "exception" and ok.vector == 6
        assert m.vm is vm and m.vcpu is not vcpu and m.vcpu.id == 1 and m.vm.nr_vcpus == 2
        after = dataclasses.asdict(ok)
        expected = dataclasses.asdict(run_case(fresh, catalogue()[0]))
        after.pop("exits"), expected.pop("exits")
        assert after == expected
    finally:
        backend.close()
        fresh.close()


def test_without_parking_a_dirty_vcpu_takes_its_vm_along(real_kvm):
    backend = KvmBackend(reuse=True, park=False)
    try:
        assert run_case(backend, _spin(), timeout=0.2).outcome == "timeout"
        assert not backend._pool
        ok = run_case(backend, catalogue()[0])
        assert ok.outcome == "exception" and ok.vector == 6
        assert backend._pool
    finally:
        backend.close()


def test_a_vm_with_max_vcpus_is_replaced(real_kvm, monkeypatch):
    monkeypatch.setattr(KvmMachine, "MAX_VCPUS", 2)
    backend = KvmBackend(reuse=True)
    try:
        run_case(backend, _spin(), timeout=0.2)
        (m,) = backend._pool.values()
        run_case(backend, _spin(), timeout=0.2)  # on vCPU 1: the VM is full
        assert not m.renewable and not backend._pool
        ok = run_case(backend, catalogue()[0])
        assert ok.outcome == "exception" and ok.vector == 6
        (m2,) = backend._pool.values()
        assert m2 is not m and m2.vcpu.id == 0
    finally:
        backend.close()


def test_a_case_with_an_extra_memslot_leaves_no_vm_behind(real_kvm):
    """Memslots are VM state: neither reset nor a fresh vCPU undoes them."""
    backend = KvmBackend(reuse=True)
    try:
        case = dataclasses.replace(catalogue()[0], extra_memory={0x2000_0000: 0x1000})
        obs = run_case(backend, case)
        assert obs.outcome == "exception" and obs.vector == 6
        assert not backend._pool
    finally:
        backend.close()


def _cpuid_cases():
    """catalogue()[0] as it is, then with two guest CPUID features off."""
    return [catalogue()[0]] + [dataclasses.replace(catalogue()[0], id=f"cpuid-{name}",
                                                   cpuid={name: False})
                               for name in sorted(FEATURES)[:2]]


def test_another_guest_cpuid_gets_a_fresh_vcpu_in_the_same_vm(real_kvm, monkeypatch):
    """KVM refuses a different KVM_SET_CPUID2 once a vCPU ran: a case with
    other CPUID overrides runs on a new vCPU of the pooled VM, given exactly
    its guest CPUID, and observes what a fresh VM does.  (The CPUID is
    recorded on its way to KVM_SET_CPUID2: kvm_pvm's KVM_GET_CPUID2 does not
    return what was set.)"""
    given: dict[int, bytes] = {}
    real_set = Vcpu.set_cpuid2

    def recording_set(vcpu, cpuid):
        given[vcpu.id] = bytes(ffi.buffer(cpuid))
        return real_set(vcpu, cpuid)

    monkeypatch.setattr(Vcpu, "set_cpuid2", recording_set)
    backend = KvmBackend(reuse=True)
    fresh = KvmBackend(reuse=False)
    try:
        cases = _cpuid_cases()
        for i, case in enumerate(cases + cases[:1]):
            obs = dataclasses.asdict(run_case(backend, case))
            (m,) = backend._pool.values()
            assert m.vm.nr_vcpus == i + 1 and m.vcpu.id == i
            overrides = tuple(sorted(case.cpuid.items()))
            want = pack_cpuid2(guest_cpuid(backend.supported, False, overrides))
            assert given[i] == bytes(ffi.buffer(want))
            expected = dataclasses.asdict(run_case(fresh, case))
            obs.pop("exits"), expected.pop("exits")
            assert obs == expected
        # The same CPUID again: the vCPU is reset, not replaced.
        run_case(backend, cases[0])
        assert backend._pool[()].vm.nr_vcpus == len(cases) + 1
    finally:
        backend.close()
        fresh.close()


def test_close_destroys_every_pooled_vm_and_releases_its_fds(real_kvm):
    """close() destroys the pool's VMs side by side (they share the RCU grace
    period each destruction waits for): every fd and mapping is released."""
    before = set(os.listdir("/proc/self/fd"))
    backend = KvmBackend(reuse=True, park=False)  # without parking: a VM per guest CPUID
    for case in _cpuid_cases():
        assert run_case(backend, case).outcome == "exception"
    assert len(backend._pool) == 3
    machines = list(backend._pool.values())
    backend.close()
    assert not backend._pool
    assert all(m.vm.closed for m in machines)
    assert set(os.listdir("/proc/self/fd")) == before
