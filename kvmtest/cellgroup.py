"""Matrix cells on one boot: `kvmtest cells GROUP.json` (run by kvmtest.matrix,
not for users).

The cells of a group differ only in kvm_amd parameters (same kernel, CPU
model, modules).  The first cell boots the guest; each next one reloads
kvm_amd in it (kvmtest.agent, docs/qemu.md section 5); the last powers it
off.  Every cell is the `kvmtest run` of its own argv: its own --json, its
own log (stderr goes there, so the matrix reads a cell's error as from a
lone run) and its exit code in its status file.  Stdout carries
``start KEY`` and ``done KEY`` lines for the matrix's progress.  A cell that
broke the guest (a panic) is an error cell, and the next cell boots afresh.

GROUP.json: {"cells": [{"key": K, "argv": [run options...], "log": PATH,
"status": PATH}, ...]}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from . import cli
from .backends import BackendError, KernelError
from .config import Config


class SharedBoot:
    """The group's backend, made by its first cell that gets that far."""

    def __init__(self) -> None:
        self.backend_note: tuple[object, str] | None = None
        self.booted_by = ""  # the configuration the running guest was booted for

    def open(self, args: argparse.Namespace) -> tuple[object, str]:
        """The backend for this cell's run and its note (cli.run_report)."""
        if self.backend_note is None:
            self.backend_note = cli.make_backend(args, share_boot=True)
        backend, note = self.backend_note
        # result.json in this cell's own artifacts; the console stays with the
        # boot's, and a cell that boots (afresh) keeps its console in its own.
        own = Path(args.artifacts) if args.artifacts else None
        backend.results_dir = own  # type: ignore[attr-defined]
        if backend.live:  # type: ignore[attr-defined]
            return backend, (f"{note}; shared boot: kvm and kvm_amd reloaded in the guest "
                             f"booted for {self.booted_by}")
        self.booted_by = Config.from_options(args.cpu, cli.kvm_amd_params(args)).label
        backend.artifacts = own  # type: ignore[attr-defined]
        return backend, note

    def close(self) -> None:
        if self.backend_note is not None:
            self.backend_note[0].close()  # type: ignore[attr-defined]
            self.backend_note = None


def _parse(argv: list[str]) -> argparse.Namespace:
    args, extra = cli.parser().parse_known_args(["run", *argv])
    if extra:
        raise ValueError(f"unrecognized run options {extra}")
    return args


def _run_shared(args: argparse.Namespace, group: SharedBoot,
                next_params: dict[str, str] | None) -> int:
    """cmd_run on the group's backend; the run ends with kvm_amd loaded for
    the next cell (NEXT_PARAMS) or, for the last, the guest powered off --
    also when it fails before running anything."""
    finished = False

    def finish(backend) -> list[str]:
        nonlocal finished
        finished = True
        return backend.finish_config(next_params)

    try:
        return cli.cmd_run(args, open_backend=group.open, finish=finish)
    except Exception:
        if not finished and group.backend_note is not None:
            with contextlib.suppress(KernelError, BackendError):  # this cell failed already
                group.backend_note[0].finish_config(next_params)  # type: ignore[attr-defined]
        raise


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("kvmtest cells: runs a matrix group (kvmtest.matrix); takes GROUP.json",
              file=sys.stderr)
        return cli.EXIT_USAGE
    cells = json.loads(Path(argv[0]).read_text())["cells"]
    parsed = [_parse(c["argv"]) for c in cells]
    group = SharedBoot()
    try:
        for i, (cell, args) in enumerate(zip(cells, parsed, strict=True)):
            last = i + 1 == len(cells)
            next_params = None if last else cli.kvm_amd_params(parsed[i + 1])
            print(f"start {cell['key']}", flush=True)
            args.func = lambda a, n=next_params: _run_shared(a, group, n)
            # The run's output goes to its log: stdout carries only these lines.
            with open(cell["log"], "w") as log, contextlib.redirect_stderr(log), \
                    contextlib.redirect_stdout(log):
                rc = cli.dispatch(args)
            Path(cell["status"]).write_text(json.dumps({"exit_code": rc}))
            print(f"done {cell['key']}", flush=True)
            if rc == cli.EXIT_INTERRUPTED:
                return rc
    finally:
        group.close()
    return 0
