"""The guest's initramfs: busybox, /init, the channel and kvm modules, Python.

The initrd handed to QEMU is the concatenation of newc cpio archives (the
kernel unpacks them in order):

* a **base** archive, cached per kernel release + content: busybox-static,
  /init, and the virtio transport + virtio_console modules of the channel;
* the **runtime** archive (kvmtest.qemu.runtime): the Python interpreter,
  the stdlib modules the agent imports and the kvmtest package, cached by
  content and shared by every kernel;
* a small **per-boot** archive: the kvm modules (the kernel's own or an
  override directory's, e.g. a rebuilt kvm.ko/kvm-amd.ko), their insmod
  parameters, the command to run and its environment, extra files.

Nothing of the host's filesystem is visible in the guest: no 9p, no block
device.  The only way out is the virtio-serial port named
``channel.PORT_NAME`` (line-framed JSON, see kvmtest.qemu.channel) and the
serial console.  The kvm modules travel in the initrd, compressed ones
(.ko.xz/.ko.zst) decompressed on the host so busybox insmod never has to.
The cpio is written in Python (no cpio tool needed) and left uncompressed:
under TCG, inflating it in the guest would cost more than reading it.
"""

from __future__ import annotations

import hashlib
import shlex
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from kvmtest.qemu.channel import PORT_NAME
from kvmtest.qemu.errors import QemuError
from kvmtest.qemu.kernels import (
    Kernel,
    ModuleTree,
    atomic_write,
    cache_root,
    locked,
    read_module,
)

BUSYBOX_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))
# The channel: a virtio transport plus virtio_console; dependencies come from
# .modinfo.  virtio_pci serves -machine pc/q35, virtio_mmio -machine microvm;
# /init skips the transport of the other machine type (config SKIP_MODULES).
# Built-in ones (7.x has virtio_console built in) are skipped.
BASE_MODULES = ("virtio_pci", "virtio_mmio", "virtio_console")
OPTIONAL_BASE_MODULES = frozenset({"virtio_mmio", "virtio_pci"})
TRANSPORT_MODULES = {
    "pci": ("virtio_pci", "virtio_pci_modern_dev", "virtio_pci_legacy_dev"),
    "mmio": ("virtio_mmio",),
}
# kvm_amd pulls kvm, irqbypass and (with SEV) ccp through its depends= field.
KVM_MODULES = ("kvm_amd",)
FATAL = "KVMTEST-FATAL"
OUTPUT_CAP = 64 * 1024  # bytes of the command's stdout/stderr sent back

# /init, run by the kernel as PID 1.  It reports on the channel (fd 3, the
# virtio port) as soon as that exists; before that, and for a failure to
# open it, on the console ("KVMTEST-FATAL ...").  Every failure ends in
# poweroff: a stuck guest would only be reaped by the host's watchdog.
# Text that goes into a JSON string passes through `clean` (a character set
# that needs no JSON escaping).
INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /bin /proc /sys /dev /tmp /run
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1

uptime_s() { read -r up idle </proc/uptime; echo "$up"; }
halt_guest() { sync; poweroff -f; reboot -f; echo o >/proc/sysrq-trigger; }
clean() { echo "$*" | tr '\n' ' ' | tr -cd 'A-Za-z0-9 _.,:;()=/+@%<>|#-' | head -c 2000; }
send() { [ -n "$CH" ] && echo "$1" >&3; }
mark() { send "{\"t\":\"mark\",\"stage\":\"$1\",\"uptime\":${2:-$(uptime_s)}}"; }
fatal() {
    echo "KVMTEST-FATAL $*"
    send "{\"t\":\"fatal\",\"message\":\"$(clean "$*")\"}"
    dmesg | tail -n 20
    halt_guest
}

T_INIT=$(uptime_s)
. /lib/kvmtest/config

# 1. the channel: virtio transport + virtio_console, then the named port.
while read -r name file; do
    case " $SKIP_MODULES " in *" $name "*) continue ;; esac
    insmod "/lib/kvmtest/base/$file" || fatal "insmod $name failed"
done </lib/kvmtest/base.list
CH=
n=0
while [ -z "$CH" ]; do
    for f in /sys/class/virtio-ports/*/name; do
        d=${f%/name}
        [ -r "$f" ] && [ "$(cat "$f")" = "$PORT_NAME" ] && CH="/dev/${d##*/}"
    done
    [ -n "$CH" ] && break
    n=$((n + 1))
    [ "$n" -gt 500 ] && fatal "virtio port $PORT_NAME did not appear"
    sleep 0.01
done
exec 3<>"$CH" || { CH=; fatal "cannot open $CH"; }
mark init "$T_INIT"
mark channel

# 2. kvm modules, each line: name status file [params...]
while read -r name status file params; do
    if [ "$status" != load ]; then
        send "{\"t\":\"module\",\"name\":\"$name\",\"status\":\"$status\"}"
        continue
    fi
    if err=$(insmod "/lib/kvmtest/kvm/$file" $params 2>&1); then
        send "{\"t\":\"module\",\"name\":\"$name\",\"status\":\"ok\",\"detail\":\"$params\"}"
    else
        detail=$(clean "$err | $(dmesg | tail -n 3)")
        send "{\"t\":\"module\",\"name\":\"$name\",\"status\":\"error\",\"detail\":\"$detail\"}"
    fi
done </lib/kvmtest/kvm.list
if [ -c /dev/kvm ]; then kvm=true; else kvm=false; fi
send "{\"t\":\"dev_kvm\",\"present\":$kvm}"
mark modules

# 3. the command (fd 3 stays open: the agent talks on it)
cd /tmp
/bin/sh /lib/kvmtest/cmd </dev/null >/tmp/.stdout 2>/tmp/.stderr
rc=$?
mark command-end
for stream in stdout stderr; do
    if [ -s "/tmp/.$stream" ]; then
        hex=$(head -c "$OUTPUT_CAP" "/tmp/.$stream" | xxd -p | tr -d '\n')
        send "{\"t\":\"output\",\"stream\":\"$stream\",\"hex\":\"$hex\"}"
    fi
done
send "{\"t\":\"exit\",\"rc\":$rc}"
halt_guest
"""


@dataclass(frozen=True)
class BootConfig:
    """Everything the per-boot archive carries to /init."""

    kvm_amd_params: Mapping[str, str]
    kvm_params: Mapping[str, str]
    command: Sequence[str]  # run in the guest, in /tmp, with ENV only
    env: Mapping[str, str] = field(default_factory=dict)
    kvm_modules_dir: Path | None = None
    transport: str = "pci"  # virtio transport of the machine type: pci or mmio
    files: Mapping[str, bytes] = field(default_factory=dict)  # extra guest files (tests)


# --------------------------------------------------------------------------
# cpio (newc)


class CpioWriter:
    """Minimal newc cpio writer: directories and regular files, root-owned."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._ino = 1
        self._dirs: set[str] = set()

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        fields = [
            self._ino,
            mode,
            0,
            0,
            2 if mode & 0o040000 else 1,
            0,
            len(data),
            0,
            0,
            rdev[0],
            rdev[1],
            len(name) + 1,
            0,
        ]
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        self._ino += 1
        self._append(header + name.encode() + b"\0")
        self._append(data)

    def _append(self, chunk: bytes) -> None:
        # newc pads both the header+name and the data to 4 bytes.
        padding = b"\0" * (-(self._size + len(chunk)) % 4)
        self._chunks += (chunk, padding)
        self._size += len(chunk) + len(padding)

    def mkdir(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for depth in range(1, len(parts) + 1):
            path = "/".join(parts[:depth])
            if path and path not in self._dirs:
                self._dirs.add(path)
                self._entry(path, 0o040755)

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        if "/" in name:
            self.mkdir(name.rsplit("/", 1)[0])
        self._entry(name, 0o100000 | mode, data)

    def add_chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name.strip("/"), 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self._chunks)


def iter_cpio(data: bytes) -> Iterator[tuple[str, int, bytes]]:
    """(name, mode, data) of each entry of a newc archive (or of concatenated ones)."""
    offset = 0
    while offset + 110 <= len(data):
        if data[offset : offset + 6] != b"070701":
            if data[offset] == 0:  # padding between concatenated archives
                offset += 4
                continue
            raise ValueError(f"not a newc cpio entry at offset {offset}")
        fields = [int(data[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        start = offset + 110
        name = data[start : start + namesize - 1].decode()
        body = start + namesize + (-(110 + namesize) % 4)
        offset = body + size + (-size % 4)
        if name != "TRAILER!!!":
            yield name, mode, data[body : body + size]


# --------------------------------------------------------------------------
# base archive


def find_busybox() -> Path:
    for path in BUSYBOX_CANDIDATES:
        if path.is_file() and _is_static(path):
            return path
    raise QemuError("no static busybox found: apt-get install busybox-static")


def _is_static(path: Path) -> bool:
    # A dynamic ELF has a PT_INTERP segment naming ld.so; the guest has none.
    data = path.read_bytes()[: 1 << 16]
    return b"/lib64/ld-linux" not in data and b"/lib/ld-linux" not in data


def _modules_tree(kernel: Kernel, *extra: Path) -> ModuleTree:
    dirs = [d for d in (*extra, kernel.modules_dir) if d is not None]
    if not dirs:
        raise QemuError(f"kernel {kernel.spec}: no modules directory (pass --modules DIR)")
    return ModuleTree.scan(*dirs)


def has_module(kernel: Kernel, name: str) -> bool:
    """True if KERNEL has module NAME, as a file or built in."""
    if kernel.modules_dir is None:
        return False
    tree = ModuleTree.scan(kernel.modules_dir)
    return name in tree.files or name in tree.builtin


def base_initramfs(kernel: Kernel, *, cache: Path | None = None) -> Path:
    """The cached base archive for KERNEL (built once per release + content)."""
    busybox = find_busybox()
    tree = _modules_tree(kernel)
    order, missing = tree.load_order(list(BASE_MODULES), optional=OPTIONAL_BASE_MODULES)
    if missing or not ({"virtio_pci", "virtio_mmio"} & (set(tree.files) | tree.builtin)):
        raise QemuError(
            f"kernel {kernel.release} lacks {', '.join(missing) or 'a virtio transport'} "
            "(as module or built-in): needs CONFIG_VIRTIO_PCI or CONFIG_VIRTIO_MMIO "
            "and CONFIG_VIRTIO_CONSOLE"
        )
    key = _content_key(
        [INIT_SCRIPT.encode(), _stat_key(busybox), *(_stat_key(tree.files[name]) for name in order)]
    )
    directory = (cache or cache_root()) / "initramfs"
    target = directory / f"{kernel.release}-{key}.cpio"
    with locked(directory / f"{kernel.release}.lock"):
        if not target.is_file():
            atomic_write(target, _build_base(busybox, tree, order))
    return target


def _build_base(busybox: Path, tree: ModuleTree, order: list[str]) -> bytes:
    cpio = CpioWriter()
    for directory in ("bin", "dev", "proc", "sys", "tmp", "run", "lib/kvmtest/base"):
        cpio.mkdir(directory)
    # The kernel opens /dev/console for PID 1 before devtmpfs is mounted.
    cpio.add_chardev("dev/console", 5, 1)
    cpio.add_file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.add_file("init", INIT_SCRIPT.encode(), 0o755)
    listing = []
    for index, name in enumerate(order):
        file = f"{index:02d}-{name}.ko"
        cpio.add_file(f"lib/kvmtest/base/{file}", read_module(tree.files[name]))
        listing.append(f"{name} {file}\n")
    cpio.add_file("lib/kvmtest/base.list", "".join(listing).encode())
    return cpio.finish()


def _stat_key(path: Path) -> bytes:
    # Name, size and mtime (not the full path): symlinked copies of the same
    # modules share one cached archive.
    st = path.stat()
    return f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode()


def _content_key(parts: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------
# per-boot archive


@dataclass(frozen=True)
class PlannedModule:
    """One kvm-related module as planned on the host."""

    name: str
    status: str  # "load", "missing" or "builtin"
    path: Path | None = None
    params: str = ""


def plan_kvm_modules(kernel: Kernel, config: BootConfig) -> list[PlannedModule]:
    """Resolve kvm_amd and its dependencies; check vermagic of every module.

    A vermagic mismatch (e.g. kvm.ko built against other headers) is an error
    before booting, because in the guest it would only be an insmod failure.
    """
    extra = (config.kvm_modules_dir,) if config.kvm_modules_dir else ()
    for directory in extra:
        if not directory.is_dir():
            raise QemuError(f"kvm modules directory {directory} does not exist")
    tree = _modules_tree(kernel, *extra)
    order, missing = tree.load_order(list(KVM_MODULES))
    params = {"kvm_amd": config.kvm_amd_params, "kvm": config.kvm_params}
    plan = [PlannedModule(name, "missing") for name in missing]
    for name in order:
        _check_vermagic(tree, name, kernel.release)
        joined = " ".join(f"{key}={value}" for key, value in params.get(name, {}).items())
        plan.append(PlannedModule(name, "load", tree.files[name], joined))
    for name in KVM_MODULES:
        if name in tree.builtin and name not in tree.files:
            plan.append(PlannedModule(name, "builtin"))
    return plan


def _check_vermagic(tree: ModuleTree, name: str, release: str) -> None:
    vermagic = tree.vermagic(name) or ""
    built_for = vermagic.split(" ", 1)[0]
    if built_for != release:
        raise QemuError(
            f"vermagic mismatch: {tree.files[name]} was built for "
            f"{built_for or '?'}, the kernel is {release}"
        )


_SAFE_WORD = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.,+-=:/")


def check_param(text: str) -> str:
    # Module parameters end up inside JSON strings written by /init: keep them
    # to a character set that needs no escaping (they come from the user).
    if not text or not set(text) <= _SAFE_WORD:
        raise QemuError(f"module parameter {text!r}: only letters, digits and _.,+-=:/")
    return text


def boot_archive(plan: list[PlannedModule], config: BootConfig) -> bytes:
    """The per-boot cpio: kvm modules, kvm.list, config, command, extra files."""
    cpio = CpioWriter()
    cpio.mkdir("lib/kvmtest/kvm")
    lines = []
    for index, module in enumerate(plan):
        file = "-"
        if module.status == "load" and module.path is not None:
            file = f"{index:02d}-{module.name}.ko"
            cpio.add_file(f"lib/kvmtest/kvm/{file}", read_module(module.path))
        params = " ".join(check_param(p) for p in module.params.split())
        lines.append(f"{module.name} {module.status} {file} {params}".rstrip() + "\n")
    cpio.add_file("lib/kvmtest/kvm.list", "".join(lines).encode())
    other = "mmio" if config.transport == "pci" else "pci"
    settings = {
        "SKIP_MODULES": " ".join(TRANSPORT_MODULES[other]),
        "PORT_NAME": PORT_NAME,
        "OUTPUT_CAP": str(OUTPUT_CAP),
    }
    text = "".join(f"{key}={shlex.quote(value)}\n" for key, value in settings.items())
    cpio.add_file("lib/kvmtest/config", text.encode())
    assignments = " ".join(shlex.quote(f"{k}={v}") for k, v in config.env.items())
    command = f"exec /bin/env -i {assignments} {shlex.join(config.command)}\n"
    cpio.add_file("lib/kvmtest/cmd", command.encode(), 0o755)
    for name, data in config.files.items():
        cpio.add_file(name, data, 0o755)
    return cpio.finish()


def write_initrd(
    out: BinaryIO, kernel: Kernel, config: BootConfig, *, runtime: Path | None = None,
    cache: Path | None = None,
) -> list[PlannedModule]:
    """Write the initrd for one boot to OUT; return the kvm module plan."""
    plan = plan_kvm_modules(kernel, config)
    for part in (base_initramfs(kernel, cache=cache), runtime):
        if part is not None:
            with open(part, "rb") as src:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
    out.write(boot_archive(plan, config))
    return plan
