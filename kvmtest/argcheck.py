"""Usage checks made before anything runs.

A mistake on the command line must cost nothing: no boot, no download, no
half-written report after a long run.  Every check here raises UsageError
with one line naming the option.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from . import outputs
from .selection import SelectionError, matcher


class UsageError(ValueError):
    """A bad command line (exit 2; `bisect-run`: 128, stop the bisect)."""


def seconds(text: str) -> float:
    """argparse type for a duration: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a timeout must be positive and finite")
    return value


def selection(expr: str | None) -> None:
    if expr is not None:
        try:
            matcher(expr)
        except SelectionError as e:
            raise UsageError(str(e)) from None


def report_path(option: str, path: str) -> None:
    """A report file that could not be written after the run is a usage error now."""
    try:
        outputs.check_writable(path)
    except OSError as e:
        raise UsageError(f"--{option} {path}: {e.strerror or e}") from None


def report_paths(paths: dict[str, str]) -> None:
    """option -> path for every report asked for; at most one may be '-'."""
    to_stdout = [o for o, p in paths.items() if p == outputs.STDOUT]
    if len(to_stdout) > 1:
        raise UsageError(f"only one report can go to standard output ('-'), not "
                         f"{' and '.join('--' + o for o in to_stdout)}")
    for option, path in paths.items():
        report_path(option, path)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def writable_dir(option: str, path: str) -> None:
    """A directory that exists and is writable, or that can be created."""
    p = Path(path).expanduser().absolute()
    if p.exists():
        if not p.is_dir():
            raise UsageError(f"{option} {path}: exists and is not a directory")
        if not os.access(p, os.W_OK | os.X_OK):
            raise UsageError(f"{option} {path}: directory not writable")
        return
    parent = _nearest_existing(p.parent)
    if not parent.is_dir():
        raise UsageError(f"{option} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: cannot create it ({parent} is not writable)")


def existing(option: str, path: str, kind: str = "any") -> None:
    """A path given on the command line must exist (kind: any, dir or file)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"{option} {path}: no such file or directory")
    if kind == "dir" and not p.is_dir():
        raise UsageError(f"{option} {path}: not a directory")
    if kind == "file" and not p.is_file():
        raise UsageError(f"{option} {path}: not a file")


def kernel_paths(args: argparse.Namespace) -> None:
    """--kernel (unless debian:...), --modules and --kvm-modules must exist."""
    kernel = getattr(args, "kernel", None)
    if kernel and not kernel.startswith("debian:"):
        existing("--kernel", kernel)
    for option in ("modules", "kvm_modules"):
        value = getattr(args, option, None)
        if value:
            existing(f"--{option.replace('_', '-')}", value, "dir")
