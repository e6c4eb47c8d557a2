"""Record and replay (kvmtest/record.py) changes no observation on a real
kernel's nested SVM.

The agent runs a case without host actions in C (csrc/record.c) and the host
replays drive() over its trace; ``records=False`` sends every case whole to
the agent's Python drive(), as before.  The whole catalogue runs both ways,
and every observation must agree field by field (the PID in a WARN line
aside: each boot's agent is another process).  Three cells of the CI matrix,
one per configuration, so that the paths npt=0 and vGIF change are covered:
six boots, ~45 s under TCG.
"""

from __future__ import annotations

import pytest
from observations import comparable, differences

from kvmtest import record
from kvmtest.backends.qemu import QemuBackend
from kvmtest.cases import catalogue

pytestmark = pytest.mark.qemu

CELLS = [
    ("debian:linux-image-7.3.4+deb13-amd64@trixie-backports", None, {}),
    ("debian:linux-image-6.1.0-47-amd64-unsigned", None, {"npt": "0"}),
    ("debian:linux-image-6.12.117+deb13-amd64-unsigned@trixie", "EPYC,+vgif", {}),
]


def _observations(kernel: str, cpu: str | None, kvm_amd: dict[str, str],
                  records: bool) -> tuple[dict[str, object], int]:
    """The catalogue's comparable observations, and how many of its cases
    the host replayed from a trace."""
    backend = QemuBackend(kernel, cpu=cpu, kvm_amd_params=kvm_amd, records=records)
    observed = comparable(backend.run_batch(list(catalogue()), 5.0))
    return observed, backend.replayed


@pytest.mark.parametrize("kernel, cpu, kvm_amd", CELLS, ids=["7.3.4", "6.1.170-npt0",
                                                             "6.12.117-vgif"])
def test_recorded_cases_observe_what_the_agents_drive_observes(qemu_available, kernel, cpu,
                                                               kvm_amd):
    recorded, replayed = _observations(kernel, cpu, kvm_amd, True)
    whole, _ = _observations(kernel, cpu, kvm_amd, False)
    assert differences(recorded, whole) == {}
    # Every eligible case the guest ran took the recorded path (the others
    # were skipped in the guest), with every kind of ending.
    ran = [c for c in catalogue() if record.eligible(c) and isinstance(recorded[c.id], dict)]
    assert replayed == len(ran) > 350
    outcomes = {recorded[c.id]["outcome"] for c in ran}  # type: ignore[index]
    assert {"sync", "exception"} <= outcomes
