"""Human table, JSON and KTAP renderings of a Report."""

from __future__ import annotations

import json
from pathlib import Path

from . import judge as j
from .session import Report, Result

MARK = {j.PASS: "PASS", j.FAIL: "FAIL", j.ERROR: "ERROR", j.SKIP: "SKIP"}


def progress_line(r: Result, i: int, n: int) -> str:
    text = f"[{i:>3}/{n}] {MARK[r.verdict.verdict]:<5} {r.case.id}"
    if r.verdict.verdict != j.PASS and r.verdict.reason:
        text += f"  ({r.verdict.reason})"
    return text


def table(report: Report) -> str:
    rows = [("case", "expected", "observed", "verdict")]
    for r in report.results:
        c = r.case
        # The selected profile's expectation, else the one the kernel matched.
        matched = r.verdict.profiles[-1] if r.verdict.profiles else "7.x"
        want = j.expectation(c, report.profile or matched)
        expected = want.describe() + (" (profile-dependent)" if c.profiles else "")
        observed = r.observation.describe() if r.observation else "-"
        rows.append((c.id, expected, observed, MARK[r.verdict.verdict]))
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


def write_json(report: Report, path: Path) -> None:
    path.write_text(json.dumps(report.to_json(), indent=1, sort_keys=True) + "\n")


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
