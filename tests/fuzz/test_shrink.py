"""The shrinker: the fewest changes (and bits) that keep a behaviour."""

from __future__ import annotations

import random

import pytest

from kvmtest.fuzz.generator import Generator
from kvmtest.fuzz.shrink import Shrinker
from kvmtest.fuzz.spec import Scenario, parse


def shrink(s: Scenario, keeps) -> Shrinker:
    sh = Shrinker(s)
    while not sh.done:
        sh.feed([bool(keeps(c)) for c in sh.candidates()])
    return sh


def test_down_to_the_defect_and_its_one_bit():
    s = parse("gif0 mode=pae l2=l2_hlt l1:hsave_pa=0x8010 "
              "vmcb:asid=0x0,cr4=0x80000000000420,rflags=0x202,tlb_ctl=0x5")

    def keeps(c: Scenario) -> bool:
        v = dict(c.vmcb)
        return c.gif == "gif0" and v.get("asid", 1) == 0 and bool(v.get("cr4", 0) >> 55 & 1)

    sh = shrink(s, keeps)
    assert sh.best.format() == "gif0 vmcb:asid=0x0,cr4=0x80000000000620"
    assert sh.stats.steps > 0


def test_default_scenario_when_nothing_is_needed():
    sh = shrink(parse("smm gif0 l1:cr4_xor=0x0 smm:asid=0x0"), lambda c: True)
    assert sh.best == parse("smm gif1")
    assert sh.stats.candidates == 1


def test_the_original_when_nothing_smaller_keeps_it():
    s = parse("gif1 vmcb:asid=0x0,tlb_ctl=0x3")
    sh = shrink(s, lambda c: c == s)
    assert sh.best == s


def _one_minimal(best: Scenario, keeps) -> bool:
    return all(not keeps(best.without([c])) for c in best.changes())


@pytest.mark.parametrize("seed", range(8))
def test_result_is_one_minimal_for_random_conjunctions(seed):
    """For a behaviour that needs k of the scenario's changes, the result
    keeps it, holds exactly those k, and dropping any one loses it."""
    rng = random.Random(seed)
    g = Generator(seed, 40)
    for s in g.round(32):
        changes = s.changes()
        if len(changes) < 2:
            continue
        need = set(rng.sample(changes, rng.randint(1, len(changes))))

        def keeps(c: Scenario, need=need) -> bool:
            return need <= set(c.changes())

        sh = shrink(s, keeps)
        assert keeps(sh.best)
        assert set(sh.best.changes()) == need
        assert _one_minimal(sh.best, keeps)


def test_feed_checks_the_batch():
    sh = Shrinker(parse("gif1 vmcb:asid=0x0"))
    with pytest.raises(ValueError):
        sh.feed([True, False, True])
