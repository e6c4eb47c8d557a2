"""The guest's initramfs: busybox, the 9p stack, the kvm modules and /init.

The initrd handed to QEMU is the concatenation of two newc cpio archives
(the kernel unpacks concatenated archives in order):

* a **base** archive, cached per kernel release: busybox-static, /init and
  the virtio-pci + 9p modules needed to mount the host's ``/`` (tag
  ``hostroot``, read-only) and the output directory (tag ``kvmtest_out``);
* a small **per-boot** archive: the kvm modules (the kernel's own or an
  override directory's, e.g. a rebuilt kvm.ko/kvm-amd.ko), their insmod
  parameters, and the boot configuration (paths of the control files).

Why the kvm modules travel in the initrd rather than over 9p: the host's
``/lib/modules`` belongs to the host kernel, and compressed modules
(.ko.xz/.ko.zst) are decompressed on the host so busybox insmod never has to.
The cpio is written in Python (no cpio tool needed) and left uncompressed:
under TCG, inflating it in the guest would cost more than reading it.
"""

from __future__ import annotations

import hashlib
import shlex
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

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
# Modules needed to mount the 9p shares; dependencies come from .modinfo.
# virtio_pci serves -machine pc/q35, virtio_mmio -machine microvm; /init
# skips the transport of the other machine type (config SKIP_MODULES).
BASE_MODULES = ("virtio_pci", "virtio_mmio", "9pnet_virtio", "9p")
OPTIONAL_BASE_MODULES = frozenset({"virtio_mmio"})
TRANSPORT_MODULES = {
    "pci": ("virtio_pci", "virtio_pci_modern_dev", "virtio_pci_legacy_dev"),
    "mmio": ("virtio_mmio",),
}
# kvm_amd pulls kvm, irqbypass and (with SEV) ccp through its depends= field.
KVM_MODULES = ("kvm_amd",)
HOSTROOT_TAG = "hostroot"
OUT_TAG = "kvmtest_out"
MARKER = "KVMTEST-MARK"
FATAL = "KVMTEST-FATAL"

# /init, run by the kernel as PID 1.  Prints "KVMTEST-MARK <stage> <uptime>"
# on the console so that the host can time boot stages.  Every failure ends
# in poweroff: a stuck guest would only be reaped by the host's timeout.
INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /bin /proc /sys /dev /tmp /newroot
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1

mark() { read up idle </proc/uptime; echo "KVMTEST-MARK $1 $up"; }
halt_guest() { sync; poweroff -f; reboot -f; echo o >/proc/sysrq-trigger; }
fatal() { echo "KVMTEST-FATAL $*"; dmesg | tail -n 20; halt_guest; }

mark init
. /lib/kvmtest/config

# 1. virtio + 9p: without them nothing else is reachable.
while read -r name file; do
    case " $SKIP_MODULES " in *" $name "*) continue ;; esac
    insmod "/lib/kvmtest/base/$file" || fatal "insmod $name failed"
done </lib/kvmtest/base.list
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=$MSIZE,cache=$ROOT_CACHE \
    hostroot /newroot || fatal "mount of 9p tag hostroot failed"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=$MSIZE kvmtest_out "/newroot$OUT" \
    || fatal "mount of 9p tag kvmtest_out on $OUT failed"
CTL="/newroot$OUT/ctl"
mark 9p

# 2. kvm modules, each line: name status file [params...]
: >"$CTL/modules.txt"
while read -r name status file params; do
    if [ "$status" != load ]; then
        echo "$name $status" >>"$CTL/modules.txt"
        continue
    fi
    if err=$(insmod "/lib/kvmtest/kvm/$file" $params 2>&1); then
        echo "$name ok $params" >>"$CTL/modules.txt"
    else
        echo "$name error $(echo "$err" | tr '\n' ' ')| $(dmesg | tail -n 3 | tr '\n' ' ')" \
            >>"$CTL/modules.txt"
    fi
done </lib/kvmtest/kvm.list
if [ -c /dev/kvm ]; then echo "/dev/kvm present" >>"$CTL/modules.txt"
else echo "/dev/kvm absent" >>"$CTL/modules.txt"; fi
mark modules

# 3. the host's command, chrooted into the host's / so every path matches.
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/shm && mount -t tmpfs -o mode=1777 tmpfs /newroot/dev/shm
mark cmd-start
chroot /newroot /bin/sh "$OUT/ctl/run.sh" </dev/null
rc=$?
mark cmd-end
echo "$rc" >"$CTL/rc"
dmesg >"$CTL/dmesg.txt"
mark poweroff
halt_guest
"""


@dataclass(frozen=True)
class BootConfig:
    """Everything the per-boot archive carries to /init."""

    outdir: Path  # host directory shared as kvmtest_out, same path in the guest
    kvm_amd_params: Mapping[str, str]
    kvm_params: Mapping[str, str]
    kvm_modules_dir: Path | None = None
    msize: int = 512 * 1024
    root_cache: str = "loose"  # host / is read-only and static during a run
    transport: str = "pci"  # virtio transport of the machine type: pci or mmio


# --------------------------------------------------------------------------
# cpio (newc)


class CpioWriter:
    """Minimal newc cpio writer: directories and regular files, root-owned."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
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
        self._chunks.append(header + name.encode() + b"\0")
        self._pad()
        self._chunks.append(data)
        self._pad()

    def _pad(self) -> None:
        size = sum(len(chunk) for chunk in self._chunks)
        self._chunks.append(b"\0" * (-size % 4))

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
    if missing:
        raise QemuError(
            f"kernel {kernel.release} lacks {', '.join(missing)} (as module or "
            "built-in): needs CONFIG_VIRTIO_PCI, CONFIG_NET_9P_VIRTIO, CONFIG_9P_FS"
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
    for directory in ("bin", "dev", "proc", "sys", "tmp", "newroot", "lib/kvmtest/base"):
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


def boot_archive(plan: list[PlannedModule], config: BootConfig) -> bytes:
    """The per-boot cpio: kvm modules, kvm.list and the shell config."""
    cpio = CpioWriter()
    cpio.mkdir("lib/kvmtest/kvm")
    lines = []
    for index, module in enumerate(plan):
        file = "-"
        if module.status == "load" and module.path is not None:
            file = f"{index:02d}-{module.name}.ko"
            cpio.add_file(f"lib/kvmtest/kvm/{file}", read_module(module.path))
        lines.append(f"{module.name} {module.status} {file} {module.params}".rstrip() + "\n")
    cpio.add_file("lib/kvmtest/kvm.list", "".join(lines).encode())
    other = "mmio" if config.transport == "pci" else "pci"
    settings = {
        "OUT": str(config.outdir),
        "MSIZE": str(config.msize),
        "SKIP_MODULES": " ".join(TRANSPORT_MODULES[other]),
        "ROOT_CACHE": config.root_cache,
    }
    text = "".join(f"{key}={shlex.quote(value)}\n" for key, value in settings.items())
    cpio.add_file("lib/kvmtest/config", text.encode())
    return cpio.finish()


def build_initrd(
    kernel: Kernel, config: BootConfig, target: Path, *, cache: Path | None = None
) -> list[PlannedModule]:
    """Write the initrd for one boot to TARGET; return the kvm module plan."""
    base = base_initramfs(kernel, cache=cache)
    plan = plan_kvm_modules(kernel, config)
    with open(target, "wb") as out:
        with open(base, "rb") as src:
            shutil.copyfileobj(src, out)
        out.write(boot_archive(plan, config))
    return plan
