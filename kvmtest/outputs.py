"""Report files: written atomically, and '-' means standard output.

A report must exist whole or not at all (a reader, CI or `kvmtest report`,
never sees half a JSON file), so it goes to a temporary file in the same
directory and is renamed into place.  A target that exists and is not a
regular file (/dev/null, a FIFO, /dev/fd/N from a shell's process
substitution) is written in place: renaming over it would replace the
device node or pipe with a file.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

STDOUT = "-"


def check_writable(path: str) -> None:
    """Raise OSError now if PATH could not be written later (usage check
    before a long run); '-' is always writable."""
    if path == STDOUT:
        return
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir() and not target.is_file():
        if not os.access(target, os.W_OK):
            raise PermissionError(f"{path}: not writable")
        return
    parent = target.resolve().parent
    if not parent.is_dir():
        raise FileNotFoundError(f"{parent}: no such directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{parent}: not writable")
    if Path(path).is_dir():
        raise IsADirectoryError(f"{path} is a directory")


def write_text(path: str, text: str) -> None:
    """Write TEXT to PATH atomically, or to stdout for '-'."""
    if path == STDOUT:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir() and not target.is_file():
        with target.open("w") as f:
            f.write(text)
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
