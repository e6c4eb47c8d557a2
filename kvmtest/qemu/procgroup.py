"""Helper commands (apt-get, dpkg-deb) in their own process group.

apt-get forks its download methods and dpkg-deb forks its decompressor, so
killing the direct child is not enough: after a Ctrl-C the grandchildren
would keep writing into a directory kvmtest is deleting.  Each command
therefore runs in a new session (its own process group, out of the
terminal's foreground group), and on any exception the whole group is
SIGKILLed and reaped *before* the caller cleans up.

Reaping the grandchildren needs this process to be their parent once their
own parent is gone: kvmtest makes itself a child subreaper
(prctl(PR_SET_CHILD_SUBREAPER)), otherwise they would be re-parented to PID 1,
which in containers often never reaps them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36
_subreaper = False


def become_subreaper() -> None:
    """Make orphaned descendants our children (Linux >= 3.4), once per process."""
    global _subreaper
    if _subreaper:
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    _subreaper = True


def stop_group(proc: subprocess.Popen) -> None:
    """SIGKILL PROC's process group and reap every member that is our child."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    _wait_uninterrupted(proc)
    reap_group(proc.pid)


def _wait_uninterrupted(proc: subprocess.Popen) -> None:
    # A second Ctrl-C must not leave the child unreaped.
    while True:
        try:
            proc.wait()
            return
        except KeyboardInterrupt:
            continue


def reap_group(pgid: int, *, block: bool = True) -> None:
    """Reap members of process group PGID that are (or became) our children."""
    while True:
        try:
            pid, _ = os.waitpid(-pgid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return
        except KeyboardInterrupt:
            continue
        if pid == 0:
            return


@contextlib.contextmanager
def group(cmd: Sequence[str], **popen: object) -> Iterator[subprocess.Popen]:
    """Popen CMD in a new process group; stop the whole group if the body raises."""
    become_subreaper()
    proc = subprocess.Popen(list(cmd), start_new_session=True, **popen)  # type: ignore[call-overload]
    try:
        yield proc
    except BaseException:
        stop_group(proc)
        raise
    finally:
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    _wait_uninterrupted(proc)
    reap_group(proc.pid, block=False)


def run(cmd: Sequence[str], *, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """subprocess.run(CMD) with text output, whose whole group dies with us.

    Output goes to temporary files, not pipes: a chatty command (tar on a
    full disk prints one error per file) can never block on a full pipe.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        with group(cmd, cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL) as proc:
            proc.wait()  # a Ctrl-C here stops the whole group
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(
            list(cmd),
            proc.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
        )

