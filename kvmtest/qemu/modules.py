"""Kernel modules of a resolved kernel: files, built-ins and load order.

Debian packages do not ship ``modules.dep`` (postinst runs depmod), so module
dependencies are read from each module's ``.modinfo`` ``depends=`` field
instead: that works identically for packages, build trees and rebuilt modules.
Modules may be ``.ko``, ``.ko.xz``, ``.ko.zst`` or ``.ko.gz``; they are
decompressed on the host.
"""

from __future__ import annotations

import gzip
import lzma
import os
import re
import shutil
import subprocess
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from kvmtest.qemu.cache import cache_root
from kvmtest.qemu.errors import QemuError

MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")



def read_module(path: Path) -> bytes:
    """The raw ELF bytes of a module, decompressing .xz/.gz/.zst on the host."""
    name = path.name
    try:
        if name.endswith(".ko"):
            return path.read_bytes()
        if name.endswith(".xz"):
            return lzma.decompress(path.read_bytes())
        if name.endswith(".gz"):
            return gzip.decompress(path.read_bytes())
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
        raise QemuError(f"cannot read module {path}: {exc}") from None
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


class ModuleFiles(dict):
    """Module name -> its file.  Kept as strings, a Path made on lookup: a
    Path per file costs more than the scan itself (~4000 modules a kernel,
    scanned by every `kvmtest run`)."""

    def __getitem__(self, name: str) -> Path:
        return Path(dict.__getitem__(self, name))


_SCANS: dict[tuple[Path, int], tuple[dict[str, str], set[str]]] = {}


def _module_name(file: str) -> str:
    """module_name() of a file name given as a string."""
    for suffix in MODULE_SUFFIXES:
        if file.endswith(suffix):
            file = file[: -len(suffix)]
            break
    return file.replace("-", "_")


def _scan_dir(directory: Path) -> tuple[dict[str, str], set[str]]:
    """Module files and built-in names under DIRECTORY.

    Unpacked packages in the cache never change, so their scans (~0.2 s for
    4000 modules) are memoised; other dirs (build trees, rebuilt modules) are
    rescanned every time.  An entry fetched again is a new directory (a new
    inode), so it is scanned again.
    """
    directory = directory.resolve()
    key = (directory, directory.stat().st_ino if directory.exists() else 0)
    if key in _SCANS:
        return _SCANS[key]
    files: dict[str, str] = {}
    found = []  # os.walk on strings: rglob costs 3x more over ~4000 modules
    for where, _, names in os.walk(directory):
        found += [(where, n) for n in names if n.endswith(MODULE_SUFFIXES)]
    for where, name in sorted(found, key=lambda f: [*f[0].split(os.sep), f[1]]):  # as Paths sort
        path = os.path.join(where, name)
        if os.path.isfile(path):
            files[_module_name(name)] = path
    builtin: set[str] = set()
    listing = directory / "modules.builtin"
    if listing.is_file():
        builtin = {
            _module_name(os.path.basename(line.strip()))
            for line in listing.read_text().splitlines()
            if line.strip()
        }
    if directory.is_relative_to(cache_root().resolve() / "kernels"):
        _SCANS[key] = (files, builtin)
    return files, builtin


@dataclass
class ModuleTree:
    """Modules found under one or more directories; earlier dirs win (overrides)."""

    dirs: tuple[Path, ...]
    files: ModuleFiles = field(default_factory=ModuleFiles)
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
