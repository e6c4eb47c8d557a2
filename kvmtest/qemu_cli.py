"""`kvmtest kmod` and `kvmtest bisect-run`: the edit-build-verdict loop."""

from __future__ import annotations

import argparse
import subprocess
import sys

from . import kmod

BISECT_GOOD, BISECT_BAD, BISECT_SKIP = 0, 1, 125
BISECT_ABORT = 128  # git bisect run stops: the command line itself is wrong


def cmd_bisect_run(args: argparse.Namespace) -> int:
    """One `git bisect run` step: build (optional), boot, run, map the verdict."""
    from .cli import EXIT_USAGE, CliError, run_report
    from .selection import SelectionError, select

    try:  # a usage error is the same at every commit: stop the bisect
        select((), args.k)
    except SelectionError as e:
        print(f"bisect-run: {e}: aborting the bisect", file=sys.stderr)
        return BISECT_ABORT
    if args.build:
        print(f"bisect-run: {args.build}", file=sys.stderr, flush=True)
        if subprocess.run(args.build, shell=True).returncode != 0:
            print("bisect-run: build failed: skip (125)", file=sys.stderr)
            return BISECT_SKIP
    args.backend = "qemu"
    try:
        report = run_report(args)
    except CliError as e:
        if e.code == EXIT_USAGE:
            print(f"bisect-run: {e}: aborting the bisect", file=sys.stderr)
            return BISECT_ABORT
        print(f"bisect-run: cannot test this kernel ({e}): skip (125)", file=sys.stderr)
        return BISECT_SKIP
    s = report.summary
    print(f"bisect-run: {s['passed']} passed, {s['failed']} failed, {s['errors']} errors, "
          f"fingerprint {report.fingerprint}", file=sys.stderr)
    if s["failed"]:
        return BISECT_BAD
    if s["errors"] or not s["passed"]:
        return BISECT_SKIP
    return BISECT_GOOD


def add_commands(sub, add_run_options) -> None:
    p = sub.add_parser("kmod", help="build kvm.ko/kvm-amd.ko out of tree, check vermagic")
    kmod.add_arguments(p)
    p.set_defaults(func=kmod.run)
    p = sub.add_parser("bisect-run", help="a `git bisect run` step: build, boot, verdict "
                       "(0 good, 1 bad, 125 skip)")
    add_run_options(p)
    p.add_argument("--build", metavar="CMD", help="shell command that builds the step "
                   "(e.g. kvmtest kmod build ...); failure -> 125")
    p.set_defaults(func=cmd_bisect_run, backend="qemu")
