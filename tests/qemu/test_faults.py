"""Faults named as they happened (marker `qemu`): a QEMU that is stopped,
killed or crashes, a guest that panics, an agent that dies.  Each ends in its
own message (what, phase, case in flight, QEMU's status, console tail), and
`kvmtest run` exits 4 with the artifacts kept and named.

The faults are real: SIGSTOP/SIGKILL go to the real QEMU process, the
panic is the kernel's own (no init, or sysrq-c from the guest).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kvmtest.cases import catalogue
from kvmtest.qemu import GUEST_PYTHON, GuestFault
from kvmtest.qemu.process import STOPPED_GRACE
from kvmtest.qemu.session import QemuSession

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                       reason="qemu-system-x86_64 not installed: apt-get install qemu-system-x86"),
]

KERNEL = "debian:linux-image-6.1.0-56-amd64-unsigned"
EXIT_KERNEL = 4


def _signal_qemu_when(session: QemuSession, ready, sig: int) -> threading.Thread:
    """Send SIG to the session's QEMU once READY() (polled) holds."""

    def go() -> None:
        for _ in range(2400):
            pid = session.qemu_pid
            if pid is not None and ready():
                os.kill(pid, sig)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread


def _in_cases(session: QemuSession) -> bool:
    vm = session._vm
    return vm is not None and vm.phase == "cases" and vm.case is not None


def _started_for(seconds: float, session: QemuSession):
    def ready() -> bool:
        vm = session._vm
        return vm is not None and vm.started > 0 and vm.elapsed >= seconds

    return ready


@pytest.mark.parametrize(("sig", "when", "phase", "pattern"), [
    (signal.SIGSTOP, "boot", "boot",
     r"QEMU is stopped \(process state T: SIGSTOP or a debugger\) for \d+ s; QEMU killed"),
    (signal.SIGKILL, "boot", "boot", r"QEMU was killed by SIGKILL"),
    (signal.SIGSTOP, "cases", "cases",
     r"QEMU is stopped \(process state T: SIGSTOP or a debugger\)"),
    (signal.SIGKILL, "cases", "cases", r"QEMU was killed by SIGKILL"),
    (signal.SIGSEGV, "cases", "cases", r"QEMU was killed by SIGSEGV"),
])
def test_qemu_stopped_or_killed(sig: int, when: str, phase: str, pattern: str) -> None:
    session = QemuSession(KERNEL)
    ready = (lambda: _in_cases(session)) if when == "cases" else _started_for(1.0, session)
    thread = _signal_qemu_when(session, ready, sig)
    t0 = time.monotonic()
    with pytest.raises(GuestFault) as info, session:
        list(session.run(catalogue(), timeout=5.0))
    elapsed = time.monotonic() - t0
    thread.join(5)
    fault = info.value
    assert fault.phase == phase, str(fault)
    assert re.search(pattern, fault.what), str(fault)
    if phase == "cases":
        assert fault.case in {c.id for c in catalogue()}
    if sig == signal.SIGSTOP:
        # The watchdog, not the 120 s boot budget or the batch deadline.
        assert elapsed < 60, elapsed
        assert fault.qemu_status == "killed by kvmtest"
    else:
        assert fault.qemu_status == f"was killed by {signal.Signals(sig).name}"
    assert "--- console tail ---" in str(fault)
    if phase == "cases":  # the kernel got far: its log is in the tail
        assert "kvm" in fault.console_tail.lower(), fault.console_tail
    shutil.rmtree(fault.artifacts or "/nonexistent", ignore_errors=True)


def test_stopped_grace_is_short() -> None:
    assert STOPPED_GRACE <= 5.0


def test_panic_at_boot_names_the_panic() -> None:
    with pytest.raises(GuestFault) as info, QemuSession(KERNEL, append="rdinit=/does-not-exist"):
        pass
    fault = info.value
    assert fault.phase == "boot"
    assert fault.what.startswith("kernel panic: Kernel panic - not syncing: ")
    assert fault.qemu_status == "exited with status 0"  # panic=-1 + -no-reboot
    assert "Kernel panic" in fault.console_tail
    shutil.rmtree(fault.artifacts or "/nonexistent", ignore_errors=True)


def test_agent_that_exits_early() -> None:
    command = [GUEST_PYTHON, "-S", "-I", "-c", "import sys; sys.exit('agent gave up')"]
    with pytest.raises(GuestFault) as info, QemuSession(KERNEL, command=command):
        pass
    fault = info.value
    assert fault.phase == "agent"
    assert fault.what == "the guest agent exited before its hello with status 1: agent gave up"
    shutil.rmtree(fault.artifacts or "/nonexistent", ignore_errors=True)


# -- the command line: exit 4, message, artifacts kept and named


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _qemu_child(pid: int) -> int | None:
    for child in _children(pid):
        try:
            if Path(f"/proc/{child}/comm").read_text().startswith("qemu-system"):
                return child
        except OSError:
            continue
    return None


@pytest.mark.parametrize(("sig", "when", "pattern"), [
    (signal.SIGSTOP, "boot", r"QEMU is stopped .* during boot"),
    (signal.SIGKILL, "boot", r"QEMU was killed by SIGKILL during boot"),
    (signal.SIGKILL, "cases", r"QEMU was killed by SIGKILL during cases \(case [^)]+\)"),
])
def test_cli_exits_4_with_the_fault(sig: int, when: str, pattern: str, tmp_path: Path) -> None:
    """Without --artifacts the temporary directory is kept and named; with it
    (the cases variant, to see the session transcript) the same message."""
    artifacts = tmp_path / "artifacts"
    extra = ["--artifacts", str(artifacts)] if when == "cases" else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmtest", "run", "--backend", "qemu", "--kernel", KERNEL, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        qemu = None
        while qemu is None and time.monotonic() < deadline:
            qemu = _qemu_child(proc.pid)
            time.sleep(0.05)
        assert qemu is not None, "QEMU never started"
        if when == "boot":
            time.sleep(1.0)
        else:  # the first case's start frame reached the host
            transcript = artifacts / "session.jsonl"
            while time.monotonic() < deadline and not (
                    transcript.exists() and '"t":"start"' in transcript.read_text()):
                time.sleep(0.05)
        os.kill(qemu, sig)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == EXIT_KERNEL, err[-3000:]
    assert "Traceback" not in err
    assert re.search(pattern, err), err[-3000:]
    kept = re.search(r"\(artifacts: (/\S+)\)", err)
    assert kept, err[-2000:]
    console = Path(kept.group(1), "console.log")
    assert console.is_file()
    # The console's tail, or, killed before the kernel printed (a loaded
    # machine, 1 s into boot), the plain fact that it is empty.
    assert ("--- console tail ---" in err) == bool(console.read_bytes().strip()), err[-2000:]
    assert ("(console empty)" in err) != ("--- console tail ---" in err), err[-2000:]
    if when != "cases":
        assert Path(kept.group(1)).name.startswith("kvmtest-qemu-")
        shutil.rmtree(kept.group(1))


def test_qemu_that_refuses_to_start_says_so() -> None:
    from kvmtest.config import Config

    with pytest.raises(GuestFault) as info, QemuSession(KERNEL, config=Config(cpu="NoSuchCpu")):
        pass
    fault = info.value
    assert fault.phase == "boot"
    assert re.match(r"QEMU failed to start: .*NoSuchCpu", fault.what), str(fault)
    assert fault.qemu_status == "exited with status 1"
    shutil.rmtree(fault.artifacts or "/nonexistent", ignore_errors=True)
