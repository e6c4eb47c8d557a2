"""Terminal output for people: colour, a live status line, and closed pipes.

A reader that stops early (``kvmtest run | head -3``) must neither crash the
command nor change its exit code: the run goes on, its report files are still
written, and only the text nobody reads is dropped.  ``pipe_safe()`` wraps
stdout and stderr so that a closed pipe is noticed once and the stream then
goes to /dev/null.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from typing import TextIO

# SGR colours (ECMA-48); used only on a TTY, and never with NO_COLOR set.
GREEN, RED, YELLOW, BOLD, DIM = "32", "31", "33", "1", "2"


class SafeStream:
    """A text stream whose writes survive a closed pipe (EPIPE)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.pipe_closed = False

    def _closed(self) -> None:
        self.pipe_closed = True
        # Later writes, and the interpreter's final flush, go nowhere.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)

    def write(self, text: str) -> int:
        if not self.pipe_closed:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._closed()
        return len(text)

    def flush(self) -> None:
        if not self.pipe_closed:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._closed()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def pipe_safe() -> Iterator[None]:
    """sys.stdout and sys.stderr as SafeStreams for the duration."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = SafeStream(sys.stdout), SafeStream(sys.stderr)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        sys.stdout, sys.stderr = saved


def is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def colour_wanted(stream: TextIO) -> bool:
    """Colour on a TTY, unless NO_COLOR is set (https://no-color.org) or TERM=dumb."""
    return (is_tty(stream) and not os.environ.get("NO_COLOR")
            and os.environ.get("TERM") != "dumb")


class Console:
    """One output stream for people: lines, colour when wanted."""

    def __init__(self, stream: TextIO | None = None, colour: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.tty = is_tty(self.stream)
        self.colour = colour_wanted(self.stream) if colour is None else colour

    def paint(self, text: str, *sgr: str) -> str:
        if not self.colour or not sgr:
            return text
        return f"\x1b[{';'.join(sgr)}m{text}\x1b[0m"

    def line(self, text: str = "") -> None:
        self.stream.write(text + "\n")
        self.stream.flush()


class StatusLine:
    """One line rewritten in place on a TTY (carriage return + erase to end of
    line); does nothing when the stream is not a TTY."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.active = is_tty(self.stream) and os.environ.get("TERM") != "dumb"
        self._shown = False

    def show(self, text: str) -> None:
        if not self.active:
            return
        width = shutil.get_terminal_size((80, 24)).columns
        # A wrapped line could not be rewritten: keep it inside the terminal.
        self.stream.write("\r" + text[: max(width - 1, 10)] + "\x1b[K")
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False
