"""debian: specs for every Debian kernel layout in use (marker `qemu`: downloads, boots).

Real archive, real apt and dpkg-deb, the shared cache (~/.cache/kvmtest).
Expected package names and versions come from apt-cache on the same private
apt state (an independent reading of the archive), never from kvmtest's
own output.
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess

import pytest

from kvmtest import judge as j
from kvmtest.qemu import QemuError, resolve_kernel
from kvmtest.qemu.cache import cache_root
from kvmtest.qemu.modules import ModuleTree, read_module

pytestmark = pytest.mark.qemu

SPLIT = "debian:linux-image-7.3.4+deb13-amd64@trixie-backports"  # 7.3.4, split packages
TRIXIE = "debian:linux-image-6.12.117+deb13-amd64-unsigned@trixie"  # classic, usr/lib/modules
BOOKWORM = "debian:linux-image-6.1.0-56-amd64-unsigned"  # classic, lib/modules, plain .ko
BPO = "debian:linux-image-6.12.95+deb12-amd64-unsigned@bookworm-backports"  # classic, .ko.xz


def apt_show(suite: str, package: str) -> dict[str, str]:
    """apt-cache show PACKAGE on kvmtest's private state for SUITE (fields of the candidate)."""
    state = cache_root() / "apt" / suite
    proc = subprocess.run(
        ["apt-cache", "-o", f"Dir::Etc::SourceList={state / 'sources.list'}",
         "-o", "Dir::Etc::SourceParts=/dev/null", "-o", f"Dir::State::Lists={state / 'lists'}",
         "-o", f"Dir::Cache={state}", "show", "--no-all-versions", package],
        capture_output=True, text=True, check=True)
    return dict(re.findall(r"^([\w-]+): (.*)$", proc.stdout, re.M))


def kernel_note(report: dict) -> str:
    return report["notes"][0]


def test_split_7_3_4_boots_without_modules(tmp_path, run_qemu_cli):
    """Debian 13's split layout: image, modules and base come from three packages."""
    rc, report = run_qemu_cli(tmp_path, "--kernel", SPLIT, "-k", "control/asid0")
    assert rc == 0, report
    version = apt_show("trixie-backports", "linux-image-7.3.4+deb13-amd64")["Version"]
    assert kernel_note(report) == (
        f"backend qemu: kernel 7.3.4+deb13-amd64 (linux-image-7.3.4+deb13-amd64 {version} "
        "from trixie-backports)")
    assert report["kernel"] == "7.3.4+deb13-amd64"  # uname -r inside the guest
    assert [c["verdict"] for c in report["cases"]] == [j.PASS, j.PASS]
    kernel = resolve_kernel(SPLIT)
    assert kernel.image.name == "vmlinuz"
    assert kernel.modules_dir.relative_to(kernel.image.parents[5]).as_posix() == (
        "root/usr/lib/modules/7.3.4+deb13-amd64")
    assert list(kernel.modules_dir.rglob("kvm-amd.ko.xz"))
    assert (kernel.modules_dir / "modules.builtin").is_file()


def test_trixie_6_12_117_unsigned_boots(tmp_path, run_qemu_cli):
    """Classic package, merged /usr: modules under usr/lib/modules."""
    rc, report = run_qemu_cli(tmp_path, "--kernel", TRIXIE, "-k", "control/asid0")
    assert rc == 0, report
    version = apt_show("trixie", "linux-image-6.12.117+deb13-amd64-unsigned")["Version"]
    assert kernel_note(report) == (
        f"backend qemu: kernel 6.12.117+deb13-amd64 (linux-image-6.12.117+deb13-amd64-unsigned "
        f"{version} from trixie)")
    assert report["kernel"] == "6.12.117+deb13-amd64"
    kernel = resolve_kernel(TRIXIE)
    assert kernel.image.name == "vmlinuz-6.12.117+deb13-amd64"
    assert kernel.modules_dir.parts[-4:] == ("usr", "lib", "modules", "6.12.117+deb13-amd64")


def test_meta_package_resolves_to_the_kernel_it_depends_on():
    meta = resolve_kernel("debian:linux-image-amd64@trixie-backports")
    depends = apt_show("trixie-backports", "linux-image-amd64")["Depends"]
    pinned = re.search(r"(linux-image-[^\s,]+) \(= ([^)]+)\)", depends)
    assert pinned, depends
    direct = resolve_kernel(f"debian:{pinned.group(1)}@trixie-backports")
    assert (meta.package, meta.package_version) == (pinned.group(1), pinned.group(2))
    assert meta.image == direct.image  # one cache entry for both specs
    assert meta.resolved_from == "debian:linux-image-amd64@trixie-backports"
    assert direct.resolved_from is None
    assert meta.describe() == (
        f"{meta.release} ({pinned.group(1)} {pinned.group(2)} from trixie-backports, "
        "resolved from debian:linux-image-amd64@trixie-backports)")
    entries = [p.name for p in (cache_root() / "kernels").iterdir()
               if p.is_dir() and p.name.startswith("linux-image-amd64")]
    assert entries == []


def test_headers_package_is_not_a_kernel():
    spec = "debian:linux-headers-7.3.4+deb13-amd64@trixie-backports"
    with pytest.raises(QemuError) as info:
        resolve_kernel(spec)
    message = str(info.value)
    assert re.fullmatch(
        re.escape(spec) + r" is not a kernel image package: it holds "
        r"usr/src/linux-headers-7\.3\.4\+deb13-amd64/… \(\d+( of \d+)? files\), no vmlinuz",
        message), message
    key = spec.removeprefix("debian:")
    assert not (cache_root() / "kernels" / key).exists()
    assert not (cache_root() / "kernels" / f"{key}.lock").exists()
    assert not list((cache_root() / "kernels").glob(f".unpack-{key}-*"))


@pytest.mark.parametrize("spec, modules, suffix", [
    (BOOKWORM, "lib/modules/6.1.0-56-amd64", ".ko"),
    (BPO, "lib/modules/6.12.95+deb12-amd64", ".ko.xz"),
])
def test_classic_packages_still_resolve(spec, modules, suffix):
    kernel = resolve_kernel(spec)
    release = modules.rsplit("/", 1)[1]
    assert kernel.image.name == f"vmlinuz-{release}" and kernel.release == release
    assert kernel.modules_dir.as_posix().endswith("/root/" + modules)
    assert next(kernel.modules_dir.rglob("kvm-amd*")).name == "kvm-amd" + suffix
    assert kernel.banner.startswith(release + " ")


def test_image_path_with_a_package_root_as_modules():
    """--modules ROOT finds ROOT/usr/lib/modules/<release> (merged /usr) too."""
    entry = resolve_kernel(TRIXIE)
    root = entry.modules_dir.parents[3]
    kernel = resolve_kernel(str(entry.image), modules=root)
    assert kernel.modules_dir == entry.modules_dir and kernel.package is None
    assert kernel.describe() == f"6.12.117+deb13-amd64 ({entry.image})"


def test_ko_xz_zst_gz_and_plain_modules_read_the_same(tmp_path):
    if shutil.which("zstd") is None:
        pytest.skip("no zstd CLI: apt-get install zstd (scripts/install.sh does)")
    kernel = resolve_kernel(SPLIT)
    source = next(kernel.modules_dir.rglob("kvm.ko.xz"))
    elf = read_module(source)
    assert elf[:4] == b"\x7fELF"
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "kvm.ko").write_bytes(elf)
    (tmp_path / "xz").mkdir()
    shutil.copy(source, tmp_path / "xz" / "kvm.ko.xz")
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "kvm.ko.gz").write_bytes(gzip.compress(elf))
    (tmp_path / "zst").mkdir()
    subprocess.run(["zstd", "-q", "-o", str(tmp_path / "zst" / "kvm.ko.zst"),
                    str(tmp_path / "plain" / "kvm.ko")], check=True)
    depends = None
    for form in ("plain", "xz", "gz", "zst"):
        tree = ModuleTree.scan(tmp_path / form)
        assert list(tree.files) == ["kvm"], form
        assert read_module(tree.files["kvm"]) == elf, form
        assert tree.vermagic("kvm").startswith("7.3.4+deb13-amd64 "), form
        depends = tree.depends("kvm") if depends is None else depends
        assert tree.depends("kvm") == depends, form
