"""The fuzz findings stored in tests/data/fuzz/ replayed on the kernels they
came from: they must still be the two legacy VMRUN bugs, seen by the same
oracles.  The findings were produced blind by

    kvmtest fuzz --kernel debian:linux-image-6.1.0-47-amd64-unsigned --profile legacy \\
        --against debian:linux-image-6.1.0-56-amd64-unsigned --against-profile fixed \\
        --time 600 --seed 1

(10 minutes; see README "Fuzzing").  Boots both kernels once each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fuzz_bugs import is_gif_left_set, is_ncr3_accepted

from kvmtest.fuzz.campaign import Campaign, Targets, judge
from kvmtest.fuzz.findings import Finding
from kvmtest.fuzz.qemu_runner import make_runner
from kvmtest.fuzz.runners import ModelRunner
from kvmtest.fuzz.spec import parse

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

DATA = Path(__file__).resolve().parent.parent / "data" / "fuzz"
LEGACY = "debian:linux-image-6.1.0-47-amd64-unsigned"
FIXED = "debian:linux-image-6.1.0-56-amd64-unsigned"


def stored() -> list[Finding]:
    return [Finding.read(p) for p in sorted(DATA.glob("F*.json"))]


@pytest.fixture(scope="module")
def replayed(qemu_available, tmp_path_factory):
    """Each stored finding (and the default scenario, as a control) on both
    kernels, side by side in one campaign object so the oracles are the
    campaign's own."""
    work = tmp_path_factory.mktemp("fuzz-qemu")
    targets = Targets(kernel=make_runner(LEGACY, profile="legacy", workdir=str(work / "k")),
                      against=make_runner(FIXED, profile="fixed", workdir=str(work / "a")),
                      model=ModelRunner("legacy"))
    campaign = Campaign(targets, seed=0, maxphyaddr=40)
    findings = stored()
    scenarios = [parse("gif1"), parse("gif0")] + [parse(f.spec) for f in findings]
    try:
        evs = campaign.evaluate(scenarios)
    finally:
        targets.close()
    return findings, evs


def as_finding(ev) -> Finding:
    return Finding(id="replay", spec=ev.scenario.format(), first_spec="",
                   signals=[], observations={r: x.observation.to_json()
                                             for r, x in ev.results.items() if x.observation})


def test_the_data_holds_both_findings():
    kinds = [("gif" if is_gif_left_set(f) else "ncr3" if is_ncr3_accepted(f) else "?")
             for f in stored()]
    assert sorted(kinds) == ["gif", "ncr3"]
    for f in stored():
        assert f.campaign["seed"] == 1 and f.reproduced == "3/3"
        assert json.loads(json.dumps(f.to_json())) == f.to_json()


def test_the_default_scenario_shows_nothing(replayed):
    _, evs = replayed
    for ev in evs[:2]:
        assert [s.key for s in ev.signals if s.oracle != "model"] == [], ev.scenario.format()


def test_stored_findings_are_still_the_two_bugs(replayed):
    findings, evs = replayed
    for f, ev in zip(findings, evs[2:], strict=True):
        now = as_finding(ev)
        assert is_gif_left_set(now) or is_ncr3_accepted(now), (f.spec, now.observations)
        assert is_gif_left_set(now) == is_gif_left_set(f)
        stored_keys = {(s["oracle"], s["signature"]) for s in f.signals
                       if s["oracle"] in ("contract", "against")}
        assert stored_keys <= ev.keys, (f.spec, ev.keys)


def test_a_replayed_finding_is_explained_by_the_profiles(replayed):
    _, evs = replayed
    for ev in evs[2:]:
        against = [s for s in ev.signals if s.oracle == "against"]
        assert against
        s = ev.scenario
        legacy, fixed = ModelRunner("legacy"), ModelRunner("fixed")
        again = judge(s, {"kernel": legacy.run_one(s), "against": fixed.run_one(s)})
        assert {x.key for x in against} <= {x.key for x in again}
