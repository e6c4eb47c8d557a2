"""The campaign loop: generate, run on every target, judge, group, shrink.

Targets have roles: ``kernel`` (under test), ``against`` (a second kernel,
or a model profile), ``model`` (the reference model with the kernel's
profile).  A model target runs each round of the generator as soon as it
exists, and its check coverage steers the next round; kernels under QEMU
run several rounds per batch (one boot, or one session round trip).  So the
scenario sequence depends only on the seed and the model, never on timing.

Each scenario's signals (oracles.py) are grouped by (oracle, signature): a
*behaviour*.  At the end every behaviour is shrunk (shrink.py) on the same
targets, all shrinkers in lockstep so each step is one batch; behaviours
whose minimal scenarios coincide become one finding, re-run to count how
often it reproduces, and written to OUT/findings/ (findings.py).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..model.profiles import V7
from ..observation import TIMEOUT, Observation
from . import oracles
from .explain import explain
from .findings import Finding
from .generator import ROUND, Generator, consistency_checks
from .oracles import Signal
from .runners import ModelRunner, Runner, RunResult
from .shrink import Shrinker
from .spec import Scenario

ROLES = ("kernel", "against", "model")
REPRO_RUNS = 3
EXAMPLES = 5


@dataclass
class Targets:
    kernel: Runner
    against: Runner | None = None
    model: Runner | None = None

    def roles(self) -> dict[str, Runner]:
        return {r: t for r in ROLES if (t := getattr(self, r)) is not None}

    def coverage_role(self) -> str | None:
        """The model whose check coverage steers the generator: the one
        whose profile performs the most checks (ties: model, kernel,
        against)."""
        models = [(r, t) for r, t in self.roles().items() if isinstance(t, ModelRunner)]
        if not models:
            return None
        order = {"model": 0, "kernel": 1, "against": 2}
        return min(models, key=lambda rt: (-len(consistency_checks(rt[1].backend.profile)),
                                           order[rt[0]]))[0]

    def close(self) -> None:
        for t in self.roles().values():
            t.close()


@dataclass
class Evaluation:
    scenario: Scenario
    results: dict[str, RunResult]
    signals: list[Signal]

    @property
    def keys(self) -> set[tuple[str, str]]:
        return {s.key for s in self.signals}


def _answered(role: str, r: RunResult, models: frozenset[str]) -> Observation | None:
    """The observation, unless the target could not answer: a model that
    ran out of time has no verdict (it emulates slowly, a kernel does not)."""
    obs = r.observation
    if obs is None or r.skipped or (role in models and obs.outcome == TIMEOUT):
        return None
    return obs


def judge(s: Scenario, results: dict[str, RunResult],
          models: frozenset[str] = frozenset(),
          known_out: Counter[str] | None = None) -> list[Signal]:
    """Every oracle's signals for one scenario; `models`: the roles that are
    the model; known_out counts the known differences (known.py) seen."""
    out: list[Signal] = []
    k = results["kernel"]
    kobs = _answered("kernel", k, models)
    if k.crash is not None:
        out.append(oracles.crash("kernel", k.crash))
    elif kobs is not None:
        out += oracles.contract(s, s.to_case(), kobs)
        out += oracles.warnings("kernel", kobs)
        for role in ("model", "against"):
            r = results.get(role)
            if r is None or r.crash is not None:  # a crash is reported below
                continue
            other = _answered(role, r, models)
            if other is not None:
                sig = oracles.differential(role, kobs, other, s, known_out)
                if sig is not None:
                    out.append(sig)
    a = results.get("against")
    if a is not None:
        if a.crash is not None:
            out.append(oracles.crash("against", a.crash))
        elif a.observation is not None:
            out += oracles.warnings("against", a.observation)
    return out


@dataclass
class Behaviour:
    key: tuple[str, str]
    first: Evaluation
    order: int
    count: int = 0
    examples: list[str] = field(default_factory=list)
    minimal: Scenario | None = None
    shrink: dict[str, int] = field(default_factory=dict)


@dataclass
class Progress:
    elapsed: float
    scenarios: int
    findings: int  # scenarios with at least one signal
    behaviours: int
    coverage: dict[str, tuple[int, int]]
    phase: str = "explore"

    @property
    def rate(self) -> float:
        return self.scenarios / self.elapsed if self.elapsed > 0 else 0.0

    def line(self) -> str:
        cov = " ".join(f"{c} {r}/{t}" for c, (r, t) in self.coverage.items())
        return (f"[{self.elapsed:7.1f}s] {self.phase}: {self.scenarios} scenarios "
                f"({self.rate:.0f}/s), findings {self.findings}, behaviours {self.behaviours}"
                f" | checks reached: {cov}")


class Campaign:
    def __init__(self, targets: Targets, seed: int, maxphyaddr: int,
                 rounds_per_batch: int = 1, on_progress: Callable[[Progress], None] | None = None,
                 shrink_oracles: Sequence[str] | None = None) -> None:
        self.targets = targets
        self.seed = seed
        cov = targets.coverage_role()
        cov_profile = targets.roles()[cov].backend.profile if cov else V7  # type: ignore[attr-defined]
        self.gen = Generator(seed, maxphyaddr, cov_profile)
        self.rounds_per_batch = rounds_per_batch
        self.on_progress = on_progress
        self.behaviours: dict[tuple[str, str], Behaviour] = {}
        self.known: Counter[str] = Counter()  # known differences (known.py) seen
        self._models = frozenset(r for r, t in targets.roles().items()
                                 if isinstance(t, ModelRunner))
        self.scenarios = 0
        self.with_signals = 0
        self.started = time.monotonic()
        self.phase = "explore"
        # Oracles whose behaviours get shrunk.  A WARN_ON_ONCE fires once per
        # boot and a crash costs a boot per candidate: not shrunk by default.
        self.shrink_oracles = tuple(shrink_oracles or ("contract", "model", "against"))

    # ---- running ----------------------------------------------------------------

    def evaluate(self, scenarios: Sequence[Scenario],
                 early: dict[str, list[RunResult]] | None = None) -> list[Evaluation]:
        """Run every target on the batch (reusing `early` results) and judge."""
        early = dict(early or {})
        todo = {r: t for r, t in self.targets.roles().items() if r not in early}
        slow = {r: t for r, t in todo.items() if not isinstance(t, ModelRunner)}
        for role, target in todo.items():
            if role not in slow:
                early[role] = target.run(scenarios)
        if len(slow) > 1:
            # Two kernels under QEMU: two processes, run side by side.
            with ThreadPoolExecutor(len(slow)) as pool:
                futures = {r: pool.submit(t.run, scenarios) for r, t in slow.items()}
                for role, fut in futures.items():
                    early[role] = fut.result()
        else:
            for role, target in slow.items():
                early[role] = target.run(scenarios)
        out = []
        for i, s in enumerate(scenarios):
            results = {role: rs[i] for role, rs in early.items()}
            out.append(Evaluation(s, results, judge(s, results, self._models, self.known)))
        return out

    def progress(self) -> Progress:
        return Progress(time.monotonic() - self.started, self.scenarios, self.with_signals,
                        len(self.behaviours), self.gen.coverage(), self.phase)

    def _report(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.progress())

    def explore(self, count: int | None = None, seconds: float | None = None) -> None:
        if count is None and seconds is None:
            raise ValueError("give a scenario count or a time budget")
        deadline = None if seconds is None else self.started + seconds
        cov_role = self.targets.coverage_role()
        roles = self.targets.roles()
        fast = {r for r, t in roles.items() if isinstance(t, ModelRunner)}
        while True:
            if count is not None and self.scenarios >= count:
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            batch: list[Scenario] = []
            early: dict[str, list[RunResult]] = {r: [] for r in fast}
            for _ in range(self.rounds_per_batch):
                size = ROUND if count is None else min(ROUND, count - self.scenarios - len(batch))
                if size <= 0:
                    break
                rnd = self.gen.round(size)
                if not rnd:
                    break
                for role in fast:
                    early[role] += roles[role].run(rnd)
                if cov_role is not None:
                    for s, r in zip(rnd, early[cov_role][-len(rnd):], strict=True):
                        self.gen.feedback(s, r.fired)
                batch += rnd
            if not batch:
                break
            for ev in self.evaluate(batch, early):
                self._record(ev)
            self.scenarios += len(batch)
            self._report()

    def _record(self, ev: Evaluation) -> None:
        if ev.signals:
            self.with_signals += 1
        for sig in ev.signals:
            b = self.behaviours.get(sig.key)
            if b is None:
                b = self.behaviours[sig.key] = Behaviour(sig.key, ev, len(self.behaviours))
            b.count += 1
            if len(b.examples) < EXAMPLES:
                b.examples.append(ev.scenario.format())

    # ---- shrinking ------------------------------------------------------------------

    def shrink(self) -> None:
        """Shrink every behaviour of the shrinkable oracles, in lockstep."""
        self.phase = "shrink"
        cache: dict[str, set[tuple[str, str]]] = {}
        active: list[tuple[Behaviour, Shrinker]] = []
        for b in self.behaviours.values():
            if b.key[0] in self.shrink_oracles:
                active.append((b, Shrinker(b.first.scenario)))
            else:
                b.minimal = b.first.scenario
        while active:
            wanted: dict[str, Scenario] = {}
            for _, sh in active:
                for c in sh.candidates():
                    if c.format() not in cache:
                        wanted[c.format()] = c
            if wanted:
                for ev in self.evaluate(list(wanted.values())):
                    cache[ev.scenario.format()] = ev.keys
                self.scenarios += len(wanted)
                self._report()
            still = []
            for b, sh in active:
                sh.feed([b.key in cache[c.format()] for c in sh.candidates()])
                if sh.done:
                    b.minimal = sh.best
                    b.shrink = {"changes_before": len(sh.original.changes()),
                                "changes_after": len(sh.best.changes()),
                                "steps": sh.stats.steps, "candidates": sh.stats.candidates}
                else:
                    still.append((b, sh))
            active = still

    # ---- findings ----------------------------------------------------------------------

    def findings(self, meta: dict[str, Any]) -> list[Finding]:
        """One finding per minimal scenario, confirmed by re-running it."""
        groups: dict[str, list[Behaviour]] = {}
        for b in sorted(self.behaviours.values(), key=lambda b: b.order):
            spec = (b.minimal or b.first.scenario).format()
            groups.setdefault(spec, []).append(b)
        specs = list(groups)
        scenarios = [(groups[sp][0].minimal or groups[sp][0].first.scenario) for sp in specs]
        reruns = [self.evaluate(scenarios) for _ in range(REPRO_RUNS)] if scenarios else []
        self.scenarios += REPRO_RUNS * len(scenarios)
        # Minimal scenarios that show exactly the same signals are one finding
        # (the same bug reached through two oracles, or two boundary values).
        merged: dict[frozenset, list[int]] = {}
        picked: list[tuple[Evaluation, int]] = []
        for i, spec in enumerate(specs):
            runs = [r[i] for r in reruns]
            wanted = {b.key for b in groups[spec]}
            seen = sum(1 for ev in runs if wanted <= ev.keys)
            ev = next((ev for ev in runs if wanted <= ev.keys), runs[0])
            picked.append((ev, seen))
            key = frozenset(ev.keys | wanted)
            merged.setdefault(key, []).append(i)
        out = []
        for n, members in enumerate(merged.values()):
            i = members[0]
            spec, (ev, seen) = specs[i], picked[i]
            bs = [b for j in members for b in groups[specs[j]]]
            wanted = {b.key for b in bs}
            signals = _merge_signals(ev.signals, [b.first for b in bs], wanted)
            first_oracle = bs[0].key[0].split(":")[0]
            f = Finding(
                id=f"F{n + 1:03d}-{first_oracle}",
                spec=spec,
                first_spec=bs[0].first.scenario.format(),
                signals=[{"oracle": s.oracle, "signature": s.signature,
                          "details": list(s.details)} for s in signals],
                observations=_observations(ev),
                differing={s.oracle: _fields(s) for s in signals
                           if s.oracle in ("model", "against")},
                console=_console(ev, [b.first for b in bs]),
                count=max(b.count for b in bs),
                examples=list(dict.fromkeys(x for b in bs for x in b.examples))[:EXAMPLES],
                shrink=bs[0].shrink,
                reproduced=f"{seen}/{REPRO_RUNS}",
                campaign=meta,
                replay=meta.get("replay", "kvmtest run --scenario '{spec}'").format(spec=spec),
            )
            if len(members) > 1:
                f.examples = [specs[j] for j in members] + f.examples
                f.examples = list(dict.fromkeys(f.examples))[:EXAMPLES + len(members)]
            f.history = {role: r.history for e in [ev, *(b.first for b in bs)]
                         for role, r in e.results.items() if r.history}
            f.explained = explain(f, self.targets)
            out.append(f)
        return out

    def summary(self, findings: list[Finding], meta: dict[str, Any]) -> dict[str, Any]:
        p = self.progress()
        return {
            **meta,
            "scenarios": p.scenarios,
            "seconds": round(p.elapsed, 1),
            "rate": round(p.rate, 1),
            "scenarios_with_signals": self.with_signals,
            "behaviours": [{"oracle": b.key[0], "signature": b.key[1], "count": b.count,
                            "first": b.first.scenario.format(),
                            "minimal": (b.minimal or b.first.scenario).format()}
                           for b in sorted(self.behaviours.values(), key=lambda b: b.order)],
            "coverage": {c: list(v) for c, v in p.coverage.items()},
            "known_differences": dict(self.known.most_common()),
            "unreached_checks": self.gen.unreached(),
            "findings": [{"id": f.id, "spec": f.spec, "signatures": f.signatures,
                          "reproduced": f.reproduced, "explained": f.explained}
                         for f in findings],
        }


def _merge_signals(rerun: list[Signal], firsts: list[Evaluation],
                   wanted: set[tuple[str, str]]) -> list[Signal]:
    """The re-run's signals, plus any wanted one only the campaign saw
    (a WARN_ON_ONCE, a crash)."""
    have = {s.key for s in rerun}
    extra = [s for ev in firsts for s in ev.signals if s.key in wanted and s.key not in have]
    return [*rerun, *extra]


def _fields(sig: Signal) -> list[str]:
    return [d.split(":", 1)[0] for d in sig.details]


def _observations(ev: Evaluation) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for role, r in ev.results.items():
        if r.observation is not None:
            out[role] = _obs_json(r.observation)
        elif r.crash is not None:
            out[role] = {"crash": r.crash[-2000:]}
    return out


def _obs_json(obs: Observation) -> dict[str, Any]:
    return obs.to_json()


def _console(ev: Evaluation, firsts: list[Evaluation]) -> list[str]:
    lines: list[str] = []
    for e in [ev, *firsts]:
        for role, r in e.results.items():
            for w in (r.observation.kernel_warnings if r.observation else None) or []:
                lines.append(f"{role}: {w}")
            lines += [f"{role}: {c}" for c in r.console]
            if r.crash:
                lines += [f"{role}: {c}" for c in r.crash.splitlines()[-40:]]
    return list(dict.fromkeys(lines))
