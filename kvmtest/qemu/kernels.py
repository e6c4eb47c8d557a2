"""Kernel acquisition for the qemu backend: turn a SPEC into a bootable kernel.

SPEC forms accepted by `resolve_kernel`:

* ``debian:PACKAGE`` -- e.g. ``debian:linux-image-6.1.0-56-amd64-unsigned``,
  fetched with ``apt-get download`` using this machine's apt sources and
  unpacked with ``dpkg-deb -x`` into the cache.
* ``debian:PACKAGE@SUITE`` -- same, but from a suite that is not in the
  machine's sources (e.g. ``@bookworm-backports``): a private apt state in the
  cache points at deb.debian.org, the system configuration is left alone.
* a kernel image path (bzImage / vmlinuz) plus ``modules=DIR`` (either
  ``lib/modules/<release>`` itself or a root containing it); without
  ``modules`` the host's ``/lib/modules/<release>`` is used if present.
* a kernel build tree (``arch/x86/boot/bzImage``, modules taken from the
  tree's ``*.ko`` files, release from ``include/config/kernel.release``).

Debian packages do not ship ``modules.dep`` (postinst runs depmod), so module
dependencies are read from each module's ``.modinfo`` ``depends=`` field
instead: that works identically for packages, build trees and rebuilt modules.
"""

from __future__ import annotations

import bz2
import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kvmtest.qemu.errors import QemuError

DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


@dataclass(frozen=True)
class Kernel:
    """A resolved kernel: what QEMU boots and where its modules live."""

    image: Path
    release: str
    modules_dir: Path | None  # lib/modules/<release> or a build tree
    spec: str
    package_version: str | None = None  # Debian version, e.g. "6.1.192-2"
    banner: str = ""  # version string embedded in the image header

    @property
    def upstream_version(self) -> str | None:
        """Upstream version (e.g. "6.1.192") when known from the Debian version."""
        if self.package_version:
            return self.package_version.split(":")[-1].split("-")[0].split("~")[0]
        match = re.search(r"Debian (\d+\.\d+\.\d+)", self.banner)
        return match.group(1) if match else None


# --------------------------------------------------------------------------
# cache and locking


def cache_root() -> Path:
    """Root of kvmtest's cache: $KVMTEST_CACHE or ~/.cache/kvmtest."""
    env = os.environ.get("KVMTEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "kvmtest"


@contextlib.contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Exclusive flock on LOCK_PATH: serialises parallel pytest-xdist workers."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------
# image header


def image_banner(image: Path) -> str:
    """The version string of an x86 bzImage ("6.1.0-56-amd64 (...) #1 SMP ...").

    The boot protocol stores a pointer to it at offset 0x20E (relative to
    0x200) when the header magic "HdrS" is present; returns "" otherwise.
    """
    try:
        with open(image, "rb") as handle:
            head = handle.read(0x10000 + 0x200)
    except OSError as exc:
        raise QemuError(f"cannot read kernel image {image}: {exc.strerror}") from None
    if head[0x202:0x206] != b"HdrS":
        return ""
    offset = int.from_bytes(head[0x20E:0x210], "little") + 0x200
    text = head[offset : offset + 256].split(b"\0", 1)[0]
    return text.decode("ascii", "replace")


def image_release(image: Path) -> str | None:
    """The kernel release (uname -r) of a bzImage, or None if not a bzImage."""
    banner = image_banner(image)
    return banner.split(" ", 1)[0] if banner else None


# --------------------------------------------------------------------------
# uncompressed vmlinux for PVH boot
#
# Under TCG the bzImage's own decompressor is the slowest part of a boot
# (xz: ~5.5 s of ~15 s).  Decompressing on the host (~1 s, cached) and giving
# QEMU the ELF vmlinux makes it boot through the PVH entry point instead,
# which kernels built with CONFIG_PVH=y (Debian's are) advertise in an ELF note.

XEN_ELFNOTE_PHYS32_ENTRY = 18


def _decompress_payload(payload: bytes) -> bytes | None:
    """Decompress a bzImage payload (it ends with a 4-byte size, ignored)."""
    if payload.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    if payload.startswith(b"\x1f\x8b"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
    if payload.startswith(b"BZh"):
        return bz2.BZ2Decompressor().decompress(payload)
    if payload.startswith(b"\x5d\x00"):
        return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(payload[:-4])
    if payload.startswith(b"\x28\xb5\x2f\xfd") and shutil.which("zstd"):
        proc = subprocess.run(
            ["zstd", "-dcq"], input=payload[:-4], capture_output=True, check=False
        )
        return proc.stdout if proc.returncode == 0 else None
    return None  # lz4/lzo: let the kernel's own decompressor do it


def has_pvh_note(elf: bytes) -> bool:
    """True if ELF (a vmlinux) has the Xen PHYS32_ENTRY note QEMU boots via PVH."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:  # 64-bit only
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for index in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + index * phentsize
        )
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, note_type = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and note_type == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def extract_vmlinux(image: Path) -> bytes | None:
    """The ELF vmlinux inside a bzImage, or None if it cannot be extracted."""
    data = image.read_bytes()
    if data[0x202:0x206] != b"HdrS" or int.from_bytes(data[0x206:0x208], "little") < 0x208:
        return None
    setup_sects = data[0x1F1] or 4
    offset = int.from_bytes(data[0x248:0x24C], "little") + (setup_sects + 1) * 512
    length = int.from_bytes(data[0x24C:0x250], "little")
    try:
        elf = _decompress_payload(data[offset : offset + length])
    except (lzma.LZMAError, zlib.error, OSError, EOFError):
        return None
    return elf if elf and elf[:4] == b"\x7fELF" else None


def pvh_image(kernel: Kernel, *, cache: Path | None = None) -> Path | None:
    """A cached uncompressed vmlinux for KERNEL if it can boot via PVH, else None."""
    tree_vmlinux = kernel.image.parents[3] / "vmlinux"
    if kernel.image.name == "bzImage" and tree_vmlinux.is_file():
        # Build tree: the linker's vmlinux (may carry debug info; QEMU only
        # loads PT_LOAD segments).  Only worth it if it has the PVH note.
        with open(tree_vmlinux, "rb") as handle:
            head = handle.read(1 << 20)
        if has_pvh_note(head):
            return tree_vmlinux
    st = kernel.image.stat()
    key = hashlib.sha256(f"{kernel.image}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    directory = (cache or cache_root()) / "vmlinux"
    target = directory / f"{kernel.release}-{key[:16]}.elf"
    missing = directory / f"{kernel.release}-{key[:16]}.nopvh"
    with locked(directory / f"{kernel.release}.lock"):
        if not target.is_file() and not missing.is_file():
            elf = extract_vmlinux(kernel.image)
            if elf is not None and has_pvh_note(elf):
                atomic_write(target, elf)
            else:
                missing.touch()  # remember: this kernel boots as bzImage
    return target if target.is_file() else None


def atomic_write(target: Path, data: bytes) -> None:
    """Write TARGET via a temp file + rename: readers never see a partial file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            os.fchmod(handle.fileno(), 0o644)  # mkstemp's 0600 would hide it from other users
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------
# modules


def read_module(path: Path) -> bytes:
    """The raw ELF bytes of a module, decompressing .xz/.gz/.zst on the host."""
    name = path.name
    if name.endswith(".ko"):
        return path.read_bytes()
    if name.endswith(".xz"):
        return lzma.decompress(path.read_bytes())
    if name.endswith(".gz"):
        return gzip.decompress(path.read_bytes())
    if name.endswith(".zst"):
        return _zstd_decompress(path)
    raise QemuError(f"not a kernel module: {path}")


def _zstd_decompress(path: Path) -> bytes:
    # The stdlib has no zstd before 3.14; the zstd CLI is a small apt package.
    if shutil.which("zstd") is None:
        raise QemuError(f"{path.name} is zstd-compressed: install the 'zstd' package")
    proc = subprocess.run(["zstd", "-dcq", str(path)], capture_output=True, check=False)
    if proc.returncode != 0:
        raise QemuError(f"zstd failed on {path}: {proc.stderr.decode().strip()}")
    return proc.stdout


def _modinfo_field(data: bytes, key: str) -> str | None:
    match = re.search(rb"(?:^|\x00)" + key.encode() + rb"=([^\x00]*)", data)
    return match.group(1).decode("ascii", "replace") if match else None


def module_name(path: Path) -> str:
    """Canonical module name: file stem with '-' folded to '_' (as the kernel does)."""
    name = path.name
    for suffix in MODULE_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


_SCANS: dict[Path, tuple[dict[str, Path], set[str]]] = {}


def _scan_dir(directory: Path) -> tuple[dict[str, Path], set[str]]:
    """Module files and built-in names under DIRECTORY.

    Unpacked packages in the cache never change, so their scans (~0.2 s for
    4000 modules) are memoised; other dirs (build trees, rebuilt modules) are
    rescanned every time.
    """
    directory = directory.resolve()
    if directory in _SCANS:
        return _SCANS[directory]
    files: dict[str, Path] = {}
    for path in sorted(directory.rglob("*.ko*")):
        if path.name.endswith(MODULE_SUFFIXES) and path.is_file():
            files[module_name(path)] = path
    builtin: set[str] = set()
    listing = directory / "modules.builtin"
    if listing.is_file():
        builtin = {
            module_name(Path(line.strip()))
            for line in listing.read_text().splitlines()
            if line.strip()
        }
    if directory.is_relative_to(cache_root().resolve() / "kernels"):
        _SCANS[directory] = (files, builtin)
    return files, builtin


@dataclass
class ModuleTree:
    """Modules found under one or more directories; earlier dirs win (overrides)."""

    dirs: tuple[Path, ...]
    files: dict[str, Path] = field(default_factory=dict)
    builtin: set[str] = field(default_factory=set)

    @classmethod
    def scan(cls, *dirs: Path) -> ModuleTree:
        tree = cls(tuple(dirs))
        for directory in reversed(dirs):  # later dirs first so earlier ones override
            files, builtin = _scan_dir(directory)
            tree.files.update(files)
            tree.builtin |= builtin
        return tree

    def depends(self, name: str) -> list[str]:
        data = read_module(self.files[name])
        deps = _modinfo_field(data, "depends") or ""
        return [dep.replace("-", "_") for dep in deps.split(",") if dep]

    def vermagic(self, name: str) -> str | None:
        return _modinfo_field(read_module(self.files[name]), "vermagic")

    def load_order(
        self, names: list[str], optional: frozenset[str] = frozenset()
    ) -> tuple[list[str], list[str]]:
        """Modules to insmod, dependencies first, and names that are missing.

        Built-in modules are skipped (nothing to load); a name in OPTIONAL that
        does not exist is silently dropped (e.g. ccp on kernels without SEV).
        """
        order: list[str] = []
        missing: list[str] = []
        visiting: set[str] = set()

        def visit(name: str) -> None:
            name = name.replace("-", "_")
            if name in order or name in visiting:
                return
            if name not in self.files:
                if name not in self.builtin and name not in optional:
                    missing.append(name)
                return
            visiting.add(name)
            for dep in self.depends(name):
                visit(dep)
            visiting.discard(name)
            order.append(name)

        for name in names:
            visit(name)
        return order, missing


# --------------------------------------------------------------------------
# Debian packages


def _apt_private_options(suite: str, cache: Path) -> list[str]:
    """apt -o options for a private state pointing at deb.debian.org SUITE."""
    root = cache / "apt" / suite
    (root / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (root / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    mirror = DEBIAN_SECURITY_MIRROR if suite.endswith("-security") else DEBIAN_MIRROR
    signed = f"[signed-by={DEBIAN_KEYRING}] " if DEBIAN_KEYRING.exists() else ""
    sources = root / "sources.list"
    sources.write_text(f"deb {signed}{mirror} {suite} main\n")
    return [
        "-o",
        f"Dir::Etc::SourceList={sources}",
        "-o",
        "Dir::Etc::SourceParts=/dev/null",
        "-o",
        f"Dir::State::Lists={root / 'lists'}",
        "-o",
        f"Dir::Cache={root}",
        "-o",
        f"Dir::Cache::archives={root / 'archives'}",
    ]


def _apt(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    # Running as root, apt drops to _apt for downloads and warns it cannot
    # write our private temp dir; downloading as root is fine here.
    cmd = ["apt-get", "-q", "-o", "APT::Sandbox::User=root", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


def _last_error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.startswith("E:")]
    return lines[-1] if lines else (proc.stderr.strip().splitlines() or ["?"])[-1]


def _apt_download(package: str, workdir: Path, options: list[str], private: bool) -> Path:
    """apt-get download PACKAGE into WORKDIR; refresh stale lists once on failure."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise QemuError("debian: kernels need apt-get and dpkg-deb (a Debian/Ubuntu host)")
    proc = _apt([*options, "download", package], workdir)
    if proc.returncode != 0 or (private and not list(workdir.glob("*.deb"))):
        # Stale or missing package lists (e.g. a security update superseded
        # the version apt knows): update once, then retry.
        update = _apt([*options, "update"], workdir)
        if update.returncode != 0:
            raise QemuError(f"apt-get update failed: {_last_error(update)}")
        proc = _apt([*options, "download", package], workdir)
    debs = list(workdir.glob("*.deb"))
    if proc.returncode != 0 or not debs:
        raise QemuError(f"apt-get download {package} failed: {_last_error(proc)}")
    return debs[0]


def _deb_version(deb: Path) -> str:
    # apt names files PACKAGE_VERSION_ARCH.deb with the epoch colon as %3a.
    return deb.name.split("_")[1].replace("%3a", ":")


def fetch_debian(package: str, *, suite: str | None = None, cache: Path | None = None) -> Kernel:
    """Download and unpack a Debian kernel package once; return the Kernel.

    Locked with flock per package (parallel workers wait for one download),
    and atomic: unpacked into a temp dir in the cache, then renamed.
    """
    base = (cache or cache_root()) / "kernels"
    key = package if suite is None else f"{package}@{suite}"
    final = base / key
    with locked(base / f"{key}.lock"):
        if not (final / "meta.json").is_file():
            _download_and_unpack(package, suite, base, final)
    return _kernel_from_meta(final, f"debian:{key}")


def _download_and_unpack(package: str, suite: str | None, base: Path, final: Path) -> None:
    # Leftovers of a killed earlier attempt for this package (we hold its lock).
    prefix = f".unpack-{final.name}-"
    for stale in base.glob(f"{prefix}*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the kernel from other users
    try:
        # One apt at a time from our workers: apt-get update takes the lists lock.
        with locked(base / ".apt.lock"):
            options = _apt_private_options(suite, base.parent) if suite else []
            deb = _apt_download(package, tmp, options, private=suite is not None)
        root = tmp / "root"
        proc = subprocess.run(
            ["dpkg-deb", "-x", str(deb), str(root)], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise QemuError(f"dpkg-deb -x {deb.name} failed: {proc.stderr.strip()}")
        images = sorted(root.glob("boot/vmlinuz-*"))
        if not images:
            raise QemuError(f"{package} contains no boot/vmlinuz-*: not a kernel image package")
        release = images[0].name.removeprefix("vmlinuz-")
        meta = {
            "package": package,
            "version": _deb_version(deb),
            "release": release,
            "image": f"root/boot/{images[0].name}",
            "modules": f"root/lib/modules/{release}",
        }
        deb.unlink()  # 70 MB: the unpacked tree is all we need
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        if final.exists():  # a stale half-state from an older layout
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _kernel_from_meta(directory: Path, spec: str) -> Kernel:
    meta = json.loads((directory / "meta.json").read_text())
    image = directory / meta["image"]
    modules = directory / meta["modules"]
    return Kernel(
        image=image,
        release=meta["release"],
        modules_dir=modules if modules.is_dir() else None,
        spec=spec,
        package_version=meta["version"],
        banner=image_banner(image),
    )


# --------------------------------------------------------------------------
# SPEC resolution


def resolve_kernel(
    spec: str, *, modules: Path | str | None = None, cache: Path | None = None
) -> Kernel:
    """Resolve SPEC (see module docstring) into a Kernel, downloading if needed."""
    if spec.startswith("debian:"):
        if modules is not None:
            raise QemuError("--modules does not apply to debian: kernels (they ship theirs)")
        package, _, suite = spec.removeprefix("debian:").partition("@")
        if not package:
            raise QemuError(
                "debian: needs a package name, e.g. debian:linux-image-6.1.0-56-amd64-unsigned"
            )
        return fetch_debian(package, suite=suite or None, cache=cache)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _from_build_tree(path, spec)
    if path.is_file():
        return _from_image(path, Path(modules) if modules else None, spec)
    raise QemuError(
        f"kernel {spec!r}: no such file or directory "
        "(use an image path, a build tree, or debian:PACKAGE)"
    )


def _from_build_tree(tree: Path, spec: str) -> Kernel:
    image = tree / "arch" / "x86" / "boot" / "bzImage"
    if not image.is_file():
        raise QemuError(f"{tree} is not a built kernel tree: no arch/x86/boot/bzImage")
    release_file = tree / "include" / "config" / "kernel.release"
    release = release_file.read_text().strip() if release_file.is_file() else image_release(image)
    if not release:
        raise QemuError(f"cannot determine the kernel release of {tree}")
    return Kernel(
        image=image, release=release, modules_dir=tree, spec=spec, banner=image_banner(image)
    )


def _from_image(image: Path, modules: Path | None, spec: str) -> Kernel:
    banner = image_banner(image)
    release = banner.split(" ", 1)[0] if banner else None
    if release is None:
        raise QemuError(f"{image} is not an x86 bzImage (no HdrS boot header)")
    if modules is None:
        # The host's own tree, if it holds modules (linux-headers alone only
        # creates /lib/modules/<release>/build).
        host = Path("/lib/modules") / release
        modules = host if (host / "kernel").is_dir() else None
    elif (modules / "lib" / "modules" / release).is_dir():
        modules = modules / "lib" / "modules" / release
    if modules is not None and not modules.is_dir():
        raise QemuError(f"modules directory {modules} does not exist")
    return Kernel(image=image, release=release, modules_dir=modules, spec=spec, banner=banner)
