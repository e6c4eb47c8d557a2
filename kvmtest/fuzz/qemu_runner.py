"""Scenarios on a kernel booted under QEMU.

Each scenario becomes a Case (Scenario.to_case) and runs through
kvmtest.qemu.session, the transport of `kvmtest run --backend qemu`: the
isolated guest, the strictly checked channel, observations decoded on the
host.  One boot serves every batch until the kernel dies; a kernel that dies
with a scenario in flight (panic, lockup, no answer) gives that scenario a
``crash`` result with the console tail, and the next batch boots again.
QEMU is always reaped (kvmtest.qemu.process).
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from ..backends import BackendError, KernelError
from ..config import Config
from ..kmod import KmodError, check_vermagic
from ..observation import Observation
from ..qemu.errors import QemuError
from ..qemu.kernels import resolve_kernel
from .runners import DEFAULT_TIMEOUT, RunResult
from .spec import Scenario

# Console lines that are a kernel bug's headline (as kvmtest.backends.qemu).
HEADLINE = re.compile(r"WARNING:|BUG:|Oops|kernel BUG|general protection fault")
HISTORY = 16  # specs that ran before a WARN or a crash in the same boot, kept


def qemu_fatal(log: Path) -> str | None:
    """QEMU's own abort ('qemu: fatal: ...'): the emulator died, not the kernel."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    m = re.search(r"^qemu: fatal: .*$", text, re.M)
    return m.group(0).strip() if m else None


class SessionRunner:
    """Scenarios as Cases over kvmtest.qemu.session.QemuSession: one boot
    serves every batch until the kernel dies; the case in flight then gets a
    ``crash`` result and the next batch boots again."""

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
        self.boots = 0
        self.facts = None
        self.unattributed: list[str] = []
        self._session = None
        self._ran: list[str] = []  # specs run in the current boot

    def _open(self):
        from ..qemu.session import QemuSession

        self.boots += 1
        s = QemuSession(self.kernel, config=self.config, kvm_modules=self.kvm_modules,
                        artifacts=self.workdir / f"boot-{self.boots:03d}", keep=True)
        try:
            s.__enter__()  # start(), torn down if it fails; open until close()
        except QemuError as e:
            raise KernelError(f"{self.label}: {e}") from None
        facts = s.facts
        if facts is None or facts.error or not facts.svm or not facts.nested_state:
            s.close()
            raise KernelError(f"{self.label}: the guest kernel's KVM has no nested SVM "
                              f"(facts: {facts})")
        self.facts, self._session, self._ran = facts, s, []
        return s

    def run(self, scenarios: Sequence[Scenario]) -> list[RunResult]:
        from ..qemu.errors import GuestFault

        results: dict[int, RunResult] = {}
        todo = list(range(len(scenarios)))
        while todo:
            session = self._session or self._open()
            # Case ids must be unique in a batch: the spec, numbered.
            cases = {f"fuzz/{k}/{scenarios[i].format()}": i for k, i in enumerate(todo)}
            batch = [replace(scenarios[i].to_case(), id=cid) for cid, i in cases.items()]
            try:
                for case_id, result in session.run(batch, timeout=self.timeout):
                    i = cases[case_id]
                    self._ran.append(scenarios[i].format())
                    results[i] = _result(result, self._ran)
            except GuestFault as fault:
                self._session = None
                i = cases.get(fault.case or "")
                if i is None:
                    raise KernelError(f"{self.label}: {fault.what} (no scenario in flight; "
                                      f"artifacts {fault.artifacts})") from None
                fatal = qemu_fatal(Path(fault.artifacts) / "qemu.log") if fault.artifacts else None
                results[i] = RunResult(crash=f"{fatal or fault.what}\n{fault.console_tail}",
                                       history=self._ran[-HISTORY:])
            todo = [i for i in todo if i not in results]
        return [results[i] for i in range(len(scenarios))]

    def close(self) -> None:
        s, self._session = self._session, None
        if s is not None:
            try:
                s.close()
            except QemuError as e:  # a WARN or panic at teardown: still reported
                self.unattributed.append(str(e).splitlines()[0])
            self.unattributed += [w for w in s.console_warnings() if HEADLINE.match(w)]


def _result(result, ran: list[str]) -> RunResult:
    if isinstance(result, Observation):
        r = RunResult(observation=result)
        if result.kernel_warnings:
            r.console = list(result.kernel_warnings)
            r.history = ran[-1 - HISTORY:-1]
        return r
    return RunResult(skipped=str(getattr(result, "message", result))[:500])


def make_runner(kernel: str, **options) -> SessionRunner:
    return SessionRunner(kernel, **options)
