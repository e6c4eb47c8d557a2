"""`kvmtest kmod` and `kvmtest bisect-run`: the edit-build-verdict loop."""

from __future__ import annotations

import argparse
import subprocess
import sys

from . import kmod

BISECT_GOOD, BISECT_BAD, BISECT_SKIP = 0, 1, 125
BISECT_ABORT = 128  # git bisect run stops: the same answer would come at every commit


def bisect_exit(code: int) -> int:
    """kvmtest's exit codes in git bisect run's terms.

    Usage and environment errors and kvmtest's own bugs do not depend on the
    commit: stop the bisect (128) instead of marking commits bad (1..127) or
    skipping them all (125).  A kernel that broke under QEMU is this commit's
    problem: skip it."""
    from .cli import EXIT_ENV, EXIT_INTERNAL, EXIT_KERNEL, EXIT_USAGE

    what = {EXIT_USAGE: "a usage error", EXIT_ENV: "an environment error",
            EXIT_INTERNAL: "an internal error"}.get(code)
    if what:
        print(f"bisect-run: {what} does not depend on the commit: stopping the bisect "
              f"({BISECT_ABORT})", file=sys.stderr)
        return BISECT_ABORT
    if code == EXIT_KERNEL:
        print(f"bisect-run: the kernel could not be tested: skip ({BISECT_SKIP})",
              file=sys.stderr)
        return BISECT_SKIP
    return code


def cmd_bisect_run(args: argparse.Namespace) -> int:
    """One `git bisect run` step: build (optional), boot, run, map the verdict."""
    from . import argcheck
    from .cli import check_run_args, run_report
    from .display import RunDisplay

    args.backend = "qemu"
    # Usage errors stop the bisect before anything is built.  --kernel,
    # --modules and --kvm-modules may be what --build makes: checked after it.
    check_run_args(args, kernel_paths=not args.build)
    if args.build:
        print(f"bisect-run: {args.build}", file=sys.stderr, flush=True)
        if subprocess.run(args.build, shell=True).returncode != 0:
            print(f"bisect-run: build failed: skip ({BISECT_SKIP})", file=sys.stderr)
            return BISECT_SKIP
        argcheck.kernel_paths(args)
    display = RunDisplay(out=sys.stderr, verbose=args.verbose)
    report = run_report(args, display=display)
    display.finish(report)
    s = report.summary
    if s["failed"] or report.kernel_warnings_outside_cases:
        code, word = BISECT_BAD, "bad"
    elif s["errors"] or not s["passed"]:
        code, word = BISECT_SKIP, "skip"
    else:
        code, word = BISECT_GOOD, "good"
    print(f"bisect-run: {s['passed']} passed, {s['failed']} failed, {s['errors']} errors, "
          f"fingerprint {report.fingerprint}: {word} ({code})", file=sys.stderr)
    return code


def add_commands(sub, add_run_options) -> None:
    p = sub.add_parser("kmod", help="build kvm.ko/kvm-amd.ko out of tree, check vermagic")
    kmod.add_arguments(p)
    p.set_defaults(func=kmod.run)
    p = sub.add_parser("bisect-run", usage_exit=BISECT_ABORT,
                       help="a `git bisect run` step: build, boot, verdict "
                       "(0 good, 1 bad, 125 skip, 128 stop)")
    add_run_options(p)
    p.add_argument("--build", metavar="CMD", help="shell command that builds the step "
                   "(e.g. kvmtest kmod build ...); failure -> 125")
    p.set_defaults(func=cmd_bisect_run, backend="qemu", exit_code=bisect_exit)
