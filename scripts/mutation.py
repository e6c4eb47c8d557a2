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
import os
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
    _module("record", "kvmtest/record.py", False),
    _module("kmsg", "kvmtest/kmsg.py", False),
)

# mutmut mutates function bodies only.  These bugs go into the tables at
# module level (uapi values, VMCB offsets, constants the judge and the model
# work from), one at a time, each against the tests that must catch it:
# (file, text, replacement, tests).
TABLE_SEEDS = (
    ("kvmtest/observation.py", "KVM_STATE_NESTED_GIF_SET = 0x100",
     "KVM_STATE_NESTED_GIF_SET = 0x200", "tests/test_abi.py"),
    ("kvmtest/vmcb.py", '("exit_code", 0x070, 8)', '("exit_code", 0x070, 4)', "tests/test_abi.py"),
    ("kvmtest/vmcb.py", '("exit_info_2", 0x080, 8)', '("exit_info_2", 0x088, 8)',
     "tests/test_abi.py"),
    ("kvmtest/vmcb.py", '("event_inj", 0x0A8, 8)', '("event_inj", 0x0A8, 4)', "tests/test_abi.py"),
    ("kvmtest/vmcb.py", "SVM_EXIT_VMMCALL = 0x81", "SVM_EXIT_VMMCALL = 0x80", "tests/test_abi.py"),
    ("kvmtest/judge.py", 'L1_REGS = ("rsp", "cr0", "cr3", "cr4", "efer")',
     'L1_REGS = ("rsp", "cr0", "cr4", "efer")', "tests/test_judge_clauses.py"),
    ("kvmtest/judge.py", "INT_CTL_CPU_OWNED = 0xF | 1 << 8 | 1 << 9",
     "INT_CTL_CPU_OWNED = 0xFF | 1 << 8 | 1 << 9", "tests/test_judge_verdicts.py"),
    ("kvmtest/judge.py", 'PROFILE_BASE = {"6.12-stable": "fixed"}',
     'PROFILE_BASE = {"6.12-stable": "7.x"}', "tests/test_judge_verdicts.py"),
    ("kvmtest/judge.py", "HARNESS_OUTCOMES = {o.TIMEOUT, o.GUEST_ASSERT, o.EMULATION_ERROR}",
     "HARNESS_OUTCOMES = {o.TIMEOUT, o.GUEST_ASSERT}", "tests/test_judge_verdicts.py"),
    ("kvmtest/model/checks.py", "18, 19, 28, 30})", "18, 19, 28})",
     "tests/model/test_checks_table.py"),
    ("kvmtest/model/checks.py", "MSRPM_SIZE = 0x2000", "MSRPM_SIZE = 0x1000",
     "tests/model/test_checks_table.py"),
    ("kvmtest/model/checks.py", '"check_cs_l_d", _cs_l_and_d', "None, _cs_l_and_d",
     "tests/model/test_checks_table.py"),
    ("kvmtest/model/svm.py", "CPU_ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17})",
     "CPU_ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 17})",
     "tests/model/test_catalogue_on_model.py"),
    ("kvmtest/model/svm.py", "(0xC001_0000, 0x1000))", "(0xC001_0000, 0x1800))",
     "tests/model/test_vmrun_path.py"),
    ("kvmtest/ucall.py", "UCALL_NARGS = 7", "UCALL_NARGS = 6", "tests/test_channel_roundtrip.py"),
    ("kvmtest/params.py", "RESULT_POISON = 0x5A5A_5A5A_5A5A_5A5A", "RESULT_POISON = 0",
     "tests/model/test_catalogue_on_model.py"),
    ("kvmtest/params.py", "PF_CLGI = 1 << 2", "PF_CLGI = 1 << 3", "tests/test_case_build.py"),
)


# mutmut's exit-code classes (mutmut.stats.status_by_exit_code): a mutant
# counts as killed when a test failed, timed out or crashed on it.
KILLED = {1, 3, -24, 24, 152, 255, -11, -9, 36}
SURVIVED = {0}
NO_TESTS = {5, 33}


def equivalent_names() -> set[str]:
    """Mutant names docs/mutation.md lists as equivalent: the first column of
    the table under "## Equivalent mutants" (and of no other section)."""
    if not EQUIVALENT_DOC.exists():
        return set()
    text = EQUIVALENT_DOC.read_text()
    section = re.search(r"^## Equivalent mutants\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    if section is None:
        return set()
    return set(re.findall(r"^\| `(kvmtest\.[^`]+__mutmut_\d+)`", section.group(1), re.MULTILINE))


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


def run_table_seeds() -> tuple[int, int]:
    """Each TABLE_SEEDS bug in a copy of the tree: (caught, total).  A seed
    whose text is no longer in the file is reported stale (fix the seed)."""
    copy = MUTANTS / "tables"
    if copy.exists():
        shutil.rmtree(copy)
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files + [str(p.relative_to(ROOT)) for p in ROOT.glob("kvmtest/_kvm_cffi*.so")]:
        (copy / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, copy / f)
    env = {**os.environ, "PYTHONPATH": str(copy)}
    caught = 0
    print(f"\ntable seeds ({len(TABLE_SEEDS)}, module-level values mutmut does not mutate):")
    for path, old, new, tests in TABLE_SEEDS:
        src = (copy / path).read_text()
        if src.count(old) != 1:
            print(f"  STALE   {path}: {old!r} is not in the file once")
            continue
        (copy / path).write_text(src.replace(old, new))
        try:
            p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p",
                                "no:cacheprovider", *tests.split()], cwd=copy, env=env,
                               capture_output=True, text=True, timeout=600)
        finally:
            (copy / path).write_text(src)
        caught += p.returncode == 1
        verdict = {0: "MISSED", 1: "caught"}.get(p.returncode, f"ERROR({p.returncode})")
        print(f"  {verdict:<7} {path}: {new}")
    print(f"table seeds caught: {caught} of {len(TABLE_SEEDS)}")
    return caught, len(TABLE_SEEDS)


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
    ap.add_argument("--tables-only", action="store_true",
                    help="run only the table seeds (a minute), not mutmut")
    args = ap.parse_args()
    unknown = sorted(set(args.modules) - set(names))
    if unknown:
        ap.error(f"unknown module(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    chosen = [m for m in MODULES if not args.modules or m.name in args.modules]
    if args.tables_only:
        MUTANTS.mkdir(exist_ok=True)
        caught, total = run_table_seeds()
        return 0 if caught == total else 1
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
    if not args.modules and not args.report_only:
        caught, total = run_table_seeds()
        summary["table_seeds"] = {"caught": caught, "total": total}
    (MUTANTS / "mutation-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
