"""``debian:PACKAGE[@SUITE]`` kernels: resolve with apt, fetch, unpack, cache.

Three Debian layouts are in use (checked against the archive, Nov 2026):

* classic (bookworm 6.1, bookworm-backports 6.12): ``linux-image-X[-unsigned]``
  holds ``boot/vmlinuz-X`` and ``lib/modules/X`` (plain ``.ko`` on 6.1,
  ``.ko.xz`` on 6.12);
* classic, merged /usr (trixie 6.12): the same, modules under ``usr/lib/modules/X``;
* split (trixie-backports 7.3, sid 7.2): ``linux-image-X`` is empty and
  Depends on ``linux-binary-X`` (``usr/lib/modules/X/vmlinuz``),
  ``linux-modules-X`` (``.ko.xz``) and ``linux-base-X`` (``modules.builtin``,
  ``config``), each pinned with ``(= VERSION)``.

Meta packages (``linux-image-amd64``) Depend on one ``linux-image-X (= V)``;
that is followed, so the cache entry is the concrete package's and a meta
spec shares it.  Only the files kvmtest uses are unpacked (the image, config,
modules.builtin/.order/.builtin.modinfo and the module files), streamed from
``dpkg-deb --fsys-tarfile`` and hashed as they are written.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kvmtest.qemu import procgroup
from kvmtest.qemu.cache import (
    FILES,
    FORMAT,
    META,
    NO_SPACE,
    Entry,
    Record,
    atomic_write,
    cache_root,
    locked,
    no_space,
    note,
    require_space,
)
from kvmtest.qemu.errors import QemuError
from kvmtest.qemu.image import Kernel, image_banner

DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
LISTS_MAX_AGE = 24 * 3600  # a private suite's package lists are refreshed daily
SPLIT_PARTS = ("linux-binary-", "linux-modules-", "linux-base-")

# Package paths kvmtest keeps (relative, without the leading "./").
KEEP = re.compile(
    r"boot/(?:vmlinuz|config)-[^/]+"
    r"|(?:usr/)?lib/modules/[^/]+/(?:vmlinuz|config|modules\.builtin(?:\.modinfo)?"
    r"|modules\.order|.+\.ko(?:\.xz|\.zst|\.gz)?)"
)


def debian_spec(package: str, suite: str | None) -> str:
    return f"debian:{package}" + (f"@{suite}" if suite else "")


def entry_key(package: str, suite: str | None) -> str:
    return package if suite is None else f"{package}@{suite}"


# --------------------------------------------------------------------------
# apt


@dataclass(frozen=True)
class Dep:
    name: str
    version: str | None  # pinned with "(= V)", else None


@dataclass(frozen=True)
class PkgInfo:
    """One package version as apt-cache shows it."""

    name: str
    version: str
    depends: tuple[Dep, ...]
    size: int  # .deb bytes
    installed_size: int  # bytes (apt shows KiB)

    @property
    def pinned(self) -> str:
        return f"{self.name}={self.version}"


def parse_show(text: str) -> PkgInfo | None:
    """The first stanza of `apt-cache show` output, or None if there is none."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        if line[0] in " \t":
            continue  # continuation (Description)
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    if "Package" not in fields or "Version" not in fields:
        return None
    depends = []
    for item in filter(None, (s.strip() for s in fields.get("Depends", "").split(","))):
        first = item.split("|")[0].strip()  # alternatives: kernels never need them
        match = re.match(r"([a-z0-9][a-z0-9+.-]*)(?::\S+)?\s*(?:\(\s*([<>=]+)\s*([^)\s]+)\s*\))?",
                         first)
        if match:
            pinned = match.group(3) if match.group(2) == "=" else None
            depends.append(Dep(match.group(1), pinned))
    return PkgInfo(
        name=fields["Package"],
        version=fields["Version"],
        depends=tuple(depends),
        size=int(fields.get("Size", "0") or 0),
        installed_size=int(fields.get("Installed-Size", "0") or 0) * 1024,
    )


@dataclass
class Plan:
    """What a spec resolves to: the concrete image package and the .debs to fetch."""

    package: PkgInfo  # the concrete linux-image-* package
    parts: tuple[Dep, ...]  # split layout: its binary/modules/base; classic: ()
    chain: list[str] = field(default_factory=list)  # names followed to get there
    debs: list[PkgInfo] | None = None  # filled by Apt.expand (costs apt-cache calls)
    complete: bool = True  # False: stopped at a cached kernel, PACKAGE is name+version only

    @property
    def needed(self) -> int:
        """Bytes a fetch needs: the .debs plus their unpacked size (Installed-Size),
        plus 5 % for file system blocks (a module tree is ~4,000 small files)."""
        return int(sum(d.size + d.installed_size for d in self.debs or []) * 1.05)


class Apt:
    """apt-get/apt-cache on the machine's state (SUITE None) or a private one."""

    def __init__(self, suite: str | None, root: Path) -> None:
        self.suite = suite
        self.root = root
        self.private = root / "apt" / suite if suite else None
        self.updated = False  # updated by this object already

    @property
    def where(self) -> str:
        return f"suite {self.suite}" if self.suite else "this machine's apt sources"

    def options(self) -> list[str]:
        if self.private is None:
            return []
        root = self.private
        for sub in ("lists/partial", "archives/partial"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        mirror = DEBIAN_SECURITY_MIRROR if self.suite.endswith("-security") else DEBIAN_MIRROR
        signed = f"[signed-by={DEBIAN_KEYRING}] " if DEBIAN_KEYRING.exists() else ""
        sources = root / "sources.list"
        text = f"deb {signed}{mirror} {self.suite} main\n"
        if not sources.is_file() or sources.read_text() != text:
            atomic_write(sources, text.encode())
        return [
            "-o", f"Dir::Etc::SourceList={sources}",
            "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={root / 'lists'}",
            "-o", f"Dir::Cache={root}",
            "-o", f"Dir::Cache::archives={root / 'archives'}",
            # Docker-style images disable apt's binary caches; sid's lists
            # take ~1 s of CPU to parse without them.
            "-o", "Dir::Cache::pkgcache=pkgcache.bin",
            "-o", "Dir::Cache::srcpkgcache=srcpkgcache.bin",
            "-o", "Acquire::Languages=none",
        ]

    def _run(self, tool: str, args: list[str], cwd: Path | None = None):
        # As root, apt drops to _apt for downloads and warns it cannot write
        # our private dirs; downloading as root is fine here.
        cmd = [tool, "-q", "-o", "APT::Sandbox::User=root", *self.options(), *args]
        return procgroup.run(cmd, cwd=cwd)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # One apt at a time from our workers: update takes the lists lock,
        # apt-cache rewrites pkgcache.bin.
        with locked(self.root / "apt" / ".lock") as lock:
            lock.discard = True  # a failed spec leaves no lock file behind
            yield

    def _stamp(self) -> Path | None:
        return self.private / "updated" if self.private else None

    def lists_age(self) -> float | None:
        stamp = self._stamp()
        if stamp is None:
            return None
        try:
            return time.time() - stamp.stat().st_mtime
        except FileNotFoundError:
            return float("inf")

    def update(self) -> None:
        with self._locked():
            proc = self._run("apt-get", ["update"])
        self.updated = True
        if proc.returncode != 0:
            if self.private is not None and not any((self.private / "lists").glob("*Packages*")):
                shutil.rmtree(self.private, ignore_errors=True)  # e.g. a misspelt suite
            raise QemuError(f"apt-get update for {self.where} failed: {last_error(proc)}")
        stamp = self._stamp()
        if stamp is not None:
            stamp.touch()

    def show(self, name: str, version: str | None = None) -> PkgInfo | None:
        """NAME (at VERSION, else the candidate) from the lists, or None."""
        with self._locked():
            proc = self._run(
                "apt-cache", ["show", "--no-all-versions", f"{name}={version}" if version else name]
            )
        return parse_show(proc.stdout) if proc.returncode == 0 else None

    def plan(self, package: str, cached: Callable[[str, str], bool] | None = None) -> Plan:
        """Resolve PACKAGE: follow meta packages, expand split images."""
        age = self.lists_age()
        if age is not None and age > LISTS_MAX_AGE and not self.updated:
            try:
                self.update()
            except QemuError as exc:
                if age == float("inf"):
                    raise
                note(f"using {self.where}'s package lists from {age / 86400:.0f} days ago: {exc}")
        try:
            return self._plan(package, cached)
        except _NotFound:
            if self.updated:
                raise
        self.update()  # stale or missing lists
        return self._plan(package, cached)

    def _plan(self, package: str, cached: Callable[[str, str], bool] | None) -> Plan:
        name, version, chain = package, None, []
        for _ in range(4):
            info = self.show(name, version)
            if info is None:
                raise _NotFound(self._not_found(package, name, version))
            chain.append(info.name)
            binary = [d for d in info.depends if d.name.startswith("linux-binary-")]
            if binary:  # split layout
                abi = binary[0].name.removeprefix("linux-binary-")
                wanted = {p + abi for p in SPLIT_PARTS}
                parts = tuple(d for d in info.depends if d.name in wanted)
                if len(parts) != len(wanted):
                    raise QemuError(
                        f"{debian_spec(package, self.suite)}: {info.name} {info.version} "
                        f"depends on {', '.join(d.name for d in parts)}, expected "
                        f"{', '.join(sorted(wanted))}")
                return Plan(info, parts, chain)
            images = [d for d in info.depends if d.name.startswith("linux-image-")]
            if not images:
                return Plan(info, (), chain, [info])  # classic (or not a kernel at all)
            name, version = images[0].name, images[0].version  # meta package
            if version and cached and cached(name, version):
                # Each apt-cache call parses the lists (0.5 s on sid): the
                # concrete package is only looked at again if it must be fetched.
                return Plan(PkgInfo(name, version, (), 0, 0), (), [*chain, name], complete=False)
        raise QemuError(f"{package}: meta packages nest too deeply ({' -> '.join(chain)})")

    def expand(self, plan: Plan) -> None:
        """Fill PLAN.debs: the split parts at their pinned versions."""
        if plan.debs is not None:
            return
        debs = []
        for dep in plan.parts:
            info = self.show(dep.name, dep.version)
            if info is None:
                raise QemuError(self._not_found(plan.package.name, dep.name, dep.version))
            debs.append(info)
        plan.debs = debs

    def _not_found(self, package: str, name: str, version: str | None) -> str:
        what = f"{name} {version}" if version else name
        if name == package:
            return f"{debian_spec(package, self.suite)}: no such package in {self.where}"
        return (f"{debian_spec(package, self.suite)}: it depends on {what}, "
                f"which is not in {self.where}")

    def download(self, debs: list[PkgInfo], workdir: Path) -> list[Path]:
        """apt-get download DEBS (pinned versions) into WORKDIR."""
        workdir.mkdir(parents=True, exist_ok=True)
        with self._locked():
            proc = self._run("apt-get", ["download", *(d.pinned for d in debs)], cwd=workdir)
        files = []
        for deb in debs:
            found = sorted(workdir.glob(f"{deb.name}_*.deb"))
            if found:
                files.append(found[0])
        if proc.returncode != 0 or len(files) != len(debs):
            output = proc.stdout + proc.stderr
            if "No space left on device" in output:
                raise OSError(errno.ENOSPC, "No space left on device")
            raise _DownloadFailed(
                f"apt-get download {' '.join(d.pinned for d in debs)} failed: {last_error(proc)}"
            )
        return files


class _NotFound(QemuError):
    pass


class _DownloadFailed(QemuError):
    pass


def last_error(proc) -> str:
    text = proc.stderr + proc.stdout
    lines = [ln for ln in text.splitlines() if ln.startswith("E:")]
    return lines[-1] if lines else (text.strip().splitlines() or ["?"])[-1]


# --------------------------------------------------------------------------
# unpacking


def _member_path(name: str) -> str | None:
    """A tar member's relative path, or None if it would leave the destination."""
    path = name.removeprefix("./").strip("/")
    parts = path.split("/")
    if not path or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        return None
    return path


def unpack(deb: Path, dest: Path) -> tuple[dict[str, Record], list[str]]:
    """Write the files of DEB that KEEP selects under DEST; hash them on the way.

    Returns their records (path relative to DEST -> size, sha256) and the
    paths of every regular file in the package (for error messages).  Only
    regular files are written, with O_EXCL|O_NOFOLLOW, at paths checked to
    stay inside DEST; modes are 0644, mtimes the package's.
    """
    records: dict[str, Record] = {}
    listing: list[str] = []
    with tempfile.TemporaryFile() as err, procgroup.group(
        ["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE, stderr=err
    ) as proc:
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                for member in tar:
                    path = _member_path(member.name)
                    if path is None or not member.isreg():
                        continue
                    listing.append(path)
                    if not KEEP.fullmatch(path):
                        continue
                    target = dest / path
                    target.parent.mkdir(parents=True, exist_ok=True)
                    source = tar.extractfile(member)
                    assert source is not None  # a regular file
                    digest, size = hashlib.sha256(), 0
                    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                    with os.fdopen(os.open(target, flags, 0o644), "wb") as out:
                        while chunk := source.read(1 << 20):
                            out.write(chunk)
                            digest.update(chunk)
                            size += len(chunk)
                    os.utime(target, (member.mtime, member.mtime))
                    records[path] = (size, digest.hexdigest())
            while proc.stdout.read(1 << 16):  # the end-of-archive padding tarfile left
                pass
        except (tarfile.TarError, EOFError) as exc:
            proc.wait()
            err.seek(0)
            why = err.read().decode(errors="replace").strip().splitlines()
            raise QemuError(f"cannot unpack {deb.name}: {why[-1] if why else exc}") from None
        proc.wait()
    if proc.returncode != 0:
        raise QemuError(f"dpkg-deb --fsys-tarfile {deb.name} failed (exit {proc.returncode})")
    return records, listing


def _holds(listing: list[str]) -> str:
    """'usr/src/linux-headers-X/… (N files)': where most of a package's files are."""
    if not listing:
        return "no files"
    dirs = Counter("/".join(p.split("/")[:-1][:3]) or "." for p in listing)
    top, count = dirs.most_common(1)[0]
    total = len(listing)
    return f"{top}/… ({count} files)" if count == total else f"{top}/… ({count} of {total} files)"


def _layout(root: Path, spec: str, listing: list[str], plan: Plan) -> dict[str, str]:
    """Release, image and modules dir (relative to ROOT's parent) of an unpacked kernel."""
    found: list[tuple[str, Path]] = [
        (p.name.removeprefix("vmlinuz-"), p) for p in sorted(root.glob("boot/vmlinuz-*"))
    ]
    for pattern in ("usr/lib/modules/*/vmlinuz", "lib/modules/*/vmlinuz"):
        found += [(p.parent.name, p) for p in sorted(root.glob(pattern))]
    if not found:
        holds = _holds(listing)
        if not listing and plan.package.depends:  # a meta package of another kind
            holds += f" (depends on {', '.join(d.name for d in plan.package.depends)})"
        raise QemuError(f"{spec} is not a kernel image package: it holds {holds}, no vmlinuz")
    release, image = found[0]
    for modules in (root / "usr/lib/modules" / release, root / "lib/modules" / release):
        if modules.is_dir() and any(modules.rglob("*.ko*")):
            break
    else:
        raise QemuError(f"{spec} has a kernel image but no modules for {release} "
                        "(try its linux-image-* package)")
    base = root.parent
    return {"release": release, "image": str(image.relative_to(base)),
            "modules": str(modules.relative_to(base))}


# --------------------------------------------------------------------------
# the cache entry


def fetch_debian(
    package: str, *, suite: str | None = None, cache: Path | None = None, spec: str | None = None
) -> Kernel:
    """The Kernel of debian:PACKAGE[@SUITE], fetched and unpacked once.

    SPEC is the spec as the user gave it (reported as 'resolved from' when
    it names a meta package).  Locked with flock per entry (parallel workers
    wait for one download); atomic (unpacked into a temp dir, then renamed);
    checked on every use and fetched again if damaged.
    """
    root = cache or cache_root()
    given = spec or debian_spec(package, suite)
    entry = Entry(root / "kernels" / entry_key(package, suite))
    apt = Apt(suite, root)
    if (entry.path / META).is_file():
        return _ensure(entry, apt, None, given)  # fast path: no apt at all
    def cached(name: str, version: str) -> bool:
        try:
            meta = Entry(root / "kernels" / entry_key(name, suite)).meta()
        except (OSError, ValueError):
            return False
        return meta.get("version") == version

    plan = apt.plan(package, cached)
    entry = Entry(root / "kernels" / entry_key(plan.package.name, suite))
    return _ensure(entry, apt, plan, given)


def _ensure(entry: Entry, apt: Apt, plan: Plan | None, given: str) -> Kernel:
    """ENTRY as a Kernel: verified, or (re)fetched under its lock."""
    with locked(entry.lock_path) as lock:
        exists = (entry.path / META).is_file()
        problem = entry.problem() if exists else None
        if exists and problem is None:
            meta = entry.meta()
            if plan is None or plan.package.version == meta["version"]:
                return _kernel(entry, meta, given)
            note(f"{given} now names {plan.package.name} {plan.package.version}; "
                 f"cache entry {entry.key} holds {meta['version']}: fetching it")
        elif exists:
            state = ("has no integrity record (an older kvmtest fetched it)"
                     if entry.legacy() else f"is damaged ({problem})")
            note(f"cache entry {entry.key} {state}: fetching it again")
        try:
            if plan is None:
                plan = _replan(entry, apt)
            elif not plan.complete:
                plan = apt.plan(plan.chain[0])
            _fetch(entry, apt, plan, given)
        except BaseException:
            if not entry.path.exists():
                lock.discard = True  # no entry: no lock left behind
            raise
        return _kernel(entry, entry.meta(), given)


def _replan(entry: Entry, apt: Apt) -> Plan:
    """The plan to fetch ENTRY again: the recorded .debs, else ask apt."""
    try:
        meta = entry.meta()
        debs = [PkgInfo(d["package"], d["version"], (), d["size"], d["installed_size"])
                for d in meta["debs"]]
        chain = meta.get("chain", [])
        return Plan(PkgInfo(meta["package"], meta["version"], (), 0, 0), (), chain, debs)
    except (OSError, ValueError, KeyError, TypeError):
        return apt.plan(entry.key.partition("@")[0])


def _fetch(entry: Entry, apt: Apt, plan: Plan, given: str) -> None:
    base = entry.path.parent
    prefix = f".unpack-{entry.key}-"
    for stale in base.glob(f"{prefix}*"):  # a killed earlier attempt (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    spec = debian_spec(plan.package.name, apt.suite)
    what = f"debian:{plan.package.name}"
    apt.expand(plan)
    require_space(base, plan.needed, what)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the kernel from other users
        try:
            debs = apt.download(plan.debs, tmp / "debs")
        except _DownloadFailed:
            if apt.updated:
                raise
            apt.update()  # the archive moved on (e.g. a security update)
            plan = apt.plan(given.removeprefix("debian:").partition("@")[0])
            apt.expand(plan)
            debs = apt.download(plan.debs, tmp / "debs")
        records: dict[str, Record] = {}
        listing: list[str] = []
        for deb in debs:
            got, names = unpack(deb, tmp / "root")
            records.update({f"root/{p}": r for p, r in got.items()})
            listing += names
            deb.unlink()  # the unpacked files are all we need
        shutil.rmtree(tmp / "debs")
        layout = _layout(tmp / "root", given if given == spec else f"{given} ({spec})", listing,
                         plan)
        meta = {
            # package/version/release/image/modules: read by older kvmtest too
            "format": FORMAT,
            "package": plan.package.name,
            "version": plan.package.version,
            "suite": apt.suite,
            **layout,
            "debs": [{"package": d.name, "version": d.version, "size": d.size,
                      "installed_size": d.installed_size} for d in plan.debs],
            "chain": plan.chain,
            "aliases": _aliases(entry, given, spec),
            "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        files = {"files": sorted([rel, *rec] for rel, rec in records.items())}
        (tmp / FILES).write_text(json.dumps(files) + "\n")
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
        _swap(tmp, entry.path)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in NO_SPACE:
            raise no_space(base, plan.needed, what) from None
        raise QemuError(f"cannot cache {what} in {base}: {exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _aliases(entry: Entry, given: str, spec: str) -> list[str]:
    """Specs that resolved to ENTRY: the old entry's (when fetching it again) + GIVEN."""
    try:
        aliases = list(entry.meta().get("aliases", []))
    except (OSError, ValueError):
        aliases = []
    return [*aliases, given] if given != spec and given not in aliases else aliases


def _swap(new: Path, final: Path) -> None:
    """Put NEW in FINAL's place; a reader sees the old or the new entry, never half."""
    if not final.exists():
        os.rename(new, final)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".trash-{final.name}-", dir=final.parent))
    os.rename(final, trash / "old")
    os.rename(new, final)
    shutil.rmtree(trash, ignore_errors=True)


def _kernel(entry: Entry, meta: dict, given: str) -> Kernel:
    kernel = kernel_of(entry, meta, given)
    if kernel.resolved_from and given not in meta.get("aliases", []):
        meta["aliases"] = [*meta.get("aliases", []), given]
        with contextlib.suppress(QemuError, OSError):  # a note for `cache list`, not vital
            atomic_write(entry.path / META, (json.dumps(meta, indent=1) + "\n").encode())
    entry.touch()
    return kernel


def kernel_of(entry: Entry, meta: dict | None = None, given: str | None = None) -> Kernel:
    """The Kernel an entry describes (no checks: see Entry.problem)."""
    meta = meta or entry.meta()
    spec = debian_spec(meta["package"], _suite(entry, meta))
    image = entry.path / meta["image"]
    return Kernel(
        image=image,
        release=meta["release"],
        modules_dir=entry.path / meta["modules"],
        spec=spec,
        package_version=meta["version"],
        banner=image_banner(image) if image.is_file() else "",
        package=meta["package"],
        resolved_from=given if given and given != spec else None,
    )


def refetch(entry: Entry, root: Path) -> None:
    """Fetch ENTRY again (kvmtest cache verify --repair)."""
    meta = entry.meta()
    apt = Apt(_suite(entry, meta), root)
    with locked(entry.lock_path):
        _fetch(entry, apt, _replan(entry, apt), debian_spec(meta["package"], apt.suite))


def _suite(entry: Entry, meta: dict) -> str | None:
    # Entries of older kvmtest versions have no "suite": it is in the key.
    return meta["suite"] if "suite" in meta else (entry.key.partition("@")[2] or None)

