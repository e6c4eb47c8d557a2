"""Scenarios on a kernel booted under QEMU.

The scenarios cross to the guest as their one-line specs (the spec is the
codec: kvmtest.fuzz.agent parses them back into Cases and runs them on the
guest kernel's KVM with the shared host loop).

BootRunner boots once per batch with kvmtest.qemu.machine.boot: a batch
costs one boot (3-5 s under TCG) plus its scenarios.  A kernel that dies
with a scenario in flight (panic, lockup, no answer) gives that scenario a
``crash`` result with the console tail; the rest of the batch runs in a new
boot.  QEMU is always reaped (kvmtest.qemu.machine).
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..backends import BackendError, KernelError
from ..backends.qemu import HEADLINE, agent_env
from ..config import Config
from ..kmod import KmodError, check_vermagic
from ..observation import Observation
from ..qemu.errors import QemuError
from ..qemu.kernels import resolve_kernel
from .runners import DEFAULT_TIMEOUT, RunResult
from .spec import Scenario

BOOT_BUDGET = 90.0  # boot + module load under TCG, with a margin
PER_SCENARIO = 1.0  # s on top of the scenario timeout


class BootRunner:
    def __init__(self, kernel: str, config: Config | None = None, profile: str | None = None,
                 kvm_modules: str | None = None, modules: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, workdir: str | None = None) -> None:
        try:
            self.kernel = resolve_kernel(kernel, modules=modules)
        except QemuError as e:
            raise BackendError(str(e)) from None
        if kvm_modules:
            try:
                check_vermagic(Path(kvm_modules), self.kernel.release)
            except KmodError as e:
                raise BackendError(str(e)) from None
        self.spec = kernel
        self.config = config or Config()
        self.profile = profile
        self.kvm_modules = kvm_modules
        self.timeout = timeout
        self.label = self.kernel.release
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="kvmtest-fuzz-"))
        self.facts: dict = {}
        self.boots = 0
        self.boot_seconds = 0.0
        self.unattributed: list[str] = []  # WARN/BUG lines outside any scenario

    def run(self, scenarios: Sequence[Scenario]) -> list[RunResult]:
        results: dict[int, RunResult] = {}
        todo = list(range(len(scenarios)))
        while todo:
            done_now = self._boot([scenarios[i] for i in todo])
            if not done_now:
                raise KernelError(f"{self.label}: a boot ran no scenario (console: "
                                  f"{self.workdir / 'console.log'})")
            for j, r in done_now.items():
                results[todo[j]] = r
            todo = [i for k, i in enumerate(todo) if k not in done_now]
        return [results[i] for i in range(len(scenarios))]

    def _boot(self, scenarios: Sequence[Scenario]) -> dict[int, RunResult]:
        from ..qemu.machine import boot

        out = self.workdir
        out.mkdir(parents=True, exist_ok=True)
        request, results = out / "fuzz-request.json", out / "fuzz-results.jsonl"
        results.unlink(missing_ok=True)
        request.write_text(json.dumps({"specs": [s.format() for s in scenarios],
                                       "timeout": self.timeout}))
        params = {"nested": "1", **self.config.kvm_amd_params}
        try:
            g = boot(self.kernel, [sys.executable, "-S", "-m", "kvmtest.fuzz.agent",
                                   str(request), str(results)],
                     env=_env(), outdir=out,
                     cpu=self.config.cpu, kvm_amd_params=params,
                     kvm_modules_dir=self.kvm_modules,
                     timeout=BOOT_BUDGET + len(scenarios) * (self.timeout + PER_SCENARIO))
        except QemuError as e:
            raise KernelError(str(e)) from None
        self.boots += 1
        self.boot_seconds += g.wall_s
        records = _records(results)
        where = f"(console: {g.console_log})"
        facts = next((r["facts"] for r in records if "facts" in r), None)
        if facts is None:
            bad = [m for m in g.modules if m.status not in ("ok", "builtin")]
            what = "; ".join(f"{m.name}: {m.status} {m.detail}".strip() for m in bad)
            raise KernelError(f"{self.label}: the fuzz agent never started "
                              f"({what or g.failure() or 'no answer'}) {where}\n"
                              f"{g.console_tail()}")
        if "error" in records[0]:
            raise KernelError(f"{self.label}: guest: {records[0]['error']} {where}")
        if not facts.get("svm") or not facts.get("nested_state"):
            raise KernelError(f"{self.label}: the guest kernel's KVM has no nested SVM "
                              f"(facts: {facts}) {where}")
        self.facts = facts
        done: dict[int, RunResult] = {}
        in_flight = None
        seen: set[str] = set()
        for r in records:
            i = r.get("i")
            if i is None:
                continue
            if r.get("begin"):
                in_flight = i
            elif "observation" in r:
                obs = Observation(**r["observation"])
                seen.update(obs.kernel_warnings or [])
                done[i] = RunResult(observation=obs)
                in_flight = None
            elif "skip" in r or "error" in r:
                done[i] = RunResult(skipped=r.get("skip") or r.get("error"))
        finished = any(r.get("done") for r in records)
        if not finished and in_flight is not None:
            done[in_flight] = RunResult(crash=_crash_text(g), console=g.oopses)
        self.unattributed += [w for w in g.oopses if HEADLINE.match(w) and w not in seen]
        return done

    def close(self) -> None:
        pass


def _env() -> dict[str, str]:
    """The guest's environment, with every payload a scenario can use built."""
    from .spec import KIND_SMM

    return agent_env([Scenario().to_case(), Scenario(kind=KIND_SMM).to_case()])


def _records(path: Path) -> list[dict]:
    """The agent's JSON lines; a torn last line (the kernel died) is dropped."""
    out = []
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            break
    return out


def _crash_text(g) -> str:
    what = ("panic: " + (g.panic_message or "") if g.panicked else
            "no answer within the time budget" if g.timed_out else
            f"the agent stopped (rc {g.returncode})")
    return f"{what}\n{g.console_tail(60)}"
