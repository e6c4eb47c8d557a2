"""Kernel-side failures under QEMU: errors with the log, never a pass.

run and explain exit 4; bisect-run skips the commit (125)."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.qemu
KERNEL = "debian:linux-image-6.1.0-56-amd64-unsigned"
BROKEN = ("--backend", "qemu", "--kernel", KERNEL, "--kvm-amd-param", "nested=bogus")


def kvmtest(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvmtest", *args], capture_output=True,
                          text=True, timeout=600)


def test_kvm_amd_that_refuses_to_load_is_exit_4(tmp_path, qemu_available):
    p = kvmtest("run", *BROKEN, "-k", "asid0", "--artifacts", str(tmp_path))
    assert p.returncode == 4, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert "kvm modules did not load" in p.stderr and "kvm_amd" in p.stderr
    assert (tmp_path / "console.log").exists()


def test_explain_kernel_that_breaks_is_exit_4(qemu_available):
    p = kvmtest("explain", "control/asid0[gif1]", *BROKEN)
    assert p.returncode == 4, p.stderr[-2000:]
    assert "kvm modules did not load" in p.stderr and "Traceback" not in p.stderr


def test_bisect_run_skips_a_kernel_that_breaks(qemu_available):
    p = kvmtest("bisect-run", *BROKEN[2:], "-k", "control/asid0[gif1]")
    assert p.returncode == 125, p.stderr[-2000:]
    assert "the kernel could not be tested: skip (125)" in p.stderr
