"""Running the command line as a user does: a real process, its exit code,
its stdout and stderr."""

from __future__ import annotations

import os
import subprocess
import sys

PY = sys.executable


def kvmtest(*args: str, env: dict | None = None, prefix: tuple[str, ...] = (),
            timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    e = dict(os.environ, **(env or {}))
    return subprocess.run([*prefix, PY, "-m", "kvmtest", *args], capture_output=True,
                          text=True, env=e, timeout=timeout, **kw)


def crashing(patch: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """kvmtest ARGS in a process where PATCH (Python, run first) made some
    function raise: every crash kvmtest knows of is handled, so the path an
    unknown bug takes is exercised by injecting one."""
    code = ("import sys\n"
            "def boom(*a, **k):\n"
            "    raise ZeroDivisionError('injected bug')\n"
            f"{patch}\n"
            "from kvmtest.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    e = dict(os.environ, **(env or {}))
    return subprocess.run([PY, "-c", code, *args], capture_output=True, text=True, env=e,
                          timeout=600)


def one_line_error(p: subprocess.CompletedProcess) -> str:
    """The one 'kvmtest: error:' line (and no traceback) on stderr."""
    assert "Traceback" not in p.stderr, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("kvmtest: error:")]
    assert len(errors) == 1, p.stderr
    return errors[0]
