"""kvmtest's cache: where it lives, how it is locked, and how entries are checked.

Layout under ``cache_root()``::

    kernels/<package>[@<suite>]/meta.json    one unpacked Debian kernel
    kernels/<package>[@<suite>]/files.json   size + sha256 of every file kept
    kernels/<package>[@<suite>]/root/...     the files, at their package paths
    kernels/<key>.lock                       flock serialising its fetch
    vmlinux/<release>-<key>.elf (+ .sha256)  uncompressed kernels for PVH boot
    initramfs/<release>-<key>.cpio           base initramfs archives
    apt/<suite>/                             private apt states (@SUITE specs)
    apt/.lock                                flock serialising apt-get/apt-cache

A cached file is only as good as the last check of it: entries record the
size and sha256 of every file they keep, a cheap check (every size, plus the
image's hash) runs on each use, and a full check (every hash) in
``kvmtest cache verify``.  A damaged entry is fetched again, never booted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kvmtest.qemu.errors import QemuError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def cache_root() -> Path:
    """Root of kvmtest's cache: $KVMTEST_CACHE or ~/.cache/kvmtest."""
    env = os.environ.get("KVMTEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "kvmtest"


def note(message: str) -> None:
    """One line on stderr for the user (repairs, fallbacks)."""
    print(f"kvmtest: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# locking


@dataclass
class Lock:
    """A held lock; set ``discard`` to delete the lock file when releasing it."""

    path: Path
    discard: bool = False


@contextlib.contextmanager
def locked(lock_path: Path, *, blocking: bool = True) -> Iterator[Lock]:
    """Exclusive flock on LOCK_PATH: serialises parallel workers.

    Lock files may be deleted (a failed fetch leaves none, prune removes
    orphans), so after flock() succeeds the path must still name the inode
    we locked; otherwise another process deleted it meanwhile and a third
    may hold a lock on a new file of that name: start over.  Raises
    BlockingIOError when BLOCKING is false and the lock is held.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(lock_path, "a+b")  # noqa: SIM115 -- closed below
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            st = os.fstat(handle.fileno())
            try:
                now = os.stat(lock_path)
            except FileNotFoundError:
                now = None
        except BaseException:
            handle.close()
            raise
        if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            break
        handle.close()
    lock = Lock(lock_path)
    try:
        yield lock
    finally:
        if lock.discard:
            lock_path.unlink(missing_ok=True)  # still held: nobody else has it
        handle.close()  # releases the flock


def is_held(lock_path: Path) -> bool:
    """True if another process holds LOCK_PATH right now."""
    if not lock_path.exists():
        return False
    try:
        with locked(lock_path, blocking=False):
            return False
    except BlockingIOError:
        return True


# --------------------------------------------------------------------------
# space


def free_bytes(directory: Path) -> int:
    """Bytes available to us on DIRECTORY's file system (nearest existing parent)."""
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def mb(size: int) -> str:
    return f"{size / 1e6:,.0f} MB" if size >= 1e6 else f"{size / 1e3:,.0f} kB"


class NoSpaceError(QemuError):
    """The cache's file system is (or would get) full."""


def no_space(directory: Path, needed: int, what: str) -> NoSpaceError:
    """The one-line error for a full disk."""
    return NoSpaceError(
        f"no space left in {directory}: {what} needs about {mb(needed)}, "
        f"{mb(free_bytes(directory))} free (free some, or point KVMTEST_CACHE elsewhere)"
    )


def require_space(directory: Path, needed: int, what: str) -> None:
    """Raise the full-disk error before starting work that needs NEEDED bytes."""
    if free_bytes(directory) < needed:
        raise no_space(directory, needed, what)


def atomic_write(target: Path, data: bytes) -> None:
    """Write TARGET via a temp file + rename: readers never see a partial file.

    A full disk is a QemuError naming the directory and the size needed.
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
    except OSError as exc:
        if exc.errno in NO_SPACE:
            raise no_space(target.parent, len(data), target.name) from None
        raise
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            os.fchmod(handle.fileno(), 0o644)  # mkstemp's 0600 would hide it from other users
        os.replace(tmp, target)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            raise no_space(target.parent, len(data), target.name) from None
        raise


# --------------------------------------------------------------------------
# integrity records


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


Record = tuple[int, str]  # size, sha256


def check_files(
    base: Path, records: dict[str, Record], *, hash_all: bool, hash_these: Iterable[str] = ()
) -> str | None:
    """What is wrong with the files under BASE, or None if they match RECORDS.

    Sizes are always compared (a stat per file); hashes of HASH_THESE, or of
    every file with HASH_ALL.
    """
    # One os.stat per file, on strings: a kernel entry has ~4000 files and
    # every `kvmtest run` checks them (pathlib cost 3x more).
    sizes: dict[str, int] = {}
    missing = []
    root = os.fspath(base)
    for rel in records:
        try:
            st = os.stat(os.path.join(root, rel))
        except OSError:
            missing.append(rel)
            continue
        if not stat.S_ISREG(st.st_mode):
            missing.append(rel)
        sizes[rel] = st.st_size
    if missing:
        return f"{len(missing)} of {len(records)} files missing, e.g. {missing[0]}"
    for rel, (size, _) in records.items():
        if sizes[rel] != size:
            return f"{rel} is {sizes[rel]} bytes, recorded {size}"
    for rel in records if hash_all else hash_these:
        if sha256_file(base / rel) != records[rel][1]:
            return f"{rel} does not match its recorded sha256"
    return None


def write_sidecar(target: Path, data: bytes) -> None:
    """Write TARGET and its record TARGET.sha256 ("<sha256> <size>")."""
    atomic_write(target, data)
    record = f"{hashlib.sha256(data).hexdigest()} {len(data)}\n"
    atomic_write(target.with_name(target.name + ".sha256"), record.encode())


def check_sidecar(target: Path) -> str | None:
    """What is wrong with TARGET according to its .sha256 record, or None."""
    record = target.with_name(target.name + ".sha256")
    try:
        digest, size = record.read_text().split()
    except (OSError, ValueError):
        return "no integrity record"
    if not target.is_file():
        return "missing"
    actual = target.stat().st_size
    if actual != int(size):
        return f"{actual} bytes, recorded {size}"
    if sha256_file(target) != digest:
        return "does not match its recorded sha256"
    return None


# --------------------------------------------------------------------------
# kernel entries


META = "meta.json"
FILES = "files.json"
FORMAT = 2  # 1 (no "format" key): no integrity records


@dataclass
class Entry:
    """One cached Debian kernel: kernels/<key>/."""

    path: Path

    @property
    def key(self) -> str:
        return self.path.name

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def meta(self) -> dict:
        return json.loads((self.path / META).read_text())

    def records(self) -> dict[str, Record]:
        data = json.loads((self.path / FILES).read_text())
        return {rel: (size, digest) for rel, size, digest in data["files"]}

    def problem(self, *, full: bool = False) -> str | None:
        """Why this entry cannot be used as is, or None (see check_files)."""
        try:
            meta = self.meta()
        except (OSError, ValueError):
            return f"no readable {META}"
        if meta.get("format", 1) < FORMAT:
            return "no integrity record"
        try:
            records = self.records()
        except (OSError, ValueError, KeyError, TypeError):
            return f"no readable {FILES}"
        try:
            image = meta["image"]
        except KeyError:
            return f"no image in {META}"
        return check_files(self.path, records, hash_all=full, hash_these=[image])

    def legacy(self) -> bool:
        """True if an older kvmtest wrote this entry (no integrity record)."""
        try:
            return self.meta().get("format", 1) < FORMAT
        except (OSError, ValueError):
            return False

    def touch(self) -> None:
        """Record a use (meta.json's mtime is 'last used')."""
        with contextlib.suppress(OSError):
            os.utime(self.path / META)

    def last_used(self) -> float:
        try:
            return (self.path / META).stat().st_mtime
        except OSError:
            return 0.0

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())


def entries(root: Path | None = None) -> list[Entry]:
    """The kernel entries in the cache (directories with a meta.json)."""
    base = (root or cache_root()) / "kernels"
    if not base.is_dir():
        return []
    return [
        Entry(p)
        for p in sorted(base.iterdir())
        if p.is_dir() and not p.name.startswith(".") and (p / META).is_file()
    ]
