"""What people and pipes get from `kvmtest run`: line counts piped and on a
real pseudo-terminal, colour and NO_COLOR, closed pipes, '-' for stdout."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess

from clirun import PY, kvmtest

SGR_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def on_a_pty(*args: str, env: dict | None = None) -> tuple[int, str]:
    """kvmtest ARGS with stdout and stderr on a real pseudo-terminal: (exit
    code, everything the terminal received)."""
    master, slave = pty.openpty()
    e = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    e.update(TERM="xterm", **(env or {}))
    p = subprocess.Popen([PY, "-m", "kvmtest", *args], stdin=slave, stdout=slave,
                         stderr=slave, env=e, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            p.kill()
            raise AssertionError("no output from kvmtest for 120 s")
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return p.wait(timeout=60), b"".join(chunks).decode()


def screen_lines(raw: str) -> list[str]:
    """The lines left on the screen: each carriage return rewrites the line."""
    lines = []
    for line in raw.replace("\r\n", "\n").split("\n"):
        lines.append(line.split("\r")[-1].replace("\x1b[K", ""))
    return [line for line in lines if line.strip()]


# The catalogue's cases that pass on the default model (the SMM family holds
# the known bugs every measured kernel shares, which the model reproduces).
# The model (7.x) reproduces known bugs in the SMM cases, the paging-off
# SVM instructions and the single-stepped VMRUNs (docs/findings.md).
PASSING = "not smm and not no-paging and not singlestep"


def test_piped_all_pass_is_at_most_15_lines():
    """The cases that can run here all pass: the backend note, a line per
    skip reason (configuration-dependent cases), the summary."""
    p = kvmtest("run", "-k", PASSING)
    assert p.returncode == 0
    lines = p.stdout.splitlines() + p.stderr.splitlines()
    assert len(lines) <= 15, lines
    assert p.stderr.startswith("auto: backend ")
    out = p.stdout.splitlines()
    assert re.match(r"\d+ passed, 0 failed, \d+ skipped, 0 errors; backend model", out[-1])
    assert all(line.startswith("SKIP  ") for line in out[:-1])
    assert not SGR_COLOUR.search(p.stdout + p.stderr)


def test_piped_default_run_is_a_line_per_non_passing_case():
    p = kvmtest("run")
    report = json.loads(kvmtest("run", "--json", "-").stdout)
    failed = [c["id"] for c in report["cases"] if c["verdict"] in ("fail", "error")]
    skip_reasons = {c["reason"] for c in report["cases"] if c["verdict"] == "skip"}
    out = p.stdout.splitlines()
    assert [line.split()[1] for line in out if line.startswith(("FAIL ", "ERROR "))] == failed
    assert len([line for line in out if line.startswith("SKIP ")]) == len(skip_reasons)
    assert len(out) == len(failed) + len(skip_reasons) + 1
    # Bounded by the findings the model reproduces, not by the catalogue's size.
    assert len(out) + len(p.stderr.splitlines()) <= 20


def test_verbose_is_the_full_view():
    p = kvmtest("run", "-v", "-k", "asid0")
    assert p.returncode == 0
    assert sum(line.startswith("[") for line in p.stderr.splitlines()) == 7  # every case
    assert p.stdout.splitlines()[0].split() == ["case", "expected", "observed", "verdict"]
    assert len(p.stdout.splitlines()) == 1 + 7 + 1  # header, a row per case, summary


def test_piped_failures_are_one_line_each():
    p = kvmtest("run", "--backend", "model", "--profile", "legacy", "-k", "save and gif1")
    assert p.returncode == 1
    report = kvmtest("run", "--backend", "model", "--profile", "legacy", "-k", "save and gif1",
                     "--json", "-")
    failed = [c for c in json.loads(report.stdout)["cases"] if c["verdict"] == "fail"]
    out = p.stdout.splitlines()
    assert len(out) == len(failed) + 1
    assert [line.split()[1] for line in out[:-1]] == [c["id"] for c in failed]
    assert all(line.startswith("FAIL  ") for line in out[:-1])


def test_tty_live_line_then_summary_in_colour():
    code, raw = on_a_pty("run", "--backend", "model", "-k", PASSING)
    assert code == 0
    live = re.findall(r"\r\[ *(\d+)/(\d+)\] \d+ passed( \d+ skipped)?  0:\d\d  \S+", raw)
    assert live and live[-1][0] == live[-1][1]  # the live line reached n/N
    lines = screen_lines(raw)
    assert lines[0] == "backend model: profile 7.x"
    assert all(SGR_COLOUR.sub("", line).startswith("SKIP  ") for line in lines[1:-1]), lines
    assert re.search(r"\x1b\[1;32m\d+ passed, 0 failed", raw)


def test_tty_failures_in_detail():
    code, raw = on_a_pty("run", "--backend", "model", "--profile", "legacy", "-k",
                         "cr0-cd0-nw1 and not smm and not nested")
    assert code == 1
    lines = [SGR_COLOUR.sub("", line) for line in screen_lines(raw)]
    i = lines.index("FAIL  save/cr0-cd0-nw1[gif1]")
    assert lines[i + 1] == "  expected  vmexit invalid (the contract; legacy has a known bug here)"
    assert lines[i + 2] == "  observed  exit 0xffffffffffffffff GIF=1"
    assert lines[i + 3].startswith("  why       known bug (legacy): GIF left set")
    assert lines[i + 4] == "  more      kvmtest explain 'save/cr0-cd0-nw1[gif1]'"
    assert lines[-1].startswith("3 passed, 1 failed")
    assert "\x1b[1;31mFAIL" in raw


def test_no_color_respected_on_a_tty():
    code, raw = on_a_pty("run", "--backend", "model", "--profile", "legacy", "-k",
                         "cr0-cd0-nw1 and not smm", env={"NO_COLOR": "1"})
    assert code == 1
    assert not SGR_COLOUR.search(raw)
    assert "FAIL  save/cr0-cd0-nw1[gif1]" in raw


def test_json_and_ktap_to_stdout():
    p = kvmtest("run", "--backend", "model", "-k", "asid0", "--json", "-")
    assert p.returncode == 0
    assert json.loads(p.stdout)["summary"]["passed"] == 7  # stdout is the report alone
    assert "7 passed" in p.stderr  # people read stderr
    assert not os.path.exists("-")
    p = kvmtest("run", "--backend", "model", "-k", "asid0", "--ktap", "-")
    assert p.stdout.startswith("KTAP version 1\n") and p.stdout.count("\nok ") == 7
    p = kvmtest("run", "--backend", "model", "-k", "asid0", "--junit", "-")
    assert p.stdout.startswith("<?xml") and p.stdout.count("<testcase ") == 7
    p = kvmtest("run", "--backend", "model", "-k", "asid0", "--junit", "-", "--json", "-")
    assert p.returncode == 2 and "only one report can go to standard output" in p.stderr


def test_report_to_a_fifo_is_written_in_place(tmp_path):
    """A non-regular target (a FIFO, as `--json >(jq .)` gives) is written, not replaced."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE, text=True)
    p = kvmtest("run", "--backend", "model", "-k", "asid0", "--json", str(fifo))
    out, _ = reader.communicate(timeout=60)
    assert p.returncode == 0 and json.loads(out)["summary"]["passed"] == 7
    assert fifo.is_fifo()


def closed_stdout(*args: str) -> subprocess.CompletedProcess:
    """kvmtest ARGS writing into a pipe whose reader is already gone (EPIPE)."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run([PY, "-m", "kvmtest", *args], stdout=w, stderr=subprocess.PIPE,
                              text=True, timeout=600)
    finally:
        os.close(w)


def test_closed_pipe_ends_quietly_and_reports_are_written(tmp_path):
    out, ktap = tmp_path / "r.json", tmp_path / "r.ktap"
    p = closed_stdout("run", "-v", "-k", PASSING, "--json", str(out), "--ktap", str(ktap))
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr and "Broken pipe" not in p.stderr
    assert json.loads(out.read_text())["summary"]["failed"] == 0
    assert ktap.read_text().startswith("KTAP version 1")
    p = closed_stdout("run", "--backend", "model", "--profile", "legacy", "-k", "asid0")
    assert p.returncode == 1 and "Traceback" not in p.stderr  # the verdict, not the pipe


def test_list_and_explain_into_a_closed_pipe():
    for args in (["list"], ["list", "--json"], ["explain", "control/asid0[gif1]"], ["info"]):
        p = closed_stdout(*args)
        assert p.returncode == 0 and p.stderr == "", (args, p.stderr)


def test_head_closes_the_pipe_early():
    """As a user types it: `kvmtest list | head -2` and `kvmtest run | head -3`."""
    for command in ("list --json", f"run -v -k '{PASSING}'"):
        sh = subprocess.run(["bash", "-c", f"set -o pipefail; {PY} -m kvmtest {command} | "
                             "head -2 >/dev/null"], capture_output=True, text=True,
                            timeout=600)
        assert sh.returncode == 0, sh.stderr
        assert "Traceback" not in sh.stderr and "BrokenPipe" not in sh.stderr
