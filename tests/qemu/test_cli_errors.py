"""Kernel-side failures under QEMU: errors with the log, never a pass.

run and explain exit 4; bisect-run skips the commit (125)."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.qemu
KERNEL = "debian:linux-image-6.1.0-56-amd64-unsigned"
BROKEN = ("--backend", "qemu", "--kernel", KERNEL, "--kvm-amd-param", "nested=bogus")


def kvmtest(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvmtest", *args], capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, **(env or {})))


def one_line(p: subprocess.CompletedProcess) -> str:
    errors = [line for line in p.stderr.splitlines() if line.startswith("kvmtest: error:")]
    assert len(errors) == 1, p.stderr
    return errors[0]


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


@pytest.fixture
def full_cache():
    """A 1 MiB tmpfs as the cache: the vmlinux extracted for a PVH boot does not fit."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    d = Path(tempfile.mkdtemp(prefix="kvmtest-full-"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        d.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield d
    subprocess.run(["umount", str(d)], check=True)
    d.rmdir()


def test_disk_full_in_the_cache(full_cache, qemu_available):
    """No room for the vmlinux (the bzImage boots instead) nor the initramfs:
    an environment error (3) before the boot, and bisect-run stops (128)
    rather than marking the commit bad or skipping it."""
    from kvmtest.qemu import resolve_kernel

    kernel = resolve_kernel(KERNEL)  # from the real cache, before it is swapped
    args = ("--kernel", str(kernel.image), "--modules", str(kernel.modules_dir), "-k", "asid0")
    env = {"KVMTEST_CACHE": str(full_cache)}
    p = kvmtest("run", "--backend", "qemu", *args, env=env)
    assert p.returncode == 3, p.stderr[-2000:]
    assert "no space left in" in one_line(p) and "Traceback" not in p.stderr
    p = kvmtest("bisect-run", *args, env=env)
    assert p.returncode == 128, p.stderr[-2000:]
    assert "stopping the bisect (128)" in p.stderr
