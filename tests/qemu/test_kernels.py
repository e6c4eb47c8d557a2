"""The CI proof on real kernels (README.md, profiles): Debian 6.1.170 keeps
the GIF bug, 6.1.192 has the fix, and the model's profiles agree with both,
case by case.  Each test boots one kernel under QEMU TCG (~15 s).

Measured, and encoded in the catalogue as known bugs: neither 6.1 kernel has
be5fa8737d42 (consistency checks in svm_leave_smm, in 6.12.88), so both
re-enter L2 with a VMCB12 an SMM handler corrupted; 6.1.192 therefore fails
exactly its SMM cases."""

import pytest

from kvmtest import judge as j
from kvmtest.backends.model import ModelBackend
from kvmtest.cases import catalogue
from kvmtest.session import run_cases

pytestmark = pytest.mark.qemu

LEGACY = "debian:linux-image-6.1.0-47-amd64-unsigned"  # 6.1.170
FIXED = "debian:linux-image-6.1.0-56-amd64-unsigned"  # 6.1.192
STABLE_612 = "debian:linux-image-6.12.95+deb12-amd64-unsigned@bookworm-backports"


def model_verdicts(profile: str) -> dict[str, str]:
    """The model's verdicts, where it runs the case (it has no SMM)."""
    results = run_cases(ModelBackend(profile), catalogue(), None)
    return {r.case.id: r.verdict.verdict for r in results if r.verdict.verdict != j.SKIP}


def known_bugs(profile: str) -> set[str]:
    """The cases a kernel of this profile must fail, from the catalogue's data."""
    return {c.id for c in catalogue() if c.profiles and j.expectation(c, profile).known_bug}


def check_kernel(report: dict, profile: str) -> None:
    verdicts = {c["id"]: c["verdict"] for c in report["cases"]}
    failed = {i for i, v in verdicts.items() if v != j.PASS}
    assert failed == known_bugs(profile), [
        (c["id"], c["reason"]) for c in report["cases"] if c["id"] in failed ^ known_bugs(profile)]
    assert profile in report["fingerprint"].split(" or ")
    model = model_verdicts(profile)
    assert {i: verdicts[i] for i in model} == model


def test_6_1_170_is_legacy(tmp_path, run_qemu_cli):
    rc, report = run_qemu_cli(tmp_path, "--kernel", LEGACY)
    assert rc == 1
    check_kernel(report, "legacy")
    gif = {c["id"] for c in report["cases"] if "GIF left set" in c["reason"]}
    assert gif and all("[gif1]" in i for i in gif)


def test_6_1_192_is_fixed(tmp_path, run_qemu_cli):
    rc, report = run_qemu_cli(tmp_path, "--kernel", FIXED)
    check_kernel(report, "fixed")
    # Only SMM known bugs fail: every VMRUN failure keeps the contract.
    assert all(i.startswith("smm/") for i in known_bugs("fixed"))
    assert rc == (1 if known_bugs("fixed") else 0)


def test_6_12_95_is_6_12_stable(tmp_path, run_qemu_cli):
    """Backports' 6.12: be5fa8737d42 refuses the RSM; only the CR4.MCE leak
    after an SMI in L2 (in every kernel measured) still fails."""
    rc, report = run_qemu_cli(tmp_path, "--kernel", STABLE_612)
    assert report["fingerprint"] == "6.12-stable"
    check_kernel(report, "6.12-stable")
    assert known_bugs("6.12-stable") == {"smm/l1-cr4-kept"} and rc == 1
