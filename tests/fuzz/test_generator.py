"""The generator: deterministic from its seed, blind to the catalogue,
steered by coverage."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import kvmtest.fuzz
from kvmtest.fuzz.generator import CLASSES, Generator
from kvmtest.fuzz.spec import FIELD_WIDTH, Scenario

FUZZ_DIR = Path(kvmtest.fuzz.__file__).parent


def specs(seed: int, n: int = 4) -> list[str]:
    g = Generator(seed, 40)
    return [s.format() for _ in range(n) for s in g.round()]


def test_same_seed_same_scenarios():
    assert specs(11) == specs(11)


def test_another_seed_other_scenarios():
    a, b = specs(11), specs(12)
    assert a != b and len(set(a) & set(b)) < len(a) // 4


def test_no_scenario_repeats_within_a_campaign():
    s = specs(3, 16)
    assert len(s) == len(set(s))


def test_the_generator_never_reads_the_catalogue():
    """Blind: no module of kvmtest.fuzz imports kvmtest.cases (the catalogue's
    defects), directly or by a relative import."""
    for path in FUZZ_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = ("." * node.level) + (node.module or "")
                assert "cases" not in mod.split("."), f"{path.name} imports {mod}"
                assert not (node.level == 2 and node.module is None
                            and any(a.name == "cases" for a in node.names)), path.name
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("kvmtest.cases") for a in node.names), path.name


def test_every_class_and_kind_is_generated():
    g = Generator(5, 40)
    seen = Counter(s.scenario_class for _ in range(8) for s in g.round())
    assert set(CLASSES) <= set(seen), seen


def test_boundaries_follow_maxphyaddr():
    """Address boundaries come from the vCPU's MAXPHYADDR, not constants."""
    def high_bits(maxphy: int) -> set[int]:
        g = Generator(9, maxphy)
        out = set()
        for _ in range(20):
            for s in g.round():
                for k, v in s.vmcb:
                    if k in ("nested_cr3", "msrpm_base_pa", "iopm_base_pa") and v:
                        out.add(v.bit_length())
        return out
    assert 41 in high_bits(40) and 37 in high_bits(36)
    assert 37 not in high_bits(40)


def test_values_fit_their_fields():
    g = Generator(21, 40)
    for _ in range(16):
        for s in g.round():
            for k, v in (*s.vmcb, *s.smm):
                assert 0 <= v < 1 << FIELD_WIDTH[k]


def test_coverage_feedback_steers_toward_rare_checks():
    """Mutators whose scenarios keep reaching checks nobody reached before
    are picked more often afterwards: let every asid change reach a new
    check, and asid changes multiply."""
    def asid_share(reward: bool) -> float:
        g = Generator(4, 40)
        new = iter(range(10**6))
        for _ in range(6):
            for s in g.round():
                hit = reward and any(k == "asid" for k, _ in s.vmcb)
                g.feedback(s, {f"check-{next(new)}"} if hit else set())
        later = [s for _ in range(6) for s in g.round() if s.kind == "vmrun"]
        return sum(any(k == "asid" for k, _ in s.vmcb) for s in later) / len(later)
    assert asid_share(True) > 2 * asid_share(False)


def test_coverage_counts_checks_per_class():
    g = Generator(4, 40)
    s = Scenario(vmcb=(("asid", 0),))
    g.feedback(s, {"asid=0"})
    cov = g.coverage()
    assert cov["vmrun/single"][0] == 1 and cov["all"][0] == 1
    assert cov["all"][1] >= 10  # the model profile's consistency checks
    assert "asid=0" not in g.unreached()
