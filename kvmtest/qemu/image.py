"""A resolved kernel (`Kernel`) and what its x86 boot header says."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from kvmtest.qemu.errors import QemuError


@dataclass(frozen=True)
class Kernel:
    """A resolved kernel: what QEMU boots and where its modules live."""

    image: Path
    release: str
    modules_dir: Path | None  # lib/modules/<release> or a build tree
    spec: str  # debian: the concrete package's spec, e.g. debian:linux-image-X@SUITE
    package_version: str | None = None  # Debian version, e.g. "6.1.192-2"
    banner: str = ""  # version string embedded in the image header
    package: str | None = None  # Debian: the concrete linux-image-* package
    resolved_from: str | None = None  # the spec as given when it named another package

    @property
    def upstream_version(self) -> str | None:
        """Upstream version (e.g. "6.1.192") when known from the Debian version."""
        if self.package_version:
            return self.package_version.split(":")[-1].split("-")[0].split("~")[0]
        match = re.search(r"Debian (\d+\.\d+\.\d+)", self.banner)
        return match.group(1) if match else None

    def describe(self) -> str:
        """Release and origin, e.g. '7.3.4+deb13-amd64 (linux-image-7.3.4+deb13-amd64
        7.3.4-1~bpo13+1 from trixie-backports, resolved from debian:linux-image-amd64@...)'."""
        if self.package is None:
            return f"{self.release} ({self.spec})"
        origin = f"{self.package} {self.package_version}"
        suite = self.spec.partition("@")[2]
        if suite:
            origin += f" from {suite}"
        if self.resolved_from:
            origin += f", resolved from {self.resolved_from}"
        return f"{self.release} ({origin})"


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
