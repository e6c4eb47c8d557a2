"""Out-of-tree rebuild of ``kvm.ko`` / ``kvm-amd.ko`` for the edit-build-verdict loop.

Only ``arch/x86/kvm`` and ``virt/kvm`` are taken from a kernel source tree;
everything else (``.config``, ``Module.symvers``, generated headers, kbuild
scripts) comes from the matching headers package or build tree, so the
modules get the target kernel's vermagic and symbol CRCs and load on it.

The two directories are mirrored into a persistent work dir whose source
files are only rewritten when their content changes: kbuild then recompiles
just what changed (a ``nested.c`` edit rebuilds in a few seconds), which is
what makes ``git bisect run`` over KVM changes cheap.  Patches are applied
to the mirror, never to the caller's tree.

Measured figures and the bisect recipe are in ``docs/kmod.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .qemu.kernels import cache_root, locked  # one cache, one lock discipline

# What the out-of-tree build needs from a source tree.  The top-level
# Makefile is optional and only used to compare versions with the headers.
KVM_SUBDIRS = ("arch/x86/kvm", "virt/kvm")
MODULES = ("kvm", "kvm-amd")
NESTED_C = "arch/x86/kvm/svm/nested.c"

# Build products an in-tree-built source may contain; never mirrored.
_BUILD_SUFFIXES = (".o", ".ko", ".mod", ".mod.c", ".cmd", ".a", ".order", ".symvers", ".s")
_LOG_TAIL_LINES = 40
_APT_LOCK_TIMEOUT = 300


class KmodError(RuntimeError):
    """An expected failure of the module build (one-line message).

    exit_code is `kvmtest kmod`'s exit code for it (README): 3 for the
    environment (tools, headers, downloads, a vermagic mismatch)."""

    exit_code = 3


class KmodUsageError(KmodError):
    """The command line names something unusable (exit 2)."""

    exit_code = 2


class BuildFailed(KmodError):
    """The sources do not build: a patch that does not apply, a compile error (exit 1)."""

    exit_code = 1


@dataclass(frozen=True)
class BuiltModules:
    """Result of `build_modules`: where the .ko files are and what they are for."""

    out_dir: Path
    modules: dict[str, Path]  # "kvm" -> out_dir/kvm.ko
    vermagic: str
    kernel_release: str
    source_version: str | None
    patch: Path | None
    work_dir: Path
    log: Path
    seconds: float  # wall time of build_modules
    cpu_seconds: float = 0.0  # user+sys of make and the compilers (meaningful under load)
    recompiled: list[str] = field(default_factory=list)  # objects kbuild compiled this time


# --------------------------------------------------------------------------
# cache keys (the cache root and its locks are kvmtest.qemu.kernels')


def _short_hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------
# ELF .modinfo / __versions (pure Python: modinfo(8) is not always installed)


def _elf_sections(data: bytes) -> dict[str, bytes]:
    """Section name -> contents of a little-endian ELF64 file (a .ko)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise KmodError("not a little-endian ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    str_off, str_size = headers[shstrndx][4], headers[shstrndx][5]
    names = data[str_off:str_off + str_size]
    sections = {}
    for name_off, sh_type, _flags, _addr, off, size in headers:
        name = names[name_off:names.index(b"\0", name_off)].decode()
        sections[name] = b"" if sh_type == 8 else data[off:off + size]  # 8 = SHT_NOBITS
    return sections


def _module_bytes(path: Path) -> bytes:
    """A module's ELF bytes; Debian ships .ko, other distros .ko.xz / .ko.zst."""
    if path.name.endswith(".xz"):
        import lzma

        return lzma.decompress(path.read_bytes())
    if path.name.endswith(".zst"):
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    return path.read_bytes()


def read_modinfo(path: Path) -> dict[str, list[str]]:
    """Key -> values of a module's .modinfo section (like `modinfo -F KEY`)."""
    info: dict[str, list[str]] = {}
    raw = _elf_sections(_module_bytes(path)).get(".modinfo", b"")
    for entry in raw.split(b"\0"):
        key, sep, value = entry.decode(errors="replace").partition("=")
        if sep:
            info.setdefault(key, []).append(value)
    return info


def vermagic_of(path: Path) -> str:
    """The module's vermagic string, e.g. '6.1.0-56-amd64 SMP preempt mod_unload modversions'."""
    values = read_modinfo(path).get("vermagic")
    if not values:
        raise KmodError(f"{path.name} has no vermagic")
    return values[0].strip()


def module_crcs(path: Path) -> dict[str, int]:
    """Imported symbol -> CRC from a module's __versions (modversions) table."""
    raw = _elf_sections(_module_bytes(path)).get("__versions", b"")
    crcs = {}
    for off in range(0, len(raw) - 63, 64):  # struct modversion_info: u64 crc + char[56]
        crc, = struct.unpack_from("<Q", raw, off)
        name = raw[off + 8:off + 64].split(b"\0", 1)[0].decode()
        crcs[name] = crc
    return crcs


def _module_files(modules_dir: Path) -> list[Path]:
    return sorted(p for pattern in ("*.ko", "*.ko.xz", "*.ko.zst")
                  for p in modules_dir.glob(pattern))


def check_vermagic(modules_dir: Path, kernel_release: str) -> None:
    """Raise KmodError if any module in modules_dir was not built for kernel_release.

    Only the release (first vermagic word) is compared: the remaining flags
    come from the same .config as the release string, so a module built
    against the matching headers agrees on them too.
    """
    modules = _module_files(Path(modules_dir))
    if not modules:
        raise KmodError(f"no kernel modules (*.ko) in {modules_dir}")
    for module in modules:
        built_for = vermagic_of(module).split()[0]
        if built_for != kernel_release:
            raise KmodError(
                f"vermagic mismatch: module {module.name} built for {built_for}, "
                f"kernel is {kernel_release}")


# --------------------------------------------------------------------------
# versions and tools


def tree_version(tree: Path) -> str | None:
    """Upstream 'VERSION.PATCHLEVEL.SUBLEVEL' from a tree's top Makefile, if any.

    Debian's per-flavour headers Makefile only includes the common one, so
    one level of `include` is followed.
    """
    makefile = Path(tree) / "Makefile"
    if not makefile.is_file():
        return None
    text = makefile.read_text(errors="replace")
    fields = dict(re.findall(r"^(VERSION|PATCHLEVEL|SUBLEVEL)\s*=\s*(\d+)", text, re.M))
    if len(fields) == 3:
        return f"{fields['VERSION']}.{fields['PATCHLEVEL']}.{fields['SUBLEVEL']}"
    included = re.search(r"^include\s+(\S+/Makefile)\s*$", text, re.M)
    if included and Path(included.group(1)).is_file():
        return tree_version(Path(included.group(1)).parent)
    return None


def headers_release(headers: Path) -> str:
    """UTS release the headers/build tree builds for (what vermagic will say)."""
    uts = Path(headers) / "include/generated/utsrelease.h"
    if not uts.is_file():
        raise KmodUsageError(f"{headers} is not a configured kernel build/headers tree "
                        "(no include/generated/utsrelease.h)")
    match = re.search(r'UTS_RELEASE\s+"([^"]+)"', uts.read_text())
    if not match:
        raise KmodError(f"cannot parse {uts}")
    return match.group(1)


def _config_value(headers: Path, key: str) -> str | None:
    config = Path(headers) / ".config"
    if not config.is_file():
        return None
    match = re.search(rf"^{key}=(.*)$", config.read_text(errors="replace"), re.M)
    return match.group(1).strip('"') if match else None


def _compiler_of(headers: Path) -> str:
    """The compiler the kernel was built with: kbuild refuses a different one.

    Debian's headers set CC=gcc-12 in .kernelvariables; CONFIG_CC_VERSION_TEXT
    names it in any configured tree ('gcc-12 (Debian 12.2.0-14) 12.2.0').
    """
    text = _config_value(headers, "CONFIG_CC_VERSION_TEXT") or "gcc"
    first = text.split()[0]
    return first if re.fullmatch(r"[\w.+-]+", first) else "gcc"


def _require_tools(headers: Path, patch: Path | None) -> None:
    needed = ["make", _compiler_of(headers), "ld"]
    if patch is not None:
        needed.append("patch")
    missing = [tool for tool in needed if shutil.which(tool) is None]
    if missing:
        raise KmodError(f"missing build tools: {', '.join(missing)} "
                        "(Debian: apt-get install make gcc-12 binutils patch)")


# --------------------------------------------------------------------------
# resolving --source and --kernel


def _is_tarball(path: Path) -> bool:
    return any(path.name.endswith(s) for s in (".tar", ".tar.xz", ".tar.gz", ".tar.bz2", ".tgz"))


def check_source_dir(tree: Path) -> Path:
    if not (tree / NESTED_C).is_file() or not (tree / "virt/kvm").is_dir():
        raise KmodUsageError(f"{tree} is not a kernel source tree (no {NESTED_C} / virt/kvm)")
    return tree


def resolve_source(spec: str | Path, cache: Path | None = None) -> Path:
    """A source tree directory, a kernel source tarball, or `debian:linux-source-X[=VER]`.

    From a tarball (e.g. Debian's /usr/src/linux-source-6.1.tar.xz) only the
    top Makefile, arch/x86/kvm and virt/kvm are extracted into the cache
    (~3 MB instead of ~1.3 GB); xz decoding the whole stream costs ~14 s, once.
    """
    if str(spec).startswith("debian:"):
        return _debian_source(str(spec).removeprefix("debian:"), cache or cache_root())
    path = Path(spec).expanduser()
    if path.is_dir():
        return check_source_dir(path.resolve())
    if not path.is_file() or not _is_tarball(path):
        raise KmodUsageError(f"--source {spec}: not a directory or a .tar[.xz|.gz|.bz2] file")
    stat = path.stat()
    name = re.sub(r"\.(tar(\.\w+)?|tgz)$", "", path.name)
    key = _short_hash(str(path.resolve()), str(stat.st_size), str(stat.st_mtime_ns))
    dest = (cache or cache_root()) / "src" / f"{name}-{key}"
    with locked(dest.with_name(dest.name + ".lock")):
        if not dest.is_dir():
            _extract_kvm_sources(path, dest)
    return check_source_dir(dest)


def _extract_kvm_sources(tarball: Path, dest: Path) -> None:
    """Extract the KVM subset into dest atomically (temp dir, then rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
    members = ["*/Makefile", *(f"*/{sub}" for sub in KVM_SUBDIRS)]
    # The tarball has one top directory (linux-source-6.1/); strip it.  With
    # --no-wildcards-match-slash, '*/Makefile' matches only the top Makefile.
    cmd = ["tar", "-xf", str(tarball), "-C", str(tmp), "--strip-components=1",
           "--wildcards", "--no-wildcards-match-slash", *members]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise KmodError(f"unpacking {tarball} failed: {_last_line(proc.stderr)}")
    tmp.rename(dest)


def _dpkg_version(package: str) -> str | None:
    proc = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Abbrev} ${Version}", package],
                          capture_output=True, text=True)
    status, _, version = proc.stdout.partition(" ")
    return version.strip() if proc.returncode == 0 and status.startswith("ii") else None


def _debian_source(spec: str, cache: Path) -> Path:
    """`linux-source-6.1[=6.1.192-2]`: the installed tarball if it is that version,
    else the package fetched with `apt-get download` (no root, system untouched)."""
    package, _, version = spec.partition("=")
    if not re.fullmatch(r"linux-source-[\d.]+", package):
        raise KmodUsageError(f"debian:{spec}: expected debian:linux-source-X.Y[=VERSION]")
    installed = _dpkg_version(package)
    tarball = Path(f"/usr/src/{package}.tar.xz")
    if installed and tarball.is_file() and version in ("", installed):
        return resolve_source(tarball, cache)
    dest = cache / "src" / f"{package}_{version or 'candidate'}"
    with locked(dest.with_name(dest.name + ".lock")):
        if not dest.is_dir():
            with tempfile.TemporaryDirectory(prefix=".deb-", dir=dest.parent) as tmp:
                inner = _download_source_tarball(spec, package, Path(tmp))
                _extract_kvm_sources(inner, dest)
    return check_source_dir(dest)


def _download_source_tarball(spec: str, package: str, tmp: Path) -> Path:
    proc = subprocess.run(["apt-get", "download", spec], cwd=tmp, capture_output=True,
                          text=True)
    debs = list(tmp.glob(f"{package}_*.deb"))
    if proc.returncode != 0 or not debs:
        raise KmodError(f"apt-get download {spec} failed: "
                        f"{_last_line(proc.stderr or proc.stdout)}")
    proc = subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(tmp / "root")],
                          capture_output=True, text=True)
    inner = tmp / "root/usr/src" / f"{package}.tar.xz"
    if proc.returncode != 0 or not inner.is_file():
        raise KmodError(f"unpacking {debs[0].name} failed: {_last_line(proc.stderr)}")
    debs[0].unlink()  # 140 MB; the KVM subset is all we keep
    return inner


def _headers_from_package(package: str) -> str:
    """Release named by a Debian package: linux-image-R[-unsigned] / linux-headers-R."""
    for prefix in ("linux-image-", "linux-headers-"):
        if package.startswith(prefix):
            release = package.removeprefix(prefix).removesuffix("-unsigned")
            if release and release[0].isdigit():
                return release
    raise KmodUsageError(f"debian:{package}: expected linux-image-<release>[-unsigned] "
                    "or linux-headers-<release>")


def resolve_headers(spec: str | Path, *, install: bool = True) -> Path:
    """--kernel SPEC -> headers/build dir that kbuild can build modules against.

    SPEC is `debian:linux-image-<release>[-unsigned]` (or linux-headers-...),
    a kernel release (`6.1.0-56-amd64`), or a headers/build directory.
    Debian headers missing on the host are installed with apt-get (root).
    """
    spec = str(spec)
    if spec.startswith("debian:"):
        release = _headers_from_package(spec.removeprefix("debian:"))
    elif Path(spec).is_dir():
        headers_release(Path(spec))  # validates that it is configured
        return Path(spec).resolve()
    elif re.fullmatch(r"\d+\.\d+[\w.+-]*", spec):
        release = spec
    else:
        raise KmodUsageError(f"--kernel {spec}: expected debian:PACKAGE, a release or a "
                        "kernel headers/build directory")
    for candidate in (Path(f"/usr/src/linux-headers-{release}"),
                      Path(f"/lib/modules/{release}/build")):
        if (candidate / "include/generated/utsrelease.h").is_file():
            return candidate
    if not install:
        raise KmodError(f"headers for {release} not installed (apt-get install "
                        f"linux-headers-{release})")
    return _apt_install_headers(release)


def _apt_install_headers(release: str) -> Path:
    package = f"linux-headers-{release}"
    if os.geteuid() != 0:
        raise KmodError(f"{package} is not installed and installing it needs root")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends",
           "-o", f"DPkg::Lock::Timeout={_APT_LOCK_TIMEOUT}", package]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    headers = Path(f"/usr/src/{package}")
    if proc.returncode != 0 or not headers.is_dir():
        raise KmodError(f"apt-get install {package} failed: "
                        f"{_last_line(proc.stderr or proc.stdout)}")
    return headers


# --------------------------------------------------------------------------
# mirroring the sources into the work dir


def source_files(tree: Path) -> dict[str, Path]:
    """Relative path -> file for everything the module build reads from the tree."""
    files: dict[str, Path] = {}
    for sub in KVM_SUBDIRS:
        for path in (tree / sub).rglob("*"):
            name = path.name
            if path.is_file() and not name.startswith(".") and not name.endswith(_BUILD_SUFFIXES):
                files[path.relative_to(tree).as_posix()] = path
    return files


def _patched_paths(patch: Path) -> list[str]:
    """Files a -p1 unified diff touches (its '+++ b/...' lines, or '---' for deletions)."""
    paths: list[str] = []
    old = None
    for line in patch.read_text(errors="replace").splitlines():
        if line.startswith("--- "):
            old = line[4:].split("\t")[0].strip()
        elif line.startswith("+++ ") and old is not None:
            new = line[4:].split("\t")[0].strip()
            target = old if new == "/dev/null" else new
            paths.append(target.split("/", 1)[1] if "/" in target else target)
            old = None
    if not paths:
        raise KmodUsageError(f"{patch} contains no unified diff")
    return paths


def _apply_patch(patch: Path, contents: dict[str, bytes]) -> dict[str, bytes]:
    """Apply a -p1 patch to the in-memory file set (the caller's tree is untouched)."""
    touched = _patched_paths(patch)
    outside = [p for p in touched if not p.startswith(tuple(s + "/" for s in KVM_SUBDIRS))]
    if outside:
        raise KmodUsageError(f"patch touches {outside[0]}, outside {' and '.join(KVM_SUBDIRS)}: "
                        "cannot build it out of tree")
    with tempfile.TemporaryDirectory(prefix="kvmtest-patch-") as tmp_name:
        tmp = Path(tmp_name)
        for rel in touched:
            if rel in contents:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(contents[rel])
        cmd = ["patch", "-p1", "--batch", "--forward", "--no-backup-if-mismatch",
               "--reject-file=-", "-d", str(tmp), "-i", str(patch.resolve())]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildFailed(f"patch {patch.name} does not apply: "
                            f"{_last_line(proc.stdout + proc.stderr)}")
        patched = dict(contents)
        for rel in touched:
            if (tmp / rel).is_file():
                patched[rel] = (tmp / rel).read_bytes()
            else:
                patched.pop(rel, None)
    return patched


def _rewrite_kvm_makefile(text: str, src: Path) -> str:
    """Point the kvm Makefile at the mirror instead of $(srctree) (= the headers).

    - `include $(srctree)/virt/kvm/Makefile.kvm`: headers packages lack it.
    - `-I $(srctree)/arch/x86/kvm`: KVM's private headers.
    - trace.h sets TRACE_INCLUDE_PATH ../../arch/x86/kvm, resolved from
      include/trace/define_trace.h in the headers; an (empty) include/trace
      in the mirror on the -I path makes ../../arch/x86/kvm land in it.
    """
    includes = f"-I {src}/arch/x86/kvm -I {src}/include/trace"
    text, n_inc = re.subn(r"^ccflags-y \+= -I \$\(srctree\)/arch/x86/kvm\s*$",
                          f"ccflags-y += {includes}", text, count=1, flags=re.M)
    text, n_mk = re.subn(r"\$\(srctree\)/virt/kvm/Makefile\.kvm",
                         f"{src}/virt/kvm/Makefile.kvm", text)
    if not (n_inc and n_mk):
        raise KmodError("arch/x86/kvm/Makefile has an unexpected layout; "
                        "out-of-tree build not supported for this source")
    return text


def _desired_contents(tree: Path, patch: Path | None, src: Path) -> dict[str, bytes]:
    contents = {rel: path.read_bytes() for rel, path in source_files(tree).items()}
    if patch is not None:
        contents = _apply_patch(patch, contents)
    makefile = "arch/x86/kvm/Makefile"
    contents[makefile] = _rewrite_kvm_makefile(contents[makefile].decode(), src).encode()
    return contents


def _sync_mirror(src: Path, contents: dict[str, bytes], manifest: Path) -> list[str]:
    """Make src hold exactly `contents`, touching only files whose bytes differ.

    Unchanged files keep their mtime, so kbuild's incremental build applies.
    Returns the relative paths written or removed.
    """
    previous = set(json.loads(manifest.read_text())) if manifest.is_file() else set()
    changed: list[str] = []
    for rel, data in contents.items():
        dest = src / rel
        if dest.is_file() and dest.read_bytes() == data:
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(dest)
        changed.append(rel)
    for rel in sorted(previous - contents.keys()):
        (src / rel).unlink(missing_ok=True)
        changed.append(rel)
    (src / "include/trace").mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps(sorted(contents)))
    return changed


# --------------------------------------------------------------------------
# building


def default_work_dir(source_tree: Path, headers: Path, intel: bool = False,
                     debug_info: bool = False) -> Path:
    """One persistent work dir per (source tree, headers, flags): bisect steps share it.

    The flags are part of the key because kbuild rebuilds everything when
    the compiler flags change.
    """
    key = _short_hash(str(Path(source_tree).resolve()), str(Path(headers).resolve()),
                      str(intel), str(debug_info))
    return cache_root() / "kmod" / key


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def _first_error(log_text: str) -> str:
    for line in log_text.splitlines():
        if re.search(r"\berror\b|\*\*\*", line, re.I):
            return line.strip()
    return _last_line(log_text)


def _run_make(headers: Path, kvm_dir: Path, jobs: int, intel: bool, debug_info: bool,
              log: Path) -> None:
    cmd = ["make", "-C", str(headers), f"M={kvm_dir}", f"-j{jobs}", "modules"]
    # Command-line variables override the .config's values at the Makefile
    # level only (autoconf.h, hence the C code, is unchanged):
    if not intel:
        # obj-$(CONFIG_KVM_INTEL): skips compiling vmx/*.c, which nothing here loads.
        cmd.append("CONFIG_KVM_INTEL=")
    if not debug_info:
        # Drops -g: 60 s instead of ~97 s CPU, identical .text, 2.2 MB kvm.ko
        # instead of 18.9 MB (Debian ships its modules stripped anyway).
        cmd.append("CONFIG_DEBUG_INFO=")
    # ARCH/CROSS_COMPILE etc. from the caller's environment would confuse kbuild.
    env = {k: v for k, v in os.environ.items()
           if k not in ("ARCH", "CROSS_COMPILE", "KBUILD_OUTPUT", "O", "M", "V")}
    env["LC_ALL"] = "C"
    with log.open("w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        text = log.read_text(errors="replace")
        _keep_log_tail(log, text)
        raise BuildFailed(f"module build failed: {_first_error(text)} (log: {log})")


def _keep_log_tail(log: Path, text: str) -> None:
    """Append the last lines once more so `tail` of the log shows the failure."""
    tail = text.splitlines()[-_LOG_TAIL_LINES:]
    with log.open("a") as fh:
        fh.write("\n--- last lines ---\n" + "\n".join(tail) + "\n")


def _install_modules(kvm_dir: Path, out_dir: Path, names: tuple[str, ...]) -> dict[str, Path]:
    """Copy the .ko files to out_dir (atomically: a reader never sees half a module)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    installed: dict[str, Path] = {}
    for name in names:
        built = kvm_dir / f"{name}.ko"
        if not built.is_file():
            raise BuildFailed(f"build produced no {built.name}")
        dest = out_dir / built.name
        tmp = out_dir / f".{built.name}.tmp"
        shutil.copyfile(built, tmp)
        tmp.replace(dest)
        installed[name] = dest
    # A stale kvm-intel.ko from an earlier build must not be loaded with new kvm.ko.
    for stale in {p.stem for p in out_dir.glob("*.ko")} - set(names):
        (out_dir / f"{stale}.ko").unlink()
    return installed


def _recompiled(log: Path) -> list[str]:
    return re.findall(r"^\s+(?:CC|AS) \[M\]\s+\S*/arch/x86/kvm/(\S+)$",
                      log.read_text(errors="replace"), re.M)


def _check_versions(tree: Path, headers: Path) -> str | None:
    source_version = tree_version(tree)
    headers_version = tree_version(headers)
    if source_version and headers_version and source_version != headers_version:
        raise KmodUsageError(f"source is {source_version} but headers {headers} are "
                        f"{headers_version}: structures may differ, refusing to build "
                        "(allow_version_mismatch=True to override)")
    return source_version


def build_modules(source_tree: Path, kernel_headers_or_build_dir: Path, out_dir: Path,
                  patch: Path | None = None, jobs: int = 2, *,
                  work_dir: Path | None = None, intel: bool = False,
                  debug_info: bool = False, allow_version_mismatch: bool = False
                  ) -> BuiltModules:
    """Build kvm.ko and kvm-amd.ko (+ kvm-intel.ko if intel) out of tree into out_dir.

    source_tree: directory with arch/x86/kvm and virt/kvm (see resolve_source).
    kernel_headers_or_build_dir: configured headers/build tree of the target
    kernel (see resolve_headers); it fixes vermagic and symbol CRCs.
    patch: -p1 unified diff applied to the work dir copy, never to source_tree.
    work_dir: persistent mirror + objects; default one per (source, headers),
    so repeated builds are incremental.  debug_info: compile with -g (18 MB
    kvm.ko instead of 2.2 MB; for gdb/crash).  Writes out_dir/kmod.json and
    out_dir/kmod-build.log.
    """
    started = time.monotonic()
    cpu_before = _children_cpu()
    tree = check_source_dir(Path(source_tree).resolve())
    headers = Path(kernel_headers_or_build_dir).resolve()
    release = headers_release(headers)
    source_version = (tree_version(tree) if allow_version_mismatch
                      else _check_versions(tree, headers))
    patch = Path(patch).resolve() if patch is not None else None
    _require_tools(headers, patch)
    work = Path(work_dir) if work_dir else default_work_dir(tree, headers, intel, debug_info)
    work.mkdir(parents=True, exist_ok=True)
    src = work.resolve() / "src"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "kmod-build.log"
    names = (*MODULES, "kvm-intel") if intel else MODULES
    with locked(work / ".lock"):
        _sync_mirror(src, _desired_contents(tree, patch, src), work / "manifest.json")
        _run_make(headers, src / "arch/x86/kvm", jobs, intel, debug_info, log)
        shutil.copyfile(log, work / "last-build.log")
        modules = _install_modules(src / "arch/x86/kvm", out_dir, names)
    vermagic = vermagic_of(modules["kvm"])
    check_vermagic(out_dir, release)  # catches a headers dir lying about its release
    built = BuiltModules(out_dir=out_dir, modules=modules, vermagic=vermagic,
                         kernel_release=release, source_version=source_version,
                         patch=patch, work_dir=work, log=log,
                         seconds=round(time.monotonic() - started, 2),
                         cpu_seconds=round(_children_cpu() - cpu_before, 2),
                         recompiled=_recompiled(log))
    _write_manifest(built, tree, headers)
    return built


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _write_manifest(built: BuiltModules, tree: Path, headers: Path) -> None:
    """out_dir/kmod.json: what these modules are, for --kvm-modules consumers."""
    meta = {
        "kernel_release": built.kernel_release,
        "vermagic": built.vermagic,
        "source": str(tree),
        "source_version": built.source_version,
        "headers": str(headers),
        "patch": str(built.patch) if built.patch else None,
        "modules": {name: path.name for name, path in built.modules.items()},
        "seconds": built.seconds,
        "cpu_seconds": built.cpu_seconds,
    }
    (built.out_dir / "kmod.json").write_text(json.dumps(meta, indent=1) + "\n")


# --------------------------------------------------------------------------
# command line: `kvmtest kmod build|check ...` (python -m kvmtest.kmod ...)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Sub-commands of `kvmtest kmod`; the lead's CLI can mount this parser."""
    sub = parser.add_subparsers(dest="kmod_command", required=True)
    build = sub.add_parser("build", help="build kvm.ko/kvm-amd.ko out of tree")
    build.add_argument("--source", required=True,
                       help="kernel source dir, tarball (/usr/src/linux-source-6.1.tar.xz) "
                            "or debian:linux-source-6.1[=VERSION]")
    build.add_argument("--kernel", required=True,
                       help="debian:linux-image-RELEASE[-unsigned], a release, or a "
                            "headers/build dir")
    build.add_argument("--patch", type=Path, help="-p1 patch applied to a copy of the source")
    build.add_argument("--out", type=Path, help="output dir for the .ko files")
    build.add_argument("-j", "--jobs", type=int, default=2)
    build.add_argument("--intel", action="store_true", help="also build kvm-intel.ko")
    build.add_argument("--debug-info", action="store_true", help="compile with -g")
    build.add_argument("--work-dir", type=Path,
                       help="persistent build dir (default: one per source+kernel in the "
                            "cache); reuse one across trees to keep rebuilds incremental")
    check = sub.add_parser("check", help="check modules' vermagic against a kernel release")
    check.add_argument("modules_dir", type=Path)
    check.add_argument("release")


def check_arguments(args: argparse.Namespace) -> None:
    """Usage errors before anything is resolved, downloaded or built."""
    if args.kmod_command == "check":
        if not Path(args.modules_dir).is_dir():
            raise KmodUsageError(f"{args.modules_dir}: no such directory")
        return
    source = str(args.source)
    if not source.startswith("debian:") and not Path(source).expanduser().exists():
        raise KmodUsageError(f"--source {source}: no such file or directory")
    if args.patch is not None and not args.patch.is_file():
        raise KmodUsageError(f"--patch {args.patch}: no such file")
    for option, path in (("--out", args.out), ("--work-dir", args.work_dir)):
        if path is not None:
            _check_creatable(option, Path(path))


def _check_creatable(option: str, path: Path) -> None:
    if path.exists():
        if not path.is_dir():
            raise KmodUsageError(f"{option} {path}: exists and is not a directory")
        probe = path
    else:
        probe = path.absolute().parent
        while not probe.exists():
            probe = probe.parent
        if not probe.is_dir():
            raise KmodUsageError(f"{option} {path}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise KmodUsageError(f"{option} {path}: {probe} is not writable")


def run(args: argparse.Namespace) -> int:
    """Execute a parsed `kvmtest kmod` command: 0 ok, else KmodError.exit_code
    (1 build failed, 2 usage, 3 environment)."""
    try:
        check_arguments(args)
        if args.kmod_command == "check":
            check_vermagic(args.modules_dir, args.release)
            print(f"ok: modules in {args.modules_dir} are for {args.release}")
            return 0
        tree = resolve_source(args.source)
        headers = resolve_headers(args.kernel)
        out = args.out or default_work_dir(tree, headers, args.intel, args.debug_info) / "out"
        built = build_modules(tree, headers, out, args.patch, args.jobs,
                              work_dir=args.work_dir, intel=args.intel,
                              debug_info=args.debug_info)
    except KmodError as exc:
        print(f"kvmtest kmod: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"built {', '.join(p.name for p in built.modules.values())} in {built.out_dir}")
    print(f"vermagic: {built.vermagic}")
    print(f"{built.seconds:.1f} s wall, {built.cpu_seconds:.1f} s CPU, "
          f"recompiled {len(built.recompiled)} objects")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvmtest kmod", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
