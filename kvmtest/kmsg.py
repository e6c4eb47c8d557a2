"""Kernel-log delta: new lines in /dev/kmsg that indicate a kernel bug."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator

KMSG = "/dev/kmsg"
# WARN/BUG/oops and the sanitizers/lockdep: a kernel that prints one of
# these during a case has a bug even if every exit field was right.
BAD = re.compile(
    r"WARNING:|BUG:|Oops|general protection fault|KASAN|UBSAN|kernel BUG|"
    r"possible circular locking|inconsistent lock state|RCU stall|Call Trace"
)


def _drain(fd: int) -> list[str]:
    lines = []
    while True:
        try:
            rec = os.read(fd, 8192)
        except BlockingIOError:
            return lines
        except OSError:  # EPIPE: records overwritten while we read; go on
            continue
        if not rec:
            return lines
        text = rec.decode("utf-8", "replace")
        lines.append(text.split(";", 1)[-1].rstrip("\n"))


@contextlib.contextmanager
def watch() -> Iterator[list[str] | None]:
    """Yield a list that receives the bad lines logged during the block, or
    None when /dev/kmsg cannot be read (then the log was not checked)."""
    try:
        fd = os.open(KMSG, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        yield None
        return
    try:
        os.lseek(fd, 0, os.SEEK_END)  # only what comes after this point
        found: list[str] = []
        try:
            yield found
        finally:
            found.extend(line for line in _drain(fd) if BAD.search(line))
    finally:
        os.close(fd)
