"""The guest's Python: the host's interpreter, trimmed to what the agent imports.

The guest sees none of the host's filesystem.  Its initramfs carries this
runtime, a newc cpio built on the host and cached by content:

    /lib64/ld-linux-x86-64.so.2           the interpreter's PT_INTERP, same path
    /opt/kvmtest/bin/python3              sys.executable (stripped copy)
    /opt/kvmtest/lib/*.so*                its DT_NEEDED closure (libpython stripped)
    /opt/kvmtest/lib/python3.11/          the stdlib modules the agent imports,
                                          as sourceless .pyc, lib-dynload/*.so,
                                          _cffi_backend, and the kvmtest package
                                          (.pyc, _kvm_cffi*.so, payloads)

Python finds its prefix from the landmark ``lib/python3.11/os.pyc`` next to
``bin/``, so it runs with ``-S -I`` (no site, no environment, no user dirs):
nothing outside /opt/kvmtest is ever on its path.  /init sets
LD_LIBRARY_PATH=/opt/kvmtest/lib for the shared libraries.

The stdlib closure is found by importing the guest's entry modules
(GUEST_ENTRY) in a fresh host interpreter with the same flags and listing
``sys.modules``; kvmtest itself is shipped whole so that a lazily imported
kvmtest module (a new scenario, a generated case) is always there.  The
cache key covers the interpreter files, the kvmtest sources and payloads,
and this builder, so editing kvmtest rebuilds the runtime on next use.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import marshal
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kvmtest.qemu.errors import QemuError
from kvmtest.qemu.initramfs import CpioWriter
from kvmtest.qemu.kernels import atomic_write, cache_root, locked

GUEST_PREFIX = "/opt/kvmtest"
GUEST_PYTHON = f"{GUEST_PREFIX}/bin/python3"
GUEST_LIBDIR = f"{GUEST_PREFIX}/lib"
PY_VERSION = f"python{sys.version_info.major}.{sys.version_info.minor}"
GUEST_STDLIB = f"{GUEST_LIBDIR}/{PY_VERSION}"
# What the guest imports at start-up; their closure is the shipped stdlib.
GUEST_ENTRY = ("kvmtest.agent",)
# Debugging aid: more stdlib modules for the guest, e.g. "cProfile,pstats".
EXTRA_ENV = "KVMTEST_RUNTIME_EXTRA"
KEEP_RUNTIMES = 4  # older cached runtimes are deleted
_LDD_LINE = re.compile(r"^\s*(\S+)(?: => (\S+))? \(0x[0-9a-f]+\)$")


@dataclass(frozen=True)
class Runtime:
    """A built runtime archive and what it holds."""

    archive: Path
    key: str
    files: int
    size: int


def host_sources() -> tuple[Path, Path, Path]:
    """(interpreter, kvmtest package dir, _cffi_backend extension) on the host."""
    import _cffi_backend

    import kvmtest

    return (
        Path(os.path.realpath(sys.executable)),
        Path(kvmtest.__file__).resolve().parent,
        Path(_cffi_backend.__file__).resolve(),
    )


def _kvmtest_files(package: Path) -> list[Path]:
    """Everything of the kvmtest package the guest may load."""
    from kvmtest.payloads import load_payload

    load_payload("vmrun")  # builds stale payloads on the host (the guest cannot)
    out = []
    for path in sorted(package.rglob("*")):
        rel = path.relative_to(package)
        if "__pycache__" in rel.parts or not path.is_file():
            continue
        binding = path.name.startswith("_kvm_cffi") and path.suffix == ".so"
        payload = rel.parts[0] == "payloads" and path.suffix in (".bin", ".json")
        if path.suffix == ".py" or binding or payload:
            out.append(path)
    return out


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def entry_modules() -> tuple[str, ...]:
    extra = [m for m in os.environ.get(EXTRA_ENV, "").split(",") if m]
    return (*GUEST_ENTRY, *extra)


def runtime_key() -> str:
    """Content key of the runtime this host would build now."""
    interpreter, package, cffi = host_sources()
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(",".join(entry_modules()).encode())
    digest.update(Path(__file__).with_name("initramfs.py").read_bytes())  # CpioWriter
    for path in (interpreter, cffi, *Path(sys.prefix, "lib").glob("libpython*.so*")):
        digest.update(_stat_key(path).encode())
    for path in _kvmtest_files(package):
        digest.update(str(path.relative_to(package)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def build_runtime(*, cache: Path | None = None) -> Runtime:
    """The cached runtime archive, built when the key changed."""
    key = runtime_key()
    directory = (cache or cache_root()) / "runtime"
    target = directory / f"python-{key}.cpio"
    with locked(directory / ".lock"):
        if not target.is_file():
            atomic_write(target, _build(key, directory))
            _prune(directory, keep=target)
    size = target.stat().st_size
    meta = directory / f"python-{key}.json"
    files = json.loads(meta.read_text())["files"] if meta.is_file() else 0
    return Runtime(target, key, files, size)


def _prune(directory: Path, keep: Path) -> None:
    archives = sorted(directory.glob("python-*.cpio"), key=lambda p: p.stat().st_mtime)
    for old in archives[:-KEEP_RUNTIMES]:
        if old != keep:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)


# --------------------------------------------------------------------------
# discovery


# Imports the entry modules and records the source text that dataclasses
# (exec) and namedtuple (eval) compile while they are imported.
_PROBE = """
import builtins, collections, dataclasses, json, sys
sources = []
def record(kind, real):
    def run(source, *args):
        if type(source) is str:
            sources.append([kind, source])
        return real(source, *args)
    return run
dataclasses.exec = record("exec", builtins.exec)
collections.eval = record("eval", builtins.eval)
for name in sys.argv[1:]:
    __import__(name)
modules = {n: getattr(m, "__file__", None) for n, m in sys.modules.items()}
print(json.dumps({"modules": modules, "sources": sources}))
"""

# The guest's entry point (GUEST_BOOT_MODULE): replays the recorded compiles
# from CODE_CACHE, then runs the agent.  Under TCG, compiling the ~150 small
# functions dataclasses generate costs about a third of the agent's imports;
# a code object compiled on the host from the same text by the same Python
# is what exec/eval would have compiled (a text not in the cache compiles).
GUEST_BOOT_MODULE = "_kvmtest_boot"
CODE_CACHE = f"{GUEST_STDLIB}/_kvmtest_codecache.marshal"
BOOT_SOURCE = f"""
import builtins, marshal, sys


def _replay():
    try:
        with open({CODE_CACHE!r}, "rb") as f:
            codes = marshal.load(f)
    except OSError:
        return
    import collections, dataclasses

    def cached(kind, real):
        def run(source, *args):
            code = codes.get((kind, source)) if type(source) is str else None
            return real(source if code is None else code, *args)
        return run
    dataclasses.exec = cached("exec", builtins.exec)
    collections.eval = cached("eval", builtins.eval)


_replay()
from kvmtest.agent import main
_status = main()
# The interpreter's finalization (tens of ms under TCG) has nothing to do:
# channel writes are unbuffered, and /init reads only the exit status.
sys.stdout.flush()
sys.stderr.flush()
import os
os._exit(_status)
"""
# -c, not -m: runpy and its imports are not needed (nor shipped).
GUEST_AGENT = (GUEST_PYTHON, "-S", "-I", "-c", f"import {GUEST_BOOT_MODULE}")


def code_cache(sources: list[list[str]]) -> bytes:
    """{(kind, text): code} for the recorded compiles, as the guest loads it."""
    codes = {}
    for kind, text in sources:
        codes[(kind, text)] = compile(text, "<string>", kind, dont_inherit=True)
    return marshal.dumps(codes)


def imported_modules(package: Path, cffi: Path) -> tuple[dict[str, str | None], list]:
    """(name -> file of every module the entry modules import, recorded
    compiles), in a fresh interpreter run like the guest's (-S -I, only the
    kvmtest and cffi roots on the path)."""
    roots = [str(package.parent), str(cffi.parent)]
    code = f"import sys; sys.path[:0] = {roots!r}\n{_PROBE}"
    proc = subprocess.run(
        [sys.executable, "-S", "-I", "-c", code, *entry_modules()],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise QemuError(f"cannot import the guest agent on the host: {tail[0]}")
    data = json.loads(proc.stdout)
    return data["modules"], data["sources"]


def shared_libraries(elf: Path) -> list[tuple[str, Path]]:
    """(soname, host path) of ELF's dynamic dependencies, the loader included."""
    proc = subprocess.run(["ldd", str(elf)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        if "not a dynamic executable" in proc.stdout + proc.stderr:
            return []
        raise QemuError(f"ldd {elf} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    out = []
    for line in proc.stdout.splitlines():
        match = _LDD_LINE.match(line)
        if match is None:
            if "not found" in line:
                raise QemuError(f"{elf}: shared library {line.split()[0]} not found")
            continue
        name, path = match.group(1), match.group(2)
        if name.startswith("linux-vdso") or (path is None and not name.startswith("/")):
            continue
        out.append((name, Path(path or name)))
    return out


# --------------------------------------------------------------------------
# the archive


def _pyc(source: Path, guest_path: str) -> bytes:
    """A sourceless .pyc (unchecked: the archive is rebuilt when sources change)."""
    code = compile(source.read_bytes(), guest_path, "exec", dont_inherit=True)
    flags = (0).to_bytes(4, "little")
    return importlib.util.MAGIC_NUMBER + flags + bytes(8) + marshal.dumps(code)


def _strip(path: Path, workdir: Path) -> bytes:
    """PATH without symbols and debug info (libpython: 23 MB -> ~4 MB), or as is."""
    strip = shutil.which("strip")
    if strip is None:
        return path.read_bytes()
    out = workdir / f"stripped-{path.name}"
    proc = subprocess.run(
        [strip, "--strip-unneeded", "-o", str(out), str(path)], capture_output=True, check=False
    )
    return out.read_bytes() if proc.returncode == 0 else path.read_bytes()


def _build(key: str, directory: Path) -> bytes:
    interpreter, package, cffi = host_sources()
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    dynload = Path(sysconfig.get_paths()["platstdlib"]).resolve() / "lib-dynload"
    modules, sources = imported_modules(package, cffi)
    cpio = CpioWriter()
    files = 0
    elves: list[Path] = [interpreter]
    with tempfile.TemporaryDirectory(prefix="kvmtest-runtime-") as tmp:
        work = Path(tmp)

        def add(name: str, data: bytes, mode: int = 0o644) -> None:
            nonlocal files
            cpio.add_file(name, data, mode)
            files += 1

        add(f"{GUEST_PREFIX}/bin/python3", _strip(interpreter, work), 0o755)
        add(CODE_CACHE, code_cache(sources))
        boot = work / f"{GUEST_BOOT_MODULE}.py"
        boot.write_text(BOOT_SOURCE)
        add(f"{GUEST_STDLIB}/{GUEST_BOOT_MODULE}.pyc",
            _pyc(boot, f"{GUEST_STDLIB}/{GUEST_BOOT_MODULE}.py"))
        # stdlib landmark: getpath looks for lib/pythonX.Y/os.py[c].
        add(f"{GUEST_STDLIB}/os.pyc", _pyc(stdlib / "os.py", f"{GUEST_STDLIB}/os.py"))
        for name, file in sorted(modules.items(), key=lambda item: item[0]):
            if file is None or name == "__main__":
                continue
            path = Path(file).resolve()
            if path.is_relative_to(package):
                continue  # the whole package is added below
            if path == cffi:
                add(f"{GUEST_STDLIB}/{path.name}", _strip(path, work), 0o755)
                elves.append(path)
            elif path.is_relative_to(dynload):
                add(f"{GUEST_STDLIB}/lib-dynload/{path.name}", _strip(path, work), 0o755)
                elves.append(path)
            elif path.is_relative_to(stdlib) and path.suffix == ".py":
                rel = path.relative_to(stdlib).with_suffix(".py").as_posix()
                if rel == "os.py":
                    continue
                add(f"{GUEST_STDLIB}/{rel}c", _pyc(path, f"{GUEST_STDLIB}/{rel}"))
            else:
                raise QemuError(f"the guest agent imports {name} from {path}, outside the "
                                f"stdlib ({stdlib}) and kvmtest: cannot ship it")
        for path in _kvmtest_files(package):
            rel = Path("kvmtest") / path.relative_to(package)
            if path.suffix == ".py":
                add(f"{GUEST_STDLIB}/{rel.with_suffix('.pyc').as_posix()}",
                    _pyc(path, f"{GUEST_STDLIB}/{rel.as_posix()}"))
            elif path.suffix == ".so":
                add(f"{GUEST_STDLIB}/{rel.as_posix()}", _strip(path, work), 0o755)
                elves.append(path)
            else:
                add(f"{GUEST_STDLIB}/{rel.as_posix()}", path.read_bytes())
        seen: set[str] = set()
        for elf in elves:
            for soname, lib in shared_libraries(elf):
                if soname in seen:
                    continue
                seen.add(soname)
                if soname.startswith("/"):  # the loader, at its PT_INTERP path
                    add(soname, lib.read_bytes(), 0o755)
                else:
                    add(f"{GUEST_LIBDIR}/{soname}", _strip(lib.resolve(), work), 0o755)
    data = cpio.finish()
    meta = directory / f"python-{key}.json"
    atomic_write(meta, json.dumps({"files": files, "modules": sorted(modules)}).encode())
    return data
