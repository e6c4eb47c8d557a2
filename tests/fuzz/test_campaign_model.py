"""Campaigns on the model: model profile legacy against profile fixed must
rediscover the two legacy VMRUN bugs blind, minimised, explained by the
profiles; the command line around it; promotion into a catalogue row."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from fuzz_bugs import is_gif_left_set, is_ncr3_accepted

from kvmtest.fuzz.campaign import Campaign, Targets
from kvmtest.fuzz.findings import Finding
from kvmtest.fuzz.runners import ModelRunner

pytestmark = pytest.mark.model
SEED, COUNT = 1, 1000


@pytest.fixture(scope="module")
def findings():
    t = Targets(kernel=ModelRunner("legacy"), against=ModelRunner("fixed"))
    c = Campaign(t, seed=SEED, maxphyaddr=40)
    c.explore(count=COUNT)
    c.shrink()
    fs = c.findings({"seed": SEED, "profile": "legacy", "against_profile": "fixed"})
    t.close()
    return fs


def one(findings, pred) -> Finding:
    hits = [f for f in findings if pred(f)]
    assert len(hits) == 1, [f.spec for f in findings]
    return hits[0]


def test_gif_left_set_rediscovered_minimal_and_explained(findings):
    f = one(findings, is_gif_left_set)
    sigs = set(f.signatures)
    assert "contract: GIF=# after #VMEXIT" in sigs and "against: gif=1|0" in sigs
    assert len(f.shrink and f.spec.split()) == 2  # gif1 and one VMCB12 field
    assert f.reproduced == "3/3"
    assert "profile difference legacy vs fixed" in (f.explained or "")


def test_missing_ncr3_check_rediscovered_minimal_and_explained(findings):
    # The same bug may show as more than one behaviour (L2's shutdown
    # intercepted or not); the plain one has NP_ENABLE and nCR3, nothing else.
    hits = [f for f in findings if is_ncr3_accepted(f)]
    f = next(f for f in hits if f.spec.split()[1].count(",") == 1)
    assert "contract: VMRUN accepted a VMCB12 failing ncr3-illegal" in f.signatures
    assert any(s.startswith("against: exit_code=") for s in f.signatures)
    assert all(f.reproduced == "3/3" and f.explained for f in hits)


def test_every_finding_of_a_profile_pair_is_explained(findings):
    assert [f.spec for f in findings if not f.explained] == []


def kvmtest(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvmtest", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_cli_campaign_writes_findings(tmp_path):
    out = tmp_path / "out"
    p = kvmtest("fuzz", "--backend", "model", "--profile", "legacy", "--against", "model:fixed",
                "--count", "300", "--seed", "2", "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert "scenarios" in p.stdout and "known" in p.stdout
    summary = json.loads((out / "campaign.json").read_text())
    assert summary["seed"] == 2 and summary["scenarios"] >= 300
    files = sorted((out / "findings").glob("*.json"))
    assert len(files) == len(summary["findings"]) > 0
    f = Finding.read(files[0])
    assert f.spec and f.observations["kernel"] and f.observations["against"]
    assert f.replay.startswith("kvmtest run --backend model --profile legacy --scenario")
    # Same seed, same scenarios: the behaviours come out identical.
    p2 = kvmtest("fuzz", "--backend", "model", "--profile", "legacy", "--against",
                 "model:fixed", "--count", "300", "--seed", "2", "--out", str(tmp_path / "o2"))
    again = json.loads((tmp_path / "o2" / "campaign.json").read_text())
    assert p2.returncode == 0
    assert [b["first"] for b in again["behaviours"]] == [b["first"] for b in summary["behaviours"]]


@pytest.mark.parametrize("args, message", [
    (["--backend", "model", "--count", "5"], "--seed"),
    (["--backend", "model", "--seed", "1"], "--time S or --count N"),
    (["--backend", "model", "--seed", "1", "--count", "0"], "positive"),
    (["--seed", "1", "--count", "5"], "--kernel SPEC"),
    (["--backend", "model", "--against", "debian:x", "--seed", "1", "--count", "5"],
     "model:PROFILE only"),
    (["--backend", "model", "--against", "model:nope", "--seed", "1", "--count", "5"],
     "unknown model profile"),
    (["--backend", "model", "--config", "npt", "--seed", "1", "--count", "5"], "NAME=VALUE"),
    (["--promote", "/nonexistent.json"], "cannot read finding"),
])
def test_usage_errors_are_one_line_exit_2(args, message, tmp_path):
    p = kvmtest("fuzz", *args, "--out", str(tmp_path / "o"))
    assert p.returncode == 2, p.stderr
    assert message in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_run_scenario_prints_fields_and_the_contract_verdict():
    p = kvmtest("run", "--backend", "model", "--profile", "legacy", "--scenario",
                "gif1 vmcb:asid=0")
    assert p.returncode == 1
    assert "exit_code      ERR" in p.stdout and "gif            1" in p.stdout
    assert "FAIL: contract: GIF=1 after #VMEXIT" in p.stdout
    p = kvmtest("run", "--backend", "model", "--profile", "fixed", "--scenario",
                "gif1 vmcb:asid=0")
    assert p.returncode == 0 and "PASS" in p.stdout
    p = kvmtest("run", "--backend", "model", "--scenario", "gif1 vmcb:asdi=0")
    assert p.returncode == 2 and "unknown VMCB field 'asdi'" in p.stderr
    assert "Traceback" not in p.stderr


def test_run_scenario_json_holds_the_verdict_observation_and_signals(tmp_path):
    out = tmp_path / "s.json"
    p = kvmtest("run", "--backend", "model", "--profile", "legacy", "--scenario",
                "gif1 vmcb:asid=0", "--json", str(out))
    assert p.returncode == 1 and "FAIL: contract" in p.stdout
    doc = json.loads(out.read_text())
    assert doc["scenario"] == "gif1 vmcb:asid=0x0" and doc["result"] == "fail"
    assert doc["observation"]["gif"] == 1
    assert [s["oracle"] for s in doc["signals"]] == ["contract"]
    # '-': the JSON alone on stdout.
    p = kvmtest("run", "--backend", "model", "--profile", "fixed", "--scenario",
                "gif1 vmcb:asid=0", "--json", "-")
    assert p.returncode == 0
    doc = json.loads(p.stdout)
    assert doc["result"] == "pass" and doc["signals"] == []


@pytest.mark.parametrize("args, message", [
    (["--ktap", "-"], "--scenario writes --json only"),
    (["--json", "/nonexistent-dir/s.json"], "no such directory"),
])
def test_run_scenario_output_errors_are_one_line_exit_2(args, message):
    p = kvmtest("run", "--backend", "model", "--scenario", "gif1", *args)
    assert p.returncode == 2 and message in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_promote_gives_a_row_whose_cases_judge_like_the_kernels(findings, tmp_path):
    """The promoted row, built by the catalogue's own helpers, fails on the
    legacy model as a known bug and passes on fixed; its negative controls
    pass on both."""
    from kvmtest.case import Expect
    from kvmtest.cases import _build
    from kvmtest.fuzz.promote import promote
    from kvmtest.judge import FAIL, PASS, judge
    from kvmtest.runner import run_case

    f = one(findings, is_gif_left_set)
    path = f.write(tmp_path)
    text = promote(str(path))
    assert text.startswith("# kvmtest fuzz finding") and "Row(" in text
    code = text.replace('"FILL IN: what breaks the contract, and the fix"', '"GIF left set"')
    row = eval(code[code.index("Row("):], {"Row": _build.Row, "Expect": Expect})
    cases = {c.id: c for c in _build.vmrun_cases("control", [row])}
    assert len(cases) == 4
    verdicts = {}
    for profile in ("legacy", "fixed"):
        model = ModelRunner(profile)
        for cid, case in cases.items():
            obs = run_case(model.backend, case, 2.0)
            verdicts[profile, cid] = judge(case, obs, profile).verdict
        model.close()
    bad = next(c for c in cases if c.startswith("control/") and "gif1" in c)
    assert verdicts["legacy", bad] == FAIL and verdicts["fixed", bad] == PASS
    for (profile, cid), v in verdicts.items():
        if cid.startswith("negative/"):
            assert v == PASS, (profile, cid)
