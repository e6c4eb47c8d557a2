"""Kernel-log delta: new lines in /dev/kmsg that indicate a kernel bug."""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterable, Iterator

KMSG = "/dev/kmsg"
# WARN/BUG/oops and the sanitizers/lockdep: a kernel that prints one of
# these during a case has a bug even if every exit field was right.
# Plain words, so that csrc/record.c can look for them too (memmem).
BAD_WORDS = ("WARNING:", "BUG:", "Oops", "general protection fault", "KASAN", "UBSAN",
             "kernel BUG", "possible circular locking", "inconsistent lock state",
             "RCU stall", "Call Trace")


def pattern(words: Iterable[str]) -> re.Pattern[str]:
    """A line holding any of WORDS (as csrc/record.c's memmem finds them)."""
    return re.compile("|".join(re.escape(w) for w in words))


BAD = pattern(BAD_WORDS)
RECORD_MAX = 8192  # bytes of one /dev/kmsg read: a whole record
# A WARN storm keeps the first bad records only (a recorded case's trace
# must fit one channel string, kvmtest/record.py): at most these many lines
# and bytes of records, then one line saying how many more there were.
KEEP_LINES = 64
KEEP_BYTES = 24 * 1024


def message(rec: bytes) -> str:
    """A /dev/kmsg record's message: what follows the first ';' of its
    "level,seq,time,flags;" prefix, without the newline."""
    return rec.decode("utf-8", "replace").split(";", 1)[-1].rstrip("\n")


def dropped(n: int) -> str:
    """The line that stands for N bad records past KEEP_LINES/KEEP_BYTES."""
    return f"kvmtest: {n} more kernel-log records with a bad word, not kept"


def keep(records: Iterable[bytes], pattern: re.Pattern[str] = BAD) -> list[str]:
    """The messages of RECORDS that match PATTERN: the first ones within
    KEEP_LINES and KEEP_BYTES (of records), then dropped() if there were
    more.  csrc/record.c's kvmtest_kmsg_drain keeps the same."""
    lines: list[str] = []
    size = more = 0
    for rec in records:
        line = message(rec)
        if not pattern.search(line):
            continue
        if more or len(lines) == KEEP_LINES or size + len(rec) > KEEP_BYTES:
            more += 1
        else:
            lines.append(line)
            size += len(rec)
    if more:
        lines.append(dropped(more))
    return lines


def _drain(fd: int) -> Iterator[bytes]:
    while True:
        try:
            rec = os.read(fd, RECORD_MAX)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno == errno.EPIPE:  # records overwritten while we read; go on
                continue
            return
        if not rec:
            return
        yield rec


class Kmsg:
    """/dev/kmsg opened once for many watches: an open and a close per case
    cost more than the drain under TCG (docs/qemu.md, section 5)."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._unreadable = False
        self._watching = False
        self._close_pending = False  # close() came inside the watch (VM teardown)

    def _open(self) -> int | None:
        if self._fd is None and not self._unreadable:
            try:
                self._fd = os.open(KMSG, os.O_RDONLY | os.O_NONBLOCK)
            except OSError:
                self._unreadable = True
        return self._fd

    def mark(self) -> int | None:
        """Start a watch for a C helper (kvmtest_kmsg_drain, csrc/record.c):
        the descriptor, at the log's end as watch() puts it; None if the log
        cannot be read."""
        if self._watching:
            raise RuntimeError("Kmsg.mark inside a watch of the same Kmsg")
        fd = self._open()
        if fd is not None:
            os.lseek(fd, 0, os.SEEK_END)
        return fd

    @contextlib.contextmanager
    def watch(self, pattern: re.Pattern[str] = BAD) -> Iterator[list[str] | None]:
        """Yield a list that receives the lines matching PATTERN (bad ones by
        default) logged during the block, or None when /dev/kmsg cannot be
        read (then the log was not checked).  Watches do not nest: they would
        share the descriptor's read position."""
        if self._watching:
            raise RuntimeError("Kmsg.watch inside a watch of the same Kmsg")
        fd = self._open()
        if fd is None:
            yield None
            return
        os.lseek(fd, 0, os.SEEK_END)  # only what comes after this point
        found: list[str] = []
        self._watching = True
        try:
            yield found
        finally:
            self._watching = False
            found.extend(keep(_drain(fd), pattern))
            if self._close_pending:
                self.close()

    def close(self) -> None:
        """Close the descriptor, at the end of the watch if inside one."""
        if self._watching:
            self._close_pending = True
        elif self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._close_pending = False


@contextlib.contextmanager
def watch(pattern: re.Pattern[str] = BAD) -> Iterator[list[str] | None]:
    """One watch on its own /dev/kmsg descriptor (Kmsg.watch)."""
    k = Kmsg()
    try:
        with k.watch(pattern) as found:
            yield found
    finally:
        k.close()
