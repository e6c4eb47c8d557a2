"""Kernel acquisition for the qemu backend: turn a SPEC into a bootable kernel.

SPEC forms accepted by `resolve_kernel`:

* ``debian:PACKAGE`` -- e.g. ``debian:linux-image-6.1.0-56-amd64-unsigned``,
  resolved and fetched with this machine's apt sources (kvmtest.qemu.debian:
  classic, merged-/usr and split packages, meta packages such as
  ``linux-image-amd64``) and cached (kvmtest.qemu.cache).
* ``debian:PACKAGE@SUITE`` -- same, but from a suite that is not in the
  machine's sources (e.g. ``@trixie-backports``): a private apt state in the
  cache points at deb.debian.org, the system configuration is left alone.
* a kernel image path (bzImage / vmlinuz) plus ``modules=DIR`` (either
  ``lib/modules/<release>`` itself or a root containing it); without
  ``modules`` the host's ``/lib/modules/<release>`` is used if present.
* a kernel build tree (``arch/x86/boot/bzImage``, modules taken from the
  tree's ``*.ko`` files, release from ``include/config/kernel.release``).

This module also re-exports what the rest of kvmtest imports from here.
"""

from __future__ import annotations

import re
from pathlib import Path

from kvmtest.qemu.cache import atomic_write, cache_root, locked
from kvmtest.qemu.debian import fetch_debian
from kvmtest.qemu.errors import QemuError
from kvmtest.qemu.image import Kernel, image_banner, image_release
from kvmtest.qemu.modules import MODULE_SUFFIXES, ModuleTree, module_name, read_module
from kvmtest.qemu.pvh import extract_vmlinux, has_pvh_note, pvh_image

# Debian policy 5.6.1 (package names); suites are codenames like trixie-backports.
PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]+")
SUITE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+-]*")

__all__ = [
    "MODULE_SUFFIXES",
    "Kernel",
    "ModuleTree",
    "atomic_write",
    "cache_root",
    "extract_vmlinux",
    "fetch_debian",
    "has_pvh_note",
    "image_banner",
    "image_release",
    "locked",
    "module_name",
    "pvh_image",
    "read_module",
    "resolve_kernel",
]


def resolve_kernel(
    spec: str, *, modules: Path | str | None = None, cache: Path | None = None
) -> Kernel:
    """Resolve SPEC (see module docstring) into a Kernel, downloading if needed."""
    if spec.startswith("debian:"):
        if modules is not None:
            raise QemuError("--modules does not apply to debian: kernels (they ship theirs)")
        package, at, suite = spec.removeprefix("debian:").partition("@")
        if not PACKAGE.fullmatch(package) or (at and not SUITE.fullmatch(suite)):
            raise QemuError(
                f"kernel {spec!r}: debian: needs PACKAGE[@SUITE], "
                "e.g. debian:linux-image-6.1.0-56-amd64-unsigned"
            )
        try:
            return fetch_debian(package, suite=suite or None, cache=cache, spec=spec)
        except OSError as exc:  # e.g. a read-only or foreign-owned cache
            where = exc.filename or (cache or cache_root())
            raise QemuError(f"kernel cache: {exc.strerror or exc}: {where}") from None
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
    else:
        for sub in ("usr/lib/modules", "lib/modules"):  # a root holding the tree
            if (modules / sub / release).is_dir():
                modules = modules / sub / release
                break
    if modules is not None and not modules.is_dir():
        raise QemuError(f"modules directory {modules} does not exist")
    return Kernel(image=image, release=release, modules_dir=modules, spec=spec, banner=banner)
