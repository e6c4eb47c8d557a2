"""`kvmtest cache list|verify|prune`: look after the kernel cache.

The cache is $KVMTEST_CACHE or ~/.cache/kvmtest (layout: kvmtest.qemu.cache).
Exit codes: 0 done (verify: every entry intact), 1 verify found damage
(named on stdout; repaired with --repair, then 0 if every repair worked),
2 usage error, 3 environment error (a repair that could not fetch).
Module rebuild caches (src/, kmod/) belong to `kvmtest kmod` and are only
counted here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .qemu.cache import (
    Entry,
    cache_root,
    check_sidecar,
    entries,
    is_held,
    locked,
    mb,
)
from .qemu.errors import QemuError

EXIT_OK, EXIT_DAMAGED, EXIT_USAGE, EXIT_ENV = 0, 1, 2, 3
DERIVED = ("vmlinux", "initramfs")
STALE_TMP = 3600.0  # an atomic_write temp file older than this was abandoned


def add_command(sub) -> None:
    p = sub.add_parser("cache", help="list, verify or prune the kernel cache",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=main)
    csub = p.add_subparsers(dest="cache_cmd", required=True)
    q = csub.add_parser("list", help="cached kernels: spec, package, version, size, last used")
    q.add_argument("--json", action="store_true")
    q.set_defaults(cache_func=cmd_list)
    q = csub.add_parser("verify", help="check every cached file against its sha256")
    q.add_argument("--repair", action="store_true", help="fetch damaged entries again")
    q.set_defaults(cache_func=cmd_verify)
    q = csub.add_parser("prune", help="remove unused entries and leftovers")
    which = q.add_mutually_exclusive_group()
    which.add_argument("--older-than", type=float, metavar="DAYS",
                       help="also remove kernels not used for DAYS days")
    which.add_argument("--all", action="store_true", help="remove every kernel")
    q.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    q.set_defaults(cache_func=cmd_prune)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _age(seconds_since_epoch: float) -> str:
    days = (time.time() - seconds_since_epoch) / 86400
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds_since_epoch))
    return f"{stamp} ({days:.0f} d ago)" if days >= 1 else f"{stamp} (today)"


# --------------------------------------------------------------------------
# list


def _describe(entry: Entry) -> dict:
    from .qemu.debian import debian_spec

    try:
        meta = entry.meta()
    except (OSError, ValueError):
        meta = {}
    suite = meta.get("suite", entry.key.partition("@")[2] or None)
    return {
        "spec": debian_spec(entry.key.partition("@")[0], suite),
        "package": meta.get("package"),
        "version": meta.get("version"),
        "release": meta.get("release"),
        "resolved_from": meta.get("aliases", []),
        "size": _size(entry.path),
        "last_used": entry.last_used(),
        "integrity_record": not entry.legacy(),
        "path": str(entry.path),
    }


def cmd_list(args: argparse.Namespace) -> int:
    root = cache_root()
    rows = [_describe(e) for e in entries(root)]
    other = {d.name: _size(d) for d in sorted(root.iterdir()) if d.is_dir()
             and d.name != "kernels"} if root.is_dir() else {}
    if args.json:
        print(json.dumps({"cache": str(root), "kernels": rows, "other": other}, indent=1))
        return EXIT_OK
    print(f"cache {root}")
    width = max([len(r["spec"]) for r in rows] + [4])
    pwidth = max([len(f"{r['package']} {r['version']}") for r in rows] + [17])
    print(f"{'spec':<{width}}  {'package version':<{pwidth}}  {'size':>8}  last used")
    for r in rows:
        what = f"{r['package']} {r['version']}"
        print(f"{r['spec']:<{width}}  {what:<{pwidth}}  {mb(r['size']):>8}  {_age(r['last_used'])}")
        for alias in r["resolved_from"]:
            print(f"{'':<{width}}  also as {alias}")
        if not r["integrity_record"]:
            print(f"{'':<{width}}  no integrity record (older kvmtest): fetched again on use")
    if not rows:
        print("(no kernels)")
    if other:
        print("other: " + ", ".join(f"{name} {mb(size)}" for name, size in other.items()))
    return EXIT_OK


# --------------------------------------------------------------------------
# verify


def cmd_verify(args: argparse.Namespace) -> int:
    from .qemu.debian import refetch

    root = cache_root()
    damaged = checked = 0
    failed_repairs = 0
    for entry in entries(root):
        checked += 1
        with locked(entry.lock_path):
            problem = entry.problem(full=True)
            legacy = entry.legacy()
        if problem is None:
            print(f"ok       {entry.key}")
            continue
        if legacy:
            print(f"LEGACY   {entry.key}: {problem} (fetched again on its next use)")
            continue
        damaged += 1
        print(f"DAMAGED  {entry.key}: {problem}")
        if args.repair:
            try:
                refetch(entry, root)
                print(f"repaired {entry.key}")
            except QemuError as exc:
                failed_repairs += 1
                print(f"kvmtest: error: repairing {entry.key}: {exc}", file=sys.stderr)
    vmlinux = root / "vmlinux"
    for elf in sorted(vmlinux.glob("*.elf")) if vmlinux.is_dir() else []:
        checked += 1
        problem = check_sidecar(elf)
        if problem is None:
            print(f"ok       vmlinux/{elf.name}")
        elif problem == "no integrity record":
            print(f"LEGACY   vmlinux/{elf.name}: {problem} (extracted again on its next use)")
        else:
            damaged += 1
            print(f"DAMAGED  vmlinux/{elf.name}: {problem}")
            if args.repair:  # re-extracted from the kernel image on its next use
                _remove(elf, dry_run=False)
                _remove(elf.with_name(elf.name + ".sha256"), dry_run=False)
                print(f"removed  vmlinux/{elf.name} (extracted again on its next use)")
    print(f"{checked} checked, {damaged} damaged")
    if failed_repairs:
        return EXIT_ENV
    return EXIT_DAMAGED if damaged and not args.repair else EXIT_OK


# --------------------------------------------------------------------------
# prune


@dataclass
class Pruner:
    dry_run: bool
    freed: int = 0
    removed: set[Path] = field(default_factory=set)

    def gone(self, path: Path) -> bool:
        """True if PATH was (or, with --dry-run, would have been) removed."""
        return path in self.removed

    def remove(self, path: Path, why: str) -> None:
        self.removed.add(path)
        size = _size(path) if path.exists() else 0
        self.freed += size
        verb = "would remove" if self.dry_run else "removed"
        print(f"{verb} {path} ({why}, {mb(size)})")
        _remove(path, dry_run=self.dry_run)


def _remove(path: Path, *, dry_run: bool) -> None:
    if dry_run:
        return
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def cmd_prune(args: argparse.Namespace) -> int:
    from .qemu.debian import kernel_of
    from .qemu.pvh import vmlinux_name

    root = cache_root()
    pruner = Pruner(args.dry_run)
    cutoff = None if args.older_than is None else time.time() - args.older_than * 86400
    kept: list[Entry] = []
    for entry in entries(root):
        old = args.all or (cutoff is not None and entry.last_used() < cutoff)
        if not old:
            kept.append(entry)
            continue
        try:
            with locked(entry.lock_path, blocking=False) as lock:
                pruner.remove(entry.path, "--all" if args.all else "not used lately")
                lock.discard = not args.dry_run
        except BlockingIOError:
            print(f"kept {entry.path} (in use)")
            kept.append(entry)
    kernels = root / "kernels"
    if kernels.is_dir():
        _prune_leftovers(kernels, pruner)
    # Derived files: keep those of the kernels still cached.
    releases, stems = set(), set()
    for entry in kept:
        with contextlib.suppress(OSError, ValueError, KeyError, QemuError):
            kernel = kernel_of(entry)
            releases.add(kernel.release)
            stems.add(vmlinux_name(kernel))
    _prune_derived(root / "vmlinux", pruner, lambda name, release: _stem(name) in stems)
    _prune_derived(root / "initramfs", pruner, lambda name, release: release in releases)
    if args.all and (root / "apt").is_dir():
        pruner.remove(root / "apt", "--all: private apt states")
    print(f"{'would free' if args.dry_run else 'freed'} {mb(pruner.freed)}")
    return EXIT_OK


def _prune_leftovers(kernels: Path, pruner: Pruner) -> None:
    """Half-made entries (.unpack-*), swapped-out ones (.trash-*) and orphan locks."""
    for path in sorted(kernels.iterdir()):
        name = path.name
        for prefix in (".unpack-", ".trash-"):
            if name.startswith(prefix) and path.is_dir():
                key = name[len(prefix):].rsplit("-", 1)[0]  # mkdtemp's random suffix
                if not is_held(kernels / f"{key}.lock"):
                    pruner.remove(path, "left by an interrupted fetch")
        if name.endswith(".lock") and not (kernels / name[:-5]).is_dir():
            _remove_lock(path, pruner)


def _remove_lock(path: Path, pruner: Pruner) -> None:
    try:
        with locked(path, blocking=False) as lock:
            print(f"{'would remove' if pruner.dry_run else 'removed'} {path} (orphan lock)")
            lock.discard = not pruner.dry_run
    except BlockingIOError:
        pass


def _stem(name: str) -> str:
    for suffix in (".elf.sha256", ".elf", ".nopvh", ".cpio"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _prune_derived(directory: Path, pruner: Pruner, used) -> None:
    """Remove files of DIRECTORY (vmlinux/, initramfs/) no cached kernel uses."""
    if not directory.is_dir():
        return
    for path in sorted(directory.iterdir()):
        name = path.name
        if name.startswith(".tmp-"):
            if time.time() - path.stat().st_mtime > STALE_TMP:
                pruner.remove(path, "abandoned temp file")
            continue
        if name.endswith(".lock"):
            continue
        release = _stem(name).rsplit("-", 1)[0]
        if used(name, release):
            continue
        if is_held(directory / f"{release}.lock"):
            print(f"kept {path} (in use)")
        else:
            pruner.remove(path, "no cached kernel uses it")
    for lock in sorted(directory.glob("*.lock")):
        release = lock.name[:-5]
        if not any(p.name.startswith(f"{release}-") and p.exists() and not pruner.gone(p)
                   for p in directory.iterdir()):
            _remove_lock(lock, pruner)


def main(args: argparse.Namespace) -> int:
    try:
        return args.cache_func(args)
    except QemuError as exc:
        print(f"kvmtest: error: {exc}", file=sys.stderr)
        return EXIT_ENV
