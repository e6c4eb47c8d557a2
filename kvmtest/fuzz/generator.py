"""Scenarios from field definitions, deterministic from a seed, steered by
the model's check coverage.

Every scenario starts from the default VMCB12 and L1 state (a VMRUN that
passes) and changes a few things, chosen by class:

    vmrun/single  one VMCB12 field
    vmrun/multi   2-4 fields at once (several defects, intercept combinations)
    vmrun/mode    an L2 mode other than 64-bit (l2modes.py), 0-2 fields
    vmrun/l1      L1's own state (SVM off, host save area, VMRUN's operand)
    smm           a VMCB12 that VMRUNs, an SMI in L2, 1-3 fields the SMM
                  handler writes before RSM
    nstate        KVM_SET_NESTED_STATE with 1-2 fields changed

Each change is a Mutator (fields.py): a field and a strategy (flip a
defined bit, set a reserved bit, a value at a boundary...).  Coverage
feedback: after each round the campaign reports, per scenario, the model
checks that fired; a mutator that reached a rarely-hit check gains weight,
one never tried yet starts with a bonus, so rounds drift toward checks not
yet reached.  Given the seed and the same feedback, the sequence is always
the same.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Iterable

from ..case import GIF0, GIF1
from ..model import checks
from ..model.profiles import TLB_CTL_REJECT, V7, Profile
from ..payloads import load_payload
from ..vmcb import Vmcb
from .fields import L1_MUTATORS, SMM_MUTATORS, VMCB_MUTATORS, Bounds, Mutator
from .l2modes import DEFAULT_MODE, MODES
from .spec import (
    FIELD_WIDTH,
    KIND_NSTATE,
    KIND_SMM,
    KIND_VMRUN,
    L1_KNOBS,
    L1_SMM_ONLY,
    Scenario,
    default_image,
    normalized,
)

# Class mix (weights).  vmrun scenarios dominate: they are what the
# consistency checks see; the others reach RSM and KVM_SET_NESTED_STATE.
CLASSES = {"vmrun/single": 30, "vmrun/multi": 25, "vmrun/mode": 15, "vmrun/l1": 8,
           "smm": 12, "nstate": 10}
ROUND = 64  # scenarios between two coverage updates
# Outside 64-bit mode L2's code stays where and what it is: CS.base, RIP and
# CS.limit form the fetch address and CS's attributes the code size (moving
# them runs whatever bytes lie there: noise, not a scenario); SS keeps DPL 0
# (an L2 at CPL > 0 faulting through L1's 64-bit TSS aborts QEMU TCG itself:
# docs/findings.md, kvmtest fuzz).
FIXED_CODE = frozenset({"rip", "cs.base", "cs.limit", "cs.attrib", "ss.attrib"})
# L1 knobs of the vmrun payload, and the smm payload's own.
L1_VMRUN = tuple(m for m in L1_MUTATORS if m.field not in L1_SMM_ONLY)
L1_SMM = tuple(m for m in L1_MUTATORS if m.field in L1_SMM_ONLY)



def consistency_checks(profile: Profile) -> tuple[str, ...]:
    """The checks a model profile performs, by name: the coverage universe.
    Late and hardware failures ("late:...", "hardware:...") join when first
    seen."""
    names = [c.name for c in (*checks.SAVE_CHECKS, *checks.CONTROL_CHECKS) if c.enabled(profile)]
    if profile.tlb_ctl == TLB_CTL_REJECT:
        names.append("tlb_ctl")
    return tuple(names)


def _base_vmcb(payload: str, entry: str) -> Vmcb:
    return default_image(payload, entry)


class Generator:
    def __init__(self, seed: int, maxphyaddr: int, profile: Profile = V7,
                 classes: dict[str, int] | None = None) -> None:
        self.rng = random.Random(seed)
        self.bounds = Bounds(maxphyaddr)
        self.classes = dict(classes or CLASSES)
        self.tries: Counter[str] = Counter()
        self.credit: dict[str, float] = {}
        self.hits: Counter[str] = Counter()
        self.reached: dict[str, set[str]] = {c: set() for c in self.classes}
        self.universe: set[str] = set(consistency_checks(profile))
        self.seen: set[str] = set()
        self._mutators: dict[str, tuple[str, ...]] = {}  # spec -> mutator keys

    # ---- choosing ------------------------------------------------------------

    def _weight(self, m: Mutator) -> float:
        if not self.tries[m.key]:
            return 4.0  # never tried: explore
        return 1.0 + 8.0 * self.credit.get(m.key, 0.0)

    def _pick(self, pool: tuple[Mutator, ...], exclude: set[str]) -> Mutator:
        # Weights are fixed for a round (computed in round()): cheap picks.
        weights = self._weights[pool]
        for _ in range(8):
            m = self.rng.choices(pool, cum_weights=weights)[0]
            if m.field not in exclude:
                return m
        cands = [m for m in pool if m.field not in exclude]
        return self.rng.choice(cands)

    def _apply(self, group: list[tuple[str, int]], pool: tuple[Mutator, ...], base: Vmcb | dict,
               used: list[str], n: int, exclude: frozenset[str] = frozenset()) -> None:
        taken = {k for k, _ in group} | exclude
        for _ in range(n):
            m = self._pick(pool, taken)
            current = dict(group).get(m.field, base[m.field])
            width = FIELD_WIDTH.get(m.field, 64) if m.group != "l1" else 64
            value = m.pick(self.rng, current, self.bounds) & ((1 << width) - 1)
            group.append((m.field, value))
            taken.add(m.field)
            used.append(m.key)
            for other, enable, p in m.enabled_by:
                if self.rng.random() < p:
                    values = dict(group)
                    values[other] = values.get(other, base[other]) | enable
                    group[:] = list(values.items())
                    taken.add(other)

    def _one(self, cls: str) -> tuple[Scenario, list[str]]:
        rng = self.rng
        used: list[str] = []
        gif = rng.choice((GIF1, GIF0))
        vmcb: list[tuple[str, int]] = []
        if cls == "smm":
            base = _base_vmcb("smm", "l2_smi")
            if rng.random() < 0.2:
                self._apply(vmcb, VMCB_MUTATORS, base, used, 1)
            smm: list[tuple[str, int]] = []
            self._apply(smm, SMM_MUTATORS, base, used, rng.choice((1, 1, 2, 3)))
            l1: list[tuple[str, int]] = []
            if rng.random() < 0.3:
                self._apply(l1, L1_SMM, L1_KNOBS, used, 1)
            return Scenario(kind=KIND_SMM, gif=gif, vmcb=vmcb, smm=smm, l1=l1), used
        if cls == "nstate":
            base = _base_vmcb("vmrun", "l2_vmmcall")
            self._apply(vmcb, VMCB_MUTATORS, base, used, rng.choice((1, 1, 2)))
            return Scenario(kind=KIND_NSTATE, vmcb=vmcb), used
        mode = DEFAULT_MODE
        l2 = None
        if cls == "vmrun/mode":
            mode = rng.choice([m for m in MODES if m != DEFAULT_MODE])
        if cls == "vmrun/mode" or rng.random() < 0.15:
            l2 = rng.choice(MODES[mode].entries)
        entry = l2 or MODES[mode].entries[0]
        payload = load_payload("vmrun")
        base = Vmcb(_base_vmcb("vmrun", entry).to_bytes())
        for name, value in MODES[mode].changes(payload, entry).items():
            base[name] = value
        n = {"vmrun/single": 1, "vmrun/multi": rng.choice((2, 2, 3, 4)),
             "vmrun/mode": rng.choice((0, 1, 1, 2)), "vmrun/l1": rng.choice((0, 1))}[cls]
        self._apply(vmcb, VMCB_MUTATORS, base, used, n, FIXED_CODE if mode != DEFAULT_MODE
                    else frozenset())
        l1: list[tuple[str, int]] = []
        if cls == "vmrun/l1":
            self._apply(l1, L1_VMRUN, L1_KNOBS, used, 1)
        return Scenario(kind=KIND_VMRUN, gif=gif, mode=mode, l2=l2, vmcb=vmcb, l1=l1), used

    def round(self, size: int = ROUND) -> list[Scenario]:
        """The next `size` scenarios (no repeats within a campaign)."""
        out: list[Scenario] = []
        self._weights = {pool: list(itertools.accumulate(self._weight(m) for m in pool))
                         for pool in (VMCB_MUTATORS, SMM_MUTATORS, L1_VMRUN, L1_SMM)}
        names = list(self.classes)
        weights = [self.classes[c] for c in names]
        attempts = 0
        while len(out) < size and attempts < 50 * size:
            attempts += 1
            cls = self.rng.choices(names, weights=weights)[0]
            s, used = self._one(cls)
            s = normalized(s)
            text = s.format()
            if text in self.seen:
                continue
            self.seen.add(text)
            self._mutators[text] = tuple(used)
            for key in used:
                self.tries[key] += 1
            out.append(s)
        return out

    # ---- feedback --------------------------------------------------------------

    def feedback(self, scenario: Scenario, fired: Iterable[str]) -> None:
        """The model checks that failed for this scenario (coverage)."""
        fired = set(fired)
        self.universe |= fired
        cls = scenario.scenario_class
        self.reached.setdefault(cls, set()).update(fired)
        for c in fired:
            self.hits[c] += 1
        novelty = sum(1.0 / self.hits[c] for c in fired)
        for key in self._mutators.pop(scenario.format(), ()):
            old = self.credit.get(key, 0.0)
            self.credit[key] = 0.8 * old + 0.2 * min(novelty, 1.0)

    def coverage(self) -> dict[str, tuple[int, int]]:
        """Per scenario class: (checks reached, checks known)."""
        total = len(self.universe)
        out = {c: (len(r), total) for c, r in self.reached.items()}
        out["all"] = (len(set().union(*self.reached.values())), total)
        return out

    def unreached(self) -> list[str]:
        return sorted(self.universe - set(self.hits))
