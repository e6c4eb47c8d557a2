"""The matrix result: cells (kernel or model profile x configuration) x cases.

One JSON form serves `kvmtest matrix --json`, `kvmtest report merge` and every
renderer (HTML, JUnit, KTAP); a saved `kvmtest run --json` report loads as a
one-cell matrix.  The schema is documented in docs/ci.md ("The matrix JSON").

A cell's status follows `kvmtest run`'s exit code: 0 pass, 1 fail, 125
untested (nothing passed: everything skipped), anything else an error (the
kernel broke, the environment is missing something); "missing" marks a
planned cell no shard reported.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import parity
from .case import Case
from .observation import Observation

SCHEMA = "kvmtest-matrix/1"
PASS, FAIL, ERROR, UNTESTED, MISSING = "pass", "fail", "error", "untested", "missing"
STATUS_BY_RC = {0: PASS, 1: FAIL, 125: UNTESTED}
# `kvmtest run`'s exit codes that a matrix passes on (README: Exit codes).
RC_FAIL, RC_ENV, RC_KERNEL, RC_UNTESTED = 1, 3, 4, 125
# Per-case fields a cell keeps (the static ones live once, in "cases").
RESULT_FIELDS = ("id", "verdict", "reason", "profiles", "observed", "observed_summary")


class ReportFileError(ValueError):
    """A file that is neither a run report nor a matrix result."""


def case_info(case: Case, expected: Any = None) -> dict[str, Any]:
    """What the HTML detail shows about a case besides its result: the VMCB12
    fields it changes, its params, the memory it adds, its source."""
    if expected is None:
        expected = case.expect.describe() if not case.profiles else {
            p: e.describe() for p, e in case.profiles.items()}
    return {
        "id": case.id,
        "family": case.family,
        "gif_mode": case.gif_mode,
        "scenario": case.scenario,
        "expected": expected,
        "source": case.source,
        "control_of": case.control_of,
        "configs": case.configs,
        "vmcb": {k: hex(v) for k, v in case.vmcb.items()},
        "smm_vmcb": {k: hex(v) for k, v in case.smm_vmcb.items()},
        "params": {k: hex(v) for k, v in case.params.items()},
        "memory": [{"gpa": hex(gpa), "bytes": len(data), "head": data[:16].hex()}
                   for gpa, data in sorted(case.memory.items())],
    }


def catalogue_info(ids: Iterable[str], backend: str | None) -> dict[str, dict]:
    """case_info for the ids the catalogue knows (an unknown id, e.g. from an
    older kvmtest, simply has no details)."""
    from .cases import DEFAULT_MAXPHYADDR, catalogue

    maxphy = DEFAULT_MAXPHYADDR
    if backend == "model":
        from .model.cpuid import MAXPHYADDR as maxphy
    by_id = {c.id: c for c in catalogue(maxphy)}
    return {i: case_info(by_id[i]) for i in ids if i in by_id}


def run_exit_code(run: dict) -> int:
    """`kvmtest run`'s exit code for a saved run report (session.Report.exit_code)."""
    s = run["summary"]
    if s["failed"] or s["errors"] or run.get("kernel_warnings_outside_cases"):
        return RC_FAIL
    return RC_UNTESTED if s["passed"] == 0 else 0


def cell_from_run(run: dict, *, key: str, target: str, exit_code: int | None = None,
                  duration_s: float | None = None, package: dict | None = None) -> dict:
    """A matrix cell from a `kvmtest run --json` report."""
    rc = run_exit_code(run) if exit_code is None else exit_code
    return {
        "key": key,
        "target": target,
        "backend": run["backend"],
        "profile": run.get("profile"),
        "config": run.get("config") or {"label": "default", "cpu": None, "kvm_amd": {}},
        "kernel": run.get("kernel"),
        "package": package,
        "fingerprint": run.get("fingerprint"),
        "summary": run["summary"],
        "status": STATUS_BY_RC.get(rc, ERROR),
        "exit_code": rc,
        "error": None,
        "duration_s": duration_s,
        "notes": run.get("notes", []),
        "kernel_warnings_outside_cases": run.get("kernel_warnings_outside_cases", []),
        "results": [{k: c.get(k) for k in RESULT_FIELDS} for c in run["cases"]],
    }


def error_cell(*, key: str, target: str, backend: str, profile: str | None, config: dict,
               error: str, exit_code: int, status: str = ERROR,
               duration_s: float | None = None) -> dict:
    """A cell that produced no run report (the kernel broke, a shard is missing)."""
    return {"key": key, "target": target, "backend": backend, "profile": profile,
            "config": config, "kernel": None, "package": None, "fingerprint": None,
            "summary": {"passed": 0, "failed": 0, "skipped": 0, "errors": 0},
            "status": status, "exit_code": exit_code, "error": error,
            "duration_s": duration_s, "notes": [], "kernel_warnings_outside_cases": [],
            "results": []}


def run_target(run: dict) -> str:
    """The column's subject in a run report: the kernel spec, or model:PROFILE."""
    if run["backend"] == "model":
        return f"model:{run.get('profile') or '7.x'}"
    return str(run.get("kernel"))


def cell_key(target: str, config_label: str) -> str:
    return f"{target} [{config_label}]"


def from_run(run: dict) -> dict:
    """A saved run report as a one-cell matrix result."""
    target = run_target(run)
    label = (run.get("config") or {}).get("label", "default")
    cell = cell_from_run(run, key=cell_key(target, label), target=target)
    infos = catalogue_info([c["id"] for c in run["cases"]], run["backend"])
    cases = []
    for c in run["cases"]:
        info = infos.get(c["id"]) or {"id": c["id"], "family": c.get("family"),
                                      "gif_mode": c.get("gif_mode")}
        # The run's own expectation and source text win over today's catalogue.
        cases.append({**info, "expected": c.get("expected"), "source": c.get("source")})
    return finish({"schema": SCHEMA, "plan": None, "shard": None, "selection": {},
                   "cells": [cell], "cases": cases})


def summary(cells: list[dict]) -> dict[str, int]:
    counts = {"cells": len(cells), PASS: 0, FAIL: 0, ERROR: 0, UNTESTED: 0, MISSING: 0}
    for c in cells:
        counts[c["status"]] += 1
    return counts


def exit_code(cells: list[dict]) -> int:
    """0 when no cell failed or broke; else 1 (a case failed somewhere), then 4
    (a kernel broke or a cell's result is missing), then 3 (environment);
    125 when no cell tested anything."""
    rcs = [c["exit_code"] for c in cells]
    if RC_FAIL in rcs:
        return RC_FAIL
    broken = [c["exit_code"] for c in cells if c["status"] in (ERROR, MISSING)]
    if broken:
        return RC_ENV if all(rc == RC_ENV for rc in broken) else RC_KERNEL
    if cells and all(c["status"] == UNTESTED for c in cells):
        return RC_UNTESTED
    return 0


def finish(result: dict) -> dict:
    """Recompute the derived top-level fields."""
    result["summary"] = summary(result["cells"])
    result["exit_code"] = exit_code(result["cells"])
    return result


def load(path: str | Path) -> dict:
    """A matrix result or a run report from PATH, as a matrix result."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise ReportFileError(f"{path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportFileError(f"{path}: not JSON ({e})") from None
    return from_json(data, str(path))


def from_json(data: Any, where: str = "input") -> dict:
    if isinstance(data, dict) and data.get("schema") == SCHEMA:
        if not isinstance(data.get("cells"), list) or not isinstance(data.get("cases"), list):
            raise ReportFileError(f"{where}: matrix result without cells/cases")
        return data
    if isinstance(data, dict) and isinstance(data.get("schema"), str) and \
            data["schema"].startswith("kvmtest-matrix/"):
        raise ReportFileError(f"{where}: matrix schema {data['schema']!r} is not {SCHEMA!r} "
                              "(written by another kvmtest version)")
    if isinstance(data, dict) and {"backend", "summary", "cases"} <= data.keys() and \
            isinstance(data["cases"], list):
        try:
            return from_run(data)
        except (KeyError, TypeError, AttributeError) as e:
            raise ReportFileError(f"{where}: malformed run report ({e!r})") from None
    raise ReportFileError(f"{where}: neither a `kvmtest run --json` report nor a "
                          "`kvmtest matrix --json` result")


def merge(results: list[dict]) -> dict:
    """Cells of several results (shards of one matrix, or any runs) as one.

    Shards of one plan come back in the plan's order, and a planned cell no
    shard reported is a "missing" cell (exit 4); the same cell twice is an
    error, since nothing says which one to keep."""
    if not results:
        raise ReportFileError("nothing to merge")
    cells: dict[str, dict] = {}
    for r in results:
        for c in r["cells"]:
            if c["key"] in cells:
                raise ReportFileError(f"cell {c['key']!r} appears in more than one input")
            cells[c["key"]] = c
    plans = {json.dumps(r.get("plan")) for r in results}
    plan = results[0].get("plan") if len(plans) == 1 else None
    selections = {json.dumps(r.get("selection"), sort_keys=True) for r in results}
    ordered: list[dict] = []
    if plan:
        for entry in plan:
            c = cells.pop(entry["key"], None)
            ordered.append(c or error_cell(
                key=entry["key"], target=entry["target"], backend=entry["backend"],
                profile=entry.get("profile"), config=entry["config"], status=MISSING,
                exit_code=RC_KERNEL,
                error="no result for this cell: its shard did not report"))
    ordered.extend(cells.values())  # not planned (plain runs, other matrices)
    case_ids: dict[str, dict] = {}
    for r in results:
        for info in r["cases"]:
            case_ids.setdefault(info["id"], info)
    return finish({
        "schema": SCHEMA,
        "plan": plan,
        "shard": None,
        "selection": results[0].get("selection", {}) if len(selections) == 1 else {},
        "cells": ordered,
        "cases": list(case_ids.values()),
    })


def differences(result: dict) -> dict[str, dict[str, Any]]:
    """case id -> {"verdicts": bool, "fields": [observed fields that differ]}
    across the cells that have a result for the case (kvmtest.parity's
    fields).  A cell without a result for a case (it broke, or did not
    select the case) is not a difference."""
    per_case: dict[str, list[dict]] = {}
    for cell in result["cells"]:
        for r in cell["results"]:
            per_case.setdefault(r["id"], []).append(r)
    out = {}
    for case_id, rs in per_case.items():
        verdicts = len({r["verdict"] for r in rs}) > 1
        obs = [_observation(r["observed"]) for r in rs if r.get("observed")]
        fields: set[str] = set()
        for other in obs[1:]:
            fields.update(d.field for d in parity.diff(obs[0], other))
        out[case_id] = {"verdicts": verdicts, "fields": sorted(fields)}
    return out


def _observation(data: dict) -> Observation:
    known = Observation.__dataclass_fields__
    return Observation(**{k: v for k, v in data.items() if k in known})
