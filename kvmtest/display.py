"""What a person sees while `kvmtest run` runs, and after.

- default, on a TTY: one live status line on stderr (n/N, counts, elapsed,
  the case just judged); afterwards the failures in detail, skips grouped by
  reason, the notes and the summary, in colour unless NO_COLOR is set.
- default, piped: one line per failed or errored case, one per skip reason,
  the notes and the summary: an all-pass run is two lines (the backend
  choice on stderr, the summary on stdout).
- verbose (-v): every case as it is judged (stderr), then the whole table.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import TextIO

from . import judge as j
from . import report as rep
from .console import BOLD, GREEN, RED, YELLOW, Console, StatusLine
from .session import Report, Result

_REFRESH_S = 0.05  # the live line is redrawn at most this often
_VERDICT_SGR = {j.FAIL: (BOLD, RED), j.ERROR: (BOLD, RED), j.SKIP: (YELLOW,)}


class RunDisplay:
    def __init__(self, out: TextIO | None = None, err: TextIO | None = None,
                 verbose: bool = False) -> None:
        self.out = Console(out if out is not None else sys.stdout)
        self.err = err if err is not None else sys.stderr
        self.verbose = verbose
        self.status = StatusLine(self.err)
        self.status.active &= not verbose
        self.counts: Counter = Counter()
        self.started = time.monotonic()
        self._drawn = 0.0

    def note(self, text: str) -> None:
        """A line for stderr (the backend choice), above the live line."""
        self.status.clear()
        self.err.write(text + "\n")
        self.err.flush()

    def start(self, total: int, backend: str) -> None:
        self.started = time.monotonic()
        self.status.show(f"[0/{total}] running on backend {backend} ...")

    def progress(self, r: Result, i: int, n: int) -> None:
        self.counts[r.verdict.verdict] += 1
        if self.verbose:
            self.err.write(rep.progress_line(r, i, n) + "\n")
            self.err.flush()
            return
        now = time.monotonic()
        if i == n or now - self._drawn >= _REFRESH_S:
            self._drawn = now
            self.status.show(rep.status_text(i, n, self.counts, r.case.id, now - self.started))

    def finish(self, report: Report) -> None:
        self.status.clear()
        out = self.out
        if self.verbose:
            out.line(rep.table(report))
        else:
            for r in report.results:
                if r.verdict.verdict not in (j.FAIL, j.ERROR):
                    continue
                sgr = _VERDICT_SGR[r.verdict.verdict]
                if out.tty:
                    out.line(out.paint(f"{rep.MARK[r.verdict.verdict]:<5} {r.case.id}", *sgr))
                    for line in rep.failure_details(r, report.profile):
                        out.line(line)
                else:
                    out.line(rep.failure_line(r))
            for reason, n in rep.skip_groups(report.results):
                out.line(out.paint(f"SKIP  {n} case{'s' if n > 1 else ''}: {reason}", YELLOW))
        for line in report.notes[1:]:
            out.line(line)
        ok = report.exit_code() == 0
        out.line(out.paint(rep.summary_line(report), BOLD, GREEN if ok else RED))
