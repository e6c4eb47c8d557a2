"""`kvmtest matrix`: every (kernel or model profile) x configuration cell.

A cell is one `kvmtest run` of one kernel (qemu) or model profile in one
configuration (kvmtest.config), run as its own process through the same
code path as `kvmtest run --json`, so whatever makes a run faster or more
exact applies to a cell unchanged.  Cells run in parallel, at most -j at a
time; a cell that breaks (panic, no modules) is an error cell and the others
still run.

Shared boots: qemu cells of one kernel and CPU model differ only in kvm_amd
parameters, so they run as one group on one boot (`kvmtest cells`,
kvmtest.cellgroup): kvm and kvm_amd are reloaded between them instead of
booting again (docs/qemu.md section 5).  Each cell is still the `kvmtest
run` of its own options, with its own JSON, log and exit code.
KVMTEST_SHARE_BOOT=0 boots every cell.

Sharding (--shard K/N): the planned cells are dealt to N shards, a boot's
group whole, so every machine that is given the same plan computes the
same slice (Plan.shard); `kvmtest report merge` puts the shards back in
plan order.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import results as res
from .config import Config, ConfigError
from .judge import PROFILES

BACKENDS = ("qemu", "model")
FILE_KEYS = {"backend", "kernels", "profiles", "configs", "k", "timeout"}
DEFAULT_TIMEOUT = 5.0
# A cell's process is killed past this (a guard against a hang the run's own
# budgets missed): a download, a boot, and every case at its timeout.
CELL_BUDGET_BASE, CELL_BUDGET_PER_CASE = 900.0, 2.0


class MatrixUsageError(ValueError):
    """A matrix that cannot be planned (exit 2)."""


@dataclass(frozen=True)
class CellSpec:
    backend: str
    target: str  # kernel SPEC, or model:PROFILE
    config: Config
    profile: str | None  # model: the behaviour emulated; qemu: the expectation

    @property
    def key(self) -> str:
        return res.cell_key(self.target, self.config.label)

    def plan_entry(self) -> dict[str, Any]:
        return {"key": self.key, "target": self.target, "backend": self.backend,
                "profile": self.profile, "config": self.config.to_json()}

    def run_argv(self, k: str | None, timeout: float, json_out: Path,
                 artifacts: Path | None) -> list[str]:
        argv = [sys.executable, "-m", "kvmtest", "run", "--backend", self.backend,
                "--json", str(json_out), "--timeout", repr(timeout)]
        if self.profile:
            argv += ["--profile", self.profile]
        if k:
            argv += ["-k", k]
        if self.backend == "qemu":
            argv += ["--kernel", self.target]
            if self.config.cpu:
                argv += ["--cpu", self.config.cpu]
            if artifacts:
                argv += ["--artifacts", str(artifacts)]
        for name, value in self.config.kvm_amd:
            argv += ["--kvm-amd-param", f"{name}={value}"]
        return argv


@dataclass
class Plan:
    cells: list[CellSpec]  # in declared order: kernels (or profiles) outer, configs inner
    k: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    case_ids: list[str] = field(default_factory=list)

    @property
    def backend(self) -> str:
        return self.cells[0].backend

    def shard(self, index: int, count: int) -> list[CellSpec]:
        """Shard INDEX (1-based) of COUNT, in declared order.  The cells that
        can share a boot (boot_key) stay together: their groups, sorted by
        key, are dealt largest first, each to the shard with the fewest
        cells so far (the lowest on a tie).  Every machine given the same
        plan, in whatever order, computes the same slices; single cells
        (the model's) are dealt round-robin."""
        groups: dict[tuple, list[str]] = {}
        for c in sorted(self.cells, key=lambda c: c.key):
            groups.setdefault(boot_key(c), []).append(c.key)
        load, mine = [0] * count, set()
        for keys in sorted(groups.values(), key=lambda g: (-len(g), g[0])):
            to = min(range(count), key=lambda i: (load[i], i))
            load[to] += len(keys)
            if to == index - 1:
                mine.update(keys)
        return [c for c in self.cells if c.key in mine]

    def selection(self) -> dict[str, Any]:
        expect = self.cells[0].profile if self.backend == "qemu" else None
        return {"k": self.k, "timeout": self.timeout, "profile": expect}


def parse_shard(text: str) -> tuple[int, int]:
    k, slash, n = text.partition("/")
    try:
        index, count = int(k), int(n)
    except ValueError:
        index = count = 0
    if not slash or count < 1 or not 1 <= index <= count:
        raise MatrixUsageError(f"--shard wants K/N with 1 <= K <= N (e.g. 2/3), not {text!r}")
    return index, count


def load_file(path: str) -> dict[str, Any]:
    """A matrix file (TOML): backend, kernels, profiles, configs, k, timeout."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise MatrixUsageError(f"--file {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise MatrixUsageError(f"--file {path}: not TOML ({e})") from None
    unknown = set(data) - FILE_KEYS
    if unknown:
        raise MatrixUsageError(f"--file {path}: unknown keys {sorted(unknown)} "
                               f"(known: {', '.join(sorted(FILE_KEYS))})")
    for name in ("kernels", "profiles", "configs"):
        value = data.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise MatrixUsageError(f"--file {path}: {name} must be a list of strings")
    for name in ("backend", "k"):
        if name in data and not isinstance(data[name], str):
            raise MatrixUsageError(f"--file {path}: {name} must be a string")
    if "timeout" in data and (isinstance(data["timeout"], bool) or
                              not isinstance(data["timeout"], int | float)):
        raise MatrixUsageError(f"--file {path}: timeout must be a number of seconds")
    return data


def make_plan(*, backend: str | None = None, kernels: list[str] | None = None,
              profiles: list[str] | None = None, configs: list[str] | None = None,
              k: str | None = None, timeout: float | None = None,
              file: dict[str, Any] | None = None) -> Plan:
    """The cells of a matrix; command-line values replace the file's."""
    file = file or {}
    kernels = kernels or file.get("kernels") or []
    profiles = profiles or file.get("profiles") or []
    configs = configs or file.get("configs") or ["default"]
    k = k if k is not None else file.get("k")
    timeout = timeout if timeout is not None else float(file.get("timeout", DEFAULT_TIMEOUT))
    backend = backend or file.get("backend") or ("qemu" if kernels else "model")
    if backend not in BACKENDS:
        raise MatrixUsageError(f"matrix backend {backend!r}: choose from {', '.join(BACKENDS)}")
    if not math.isfinite(timeout) or timeout <= 0:
        raise MatrixUsageError(f"--timeout must be positive, not {timeout}")
    for p in profiles:
        if p not in PROFILES:
            raise MatrixUsageError(f"unknown profile {p!r} (choose from {', '.join(PROFILES)})")
    try:
        parsed = [Config.parse(c) for c in configs]
    except ConfigError as e:
        raise MatrixUsageError(str(e)) from None
    _no_duplicates("--config", [c.label for c in parsed])
    _no_duplicates("--kernel", kernels)
    _no_duplicates("--profile", profiles)
    if backend == "qemu":
        if not kernels:
            raise MatrixUsageError("matrix --backend qemu needs --kernel SPEC (one per kernel)")
        if len(profiles) > 1:
            raise MatrixUsageError("with --backend qemu, --profile is the behaviour every "
                                   "kernel is expected to show: give at most one")
        missing = [k for k in kernels if not k.startswith("debian:")
                   and not Path(k).expanduser().exists()]
        if missing:  # as for `kvmtest run`: a usage error before any cell runs
            raise MatrixUsageError(f"--kernel {missing[0]}: no such file or directory")
        expect = profiles[0] if profiles else None
        cells = [CellSpec("qemu", kern, c, expect) for kern in kernels for c in parsed]
    else:
        if kernels:
            raise MatrixUsageError("--kernel needs --backend qemu (the model's columns are "
                                   "--profile)")
        cpu = [c.label for c in parsed if c.cpu]
        if cpu:
            raise MatrixUsageError(f"configuration {cpu[0]!r}: the model has no CPU model "
                                   "(cpu= needs --backend qemu)")
        cells = [CellSpec("model", f"model:{p}", c, p)
                 for p in profiles or list(PROFILES) for c in parsed]
    return Plan(cells=cells, k=k, timeout=timeout, case_ids=_selected(backend, k))


def _no_duplicates(option: str, values: list[str]) -> None:
    seen = set()
    for v in values:
        if v in seen:
            raise MatrixUsageError(f"{option} {v!r} given twice")
        seen.add(v)


def _selected(backend: str, k: str | None) -> list[str]:
    from .cases import DEFAULT_MAXPHYADDR, catalogue
    from .selection import SelectionError, select

    maxphy = DEFAULT_MAXPHYADDR
    if backend == "model":
        from .model.cpuid import MAXPHYADDR as maxphy
    try:
        ids = [c.id for c in select(catalogue(maxphy), k)]
    except SelectionError as e:
        raise MatrixUsageError(str(e)) from None
    if not ids:
        raise MatrixUsageError(f"no case matches -k {k!r}")
    return ids


# --------------------------------------------------------------------------
# running


def _slug(key: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_.+" else "_" for ch in key).strip("_")


def _package(spec: CellSpec) -> dict | None:
    """The concrete kernel a qemu cell booted (the run resolved it, so this
    reads the cache); None when it cannot be told."""
    if spec.backend != "qemu":
        return None
    from .qemu.errors import QemuError
    from .qemu.kernels import resolve_kernel

    try:
        kern = resolve_kernel(spec.target)
    except (QemuError, OSError, ValueError):
        return None
    name = spec.target.removeprefix("debian:").partition("@")[0] \
        if spec.target.startswith("debian:") else None
    return {"name": name, "version": kern.package_version,
            "upstream": kern.upstream_version, "release": kern.release}


def _error_text(log: str) -> str:
    """`kvmtest run`'s own error message (it may span lines: a console tail),
    else the end of its stderr."""
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("kvmtest: error: "):
            return "\n".join([line.removeprefix("kvmtest: error: "), *lines[i + 1:]]).strip()
    return "\n".join(lines[-20:]).strip() or "the run exited without a report"


class Runner:
    """Runs cells as child processes; stop() ends every running one."""

    def __init__(self, plan: Plan, artifacts: Path | None = None) -> None:
        self.plan = plan
        self.artifacts = artifacts
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._stopping = False

    @property
    def budget(self) -> float:
        """Seconds a cell's run may take before it is killed."""
        return CELL_BUDGET_BASE + len(self.plan.case_ids) * (
            CELL_BUDGET_PER_CASE + self.plan.timeout)

    def _argv(self, spec: CellSpec, tmp: Path, name: str) -> tuple[list[str], Path, Path]:
        """(the cell's `kvmtest run` argv, its JSON, its log)."""
        where = tmp
        if self.artifacts:
            where = self.artifacts / _slug(spec.key)
            where.mkdir(parents=True, exist_ok=True)
        # A group's cells share TMP: each its own log there.
        out = tmp / f"{name}.json"
        log_path = where / "kvmtest-run.log" if self.artifacts else tmp / f"{name}.log"
        argv = spec.run_argv(self.plan.k, self.plan.timeout, out,
                             where / "qemu" if self.artifacts else None)
        return argv, out, log_path

    def _collect(self, spec: CellSpec, out: Path, log_path: Path, rc: int,
                 duration: float) -> dict:
        """The cell from its run's exit code, JSON and log."""
        if out.is_file() and rc in (0, res.RC_FAIL, res.RC_UNTESTED):
            run = json.loads(out.read_text())
            return res.cell_from_run(run, key=spec.key, target=spec.target, exit_code=rc,
                                     duration_s=duration, package=_package(spec))
        return self._error(spec, _error_text(log_path.read_text()), rc, duration)

    def run_cell(self, spec: CellSpec) -> dict:
        start = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="kvmtest-cell-") as tmp:
            argv, out, log_path = self._argv(spec, Path(tmp), "run")
            with open(log_path, "w") as log:
                rc = self._spawn(argv, log, self.budget)
            duration = round(time.monotonic() - start, 3)
            if rc is None:
                return self._error(spec, f"no result within {self.budget:.0f} s: the cell's "
                                   "run was killed", res.RC_KERNEL, duration)
            return self._collect(spec, out, log_path, rc, duration)

    def run_group(self, specs: list[CellSpec], started: Callable[[CellSpec], None],
                  finished: Callable[[CellSpec, dict], None]) -> None:
        """SPECS on one boot (`kvmtest cells`); STARTED and FINISHED are called
        as each cell starts and ends, FINISHED for every cell.  Each cell has
        the budget of a lone cell, from its start."""
        with tempfile.TemporaryDirectory(prefix="kvmtest-group-") as tmp_name:
            tmp = Path(tmp_name)
            entries, paths = [], {}
            for i, spec in enumerate(specs):
                argv, out, log_path = self._argv(spec, tmp, str(i))
                status = tmp / f"{i}.status"
                entries.append({"key": spec.key, "argv": argv[4:], "log": str(log_path),
                                "status": str(status)})  # argv[:4]: python -m kvmtest run
                paths[spec.key] = (spec, out, log_path, status)
            # Kept with the first cell's artifacts, if any: what ran on that boot.
            plan_dir = self.artifacts / _slug(specs[0].key) if self.artifacts else tmp
            (plan_dir / "group.json").write_text(json.dumps({"cells": entries}, indent=1))
            argv = [sys.executable, "-m", "kvmtest", "cells", str(plan_dir / "group.json")]
            left = {spec.key: spec for spec in specs}
            clock = time.monotonic()
            watchdog = _Watchdog(self.budget)
            over = (f"no result within {self.budget:.0f} s: the cell's run was killed "
                    "(on a shared boot)")

            def line(text: str) -> None:
                nonlocal clock
                what, _, key = text.strip().partition(" ")
                if key not in left:
                    return
                spec, out, log_path, status = paths[key]
                if what == "start":
                    watchdog.restart()
                    started(spec)
                elif what == "done":
                    del left[key]
                    rc = json.loads(status.read_text())["exit_code"]
                    now = time.monotonic()
                    duration, clock = round(now - clock, 3), now
                    finished(spec, self._error(spec, over, res.RC_KERNEL, duration)
                             if watchdog.fired else
                             self._collect(spec, out, log_path, rc, duration))

            with open(tmp / "group.log", "w+") as log:
                rc = self._spawn(argv, log, watchdog, lines=line)
                log.seek(0)
                text = log.read()
            for spec in list(left.values()):  # the group's process ended before them
                why = (f"not run: the shared boot's run was killed ({over})" if rc is None else
                       f"the shared boot's run ended (exit {rc}) before this cell: "
                       f"{_error_text(text)}")
                finished(spec, self._error(spec, why, rc or res.RC_KERNEL, 0.0))

    def _error(self, spec: CellSpec, text: str, rc: int, duration: float) -> dict:
        return res.error_cell(key=spec.key, target=spec.target, backend=spec.backend,
                              profile=spec.profile, config=spec.config.to_json(), error=text,
                              exit_code=rc, duration_s=duration)

    def _spawn(self, argv: list[str], log, budget: float | _Watchdog,
               lines: Callable[[str], None] | None = None) -> int | None:
        """The child's exit code, or None if it outlived its budget (seconds,
        or a _Watchdog the caller restarts).  LINES gets each line of its
        stdout (else stdout is discarded)."""
        with self._lock:
            if self._stopping:
                raise KeyboardInterrupt
            # Its own session: a kill reaches QEMU too, and the terminal's ^C
            # reaches only us (we stop the children ourselves).
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE if lines else subprocess.DEVNULL,
                                 stderr=log, start_new_session=True, text=bool(lines))
            self._procs.add(p)
        watchdog = budget if isinstance(budget, _Watchdog) else _Watchdog(budget)
        watchdog.start(lambda: _kill(p))
        try:
            if lines and p.stdout is not None:
                for text in p.stdout:
                    lines(text)
            p.wait()
            return None if watchdog.fired else p.returncode
        finally:
            watchdog.cancel()
            if p.poll() is None:  # LINES raised: the child must not run on unwatched
                _kill(p)
            if p.stdout is not None:
                p.stdout.close()
            with self._lock:
                self._procs.discard(p)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            procs = list(self._procs)
        for p in procs:
            _kill(p)


class _Watchdog:
    """Calls its action once SECONDS pass without a restart()."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.fired = False
        self._action: Callable[[], None] | None = None
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def start(self, action: Callable[[], None]) -> None:
        self._action = action
        self.restart()

    def restart(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            if self._action is not None and not self.fired:
                self._timer = threading.Timer(self.seconds, self._fire)
                self._timer.daemon = True
                self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
        if self._action is not None:
            self._action()

    def cancel(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()


def _kill(p: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, sig)
        try:
            p.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


Progress = Callable[[str], None]


def describe_done(cell: dict) -> str:
    if cell["status"] in (res.ERROR, res.MISSING):
        return f"{cell['error'].splitlines()[0] if cell['error'] else 'error'}"
    s = cell["summary"]
    return (f"{s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped, "
            f"{s['errors']} errors; fingerprint {cell['fingerprint']}")


def boot_groups(cells: list[CellSpec], share: bool | None = None) -> list[list[CellSpec]]:
    """The cells that share a boot: qemu cells of one kernel and CPU model
    (kvm_amd parameters apart), each group in plan order; larger groups
    first, so that the last to start are the shortest.  Not SHARE (default:
    unless KVMTEST_SHARE_BOOT=0): a cell per group."""
    if share is None:
        share = os.environ.get("KVMTEST_SHARE_BOOT") != "0"
    if not share:
        return [[c] for c in cells]
    groups: dict[tuple, list[CellSpec]] = {}
    for c in cells:
        groups.setdefault(boot_key(c), []).append(c)
    return sorted(groups.values(), key=len, reverse=True)


def boot_key(cell: CellSpec) -> tuple:
    """Cells with one key can share a boot: qemu, one kernel, one CPU model."""
    return ("qemu", cell.target, cell.config.cpu) if cell.backend == "qemu" else ("cell", cell.key)


def run(plan: Plan, cells: list[CellSpec], *, jobs: int, shard: str | None = None,
        artifacts: Path | None = None, progress: Progress | None = None,
        share: bool | None = None) -> dict:
    """Run CELLS (all of the plan, or one shard) and return the matrix result."""
    say = progress or (lambda _line: None)
    runner = Runner(plan, artifacts)
    began = time.monotonic()
    n = len(cells)
    width = len(str(n))
    counter = iter(range(1, n + 1))
    counter_lock = threading.Lock()

    numbers: dict[str, int] = {}
    finished_cells: dict[str, dict] = {}

    def started(spec: CellSpec) -> None:
        with counter_lock:
            i = numbers[spec.key] = next(counter)
        say(f"[{i:>{width}}/{n}] start  {spec.key}")

    def finished(spec: CellSpec, cell: dict) -> None:
        if spec.key not in numbers:  # its group ended before it started
            started(spec)
        mark = {res.PASS: "PASS", res.FAIL: "FAIL", res.UNTESTED: "NONE"}.get(
            cell["status"], "ERROR")
        say(f"[{numbers[spec.key]:>{width}}/{n}] {mark:<6} {spec.key}: {describe_done(cell)} "
            f"({cell['duration_s']:.1f} s)")
        finished_cells[spec.key] = cell

    def one(group: list[CellSpec]) -> None:
        if len(group) > 1:
            runner.run_group(group, started, finished)
            return
        started(group[0])
        finished(group[0], runner.run_cell(group[0]))

    pool = ThreadPoolExecutor(max_workers=max(1, min(jobs, n or 1)),
                              thread_name_prefix="kvmtest-cell")
    try:
        futures = [pool.submit(one, g) for g in boot_groups(cells, share)]
        for f in futures:
            f.result()
        done = [finished_cells[c.key] for c in cells]
    except BaseException:
        runner.stop()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    infos = res.catalogue_info(plan.case_ids, plan.backend)
    result = {
        "schema": res.SCHEMA,
        "plan": [c.plan_entry() for c in plan.cells],
        "shard": shard,
        "selection": plan.selection(),
        "cells": done,
        "cases": [infos[i] for i in plan.case_ids if i in infos],
        "wall_s": round(time.monotonic() - began, 3),
    }
    return res.finish(result)
