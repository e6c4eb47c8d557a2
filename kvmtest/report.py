"""Renderings of a Report: the human table and lines, JSON and KTAP.

Everything here returns text; kvmtest.display decides what a person sees and
kvmtest.outputs writes report files.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable

from . import judge as j
from .case import Case, Expect
from .session import Report, Result

MARK = {j.PASS: "PASS", j.FAIL: "FAIL", j.ERROR: "ERROR", j.SKIP: "SKIP"}


def progress_line(r: Result, i: int, n: int) -> str:
    text = f"[{i:>3}/{n}] {MARK[r.verdict.verdict]:<5} {r.case.id}"
    if r.verdict.verdict != j.PASS and r.verdict.reason:
        text += f"  ({r.verdict.reason})"
    return text


def expected_text(r: Result, profile: str | None) -> str:
    """The selected profile's expectation, else the one the kernel matched."""
    matched = r.verdict.profiles[-1] if r.verdict.profiles else j.PROFILES[-1]
    want = j.expectation(r.case, profile or matched)
    return want.describe() + (" (profile-dependent)" if r.case.profiles else "")


def reference(case: Case, verdict_profiles: tuple[str, ...],
              profile: str | None) -> tuple[str, Expect]:
    """The expectation to hold an observation against, and its name: the
    selected (else the matched, else the newest) profile's, or the contract
    where that profile's behaviour is a known bug."""
    name = profile or (verdict_profiles[-1] if verdict_profiles else j.PROFILES[-1])
    want = j.expectation(case, name)
    if want.known_bug:
        return f"the contract; {name} has a known bug here", case.expect
    return (f"profile {name}" if case.profiles else "every kernel"), want


def observed_text(r: Result) -> str:
    return r.observation.describe() if r.observation else "-"


def table(report: Report) -> str:
    rows = [("case", "expected", "observed", "verdict")]
    for r in report.results:
        rows.append((r.case.id, expected_text(r, report.profile), observed_text(r),
                     MARK[r.verdict.verdict]))
    widths = [min(60, max(len(row[i]) for row in rows)) for i in range(3)]
    lines = []
    for row in rows:
        cells = [row[i][: widths[i]].ljust(widths[i]) for i in range(3)]
        lines.append("  ".join([*cells, row[3]]))
    return "\n".join(lines)


def summary_line(report: Report) -> str:
    s = report.summary
    return (f"{s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped, "
            f"{s['errors']} errors; backend {report.backend}, kernel {report.kernel}, "
            f"fingerprint {report.fingerprint}")


def failure_line(r: Result) -> str:
    """One line for a failed or errored case (the piped view)."""
    return f"{MARK[r.verdict.verdict]:<5} {r.case.id}  {r.verdict.reason}".rstrip()


def failure_details(r: Result, profile: str | None) -> list[str]:
    """The lines under a failed case's heading (the TTY view)."""
    title, want = reference(r.case, r.verdict.profiles, profile)
    return [f"  expected  {want.describe()} ({title})",
            f"  observed  {observed_text(r)}",
            f"  why       {r.verdict.reason or r.verdict.verdict}",
            f"  more      kvmtest explain '{r.case.id}'"]


def skip_groups(results: list[Result]) -> list[tuple[str, int]]:
    """(reason, number of cases) for the skipped cases, most common first."""
    counts = Counter(r.verdict.reason for r in results if r.verdict.verdict == j.SKIP)
    return counts.most_common()


def status_text(done: int, total: int, counts: Counter, current: str, elapsed: float) -> str:
    """The live progress line: n/N, counts, elapsed time, the case just run."""
    parts = [f"[{done:>{len(str(total))}}/{total}]", f"{counts[j.PASS]} passed"]
    for verdict, word in ((j.FAIL, "failed"), (j.ERROR, "errors"), (j.SKIP, "skipped")):
        if counts[verdict]:
            parts.append(f"{counts[verdict]} {word}")
    minutes, seconds = divmod(int(elapsed), 60)
    return f"{' '.join(parts)}  {minutes}:{seconds:02d}  {current}"


def junit_text(report: Report) -> str:
    from . import junit  # built from the run's JSON, like `kvmtest report`'s

    return junit.from_run(report.to_json())


def json_text(report: Report) -> str:
    """The run's JSON: indented, with one case per line (diffs read case by
    case, and json's C encoder does the lines: with indent= every value goes
    through the pure-Python one, a third of a verdict's host time)."""
    data = report.to_json()
    cases = data.pop("cases")
    head = json.dumps(data, indent=1, sort_keys=True)
    lines = ",\n  ".join(json.dumps(c, sort_keys=True) for c in cases)
    body = f'"cases": [\n  {lines}\n ]' if cases else '"cases": []'
    return f"{head[:-2]},\n {body}\n}}\n"


def ktap(report: Report) -> str:
    """kselftest KTAP v1 (Documentation/dev-tools/ktap.rst)."""
    lines = ["KTAP version 1", f"# kvmtest backend={report.backend} kernel={report.kernel}",
             f"1..{len(report.results)}"]
    for i, r in enumerate(report.results, 1):
        v = r.verdict
        name = r.case.id.replace("#", "_")
        if v.verdict == j.SKIP:
            lines.append(f"ok {i} {name} # SKIP {v.reason}")
            continue
        if v.verdict != j.PASS:
            for part in (v.reason or v.verdict).split("; "):
                lines.append(f"# {name}: {part}")
        lines.append(f"{'ok' if v.verdict == j.PASS else 'not ok'} {i} {name}")
    s = report.summary
    lines.append(f"# fingerprint: {report.fingerprint}")
    lines.append(f"# totals: pass:{s['passed']} fail:{s['failed']} xfail:0 xpass:0 "
                 f"skip:{s['skipped']} error:{s['errors']}")
    return "\n".join(lines) + "\n"


# The report files `kvmtest run` can write, one --NAME FILE option each
# ('-' is standard output): name -> (help, rendering).
FORMATS: dict[str, tuple[str, Callable[[Report], str]]] = {
    "json": ("write the JSON report here", json_text),
    "ktap": ("write a KTAP v1 report here", ktap),
    "junit": ("write JUnit XML here", junit_text),
}
