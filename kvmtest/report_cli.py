"""`kvmtest matrix` and `kvmtest report`: comparing kernels and configurations.

Exit codes (README "Matrix and reports"): 0 no cell failed or broke; 1 a
case failed or errored in some cell; 4 a cell's kernel broke or a merged
cell's result is missing; 3 a cell could not start here (environment); 125
no cell tested anything; 2 a usage error before anything ran.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import junit, ktap, matrix, report_html
from . import results as res
from .judge import PROFILES
from .outputs import check_writable, write_text

EXIT_USAGE = 2
OUTPUTS = ("json", "html", "junit", "ktap")


class ReportUsageError(Exception):
    pass


def _check_outputs(args: argparse.Namespace) -> None:
    paths = [getattr(args, o) for o in OUTPUTS if getattr(args, o, None)]
    if paths.count("-") > 1:
        raise ReportUsageError("only one output can go to standard output ('-')")
    for path in paths:
        try:
            check_writable(path)
        except OSError as e:
            raise ReportUsageError(f"cannot write {path}: {e}") from None


def write_outputs(result: dict, args: argparse.Namespace, flat_ktap: bool = False) -> None:
    if getattr(args, "json", None):
        write_text(args.json, json.dumps(result, indent=1) + "\n")
    if getattr(args, "html", None):
        write_text(args.html, report_html.render(result))
    if getattr(args, "junit", None):
        write_text(args.junit, junit.render(result))
    if getattr(args, "ktap", None):
        write_text(args.ktap, ktap.render(result, flat=flat_ktap))


def summary_lines(result: dict) -> list[str]:
    lines = []
    for cell in result["cells"]:
        mark = {res.PASS: "PASS", res.FAIL: "FAIL", res.UNTESTED: "NONE"}.get(
            cell["status"], "ERROR" if cell["status"] == res.ERROR else "MISSING")
        lines.append(f"{mark:<7} {cell['key']}: {matrix.describe_done(cell)}")
    s = result["summary"]
    lines.append(f"{s['cells']} cells: {s['pass']} passed, {s['fail']} failed, "
                 f"{s['error']} errors, {s['untested']} tested nothing, "
                 f"{s['missing']} missing; exit {result['exit_code']}")
    return lines


def cmd_matrix(args: argparse.Namespace) -> int:
    try:
        file = matrix.load_file(args.file) if args.file else None
        plan = matrix.make_plan(backend=args.backend, kernels=args.kernel,
                                profiles=args.profile, configs=args.config, k=args.k,
                                timeout=args.timeout, file=file)
        cells, shard = plan.cells, None
        if args.shard:
            index, count = matrix.parse_shard(args.shard)
            cells, shard = plan.shard(index, count), f"{index}/{count}"
        if args.jobs is not None and args.jobs < 1:
            raise ReportUsageError(f"-j wants a positive number, not {args.jobs}")
        _check_outputs(args)
    except (matrix.MatrixUsageError, ReportUsageError) as e:
        print(f"kvmtest: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.dry_run:  # the cells this machine would run: TARGET<TAB>CONFIG
        for c in cells:
            print(f"{c.target}\t{c.config.label}")
        return 0
    jobs = args.jobs or os.cpu_count() or 1
    artifacts = Path(args.artifacts).resolve() if args.artifacts else None
    print(f"matrix: {len(cells)} of {len(plan.cells)} cells"
          f"{f' (shard {shard})' if shard else ''}, {len(plan.case_ids)} cases each, "
          f"{min(jobs, max(1, len(cells)))} at a time", file=sys.stderr, flush=True)

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    result = matrix.run(plan, cells, jobs=jobs, shard=shard, artifacts=artifacts, progress=say)
    write_outputs(result, args)
    _print_summary(result, args)
    return result["exit_code"]


def cmd_report(args: argparse.Namespace) -> int:
    files = list(args.files)
    merging = files[0] == "merge"
    if merging:
        files = files[1:]
    try:
        if not files:
            raise ReportUsageError("report merge needs at least one JSON file")
        if not merging and len(files) > 1:
            raise ReportUsageError("report takes one JSON file (use `kvmtest report merge "
                                   "A.json B.json ...` to merge several)")
        _check_outputs(args)
        loaded = [res.load(f) for f in files]
        result = res.merge(loaded) if merging else loaded[0]
    except (ReportUsageError, res.ReportFileError) as e:
        print(f"kvmtest: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    # A lone run report converts to KTAP exactly as `kvmtest run --ktap` writes it.
    flat = not merging and result.get("plan") is None and len(result["cells"]) == 1 \
        and _is_run_report(files[0])
    write_outputs(result, args, flat_ktap=flat)
    _print_summary(result, args)
    return result["exit_code"]


def _print_summary(result: dict, args: argparse.Namespace) -> None:
    """The cells' lines on stdout, or on stderr when a report goes to stdout."""
    to_stdout = "-" in [getattr(args, o, None) for o in OUTPUTS]
    for line in summary_lines(result):
        print(line, file=sys.stderr if to_stdout else sys.stdout)


def _is_run_report(path: str) -> bool:
    try:
        return json.loads(Path(path).read_text()).get("schema") != res.SCHEMA
    except (OSError, ValueError, AttributeError):
        return False


def _add_outputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="FILE", help="write the matrix result JSON here ('-': stdout)")
    p.add_argument("--html", metavar="FILE", help="write the self-contained HTML report here")
    p.add_argument("--junit", metavar="FILE", help="write JUnit XML here")
    p.add_argument("--ktap", metavar="FILE", help="write KTAP v1 here (a subtest per cell)")


def add_commands(sub) -> None:
    p = sub.add_parser(
        "matrix", help="run kernels (or model profiles) x configurations, in parallel",
        description="Every (kernel, configuration) cell is one `kvmtest run`; the result has "
                    "a column per cell.  Exit: 0 no cell failed or broke, 1 a case failed, "
                    "4 a kernel broke, 3 environment, 125 nothing tested, 2 usage.")
    p.add_argument("--backend", choices=matrix.BACKENDS, default=None,
                   help="qemu (kernels are the columns) or model (profiles are); "
                        "default: qemu with --kernel, else model")
    p.add_argument("--kernel", action="append", metavar="SPEC",
                   help="qemu: a kernel column (repeat); any SPEC `kvmtest run` takes")
    p.add_argument("--profile", action="append", choices=PROFILES,
                   help="model: a profile column (repeat; default: every profile); "
                        "qemu: the behaviour expected of every kernel (at most one)")
    p.add_argument("--config", action="append", metavar="TEXT",
                   help="a configuration column (repeat), e.g. default, npt=0, "
                        "'cpu=EPYC,+vgif'")
    p.add_argument("--file", metavar="MATRIX.toml",
                   help="backend, kernels, profiles, configs, k, timeout from a TOML file "
                        "(options given here replace its values)")
    p.add_argument("-k", metavar="EXPR", help="select cases, e.g. 'save and gif1'")
    p.add_argument("--timeout", type=float, default=None, help="per-case run timeout (s)")
    p.add_argument("-j", "--jobs", type=int, default=None,
                   help="cells at a time (default: the number of CPUs)")
    p.add_argument("--shard", metavar="K/N", help="run only shard K of N (for CI fan-out; "
                   "merge with `kvmtest report merge`)")
    p.add_argument("--artifacts", metavar="DIR",
                   help="keep each cell's log (and QEMU console) in DIR/<cell>")
    p.add_argument("--dry-run", action="store_true",
                   help="print the cells (of this shard) as TARGET<TAB>CONFIG lines, run nothing")
    _add_outputs(p)
    p.set_defaults(func=cmd_matrix)
    p = sub.add_parser(
        "report", help="turn saved JSON (run or matrix) into HTML, JUnit or KTAP; merge shards",
        description="kvmtest report FILE.json [--html OUT] [--junit OUT] [--ktap OUT]\n"
                    "kvmtest report merge A.json B.json ... [--json OUT] [--html OUT] ...",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", metavar="FILE",
                   help="a run or matrix JSON; or 'merge' followed by several")
    _add_outputs(p)
    p.set_defaults(func=cmd_report)
