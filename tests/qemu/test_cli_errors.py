"""Kernel-side failures under QEMU are errors with the log, exit 4 (never a pass)."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.qemu
KERNEL = "debian:linux-image-6.1.0-56-amd64-unsigned"


def test_kvm_amd_that_refuses_to_load_is_exit_4(tmp_path, qemu_available):
    p = subprocess.run([sys.executable, "-m", "kvmtest", "run", "--backend", "qemu",
                        "--kernel", KERNEL, "--kvm-amd-param", "nested=bogus", "-k", "asid0",
                        "--artifacts", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 4, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert "kvm modules did not load" in p.stderr and "kvm_amd" in p.stderr
    assert (tmp_path / "console.log").exists()


def test_unknown_kernel_spec_is_exit_3(tmp_path):
    p = subprocess.run([sys.executable, "-m", "kvmtest", "run", "--backend", "qemu",
                        "--kernel", str(tmp_path / "no-such-bzImage")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 3 and "no such file" in p.stderr
    assert "Traceback" not in p.stderr
