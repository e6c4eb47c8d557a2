"""A cache that heals, on real Debian packages (marker `qemu`: downloads, one boot).

Each test works on a private cache ($KVMTEST_CACHE or cache=) seeded with a
copy of a shared entry, so that damaging it never touches ~/.cache/kvmtest;
repairs download the package again from deb.debian.org.  Full disks are
small tmpfs mounts (root needed).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmtest import judge as j
from kvmtest.qemu import resolve_kernel
from kvmtest.qemu.cache import Entry, cache_root, check_sidecar, sha256_file
from kvmtest.qemu.pvh import pvh_image

pytestmark = pytest.mark.qemu

# The smallest classic package (27 MB): for repairs that need no boot.
CLOUD = "debian:linux-image-6.1.0-56-cloud-amd64-unsigned"
CLOUD_IMAGE = "root/boot/vmlinuz-6.1.0-56-cloud-amd64"
SPLIT = "debian:linux-image-7.3.4+deb13-amd64@trixie-backports"
BOOKWORM = "debian:linux-image-6.1.0-56-amd64-unsigned"
BPO = "debian:linux-image-6.12.95+deb12-amd64-unsigned@bookworm-backports"


def key(spec: str) -> str:
    return spec.removeprefix("debian:")


def seeded(root: Path, spec: str) -> Entry:
    """Copy SPEC's shared entry (and its private apt state) into the cache at ROOT."""
    resolve_kernel(spec)  # fetched into the shared cache once
    shutil.copytree(cache_root() / "kernels" / key(spec), root / "kernels" / key(spec))
    suite = spec.partition("@")[2]
    if suite:
        shutil.copytree(cache_root() / "apt" / suite, root / "apt" / suite)
    return Entry(root / "kernels" / key(spec))


def kvmtest(cache: Path, *args: str, path: Path | None = None, **popen) -> subprocess.Popen:
    env = dict(os.environ, KVMTEST_CACHE=str(cache))
    if path is not None:  # tools found here first
        env["PATH"] = f"{path}:{env['PATH']}"
    return subprocess.Popen([sys.executable, "-m", "kvmtest", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def run(cache: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    proc = kvmtest(cache, *args)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount_tmpfs(size) -> a fresh tmpfs of that size; unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (run the suite as root)")
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       check=True)
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


class Descendants:
    """Every process that descends from PID, remembered while it runs (via /proc)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.seen: dict[int, str] = {}

    def poll(self) -> dict[int, str]:
        table = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            table[int(entry)] = (int(stat[stat.rindex(")") + 2 :].split()[1]), comm)
        frontier = {self.pid}
        while frontier:
            frontier = {p for p, (ppid, _) in table.items() if ppid in frontier
                        and p not in self.seen}
            self.seen.update({p: table[p][1] for p in frontier})
        return self.seen

    def wait_for(self, comm: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while comm not in self.poll().values():
            if time.monotonic() > deadline:
                raise AssertionError(f"no {comm} within {timeout} s: saw {set(self.seen.values())}")
            time.sleep(0.02)

    def remaining(self) -> dict[int, str]:
        """Remembered descendants that still exist (running or unreaped)."""
        out = {}
        for pid, comm in self.seen.items():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            if stat[stat.index("(") + 1 : stat.rindex(")")] == comm:  # not a reused pid
                out[pid] = comm
        return out


def leftovers(cache: Path, spec: str) -> list[str]:
    """Half entries and locks a failed fetch of SPEC could have left."""
    kernels = cache / "kernels"
    names = [p.name for p in kernels.iterdir()] if kernels.is_dir() else []
    locks = [str(p.relative_to(cache)) for p in cache.rglob("*.lock")]
    locks += [str(p.relative_to(cache)) for p in cache.rglob(".lock")]
    return [n for n in names if n.startswith((".unpack-", ".trash-")) or n == key(spec)] + locks


# --------------------------------------------------------------------------
# damaged entries are fetched again


def test_truncated_image_is_fetched_again(tmp_path, capfd):
    entry = seeded(tmp_path, CLOUD)
    image = entry.path / CLOUD_IMAGE
    good, size = sha256_file(image), image.stat().st_size
    os.truncate(image, size // 2)
    kernel = resolve_kernel(CLOUD, cache=tmp_path)
    assert capfd.readouterr().err == (
        f"kvmtest: cache entry {key(CLOUD)} is damaged ({CLOUD_IMAGE} is {size // 2} bytes, "
        f"recorded {size}): fetching it again\n")
    assert kernel.image == image and sha256_file(image) == good
    assert entry.problem(full=True) is None
    resolve_kernel(CLOUD, cache=tmp_path)
    assert capfd.readouterr().err == ""  # healed once, then quiet


def test_meta_spec_repairs_the_kernel_it_resolves_to(tmp_path, capfd):
    """A meta spec stops at a cached kernel of the pinned version; damaged, it is fetched."""
    meta_spec = "debian:linux-image-cloud-amd64"
    shared = resolve_kernel(meta_spec)
    entry = seeded(tmp_path, f"debian:{shared.package}")
    image = entry.path / entry.meta()["image"]
    good, size = sha256_file(image), image.stat().st_size
    os.truncate(image, 4096)
    kernel = resolve_kernel(meta_spec, cache=tmp_path)
    assert capfd.readouterr().err == (
        f"kvmtest: cache entry {shared.package} is damaged ({image.relative_to(entry.path)} "
        f"is 4096 bytes, recorded {size}): fetching it again\n")
    assert sha256_file(kernel.image) == good and kernel.resolved_from == meta_spec
    assert (kernel.package, kernel.package_version) == (shared.package, shared.package_version)


def test_entry_of_an_older_kvmtest_is_fetched_again(tmp_path, capfd):
    entry = seeded(tmp_path, CLOUD)
    meta = entry.meta()
    (entry.path / "meta.json").write_text(json.dumps(
        {k: meta[k] for k in ("package", "version", "release", "image", "modules")}))
    (entry.path / "files.json").unlink()
    resolve_kernel(CLOUD, cache=tmp_path)
    assert capfd.readouterr().err == (
        f"kvmtest: cache entry {key(CLOUD)} has no integrity record (an older kvmtest "
        "fetched it): fetching it again\n")
    assert not entry.legacy() and entry.problem(full=True) is None


def test_verify_names_a_flipped_byte_and_repair_fixes_it(tmp_path):
    entry = seeded(tmp_path, CLOUD)
    module = next(entry.path.rglob("kvm-amd.ko"))
    good = sha256_file(module)
    data = bytearray(module.read_bytes())
    data[len(data) // 2] ^= 1
    module.write_bytes(bytes(data))
    proc = run(tmp_path, "cache", "verify")
    assert proc.returncode == 1, proc.stderr
    rel = module.relative_to(entry.path)
    assert f"DAMAGED  {key(CLOUD)}: {rel} does not match its recorded sha256" in proc.stdout
    assert proc.stdout.splitlines()[-1] == "1 checked, 1 damaged"
    proc = run(tmp_path, "cache", "verify", "--repair")
    assert proc.returncode == 0 and f"repaired {key(CLOUD)}" in proc.stdout, proc.stderr
    assert sha256_file(module) == good
    assert run(tmp_path, "cache", "verify").returncode == 0


def test_removed_modules_dir_is_fetched_again_and_boots(tmp_path, qemu_available):
    """The issue: a removed modules dir said 'pass --modules DIR', which debian: refuses."""
    entry = seeded(tmp_path / "cache", SPLIT)
    shutil.rmtree(entry.path / entry.meta()["modules"])
    out = tmp_path / "report.json"
    proc = run(tmp_path / "cache", "run", "--backend", "qemu", "--kernel", SPLIT,
               "-k", "control/asid0", "--json", str(out), "--artifacts", str(tmp_path / "art"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    repairs = [ln for ln in proc.stderr.splitlines() if "cache entry" in ln]
    assert len(repairs) == 1 and re.fullmatch(
        rf"kvmtest: cache entry {re.escape(key(SPLIT))} is damaged \(\d+ of \d+ files missing, "
        r"e\.g\. root/usr/lib/modules/7\.3\.4\+deb13-amd64/\S+\): fetching it again",
        repairs[0]), repairs
    assert "--modules" not in proc.stderr
    report = json.loads(out.read_text())
    assert [c["verdict"] for c in report["cases"]] == [j.PASS, j.PASS]


# --------------------------------------------------------------------------
# the PVH vmlinux


def test_damaged_vmlinux_is_extracted_again(tmp_path, capfd):
    kernel = resolve_kernel(BOOKWORM)
    elf = pvh_image(kernel, cache=tmp_path)
    assert elf is not None and check_sidecar(elf) is None
    good = sha256_file(elf)
    data = bytearray(elf.read_bytes())
    data[-100] ^= 1
    elf.write_bytes(bytes(data))
    capfd.readouterr()
    assert pvh_image(kernel, cache=tmp_path) == elf
    assert capfd.readouterr().err == (
        f"kvmtest: cached vmlinux {elf} is damaged (does not match its recorded sha256): "
        "extracting it again\n")
    assert sha256_file(elf) == good


def test_vmlinux_on_a_full_disk_boots_the_bzimage(mount_tmpfs, tmp_path, capfd, qemu_available):
    """32 MB holds the initramfs archives but not the 66 MB vmlinux."""
    cache = mount_tmpfs("32m")
    kernel = resolve_kernel(BOOKWORM)
    assert pvh_image(kernel, cache=cache) is None
    note = capfd.readouterr().err
    assert re.fullmatch(
        rf"kvmtest: no space left in {re.escape(str(cache / 'vmlinux'))}: the uncompressed "
        r"vmlinux needs about \d+ MB, \d+ MB free \(free some, or point KVMTEST_CACHE "
        r"elsewhere\); booting the bzImage instead\n", note), note
    assert not [p for p in (cache / "vmlinux").iterdir() if not p.name.endswith(".lock")]
    # The whole run: the bzImage boots, with the note.
    proc = run(cache, "run", "--backend", "qemu", "--kernel", str(kernel.image),
               "--modules", str(kernel.modules_dir), "-k", "control/asid0",
               "--artifacts", str(tmp_path / "art"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "booting the bzImage instead" in proc.stderr


# --------------------------------------------------------------------------
# full disks, Ctrl-C, bad specs: one line, nothing left behind


def test_full_disk_before_a_fetch_is_one_line(mount_tmpfs):
    cache = mount_tmpfs("50m")
    proc = run(cache, "run", "--backend", "qemu", "--kernel", BOOKWORM, "-k", "control/asid0")
    assert proc.returncode == 3
    assert re.fullmatch(
        rf"kvmtest: error: no space left in {re.escape(str(cache / 'kernels'))}: "
        rf"{re.escape(BOOKWORM)} needs about (\d+) MB, \d+ MB free \(free some, or point "
        r"KVMTEST_CACHE elsewhere\)\n", proc.stderr), proc.stderr
    assert leftovers(cache, BOOKWORM) == []


def test_disk_filling_up_during_the_unpack_is_one_line(mount_tmpfs):
    """Enough room when the fetch starts; another writer fills the disk meanwhile."""
    cache = mount_tmpfs("320m")  # 106 MB .deb + 110 MB unpacked + 5 %, + apt lists
    proc = kvmtest(cache, "run", "--backend", "qemu", "--kernel", BPO, "-k", "control/asid0")
    watch = Descendants(proc.pid)
    try:
        watch.wait_for("dpkg-deb")
        free = os.statvfs(cache).f_bavail * os.statvfs(cache).f_frsize
        with open(cache / "filler", "wb") as filler, pytest.raises(OSError):
            filler.write(bytes(free))  # as much as fits
        err = proc.communicate(timeout=300)[1]
    finally:
        proc.kill()
        proc.wait()
    watch.poll()
    assert proc.returncode == 3, err
    assert re.fullmatch(
        rf"kvmtest: error: no space left in {re.escape(str(cache / 'kernels'))}: "
        rf"debian:{re.escape(key(BPO).partition('@')[0])} needs about \d+ MB, \d+ [kM]B free "
        r"\(free some, or point KVMTEST_CACHE elsewhere\)\n", err), err
    assert watch.remaining() == {}
    assert leftovers(cache, BPO) == []


def test_ctrl_c_during_the_unpack_stops_every_child(tmp_path):
    """^C while dpkg-deb unpacks.  A dpkg-deb first on PATH waits 30 s, then
    runs the real one: the unpack stays open long enough to be seen and
    interrupted on a loaded machine (a real unpack of 27 MB takes well under
    a second, between two polls of /proc)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    real = shutil.which("dpkg-deb")
    assert real, "dpkg-deb (Debian's dpkg) is needed"
    wrapper = bin_dir / "dpkg-deb"
    wrapper.write_text(f'#!/bin/sh\nsleep 30\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    proc = kvmtest(tmp_path / "cache", "run", "--backend", "qemu", "--kernel", CLOUD,
                   "-k", "control/asid0", path=bin_dir)
    watch = Descendants(proc.pid)
    try:
        watch.wait_for("dpkg-deb")
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130 and err == "kvmtest: interrupted\n", err
    assert "dpkg-deb" in watch.seen.values() and "apt-get" in watch.seen.values()
    assert watch.remaining() == {}
    assert leftovers(tmp_path / "cache", CLOUD) == []


@pytest.mark.parametrize("spec, message", [
    ("debian:no-such-package",
     "debian:no-such-package: no such package in this machine's apt sources"),
    ("debian:no-such-package@bookworm-backports",
     "debian:no-such-package@bookworm-backports: no such package in suite bookworm-backports"),
    ("debian:linux-image-amd64@no-such-suite",
     "apt-get update for suite no-such-suite failed: E: The repository "
     "'http://deb.debian.org/debian no-such-suite Release' does not have a Release file."),
])
def test_bad_debian_spec_is_one_line_and_leaves_nothing(tmp_path, spec, message):
    proc = run(tmp_path, "run", "--backend", "qemu", "--kernel", spec, "-k", "control/asid0")
    assert proc.returncode == 3 and proc.stderr == f"kvmtest: error: {message}\n"
    assert leftovers(tmp_path, spec) == []
    assert not (tmp_path / "apt" / "no-such-suite").exists()
