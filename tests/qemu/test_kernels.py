"""The CI proof on real kernels (DESIGN.md section 3): Debian 6.1.170 keeps
the GIF bug, 6.1.192 has the fix, and the model's profiles agree with both,
case by case.  Each test boots one kernel under QEMU TCG (~45 s)."""

import pytest

from kvmtest import judge as j
from kvmtest.backends.model import ModelBackend
from kvmtest.cases import catalogue
from kvmtest.session import run_cases

pytestmark = pytest.mark.qemu

LEGACY = "debian:linux-image-6.1.0-47-amd64-unsigned"  # 6.1.170
FIXED = "debian:linux-image-6.1.0-56-amd64-unsigned"  # 6.1.192


def model_verdicts(profile: str) -> dict[str, str]:
    results = run_cases(ModelBackend(profile), catalogue(), None)
    return {r.case.id: r.verdict.verdict for r in results}


def legacy_bugs() -> set[str]:
    """The cases a legacy kernel must fail, from the catalogue's data."""
    return {
        c.id for c in catalogue() if c.profiles.get("legacy") and c.profiles["legacy"].known_bug
    }


def test_6_1_170_is_legacy(tmp_path, run_qemu_cli):
    rc, report = run_qemu_cli(tmp_path, "--kernel", LEGACY)
    verdicts = {c["id"]: c["verdict"] for c in report["cases"]}
    failed = {i for i, v in verdicts.items() if v != j.PASS}
    assert rc == 1
    assert report["fingerprint"] == "legacy"
    assert failed == legacy_bugs()
    gif = {c["id"] for c in report["cases"] if "GIF left set" in c["reason"]}
    assert gif and all("[gif1]" in i for i in gif)
    assert verdicts == model_verdicts("legacy")


def test_6_1_192_is_fixed(tmp_path, run_qemu_cli):
    rc, report = run_qemu_cli(tmp_path, "--kernel", FIXED)
    assert (rc, report["fingerprint"]) == (0, "fixed"), [
        (c["id"], c["reason"]) for c in report["cases"] if c["verdict"] != j.PASS
    ]
    assert report["summary"]["passed"] == len(catalogue())
    verdicts = {c["id"]: c["verdict"] for c in report["cases"]}
    assert verdicts == model_verdicts("fixed")
