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
import re
import sys
import tempfile
import types
import typing
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

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
BOOT_BUDGET = 90.0  # boot + module load under TCG, with a margin
PER_SCENARIO = 1.0  # s on top of the scenario timeout
HISTORY = 16  # specs that ran before a WARN or a crash in the same boot, kept


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
        console = _keep_console(g.console_log, self.boots)
        records = _records(results)
        where = f"(console: {g.console_log})"
        facts = next((r["facts"] for r in records if isinstance(r, dict) and "facts" in r
                      and isinstance(r["facts"], dict)), None)
        if facts is None:
            bad = [m for m in g.modules if m.status not in ("ok", "builtin")]
            what = "; ".join(f"{m.name}: {m.status} {m.detail}".strip() for m in bad)
            raise KernelError(f"{self.label}: the fuzz agent never started "
                              f"({what or g.failure() or 'no answer'}) {where}\n"
                              f"{g.console_tail()}")
        first = records[0] if isinstance(records[0], dict) else {}
        if "error" in first:
            raise KernelError(f"{self.label}: guest: {str(first['error'])[:500]} {where}")
        if not facts.get("svm") or not facts.get("nested_state"):
            raise KernelError(f"{self.label}: the guest kernel's KVM has no nested SVM "
                              f"(facts: {facts}) {where}")
        self.facts = facts
        done: dict[int, RunResult] = {}
        in_flight = None
        seen: set[str] = set()
        ran: list[str] = []  # the specs this boot ran, in order
        for r in records:
            i = r.get("i") if isinstance(r, dict) else None
            if i is None:
                continue
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(scenarios):
                raise GuestDataError(f"{self.label}: the guest named scenario {i!r} of "
                                     f"{len(scenarios)}")
            if r.get("begin"):
                in_flight = i
                ran.append(scenarios[i].format())
            elif "observation" in r:
                obs = decode_observation(r["observation"])
                seen.update(obs.kernel_warnings or [])
                done[i] = RunResult(observation=obs)
                if obs.kernel_warnings:
                    done[i].console = _excerpt(console, obs.kernel_warnings)
                    done[i].history = ran[-1 - HISTORY:-1]
                in_flight = None
            elif "skip" in r or "error" in r:
                done[i] = RunResult(skipped=str(r.get("skip") or r.get("error"))[:500])
        finished = any(isinstance(r, dict) and r.get("done") is True for r in records)
        if not finished and in_flight is not None:
            done[in_flight] = RunResult(crash=_crash_text(g), console=g.oopses,
                                        history=ran[-1 - HISTORY:-1])
        self.unattributed += [w for w in g.oopses if HEADLINE.match(w) and w not in seen]
        return done

    def close(self) -> None:
        pass


class GuestDataError(KernelError):
    """The guest sent an observation that does not decode."""


_TYPES = {int: int, str: str, bool: bool}


def _check(value: Any, hint: Any, where: str) -> None:
    """value against a type hint of Observation (None, int, bool, str, and
    lists/dicts of those): the guest is untrusted, nothing is taken loosely."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        for h in args:
            try:
                _check(value, h, where)
                return
            except GuestDataError:
                continue
        raise GuestDataError(f"guest observation: {where} has type {type(value).__name__}")
    if hint is type(None):
        if value is not None:
            raise GuestDataError(f"guest observation: {where} is not null")
        return
    if origin is list:
        if not isinstance(value, list) or len(value) > 4096:
            raise GuestDataError(f"guest observation: {where} is not a list")
        for i, v in enumerate(value):
            _check(v, args[0], f"{where}[{i}]")
        return
    if origin is dict:
        if not isinstance(value, dict) or len(value) > 64:
            raise GuestDataError(f"guest observation: {where} is not a small object")
        for k, v in value.items():
            _check(k, args[0], f"{where} key")
            _check(v, args[1], f"{where}.{k}")
        return
    want = _TYPES.get(hint)
    ok = isinstance(value, want) if want is not None else False
    if want is int:
        ok = ok and not isinstance(value, bool) and -(1 << 63) <= value < 1 << 64
    if want is str:
        ok = ok and len(value) <= 4096
    if not ok:
        raise GuestDataError(f"guest observation: {where} is not {getattr(hint, '__name__', hint)}")


def decode_observation(data: Any) -> Observation:
    """An Observation from the guest's JSON, checked field by field."""
    hints = typing.get_type_hints(Observation)
    if not isinstance(data, dict):
        raise GuestDataError("guest observation is not an object")
    if not isinstance(data.get("outcome"), str):
        raise GuestDataError("guest observation has no outcome")
    unknown = set(data) - set(hints)
    if unknown:
        raise GuestDataError(f"guest observation has unknown fields {sorted(unknown)[:5]}")
    for name, value in data.items():
        _check(value, hints[name], name)
    return Observation(**data)


def _keep_console(path: Path, boot: int) -> str:
    """The boot's console, kept as console-NNN.log (the next boot rewrites
    console.log); returns its text."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    (path.parent / f"console-{boot:03d}.log").write_text(text)
    return text


_CUT = "------------[ cut here ]------------"


def _excerpt(console: str, headlines: list[str], limit: int = 60) -> list[str]:
    """The console lines of each warning: from its 'cut here' marker (or the
    headline) to its end marker, at most `limit` lines each."""
    lines = console.splitlines()
    out: list[str] = []
    for head in headlines:
        if not re.search(r"WARNING|BUG|Oops|UBSAN|KASAN", head):
            continue
        at = next((i for i, ln in enumerate(lines) if head in ln), None)
        if at is None:
            continue
        start = at - 1 if at and _CUT in lines[at - 1] else at
        end = next((j for j in range(at, min(len(lines), at + limit))
                    if "end trace" in lines[j]), min(len(lines), at + limit) - 1)
        out += lines[start:end + 1]
    return out


def _env() -> dict[str, str]:
    """The guest's environment, with every payload a scenario can use built."""
    from ..backends.qemu import agent_env  # the boot-per-batch transport's helper
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


def qemu_fatal(log: Path) -> str | None:
    """QEMU's own abort ('qemu: fatal: ...'): the emulator died, not the kernel."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    m = re.search(r"^qemu: fatal: .*$", text, re.M)
    return m.group(0).strip() if m else None


def _crash_text(g) -> str:
    fatal = qemu_fatal(g.outdir / "ctl" / "qemu.log")
    what = (fatal if fatal else
            "Kernel panic: " + (g.panic_message or "") if g.panicked else
            "no answer within the time budget" if g.timed_out else
            f"the agent stopped (rc {g.returncode})")
    return f"{what}\n{g.console_tail(60)}"


# ---- one boot for many batches: kvmtest.qemu.session (when available) ------------


def session_available() -> bool:
    try:
        import kvmtest.qemu.session  # noqa: F401
    except ImportError:
        return False
    return True


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
            s.__enter__()
        except QemuError as e:
            raise KernelError(f"{self.label}: {e}") from None
        facts = s.facts
        if facts is None or facts.error or not facts.svm or not facts.nested_state:
            s.__exit__(None, None, None)
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


def make_runner(kernel: str, **options):
    """The best transport available: one session per kernel, or a boot per
    batch before kvmtest.qemu.session exists."""
    return (SessionRunner if session_available() else BootRunner)(kernel, **options)
