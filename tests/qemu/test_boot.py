"""The qemu boot layer on a real Debian kernel (marker `qemu`; ~1 min on 2 cores).

Each test boots one QEMU (TCG, -cpu EPYC unless the host has nested SVM).
The kernel package is downloaded once into the kvmtest cache.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvmtest.qemu import Kernel, QemuError, boot, resolve_kernel
from kvmtest.qemu.initramfs import BASE_MODULES

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None,
        reason="qemu-system-x86_64 not installed: apt-get install "
        "qemu-system-x86 busybox-static (see kvmtest/qemu/NOTES.md)",
    ),
]

KERNEL = "debian:linux-image-6.1.0-56-amd64-unsigned"

# Runs in the guest with the host's Python: /dev/kvm must be nested-SVM capable.
PROBE = """
import fcntl, json, os
fd = os.open("/dev/kvm", os.O_RDWR)
print(json.dumps({
    "api": fcntl.ioctl(fd, 0xAE00, 0),               # KVM_GET_API_VERSION
    "nested_state": fcntl.ioctl(fd, 0xAE03, 157),    # KVM_CHECK_EXTENSION(NESTED_STATE)
    "nested": open("/sys/module/kvm_amd/parameters/nested").read().strip(),
    "svm": " svm" in open("/proc/cpuinfo").read(),
    "release": os.uname().release,
}))
"""


@pytest.fixture(scope="module")
def kernel() -> Kernel:
    return resolve_kernel(KERNEL)


def _qemu_running_for(outdir: Path) -> list[str]:
    proc = subprocess.run(
        ["pgrep", "-af", f"qemu-system-x86_64.*{outdir}"],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.stdout.splitlines()


def test_guest_has_nested_svm_kvm(kernel: Kernel, tmp_path: Path) -> None:
    result = boot(kernel, [sys.executable, "-c", PROBE], outdir=tmp_path, timeout=240)
    assert result.failure() is None, result.console_tail()
    assert result.returncode == 0, result.stderr
    assert [m.status for m in result.modules] == ["ok"] * len(result.modules)
    assert {m.name for m in result.modules} >= {"kvm", "kvm_amd"}
    assert result.dev_kvm and result.kvm_ready and result.kvm_error() is None
    probe = json.loads(result.stdout)
    assert probe["api"] == 12
    assert probe["nested"] in ("1", "Y")
    assert probe["svm"] is True
    assert probe["nested_state"] > 0
    assert probe["release"] == kernel.release
    timings = result.timings()
    assert all(value is not None for value in timings.values()), timings


def test_kernel_panic_is_detected(kernel: Kernel, tmp_path: Path) -> None:
    # No such rdinit: the kernel falls back to mounting a root fs, finds
    # none and panics; panic=-1 + -no-reboot make QEMU exit at once.
    result = boot(
        kernel, ["/bin/true"], outdir=tmp_path, timeout=120, append="rdinit=/does-not-exist"
    )
    assert result.panicked, result.console_tail()
    assert not result.timed_out
    assert result.returncode is None
    assert "Kernel panic" in (result.failure() or "")
    assert "Kernel panic" in result.console_tail()


def test_hanging_command_times_out_and_qemu_is_reaped(kernel: Kernel, tmp_path: Path) -> None:
    timeout = 20.0
    result = boot(kernel, ["/bin/sleep", "3600"], outdir=tmp_path, timeout=timeout)
    assert result.timed_out
    assert result.returncode is None
    assert result.wall_s < timeout + 10
    assert "timed out" in (result.failure() or "")
    assert _qemu_running_for(tmp_path) == []


def test_missing_kvm_modules_are_reported(kernel: Kernel, tmp_path: Path) -> None:
    # A modules dir holding only the 9p stack: the guest boots, kvm is absent.
    assert kernel.modules_dir is not None
    mods = tmp_path / "mods"
    mods.mkdir()
    wanted = {
        "virtio",
        "virtio_ring",
        "virtio_pci",
        "virtio_pci_modern_dev",
        "virtio_pci_legacy_dev",
        "9pnet",
        "9pnet_virtio",
        "9p",
        "netfs",
        "fscache",
        *BASE_MODULES,
    }
    for path in kernel.modules_dir.rglob("*.ko*"):
        if path.name.split(".ko")[0].replace("-", "_") in wanted:
            (mods / path.name).symlink_to(path)
    bare = Kernel(image=kernel.image, release=kernel.release, modules_dir=mods, spec="test:no-kvm")
    result = boot(bare, ["/bin/true"], outdir=tmp_path / "out", timeout=120)
    assert result.returncode == 0, result.console_tail()
    assert ("kvm_amd", "missing") in [(m.name, m.status) for m in result.modules]
    assert result.dev_kvm is False
    assert not result.kvm_ready
    assert "kvm_amd is missing" in (result.kvm_error() or "")


def test_cpu_without_svm_is_a_clear_module_error(kernel: Kernel, tmp_path: Path) -> None:
    # Note: -cpu qemu64 *has* svm; EPYC minus svm is the simplest SVM-less AMD model.
    result = boot(kernel, ["/bin/true"], outdir=tmp_path, cpu="EPYC,-svm", timeout=120)
    assert result.returncode == 0, result.console_tail()
    error = result.kvm_error() or ""
    assert "insmod kvm_amd failed" in error and "svm not available" in error, error


def test_bad_spec_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(QemuError, match="no such file"):
        resolve_kernel(str(tmp_path / "nope"))
