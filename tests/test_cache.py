"""The kernel cache without network: locks, records, full disks, prune, parsing.

Entries here are synthetic (a few real files under a meta.json), not
unpacked kernels: what is tested is the bookkeeping, which does not depend
on what the files hold.  Real entries are in tests/qemu/test_cache_heal.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kvmtest.qemu.cache import (
    Entry,
    NoSpaceError,
    atomic_write,
    check_sidecar,
    is_held,
    locked,
    sha256_file,
    write_sidecar,
)
from kvmtest.qemu.debian import KEEP, _holds, _member_path, parse_show

# --------------------------------------------------------------------------
# fixtures


@pytest.fixture
def tmpfs(tmp_path):
    """A 1 MiB tmpfs (needs root to mount)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (run the suite as root)")
    where = tmp_path / "tmpfs"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], check=True)
    yield where
    subprocess.run(["umount", str(where)], check=True)


def make_entry(root: Path, key: str, release: str, files: dict[str, bytes]) -> Entry:
    """A synthetic kernel entry whose records match FILES (paths under root/)."""
    path = root / "kernels" / key
    records = []
    for rel, data in files.items():
        target = path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        records.append([rel, len(data), sha256_file(target)])
    image = next(rel for rel in files if "vmlinuz" in rel)
    meta = {"format": 2, "package": key.partition("@")[0], "version": "1.0-1",
            "suite": key.partition("@")[2] or None, "release": release, "image": image,
            "modules": f"root/lib/modules/{release}", "debs": [], "aliases": []}
    (path / "meta.json").write_text(json.dumps(meta))
    (path / "files.json").write_text(json.dumps({"files": records}))
    return Entry(path)


def kernel_files(release: str) -> dict[str, bytes]:
    return {f"root/boot/vmlinuz-{release}": b"image" * 1000,
            f"root/lib/modules/{release}/kernel/kvm.ko": b"module" * 100}


def run_cli(cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, KVMTEST_CACHE=str(cache))
    return subprocess.run([sys.executable, "-m", "kvmtest", "cache", *args], env=env,
                          capture_output=True, text=True, timeout=120)


# --------------------------------------------------------------------------
# locks


def test_discarded_lock_leaves_no_file_and_waiters_get_a_fresh_one(tmp_path):
    path = tmp_path / "k.lock"
    order: list[str] = []
    seen: list[bool] = []
    first = threading.Event()

    def waiter() -> None:
        first.wait()
        with locked(path):  # blocks until the holder discards and releases
            # The waiter must hold the file now at PATH, not the unlinked
            # inode it first waited on: a second locker must be refused.
            order.append("waiter")
            seen.append(is_held(path))
    thread = threading.Thread(target=waiter)
    thread.start()
    with locked(path) as lock:
        first.set()
        time.sleep(0.2)  # the waiter is now blocked in flock on the old inode
        order.append("holder")
        lock.discard = True
    thread.join(5)
    assert order == ["holder", "waiter"] and seen == [True]
    assert path.exists()  # recreated by the waiter (it does not discard)
    with locked(path) as lock:
        lock.discard = True
    assert not path.exists()


def test_is_held_sees_another_process_and_creates_nothing(tmp_path):
    path = tmp_path / "k.lock"
    assert not is_held(path) and not path.exists()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl,sys,time; f=open(sys.argv[1],'a'); fcntl.flock(f,fcntl.LOCK_EX); "
        "print('held',flush=True); time.sleep(30)"), str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert is_held(path)
    finally:
        holder.kill()
        holder.wait()
    assert not is_held(path)


# --------------------------------------------------------------------------
# records


def test_entry_problem_names_missing_truncated_and_altered_files(tmp_path):
    entry = make_entry(tmp_path, "k", "9.9.9-test", kernel_files("9.9.9-test"))
    module = entry.path / "root/lib/modules/9.9.9-test/kernel/kvm.ko"
    image = entry.path / "root/boot/vmlinuz-9.9.9-test"
    assert entry.problem() is None and entry.problem(full=True) is None
    data = module.read_bytes()
    module.write_bytes(data[:-1] + b"X")  # same size: only a full check sees it
    assert entry.problem() is None
    assert entry.problem(full=True) == (
        "root/lib/modules/9.9.9-test/kernel/kvm.ko does not match its recorded sha256")
    module.write_bytes(data)
    image.write_bytes(image.read_bytes()[:-1] + b"X")  # the image is hashed on every use
    assert entry.problem() == "root/boot/vmlinuz-9.9.9-test does not match its recorded sha256"
    image.write_bytes(b"short")
    assert entry.problem() == "root/boot/vmlinuz-9.9.9-test is 5 bytes, recorded 5000"
    module.unlink()
    assert entry.problem().startswith("1 of 2 files missing, e.g. root/lib/modules/")


def test_entry_of_an_older_kvmtest_has_no_record(tmp_path):
    entry = make_entry(tmp_path, "k", "9.9.9-test", kernel_files("9.9.9-test"))
    meta = entry.meta()
    del meta["format"]
    (entry.path / "meta.json").write_text(json.dumps(meta))
    assert entry.legacy() and entry.problem() == "no integrity record"


def test_sidecar_detects_truncation_and_flips(tmp_path):
    target = tmp_path / "x.elf"
    write_sidecar(target, b"\x7fELF" + bytes(1000))
    assert check_sidecar(target) is None
    target.write_bytes(b"\x7fELF" + bytes(999) + b"\1")
    assert check_sidecar(target) == "does not match its recorded sha256"
    target.write_bytes(b"\x7fELF")
    assert check_sidecar(target) == "4 bytes, recorded 1004"
    (tmp_path / "x.elf.sha256").unlink()
    assert check_sidecar(target) == "no integrity record"


def test_atomic_write_on_a_full_disk_is_one_line_and_leaves_nothing(tmpfs):
    with pytest.raises(NoSpaceError) as info:
        atomic_write(tmpfs / "sub" / "big.bin", bytes(3 << 20))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"no space left in {tmpfs / 'sub'}: big.bin needs about 3 MB, ")
    assert [p.name for p in (tmpfs / "sub").iterdir()] == []


# --------------------------------------------------------------------------
# unpack selection and apt parsing


@pytest.mark.parametrize("path, keep", [
    ("boot/vmlinuz-6.1.0-56-amd64", True),
    ("boot/config-6.1.0-56-amd64", True),
    ("boot/System.map-6.1.0-56-amd64", False),
    ("lib/modules/6.1.0-56-amd64/kernel/arch/x86/kvm/kvm-amd.ko", True),
    ("usr/lib/modules/7.3.4+deb13-amd64/vmlinuz", True),
    ("usr/lib/modules/7.3.4+deb13-amd64/kernel/virt/lib/irqbypass.ko.xz", True),
    ("usr/lib/modules/7.3.4+deb13-amd64/kernel/x/y.ko.zst", True),
    ("usr/lib/modules/7.3.4+deb13-amd64/modules.builtin", True),
    ("usr/lib/modules/7.3.4+deb13-amd64/modules.builtin.modinfo", True),
    ("usr/lib/modules/7.3.4+deb13-amd64/System.map", False),
    ("usr/share/doc/linux-base-7.3.4+deb13-amd64/changelog.Debian.gz", False),
    ("usr/src/linux-headers-7.3.4+deb13-amd64/Makefile", False),
])
def test_only_what_kvmtest_uses_is_unpacked(path, keep):
    assert bool(KEEP.fullmatch(path)) is keep


@pytest.mark.parametrize("name, path", [
    ("./boot/vmlinuz-1", "boot/vmlinuz-1"),
    ("./usr/lib/modules/1/kernel/a.ko", "usr/lib/modules/1/kernel/a.ko"),
    ("../etc/passwd", None),
    ("./boot/../../x", None),
    ("/etc/passwd", None),
    ("./", None),
])
def test_member_paths_never_leave_the_destination(name, path):
    assert _member_path(name) == path


def test_parse_show_reads_pinned_dependencies():
    # The stanza as apt-cache showed it for trixie-backports (Nov 2026).
    info = parse_show(
        "Package: linux-image-7.3.4+deb13-amd64\nSource: linux-signed-amd64 (7.3.4+1~bpo13+1)\n"
        "Version: 7.3.4-1~bpo13+1\nInstalled-Size: 15\n"
        "Depends: dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, "
        "linux-base-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1), linux-binary-7.3.4+deb13-amd64 "
        "(= 7.3.4-1~bpo13+1), linux-modules-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1)\n"
        "Size: 1900\nDescription: Linux 7.3.4 for 64-bit PCs\n continued\n\n"
        "Package: second-stanza\nVersion: 1\n")
    assert info.name == "linux-image-7.3.4+deb13-amd64" and info.version == "7.3.4-1~bpo13+1"
    assert (info.size, info.installed_size) == (1900, 15 * 1024)
    assert [(d.name, d.version) for d in info.depends] == [
        ("dracut", None),
        ("linux-base-7.3.4+deb13-amd64", "7.3.4-1~bpo13+1"),
        ("linux-binary-7.3.4+deb13-amd64", "7.3.4-1~bpo13+1"),
        ("linux-modules-7.3.4+deb13-amd64", "7.3.4-1~bpo13+1"),
    ]
    assert parse_show("") is None


@pytest.mark.parametrize("spec", [
    "debian:", "debian:-o=Dir::Etc=/tmp", "debian:Linux-Image", "debian:a/b",
    "debian:linux-image-amd64@", "debian:linux-image-amd64@../x", "debian:x@-o",
])
def test_malformed_debian_specs_never_reach_apt(spec, tmp_path):
    from kvmtest.qemu import QemuError, resolve_kernel

    with pytest.raises(QemuError, match=r"debian: needs PACKAGE\[@SUITE\]"):
        resolve_kernel(spec, cache=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_holds_names_where_most_files_are():
    assert _holds([]) == "no files"
    assert _holds(["usr/src/h/Makefile", "usr/src/h/a/b.h", "usr/share/doc/x"]) == (
        "usr/src/h/… (2 of 3 files)")


# --------------------------------------------------------------------------
# kvmtest cache list / verify / prune


def test_cache_commands_on_an_empty_cache(tmp_path):
    for args in (["list"], ["verify"], ["prune"]):
        proc = run_cli(tmp_path / "none", *args)
        assert proc.returncode == 0, proc.stderr
    assert run_cli(tmp_path / "none", "verify").stdout.strip() == "0 checked, 0 damaged"
    assert run_cli(tmp_path, "prune", "--older-than", "x").returncode == 2


def test_verify_exit_codes_name_the_damaged_file(tmp_path):
    entry = make_entry(tmp_path, "k@suite", "9.9.9-test", kernel_files("9.9.9-test"))
    proc = run_cli(tmp_path, "verify")
    assert proc.returncode == 0 and proc.stdout.splitlines() == [
        "ok       k@suite", "1 checked, 0 damaged"]
    module = entry.path / "root/lib/modules/9.9.9-test/kernel/kvm.ko"
    module.write_bytes(module.read_bytes()[:-1] + b"X")
    proc = run_cli(tmp_path, "verify")
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[0] == ("DAMAGED  k@suite: root/lib/modules/9.9.9-test/"
                                           "kernel/kvm.ko does not match its recorded sha256")


def test_list_shows_spec_package_version_and_aliases(tmp_path):
    entry = make_entry(tmp_path, "linux-image-9@sid", "9.9.9-test", kernel_files("9.9.9-test"))
    meta = entry.meta()
    meta["aliases"] = ["debian:linux-image-amd64@sid"]
    (entry.path / "meta.json").write_text(json.dumps(meta))
    proc = run_cli(tmp_path, "list", "--json")
    row = json.loads(proc.stdout)["kernels"][0]
    assert (row["spec"], row["package"], row["version"]) == (
        "debian:linux-image-9@sid", "linux-image-9", "1.0-1")
    assert row["resolved_from"] == ["debian:linux-image-amd64@sid"] and row["size"] > 5000
    text = run_cli(tmp_path, "list").stdout
    assert "debian:linux-image-9@sid" in text and "also as debian:linux-image-amd64@sid" in text


def test_prune_removes_old_entries_leftovers_and_unused_derived_files(tmp_path):
    from kvmtest.qemu.debian import kernel_of
    from kvmtest.qemu.pvh import vmlinux_name

    kernels = tmp_path / "kernels"
    fresh = make_entry(tmp_path, "fresh", "1.0-fresh", kernel_files("1.0-fresh"))
    old = make_entry(tmp_path, "old", "1.0-old", kernel_files("1.0-old"))
    (kernels / "fresh.lock").touch()
    (kernels / "old.lock").touch()
    long_ago = time.time() - 40 * 86400
    os.utime(old.path / "meta.json", (long_ago, long_ago))
    # an interrupted fetch, one still running (its lock is held), an orphan lock
    (kernels / ".unpack-gone-abcd1234" / "root").mkdir(parents=True)
    (kernels / ".unpack-busy-abcd1234").mkdir()
    (kernels / "orphan.lock").touch()
    vmlinux = tmp_path / "vmlinux"
    vmlinux.mkdir()
    used = vmlinux_name(kernel_of(fresh))
    unused = vmlinux_name(kernel_of(old))
    for name in (f"{used}.elf", f"{used}.elf.sha256", "1.0-fresh.lock",
                 f"{unused}.elf", "1.0-old.lock", "5.5.5-0123456789abcdef.elf"):
        (vmlinux / name).write_bytes(b"x")
    initramfs = tmp_path / "initramfs"
    initramfs.mkdir()
    for name in ("1.0-fresh-0123456789abcdef.cpio", "1.0-old-0123456789abcdef.cpio"):
        (initramfs / name).write_bytes(b"x")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl,sys,time; f=open(sys.argv[1],'a'); fcntl.flock(f,fcntl.LOCK_EX); "
        "print('held',flush=True); time.sleep(30)"), str(kernels / "busy.lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        dry = run_cli(tmp_path, "prune", "--older-than", "30", "--dry-run")
        assert dry.returncode == 0 and (old.path / "meta.json").exists()
        proc = run_cli(tmp_path, "prune", "--older-than", "30")
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in kernels.iterdir()) == [
        ".unpack-busy-abcd1234", "busy.lock", "fresh", "fresh.lock"]
    assert sorted(p.name for p in vmlinux.iterdir()) == sorted(
        [f"{used}.elf", f"{used}.elf.sha256", "1.0-fresh.lock"])
    assert [p.name for p in initramfs.iterdir()] == ["1.0-fresh-0123456789abcdef.cpio"]
    assert dry.stdout.replace("would remove", "removed").replace("would free", "freed") == (
        proc.stdout)
    proc = run_cli(tmp_path, "prune", "--all")
    assert proc.returncode == 0
    assert sorted(p.name for p in kernels.iterdir()) == []
    assert list(vmlinux.iterdir()) == [] and list(initramfs.iterdir()) == []
