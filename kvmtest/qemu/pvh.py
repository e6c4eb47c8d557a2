"""An uncompressed vmlinux for PVH boot, cached per kernel image.

Under TCG the bzImage's own decompressor is the slowest part of a boot
(xz: ~5.5 s of ~15 s).  Decompressing on the host (~1 s, cached) and giving
QEMU the ELF vmlinux makes it boot through the PVH entry point instead,
which kernels built with CONFIG_PVH=y (Debian's are) advertise in an ELF note.
The cached vmlinux is checked against its size and sha256 on every use
(~40 ms for 60 MB); when it cannot be cached (full disk, read-only cache)
the bzImage boots instead, with a note.
"""

from __future__ import annotations

import bz2
import contextlib
import hashlib
import lzma
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

from kvmtest.qemu.cache import (
    NoSpaceError,
    cache_root,
    check_sidecar,
    locked,
    note,
    require_space,
    write_sidecar,
)
from kvmtest.qemu.image import Kernel

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


def vmlinux_name(kernel: Kernel) -> str:
    """File stem of KERNEL's cached vmlinux: release + a key of the image's identity."""
    st = kernel.image.stat()
    key = hashlib.sha256(f"{kernel.image}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    return f"{kernel.release}-{key[:16]}"


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
    directory = (cache or cache_root()) / "vmlinux"
    stem = vmlinux_name(kernel)
    try:
        with locked(directory / f"{kernel.release}.lock"):
            return _cached_vmlinux(kernel, directory / f"{stem}.elf", directory / f"{stem}.nopvh")
    except NoSpaceError as exc:
        note(f"{exc}; booting the bzImage instead")
    except OSError as exc:
        note(f"cannot cache the vmlinux in {directory} ({exc.strerror}); booting the bzImage")
    return None


def _cached_vmlinux(kernel: Kernel, target: Path, nopvh: Path) -> Path | None:
    if nopvh.is_file():
        return None  # remembered: this kernel boots as bzImage
    if target.exists():
        problem = check_sidecar(target)
        if problem is None:
            return target
        if problem != "no integrity record":  # not one written by an older kvmtest
            note(f"cached vmlinux {target} is damaged ({problem}): extracting it again")
    elf = extract_vmlinux(kernel.image)
    if elf is None or not has_pvh_note(elf):
        with contextlib.suppress(OSError):
            nopvh.touch()
        return None
    try:
        require_space(target.parent, len(elf), "the uncompressed vmlinux")
        write_sidecar(target, elf)
    except NoSpaceError:
        target.unlink(missing_ok=True)  # without its record it would be re-made anyway
        raise
    return target
