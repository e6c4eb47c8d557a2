"""Mutation score of the code that decides verdicts (scripts/mutation.sh).

mutmut (configured in pyproject.toml, [tool.mutmut]) seeds one small bug at a
time into a copy of the tree (mutants/) and runs the fast tests that call the
mutated function; a mutant no test fails on "survived".  This script runs it
over the modules below and prints the score per module, the overall score and
every surviving mutant.  Survivors judged equivalent (no observable change)
are listed with the reason in docs/mutation.md and marked so here.

Not part of CI: a full run takes about half an hour on 2 cores.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = ROOT / "mutants"
EQUIVALENT_DOC = ROOT / "docs" / "mutation.md"

# The VMRUN path of the model (kvmtest/model/svm.py): L1's VMRUN from the
# permission and operand checks through KVM's consistency checks, the late
# failures, entering L2 and injecting EVENTINJ, to the #VMEXIT that brings L1
# back and the GIF/guest-mode view KVM_GET_NESTED_STATE reports.  The SMM,
# KVM_SET_NESTED_STATE, MSR and L2-event paths are not in this set.
SVM_VMRUN_METHODS = (
    "execute", "check_permissions", "_rax_operand", "_stgi", "_clgi", "_set_gif",
    "_vmrun", "_late_failure", "_fail_late", "_late_shutdown", "_hardware_vmrun_failure",
    "_inject_event", "vmexit", "_current_l2_state", "_write_vmexit", "_back_to_l1",
    "_intercepted", "nested_view",
)
SVM_VMRUN_FUNCTIONS = ("msrpm_bit", "_static_state", "_l2_state_from_vmcb")


@dataclass(frozen=True)
class Module:
    name: str
    path: str
    patterns: tuple[str, ...]  # mutmut mutant-name globs
    target: bool  # one of the modules held to the 90% bar


def _module(name: str, path: str, target: bool) -> Module:
    dotted = path.removesuffix(".py").replace("/", ".")
    return Module(name, path, (f"{dotted}.*",), target)


MODULES = (
    _module("judge", "kvmtest/judge.py", True),
    _module("runner", "kvmtest/runner.py", True),
    _module("build", "kvmtest/cases/_build.py", True),
    _module("checks", "kvmtest/model/checks.py", True),
    Module("svm-vmrun", "kvmtest/model/svm.py",
           tuple(f"kvmtest.model.svm.xǁNestedSvmǁ{m}__mutmut_*" for m in SVM_VMRUN_METHODS)
           + tuple(f"kvmtest.model.svm.x_{f}__mutmut_*" for f in SVM_VMRUN_FUNCTIONS), True),
    _module("ucall", "kvmtest/ucall.py", False),
    _module("params", "kvmtest/params.py", False),
    _module("vmcb", "kvmtest/vmcb.py", False),
)

# mutmut's exit-code classes (mutmut.stats.status_by_exit_code): a mutant
# counts as killed when a test failed, timed out or crashed on it.
KILLED = {1, 3, -24, 24, 152, 255, -11, -9, 36}
SURVIVED = {0}
NO_TESTS = {5, 33}


def equivalent_names() -> set[str]:
    """Mutant names docs/mutation.md lists as equivalent (first column)."""
    if not EQUIVALENT_DOC.exists():
        return set()
    return set(re.findall(r"^\| `(kvmtest\.[^`]+__mutmut_\d+)`", EQUIVALENT_DOC.read_text(),
                          re.MULTILINE))


def results(module: Module) -> dict[str, int | None]:
    meta = MUTANTS / f"{module.path}.meta"
    if not meta.exists():
        return {}
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    return {k: v for k, v in codes.items() if any(fnmatch.fnmatch(k, p) for p in module.patterns)}


def _natural(name: str) -> tuple[str, int]:
    stem, _, n = name.rpartition("__mutmut_")
    return stem, int(n)


def run_mutmut(modules: list[Module], log: Path) -> int:
    patterns = [p for m in modules for p in m.patterns]
    with log.open("w") as out:
        return subprocess.call(["mutmut", "run", *patterns], cwd=ROOT, stdout=out,
                               stderr=subprocess.STDOUT)


def diff(name: str) -> str:
    p = subprocess.run(["mutmut", "show", name], cwd=ROOT, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines()
             if ln[:1] in "+-" and not ln.startswith(("+++", "---"))]
    return " / ".join(ln.strip() for ln in lines)[:160]


def report(modules: list[Module], show_diffs: bool) -> dict:
    equivalent = equivalent_names()
    summary: dict = {"modules": {}}
    survivors: list[tuple[str, str]] = []
    totals = {"killed": 0, "survived": 0, "no_tests": 0, "equivalent": 0, "total": 0}
    print(f"{'module':<12} {'file':<26} {'killed':>7} {'total':>6} {'score':>7}  "
          f"{'survived':>8} (equiv.) {'no tests':>8}")
    for m in modules:
        codes = results(m)
        killed = sum(v in KILLED for v in codes.values())
        surv = sorted((k for k, v in codes.items() if v in SURVIVED), key=_natural)
        no_tests = sorted((k for k, v in codes.items() if v in NO_TESTS), key=_natural)
        unchecked = sum(v is None for v in codes.values())
        equiv = [k for k in surv if k in equivalent]
        total = len(codes) - unchecked
        score = 100.0 * killed / total if total else 0.0
        print(f"{m.name:<12} {m.path:<26} {killed:>7} {total:>6} {score:>6.1f}%  "
              f"{len(surv):>8} ({len(equiv):>4}) {len(no_tests):>8}"
              + ("" if not unchecked else f"  ({unchecked} not run)"))
        summary["modules"][m.name] = {"path": m.path, "killed": killed, "total": total,
                                      "score": round(score, 1), "survived": surv,
                                      "no_tests": no_tests, "target": m.target}
        for k in surv + no_tests:
            tag = "equivalent" if k in equivalent else "NO TESTS" if k in no_tests else ""
            survivors.append((k, tag))
        for key, n in (("killed", killed), ("survived", len(surv)), ("no_tests", len(no_tests)),
                       ("equivalent", len(equiv)), ("total", total)):
            totals[key] += n
    score = 100.0 * totals["killed"] / totals["total"] if totals["total"] else 0.0
    print(f"{'overall':<39} {totals['killed']:>7} {totals['total']:>6} {score:>6.1f}%  "
          f"{totals['survived']:>8} ({totals['equivalent']:>4}) {totals['no_tests']:>8}")
    summary["overall"] = {**totals, "score": round(score, 1)}
    print(f"\nsurviving mutants ({len(survivors)}; 'mutmut show NAME' prints one):")
    for name, tag in survivors:
        line = f"  {name}" + (f"  [{tag}]" if tag else "")
        if show_diffs and tag != "equivalent":
            line += f"\n      {diff(name)}"
        print(line)
    return summary


def main() -> int:
    names = [m.name for m in MODULES]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("modules", nargs="*", metavar="MODULE",
                    help=f"modules to mutate (default: all): {', '.join(names)}")
    ap.add_argument("--report-only", action="store_true",
                    help="print the score of the last run without running mutmut")
    ap.add_argument("--keep", action="store_true",
                    help="reuse mutants/ (test-to-function stats) from the last run")
    ap.add_argument("--diffs", action="store_true", help="print each survivor's change")
    args = ap.parse_args()
    unknown = sorted(set(args.modules) - set(names))
    if unknown:
        ap.error(f"unknown module(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    chosen = [m for m in MODULES if not args.modules or m.name in args.modules]
    if not args.report_only:
        if shutil.which("mutmut") is None:
            print("mutation: mutmut is not installed: pip install 'mutmut==3.8.1' "
                  "(pyproject.toml, extra 'mutation')", file=sys.stderr)
            return 3
        if not args.keep and MUTANTS.exists():
            shutil.rmtree(MUTANTS)  # fresh stats: the tests may have changed
        MUTANTS.mkdir(exist_ok=True)
        log = MUTANTS / "mutmut-run.log"
        print(f"mutation: mutmut run over {', '.join(m.name for m in chosen)} "
              f"(log: {log.relative_to(ROOT)})", flush=True)
        rc = run_mutmut(chosen, log)
        if rc != 0:
            tail = log.read_text(errors="replace").replace("\r", "\n").splitlines()[-15:]
            print(f"mutation: mutmut failed (exit {rc}):", *tail, sep="\n", file=sys.stderr)
            return 1
    summary = report(chosen, args.diffs)
    (MUTANTS / "mutation-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
