"""Parked vCPUs (KvmMachine.renew) change no observation on a real kernel.

The agent normally gives a case whose vCPU is left dirty a fresh vCPU in the
same VM.  KVMTEST_PARK_VCPUS=0 makes it destroy the VM instead, as it did
before parking.  On 6.1.192, the whole catalogue is run both ways, and every
observation must agree field by field.  The only exception is the PID in a
WARN line: the agent is a new process each boot.  Two boots, ~25 s under TCG.
"""

from __future__ import annotations

import dataclasses
import re

import pytest

from kvmtest.backends.qemu import QemuBackend
from kvmtest.cases import catalogue

pytestmark = pytest.mark.qemu

KERNEL = "debian:linux-image-6.1.0-56-amd64-unsigned"
PID = re.compile(r"PID: \d+")


def _observations(guest_env: dict[str, str] | None) -> dict[str, object]:
    backend = QemuBackend(KERNEL, guest_env=guest_env)
    out = backend.run_batch(list(catalogue()), 5.0)
    result = {}
    for case_id, obs in out.items():
        if isinstance(obs, str):  # a skip reason
            result[case_id] = obs
            continue
        data = dataclasses.asdict(obs)
        data["kernel_warnings"] = [PID.sub("PID: -", w) for w in data["kernel_warnings"] or []]
        result[case_id] = data
    return result


def test_parked_vcpus_observe_what_a_vm_per_dirty_case_observes(qemu_available):
    parked = _observations(None)
    unparked = _observations({"KVMTEST_PARK_VCPUS": "0"})
    assert parked.keys() == unparked.keys()
    differ = {case_id: [field for field in obs if obs[field] != unparked[case_id][field]]
              if isinstance(obs, dict) else obs
              for case_id, obs in parked.items() if obs != unparked[case_id]}
    assert differ == {}
    # The comparison had dirty vCPUs to park: nested_state and SMM cases.
    assert any(case_id.startswith("nested_state/") for case_id in parked)
