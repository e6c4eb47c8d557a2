"""Parked vCPUs (KvmMachine.renew) change no observation on a real kernel.

The agent normally gives a case whose vCPU is left dirty, or that wants
another guest CPUID, a fresh vCPU in the same VM.  KVMTEST_PARK_VCPUS=0 makes
it destroy the VM instead, and keep a VM per guest CPUID, as it did before
parking.  On 6.1.192, the whole catalogue is run both ways, and every
observation must agree field by field.  The only exception is the PID in a
WARN line: the agent is a new process each boot.  In the default
configuration and with npt=0: four boots, ~50 s under TCG.
"""

from __future__ import annotations

import pytest
from observations import comparable, differences

from kvmtest.backends.qemu import QemuBackend
from kvmtest.cases import catalogue

pytestmark = pytest.mark.qemu

KERNEL = "debian:linux-image-6.1.0-56-amd64-unsigned"


def _observations(guest_env: dict[str, str] | None,
                  kvm_amd: dict[str, str] | None = None) -> dict[str, object]:
    backend = QemuBackend(KERNEL, guest_env=guest_env, kvm_amd_params=kvm_amd)
    return comparable(backend.run_batch(list(catalogue()), 5.0))


@pytest.mark.parametrize("kvm_amd", [{}, {"npt": "0"}], ids=["default", "npt0"])
def test_parked_vcpus_observe_what_a_vm_per_dirty_case_observes(qemu_available, kvm_amd):
    """With npt=0 too: L1 runs on shadow pages, which KVM shares between the
    vCPUs of a VM by mmu_page_role, and the role does not track the guest
    CPUID (the comment in arch/x86/kvm/cpuid.c kvm_set_cpuid()): the vCPUs
    of other CPUIDs that parking puts in one VM must not change what a case
    observes."""
    parked = _observations(None, kvm_amd)
    unparked = _observations({"KVMTEST_PARK_VCPUS": "0"}, kvm_amd)
    assert differences(parked, unparked) == {}
    # The comparison had dirty vCPUs to park: nested_state and SMM cases.
    assert any(case_id.startswith("nested_state/") for case_id in parked)
