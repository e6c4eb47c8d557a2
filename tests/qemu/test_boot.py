"""The qemu boot layer on a real Debian kernel (marker `qemu`; ~1 min on 2 cores).

Each test boots one QEMU (TCG, -cpu EPYC unless the host has nested SVM).
The kernel package is downloaded once into the kvmtest cache.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kvmtest.qemu import GUEST_PYTHON, Kernel, QemuError, boot, resolve_kernel
from kvmtest.qemu.initramfs import BASE_MODULES, iter_cpio
from kvmtest.qemu.runtime import GUEST_AGENT, build_runtime

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None,
        reason="qemu-system-x86_64 not installed: apt-get install "
        "qemu-system-x86 busybox-static (see docs/qemu.md)",
    ),
]

KERNEL = "debian:linux-image-6.1.0-56-amd64-unsigned"

# Runs in the guest with the runtime's Python: /dev/kvm must be nested-SVM capable.
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


def _only_regular_files(directory: Path) -> list[str]:
    """Names in DIRECTORY; fails on anything that is not a regular file."""
    names = []
    for entry in directory.iterdir():
        mode = entry.lstat().st_mode
        assert stat.S_ISREG(mode), f"{entry} is not a regular file ({stat.filemode(mode)})"
        names.append(entry.name)
    return sorted(names)


def test_guest_has_nested_svm_kvm(kernel: Kernel, tmp_path: Path) -> None:
    result = boot(kernel, [GUEST_PYTHON, "-S", "-I", "-c", PROBE], outdir=tmp_path, timeout=240)
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
    # Everything here was written by the host: the guest has no share.
    assert _only_regular_files(tmp_path) == ["console.log", "qemu.log"]
    assert "Run /init as init process" in (tmp_path / "console.log").read_text()


def test_qemu_runs_unprivileged(kernel: Kernel, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the privilege drop applies when kvmtest runs as root")
    result = boot(kernel, ["/bin/true"], outdir=tmp_path, timeout=120)
    assert result.returncode == 0, result.console_tail()
    assert result.run_as == "nobody"


def test_kernel_panic_is_detected(kernel: Kernel, tmp_path: Path) -> None:
    # No such rdinit: the kernel falls back to mounting a root fs, finds
    # none and panics; panic=-1 + -no-reboot make QEMU exit at once.
    result = boot(
        kernel, ["/bin/true"], outdir=tmp_path, timeout=120, append="rdinit=/does-not-exist"
    )
    assert result.panicked, result.console_tail()
    assert not result.timed_out
    assert result.returncode is None
    failure = result.failure() or ""
    assert "kernel panic: Kernel panic - not syncing" in failure and "during boot" in failure
    assert "Kernel panic" in result.console_tail()


def test_hanging_command_times_out_and_qemu_is_reaped(kernel: Kernel, tmp_path: Path) -> None:
    timeout = 20.0
    result = boot(kernel, ["/bin/sleep", "3600"], outdir=tmp_path, timeout=timeout)
    assert result.timed_out
    assert result.returncode is None
    assert result.wall_s < timeout + 10
    failure = result.failure() or ""
    assert "timed out" in failure and "during command" in failure, failure
    assert result.qemu_returncode == -9  # killed by us, reaped
    assert subprocess.run(["pgrep", "-P", str(os.getpid()), "qemu"],
                          capture_output=True).stdout == b""


def test_missing_kvm_modules_are_reported(kernel: Kernel, tmp_path: Path) -> None:
    # A modules dir holding only the channel's modules: the guest boots, kvm is absent.
    assert kernel.modules_dir is not None
    mods = tmp_path / "mods"
    mods.mkdir()
    wanted = {"virtio", "virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
              *BASE_MODULES}
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


def test_runtime_imports_the_agent_outside_any_guest(tmp_path: Path) -> None:
    """The runtime archive is complete: its Python, unpacked anywhere and run
    with -S -I (nothing of the host on its path), imports the agent."""
    archive = build_runtime().archive
    for name, mode, data in iter_cpio(archive.read_bytes()):
        target = tmp_path / name
        if stat.S_ISDIR(mode):
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            target.chmod(mode & 0o777)
    python = tmp_path / GUEST_PYTHON.lstrip("/")
    code = ("import sys, kvmtest.agent, kvmtest.runner; "
            "print(sys.prefix); print(kvmtest.agent.__file__)")
    env = {"LD_LIBRARY_PATH": str(python.parent.parent / "lib")}
    proc = subprocess.run([str(python), "-S", "-I", "-c", code], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    prefix, agent = proc.stdout.split()
    assert prefix == str(python.parent.parent)
    assert agent.startswith(prefix) and agent.endswith(".pyc")  # sourceless, from the archive
    assert sys.prefix not in proc.stdout
    # The guest's own entry command, all the way to the agent's main (which
    # refuses to run without its channel).
    proc = subprocess.run([str(python), *GUEST_AGENT[1:]], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "KVMTEST_CHANNEL_FD unset" in proc.stderr, proc.stderr
