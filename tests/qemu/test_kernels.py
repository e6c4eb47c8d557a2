"""The CI proof on real kernels: five Debian kernels booted under QEMU TCG,
each in the default configuration (the whole catalogue; npt=0 and vGIF in
tests/qemu/test_configs.py).  One boot per kernel and configuration.  For
each:

- the exit code and fingerprint are the measured profile's
  (kvmtest.model.profiles: each profile names the kernels behind it);
- every failure is a known bug of that profile, and docs/findings.md lists
  the case under a "Cases:" line;
- the model's profile for that kernel, under the same kvm_amd parameters,
  agrees with the kernel observation by observation, field by field
  (kvmtest.parity): outcome, EXITCODE/EXITINFO1/2, EXITINTINFO, EVENTINJ,
  GIF, guest mode, L1's registers, exception vector/RIP/error code, KVM's
  exit data.  The only differences allowed are the documented ones of
  tests/data/parity_differences.toml, and each of those must still occur;
- the SMM cases really took the SMI in L2 and ran the handler once.

About 10 s per boot under TCG on 2 cores.  The npt=0 and vGIF boots are
tests/qemu/test_configs.py's, with the same checks (check_tier_run).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvmtest import judge as j
from kvmtest import parity
from kvmtest.backends.model import ModelBackend
from kvmtest.case import SMM
from kvmtest.cases import catalogue
from kvmtest.model.profiles import PROFILES, get_profile
from kvmtest.observation import Observation
from kvmtest.runner import run_case

ROOT = Path(__file__).resolve().parents[2]
DIFFERENCES = ROOT / "tests" / "data" / "parity_differences.toml"
FINDINGS = ROOT / "docs" / "findings.md"


@dataclass(frozen=True)
class Kernel:
    name: str  # the name parity_differences.toml uses
    spec: str
    profile: str


KERNELS = (
    Kernel("6.1.170", "debian:linux-image-6.1.0-47-amd64-unsigned", "legacy"),
    Kernel("6.1.192", "debian:linux-image-6.1.0-56-amd64-unsigned", "fixed"),
    Kernel("6.12.95", "debian:linux-image-6.12.95+deb12-amd64-unsigned@bookworm-backports",
           "6.12-stable"),
    Kernel("6.12.117", "debian:linux-image-6.12.117+deb13-amd64-unsigned@trixie", "6.12-stable"),
    Kernel("7.3.4", "debian:linux-image-7.3.4+deb13-amd64@trixie-backports", "7.x"),
)
# name -> (kvmtest run arguments, the kvm_amd parameters the model takes).
# This file boots the default configuration; tests/qemu/test_configs.py
# boots the others (the whole catalogue each) through check_tier_run().
CONFIGS = {
    "default": ((), {}),
    "npt0": (("--kvm-amd-param", "npt=0"), {"npt": "0"}),
    "vgif": (("--cpu", "EPYC,+vgif"), {"vgif": "1"}),
}


def documented_differences() -> list[dict]:
    return tomllib.loads(DIFFERENCES.read_text())["difference"]


def finding_patterns() -> list[str]:
    """The case-id globs docs/findings.md lists on its "Cases:" lines."""
    lines = [ln.strip() for ln in FINDINGS.read_text().splitlines()
             if ln.strip().startswith("Cases:")]
    return [p for ln in lines for p in re.findall(r"`([^`]+)`", ln)]


def matches(case_id: str, pattern: str) -> bool:
    """A case id against a pattern where only * is special (ids hold [ and ])."""
    return re.fullmatch(".*".join(map(re.escape, pattern.split("*"))), case_id) is not None


def documented_in_findings(case_id: str, patterns: list[str]) -> bool:
    return any(matches(case_id, p) for p in patterns)


def model_observations(profile: str, kvm_amd: dict[str, str],
                       ids: list[str]) -> dict[str, Observation]:
    by_id = {c.id: c for c in catalogue()}
    backend = ModelBackend(profile, kvm_amd_params=kvm_amd)
    try:
        return {i: run_case(backend, by_id[i]) for i in ids}
    finally:
        backend.close()


def smm_mechanics_problems(report: dict) -> list[str]:
    """What parity cannot see in the SMM cases (kvmtest.smm's detail): the SMI
    was taken in guest mode, the handler ran exactly once, and the state-save
    area held what svm_enter_smm() writes -- unless the case's handler
    rewrote that field itself."""
    by_id = {c.id: c for c in catalogue()}
    bad = []
    for c in report["cases"]:
        case = by_id[c["id"]]
        if c["verdict"] == j.SKIP or case.scenario != SMM:
            continue
        detail = c["observed"].get("detail", "")
        want = ["SMI in guest mode=1", "SMM handler ran 1x"]
        if not any(n.startswith("smram.") for n in case.smm_vmcb):
            want.append("svm_guest=1 vmcb12=0x9000")
        bad += [f"{c['id']}: no {w!r} in {detail!r}" for w in want if w not in detail]
    return bad


def unexplained_differences(report: dict, model: dict[str, Observation], kernel: str,
                            config: str) -> tuple[list[str], list[str]]:
    """(differences no entry explains, entries that did not occur)."""
    entries = [d for d in documented_differences()
               if kernel in d["kernels"] and config in d["configs"]]
    used: set[int] = set()
    left = []
    for c in report["cases"]:
        if c["verdict"] == j.SKIP:
            continue
        for d in parity.diff(Observation(**c["observed"]), model[c["id"]]):
            match = [n for n, e in enumerate(entries)
                     if matches(c["id"], e["cases"]) and e["field"] == d.field
                     and (e["kernel"], e["model"]) == (d.left, d.right)]
            if match:
                used.update(match)
            else:
                left.append(f"{c['id']}: {d.describe()} (kernel != model)")
    stale = [f"{e['cases']} {e['field']}" for n, e in enumerate(entries) if n not in used]
    return left, stale


@pytest.mark.qemu
@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.name)
def test_kernel_matches_its_profile(kernel: Kernel, tmp_path, run_qemu_cli):
    check_tier_run(kernel, "default", tmp_path, run_qemu_cli)


def check_tier_run(kernel: Kernel, config: str, tmp_path, run_qemu_cli) -> dict:
    """Boot kernel in config, run the catalogue and check it (see the module
    docstring); returns the report."""
    args, kvm_amd = CONFIGS[config]
    rc, report = run_qemu_cli(tmp_path, "--kernel", kernel.spec, *args)
    ran = [c for c in report["cases"] if c["verdict"] != j.SKIP]
    assert ran, report["notes"]

    # The fingerprint: the profile itself (a selection that cannot tell two
    # profiles apart names both).
    assert kernel.profile in report["fingerprint"].split(" or "), report["fingerprint"]
    if config == "default":
        assert report["fingerprint"] == kernel.profile

    # Failures: exactly the profile's known bugs, each one in docs/findings.md.
    by_id = {c.id: c for c in catalogue()}
    failed = {c["id"] for c in ran if c["verdict"] != j.PASS}
    bugs = {c["id"] for c in ran
            if by_id[c["id"]].profiles
            and j.expectation(by_id[c["id"]], kernel.profile).known_bug}
    # A race in the kernel no case can steer: a known-bug alternative that
    # fails the case only when it shows (cases/eventinj.py, reserved TYPEs).
    racy = {c["id"] for c in ran if by_id[c["id"]].profiles and any(
        a.known_bug for a in j.expectation(by_id[c["id"]], kernel.profile).alternatives)}
    assert bugs <= failed <= bugs | racy, [
        (c["id"], c["reason"]) for c in ran if c["id"] in failed ^ bugs and c["id"] not in racy]
    patterns = finding_patterns()
    assert [i for i in sorted(failed) if not documented_in_findings(i, patterns)] == []
    assert rc == (1 if failed or report["kernel_warnings_outside_cases"] else 0)

    assert smm_mechanics_problems(report) == []

    # The model's profile, observation by observation (but where the kernel
    # lost a race the model does not run).
    lost = failed & racy
    compared = {**report, "cases": [c for c in report["cases"] if c["id"] not in lost]}
    model = model_observations(kernel.profile, kvm_amd,
                               [c["id"] for c in ran if c["id"] not in lost])
    left, stale = unexplained_differences(compared, model, kernel.name, config)
    assert left == [], "\n".join(left)
    assert stale == [], f"documented differences that no longer occur: {stale}"
    return report


# The data the tier relies on, checked without booting anything.

def test_documented_differences_are_well_formed():
    names = {k.name for k in KERNELS}
    for d in documented_differences():
        assert set(d) == {"cases", "field", "kernel", "model", "kernels", "configs", "reason"}
        assert d["field"] in parity.FIELDS or d["field"].startswith("l1.")
        assert set(d["kernels"]) <= names and set(d["configs"]) <= set(CONFIGS)
        assert d["reason"].strip() and d["kernel"] != d["model"]
        assert any(matches(c.id, d["cases"]) for c in catalogue())


def test_every_profile_is_a_booted_kernel():
    """No profile without a measured kernel; the tier boots one of each."""
    assert set(PROFILES) == set(j.PROFILES)
    for k in KERNELS:
        assert k.spec in get_profile(k.profile).measured, k
    assert {k.profile for k in KERNELS} == set(j.PROFILES)


def test_every_known_bug_is_in_the_findings():
    """Each case some profile marks as a known bug is documented."""
    patterns = finding_patterns()
    bugs = {c.id for c in catalogue() for p in c.profiles.values()
            for e in (p, *p.alternatives) if e.known_bug}
    assert bugs and [i for i in sorted(bugs) if not documented_in_findings(i, patterns)] == []
