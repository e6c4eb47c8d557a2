"""Every cell of the README's exit-code table, produced by a real process.

ROWS maps (command, code) to the test that produces it; a test checks that
the README's table and ROWS name the same cells.  Cells that need a kernel
under QEMU are tested in tests/qemu/ (named here by path).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from clirun import PY, crashing, kvmtest, one_line_error

REPO = Path(__file__).resolve().parents[1]
QEMU_ERRORS = "tests/qemu/test_cli_errors.py"
QEMU_KMOD = "tests/qemu/test_kmod.py"
THIS = "tests/test_exit_codes.py"

ROWS: dict[tuple[str, int], str] = {
    ("run", 0): f"{THIS}::test_run_all_passed",
    ("run", 1): f"{THIS}::test_run_a_case_failed",
    ("run", 2): f"{THIS}::test_run_usage_errors_before_anything_runs",
    ("run", 3): f"{THIS}::test_run_environment_errors",
    ("run", 4): f"{QEMU_ERRORS}::test_kvm_amd_that_refuses_to_load_is_exit_4",
    ("run", 70): f"{THIS}::test_internal_error",
    ("run", 125): f"{THIS}::test_run_nothing_testable",
    ("run", 130): f"{THIS}::test_run_interrupted",
    ("explain", 0): f"{THIS}::test_explain_shown",
    ("explain", 1): f"{THIS}::test_explain_case_failed",
    ("explain", 2): f"{THIS}::test_explain_unknown_id",
    ("explain", 3): f"{THIS}::test_explain_environment_error",
    ("explain", 4): f"{QEMU_ERRORS}::test_explain_kernel_that_breaks_is_exit_4",
    ("explain", 70): f"{THIS}::test_internal_error",
    ("explain", 125): f"{THIS}::test_explain_case_skipped",
    ("explain", 130): f"{THIS}::test_interrupted",
    ("list", 0): f"{THIS}::test_list_and_info_ok",
    ("list", 2): f"{THIS}::test_list_and_info_usage",
    ("list", 70): f"{THIS}::test_internal_error",
    ("list", 130): f"{THIS}::test_interrupted",
    ("info", 0): f"{THIS}::test_list_and_info_ok",
    ("info", 2): f"{THIS}::test_list_and_info_usage",
    ("info", 70): f"{THIS}::test_internal_error",
    ("info", 130): f"{THIS}::test_interrupted",
    ("kmod", 0): f"{QEMU_KMOD}::test_kmod_cli_exit_codes",
    ("kmod", 1): f"{QEMU_KMOD}::test_kmod_cli_exit_codes",
    ("kmod", 2): f"{THIS}::test_kmod_usage_errors",
    ("kmod", 3): f"{THIS}::test_kmod_environment_error",
    ("kmod", 70): f"{THIS}::test_internal_error",
    ("kmod", 130): f"{THIS}::test_interrupted",
    ("bisect-run", 0): f"{QEMU_KMOD}::test_bisect_run_good_and_bad",
    ("bisect-run", 1): f"{QEMU_KMOD}::test_bisect_run_good_and_bad",
    ("bisect-run", 125): f"{THIS}::test_bisect_run_build_failed_skips",
    ("bisect-run", 128): f"{THIS}::test_bisect_run_stops_on_what_no_commit_changes",
    ("bisect-run", 130): f"{THIS}::test_interrupted",
}


def readme_table() -> set[tuple[str, int]]:
    """(command, code) for every non-empty cell of the README's exit-code table."""
    text = (REPO / "README.md").read_text()
    section = text.split("### Exit codes", 1)[1].splitlines()
    start = next(i for i, line in enumerate(section) if line.startswith("|"))
    rows = []
    for line in section[start:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    header = [c.strip().strip("`").split()[0] for c in rows[0].strip("|").split("|")]
    cells = set()
    for line in rows[2:]:
        parts = [c.strip() for c in line.strip("|").split("|")]
        code = int(parts[0])
        cells |= {(cmd, code) for cmd, cell in zip(header[1:], parts[1:], strict=True)
                  if cell not in ("", "—")}
    return cells


def test_readme_table_is_what_is_tested():
    assert readme_table() == set(ROWS)
    for ref in set(ROWS.values()):
        path, name = ref.split("::")
        assert re.search(rf"^def {name}\(", (REPO / path).read_text(), re.M), ref


# -- run -----------------------------------------------------------------------------


def test_run_all_passed():
    p = kvmtest("run", "--backend", "model", "-k", "cr0-cd0-nw1 and not smm and not nested")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[-1].startswith("4 passed, 0 failed")


def test_run_a_case_failed():
    p = kvmtest("run", "--backend", "model", "--profile", "legacy", "-k",
                "save/cr0-cd0-nw1[gif1]")
    assert p.returncode == 1
    assert "FAIL  save/cr0-cd0-nw1[gif1]  known bug (legacy)" in p.stdout


USAGE = {
    "bad -k": (["-k", "save and ("], "cannot parse -k expression"),
    "-k matches nothing": (["-k", "no-such-case"], "no case matches"),
    "negative timeout": (["--timeout", "-1"], "positive and finite"),
    "nan timeout": (["--timeout", "nan"], "positive and finite"),
    "inf timeout": (["--timeout", "inf"], "positive and finite"),
    "zero timeout": (["--timeout", "0"], "positive and finite"),
    "word timeout": (["--timeout", "soon"], "not a number of seconds"),
    "json dir missing": (["--json", "/nonexistent/dir/x.json"], "no such directory"),
    "ktap under a file": (["--ktap", "/etc/passwd/x.ktap"], "--ktap /etc/passwd/x.ktap"),
    "json is a dir": (["--json", "/tmp"], "is a directory"),
    "two reports on stdout": (["--json", "-", "--ktap", "-"], "only one report"),
    "artifacts is a file": (["--backend", "qemu", "--kernel", "debian:linux-image-x",
                             "--artifacts", "/etc/passwd"], "not a directory"),
    "kernel path missing": (["--backend", "qemu", "--kernel", "/nonexistent/bzImage"],
                            "--kernel /nonexistent/bzImage: no such file"),
    "kvm-modules missing": (["--backend", "qemu", "--kernel", "debian:linux-image-x",
                             "--kvm-modules", "/nonexistent"], "--kvm-modules /nonexistent"),
    "qemu option without qemu": (["--backend", "model", "--cpu", "EPYC"], "needs --backend qemu"),
    "qemu without kernel": (["--backend", "qemu"], "needs --kernel"),
    "unknown backend": (["--backend", "nope"], "invalid choice"),
}


@pytest.mark.parametrize("case", USAGE, ids=list(USAGE))
def test_run_usage_errors_before_anything_runs(case):
    args, message = USAGE[case]
    p = kvmtest("run", *args)
    assert p.returncode == 2
    assert message in one_line_error(p)
    assert "backend" not in p.stderr.replace("--backend", "")  # nothing was started
    assert p.stdout == ""


def test_run_environment_errors(tmp_path):
    p = kvmtest("run", "--backend", "kvm", env={"KVMTEST_DEV_KVM": str(tmp_path / "kvm")})
    assert p.returncode == 3 and "no " in one_line_error(p)
    # A disk that is full when the report is written (/dev/full: ENOSPC).
    p = kvmtest("run", "--backend", "model", "-k", "asid0", "--json", "/dev/full")
    assert p.returncode == 3
    assert "cannot write --json /dev/full: No space left on device" in one_line_error(p)
    assert "7 passed" in p.stdout  # the run itself completed


@pytest.mark.kvm
def test_run_nothing_testable(real_kvm):
    if real_kvm["svm"]:
        pytest.skip("this host has nested SVM: every case can be tested here")
    p = kvmtest("run", "--backend", "kvm", "-k", "control/asid0")
    assert p.returncode == 125
    assert "SKIP  2 cases: host KVM has no SVM" in p.stdout


def _interrupt_when(args: list[str], patch: str, ready: str) -> subprocess.CompletedProcess:
    """Start kvmtest with PATCH applied, send SIGINT once stderr shows READY."""
    code = ("import sys, time\n" + patch + "\nfrom kvmtest.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    p = subprocess.Popen([PY, "-c", code, *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stderr is not None
    seen = ""
    deadline = time.monotonic() + 60
    while ready not in seen and time.monotonic() < deadline:
        seen += p.stderr.readline()
    os.kill(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=60)
    return subprocess.CompletedProcess(p.args, p.returncode, out, seen + err)


def test_run_interrupted():
    """A real SIGINT while the cases run (run_cases made slow to leave time)."""
    slow = "import kvmtest.cli as c\nc.run_cases = lambda *a, **k: time.sleep(60)"
    p = _interrupt_when(["run", "--backend", "model"], slow, "backend model")
    assert p.returncode == 130
    assert "kvmtest: interrupted" in p.stderr and "Traceback" not in p.stderr


# -- explain -------------------------------------------------------------------------


def test_explain_shown():
    p = kvmtest("explain", "save/cr0-cd0-nw1[gif1]")
    assert p.returncode == 0
    assert "cr0  0x80010033 -> 0xa0010033  (+bit 29 NW)" in p.stdout


def test_explain_case_failed():
    p = kvmtest("explain", "save/cr0-cd0-nw1[gif1]", "--backend", "model", "--profile", "legacy")
    assert p.returncode == 1
    assert re.search(r"^  gif +0 +1  <-- differs$", p.stdout, re.M), p.stdout


def test_explain_unknown_id():
    p = kvmtest("explain", "save/cr0-cd0-nw1")
    assert p.returncode == 2
    line = one_line_error(p)
    assert "no case 'save/cr0-cd0-nw1'" in line and "save/cr0-cd0-nw1[gif1]" in line


def test_explain_environment_error(tmp_path):
    p = kvmtest("explain", "insn/nosvm-vmrun", "--backend", "kvm",
                env={"KVMTEST_DEV_KVM": str(tmp_path / "kvm")})
    assert p.returncode == 3 and "modprobe kvm_amd" in one_line_error(p)


@pytest.mark.kvm
def test_explain_case_skipped(real_kvm):
    if real_kvm["svm"]:
        pytest.skip("this host has nested SVM: the case runs here")
    p = kvmtest("explain", "control/asid0[gif1]", "--backend", "kvm")
    assert p.returncode == 125 and "verdict: SKIP (host KVM has no SVM" in p.stdout


# -- list, info ------------------------------------------------------------------------


def test_list_and_info_ok():
    assert kvmtest("list", "-k", "asid0").returncode == 0
    assert kvmtest("info").returncode == 0


def test_list_and_info_usage():
    p = kvmtest("list", "-k", "(")
    assert p.returncode == 2 and "-k" in one_line_error(p)
    p = kvmtest("info", "--bogus")
    assert p.returncode == 2 and "unrecognized arguments: --bogus" in one_line_error(p)


# -- kmod ------------------------------------------------------------------------------


def test_kmod_usage_errors(tmp_path):
    p = kvmtest("kmod", "check", str(tmp_path / "nope"), "6.1.0-56-amd64")
    assert p.returncode == 2 and "no such directory" in p.stderr
    p = kvmtest("kmod", "build", "--source", str(tmp_path / "nope"), "--kernel", "6.1.0-56-amd64")
    assert p.returncode == 2 and "--source" in p.stderr
    p = kvmtest("kmod", "build", "--source", str(tmp_path), "--kernel", "6.1.0-56-amd64",
                "--patch", str(tmp_path / "none.patch"))
    assert p.returncode == 2 and "--patch" in p.stderr
    p = kvmtest("kmod", "build", "--source", str(tmp_path), "--kernel", "6.1.0-56-amd64",
                "--out", "/etc/passwd")
    assert p.returncode == 2 and "--out /etc/passwd" in p.stderr
    assert kvmtest("kmod", "check").returncode == 2
    assert "Traceback" not in p.stderr


def test_kmod_environment_error(tmp_path):
    p = kvmtest("kmod", "check", str(tmp_path), "6.1.0-56-amd64")
    assert p.returncode == 3 and "no kernel modules" in p.stderr


# -- bisect-run ------------------------------------------------------------------------


def test_bisect_run_build_failed_skips():
    p = kvmtest("bisect-run", "--build", "false", "--kernel", "debian:linux-image-x", "-k",
                "asid0")
    assert p.returncode == 125 and "build failed: skip (125)" in p.stderr


BISECT_STOP = {
    "bad -k": ["--kernel", "debian:linux-image-x", "-k", "("],
    "nan timeout": ["--kernel", "debian:linux-image-x", "--timeout", "nan"],
    "unknown option": ["--kernel", "debian:linux-image-x", "--bogus"],
    "kernel path missing": ["--kernel", "/nonexistent/bzImage"],
    "not a kernel (environment)": ["--kernel", "/etc/hostname", "-k", "asid0"],
}


@pytest.mark.parametrize("case", BISECT_STOP, ids=list(BISECT_STOP))
def test_bisect_run_stops_on_what_no_commit_changes(case):
    p = kvmtest("bisect-run", *BISECT_STOP[case])
    assert p.returncode == 128, p.stderr
    assert "Traceback" not in p.stderr


def test_bisect_run_internal_error_stops():
    p = crashing("import kvmtest.cli as c\nc.make = boom", "bisect-run", "--kernel",
                 "/etc/hostname", "-k", "asid0")
    assert p.returncode == 128
    assert "internal error" in p.stderr and "stopping the bisect (128)" in p.stderr
    Path(re.search(r"traceback in (\S+)\)", p.stderr).group(1)).unlink()


def test_bisect_run_missing_kernel_after_build_stops(tmp_path):
    """--kernel may be what --build makes: checked after a build that succeeded."""
    p = kvmtest("bisect-run", "--build", "true", "--kernel", str(tmp_path / "bzImage"))
    assert p.returncode == 128 and "no such file" in p.stderr


# -- every command: internal errors, Ctrl-C ----------------------------------------------

CRASH = {  # command line, and what to break on its way
    "run": (["run", "--backend", "model", "-k", "asid0"],
            "import kvmtest.judge as m\nm.judge = boom"),
    "explain": (["explain", "control/asid0[gif1]"], "import kvmtest.explain as m\n"
                "m.vmcb12_changes = boom"),
    "list": (["list"], "import kvmtest.cli as m\nm.select = boom"),
    "info": (["info"], "import kvmtest.info as m\nm.host_facts = boom"),
    "kmod": (["kmod", "check", "/tmp", "6.1.0-56-amd64"],
             "import kvmtest.kmod as m\nm.check_vermagic = boom"),
    "bisect-run": (["bisect-run", "--kernel", "/etc/hostname", "-k", "asid0"],
                   "import kvmtest.cli as m\nm.make = boom"),
}
INTERNAL = {"bisect-run": 128}


@pytest.mark.parametrize("command", CRASH)
def test_internal_error(command):
    """An uncaught exception: one line, the traceback in a log, never 1."""
    args, patch = CRASH[command]
    p = crashing(patch, *args)
    assert p.returncode == INTERNAL.get(command, 70), p.stderr
    line = next(line for line in p.stderr.splitlines() if "internal error" in line)
    assert "ZeroDivisionError: injected bug" in line
    assert "in <string>:3 boom;" in line  # where it was raised
    log = Path(re.search(r"traceback in (\S+)\)", line).group(1))
    try:
        assert "Traceback" not in p.stderr
        assert 'in boom\nZeroDivisionError: injected bug' in log.read_text()
    finally:
        log.unlink()


@pytest.mark.parametrize("command", CRASH)
def test_interrupted(command):
    args, patch = CRASH[command]
    p = _interrupted(args, patch)
    assert p.returncode == 130, p.stderr
    assert "kvmtest: interrupted" in p.stderr and "Traceback" not in p.stderr


def _interrupted(args: list[str], patch: str) -> subprocess.CompletedProcess:
    """Ctrl-C at the point CRASH breaks (KeyboardInterrupt raised there)."""
    interrupt = ("def interrupt(*a, **k):\n    raise KeyboardInterrupt\n"
                 + patch.replace("= boom", "= interrupt"))
    return crashing(interrupt, *args)
