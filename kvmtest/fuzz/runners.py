"""Run scenarios on one target and bring back what it did.

A runner takes a batch of scenarios and returns one RunResult per scenario,
in order.  Targets:

- ModelRunner: the Unicorn model with one profile; also reports which of
  the model's checks fired (coverage feedback for the generator).
- qemu (qemu_runner.py): a kernel booted under QEMU; the scenarios cross to
  the guest as their one-line specs.

A kernel that crashes or hangs with a scenario in flight gives that
scenario a RunResult with ``crash`` set; the runner reboots for the rest.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from ..backends.model import ModelBackend
from ..model import checks
from ..observation import Observation
from ..runner import run_case
from .spec import Scenario

DEFAULT_TIMEOUT = 1.0  # s per scenario: a kernel answers in milliseconds


@dataclass
class RunResult:
    observation: Observation | None = None
    crash: str | None = None  # the kernel died or hung: what the console said
    skipped: str | None = None  # the target cannot run this kind of scenario
    fired: frozenset[str] = frozenset()  # model only: checks that failed
    console: list[str] = field(default_factory=list)  # kernel-log excerpt
    # Kernels: what ran before in the same boot, when a WARN or crash came
    # (a WARN_ON_ONCE, or state left by earlier scenarios).
    history: list[str] = field(default_factory=list)


class Runner(Protocol):
    label: str  # e.g. "model:fixed", "6.1.0-47-amd64"
    profile: str | None  # the model profile of this target, when known

    def run(self, scenarios: Sequence[Scenario]) -> list[RunResult]: ...

    def close(self) -> None: ...


class _Probe:
    """The model backend, remembering the machine each case ran on (to read
    the model's last failure afterwards)."""

    def __init__(self, backend: ModelBackend) -> None:
        self.backend = backend
        self.last_failure: tuple[str, list[str]] | None = None

    def capabilities(self) -> dict[str, str | None]:
        return self.backend.capabilities()

    def kernel_log(self):
        return self.backend.kernel_log()

    @contextmanager
    def machine(self, payload, svm: bool) -> Iterator[object]:
        with self.backend.machine(payload, svm) as m:
            try:
                yield m
            finally:
                self.last_failure = m.svm.last_failure


class ModelRunner:
    def __init__(self, profile: str, timeout: float = DEFAULT_TIMEOUT,
                 kvm_amd_params: dict[str, str] | None = None) -> None:
        self.profile = profile
        self.label = f"model:{profile}"
        self.timeout = timeout
        self.backend = ModelBackend(profile, kvm_amd_params=kvm_amd_params)
        self._probe = _Probe(self.backend)
        self.maxphyaddr = self.backend.maxphyaddr

    def run(self, scenarios: Sequence[Scenario]) -> list[RunResult]:
        out = []
        for s in scenarios:
            out.append(self.run_one(s))
        return out

    def run_one(self, s: Scenario) -> RunResult:
        fired: list[str] = []
        checks.on_checked = fired.extend
        self._probe.last_failure = None
        try:
            obs = run_case(self._probe, s.to_case(), self.timeout)
        finally:
            checks.on_checked = None
        late = self._probe.last_failure
        if late is not None and late[0] != "consistency":
            fired += [f"{late[0]}:{why}" for why in late[1]]
        return RunResult(observation=obs, fired=frozenset(fired))

    def close(self) -> None:
        self.backend.close()
