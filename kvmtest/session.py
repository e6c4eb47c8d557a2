"""Run a selection of cases on one backend and judge them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from . import judge as j
from .case import CONFIG_NEEDS, NEED_NESTED_STATE, NEED_NO_SVM, NEED_SMM, NEED_SVM, Case
from .observation import Observation
from .runner import DEFAULT_TIMEOUT, run_case


@dataclass
class Result:
    case: Case
    verdict: j.Verdict
    observation: Observation | None = None

    def to_json(self) -> dict:
        want = self.case.expect if not self.case.profiles else None
        expected = want.describe() if want else {
            p: e.describe() for p, e in self.case.profiles.items()}
        return {
            "id": self.case.id,
            "family": self.case.family,
            "gif_mode": self.case.gif_mode,
            "verdict": self.verdict.verdict,
            "expected": expected,
            "observed": self.observation.to_json() if self.observation else None,
            "observed_summary": self.observation.describe() if self.observation else None,
            "reason": self.verdict.reason,
            "profiles": list(self.verdict.profiles),
            "source": self.case.source,
        }


@dataclass
class Report:
    backend: str
    profile: str | None
    kernel: str
    results: list[Result] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Kernel WARN/BUG lines outside every case's window (e.g. VM teardown):
    # no case can carry them, but the run cannot pass with them.
    kernel_warnings_outside_cases: list[str] = field(default_factory=list)
    # The configuration under test (kvmtest.config.Config.to_json()).
    config: dict | None = None

    @property
    def summary(self) -> dict[str, int]:
        counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
        key = {j.PASS: "passed", j.FAIL: "failed", j.SKIP: "skipped", j.ERROR: "errors"}
        for r in self.results:
            counts[key[r.verdict.verdict]] += 1
        return counts

    @property
    def fingerprint(self) -> str:
        return j.fingerprint(r.verdict for r in self.results)

    def exit_code(self) -> int:
        s = self.summary
        if s["failed"] or s["errors"] or self.kernel_warnings_outside_cases:
            return 1
        if s["passed"] == 0:
            return 125  # nothing could be tested: `git bisect run` skips
        return 0

    def to_json(self) -> dict:
        return {
            "backend": self.backend,
            "profile": self.profile,
            "kernel": self.kernel,
            "config": self.config,
            "fingerprint": self.fingerprint,
            "summary": self.summary,
            "notes": self.notes,
            "kernel_warnings_outside_cases": self.kernel_warnings_outside_cases,
            "cases": [r.to_json() for r in self.results],
        }


NEED_ORDER = (NEED_NO_SVM, NEED_SVM, NEED_NESTED_STATE, NEED_SMM, *CONFIG_NEEDS)
Progress = Callable[[Result, int, int], None]


def skip_reason(backend, case: Case) -> str | None:
    caps = backend.capabilities()
    # The most basic missing capability first: no SVM explains no nested state.
    for need in sorted(case.needs, key=NEED_ORDER.index):
        reason = caps.get(need, f"backend {backend.name} cannot provide {need!r}")
        if reason:
            return reason
    return None


def run_cases(backend, cases: Sequence[Case], profile: str | None,
              progress: Progress | None = None, timeout: float = DEFAULT_TIMEOUT) -> list[Result]:
    """Judge every case; a backend with run_batch (qemu) runs them in one go."""
    runnable = [c for c in cases if skip_reason(backend, c) is None]
    batch = getattr(backend, "run_batch", None)
    observations: dict[str, Observation | str] = batch(runnable, timeout) if batch else {}
    results = []
    for i, case in enumerate(cases, 1):
        reason = skip_reason(backend, case)
        if reason:
            r = Result(case, j.Verdict(j.SKIP, reason))
        else:
            obs = observations.get(case.id) if batch else run_case(backend, case, timeout)
            if obs is None:
                r = Result(case, j.Verdict(j.ERROR, "no observation came back"))
            elif isinstance(obs, str):  # the guest found a capability missing
                r = Result(case, j.Verdict(j.SKIP, obs))
            else:
                r = Result(case, j.judge(case, obs, profile), obs)
        results.append(r)
        if progress:
            progress(r, i, len(cases))
    return results
