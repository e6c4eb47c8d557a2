"""The qemu backend's boot layer: run commands inside a chosen kernel under QEMU.

Typical use::

    from kvmtest.qemu import boot, resolve_kernel
    kernel = resolve_kernel("debian:linux-image-6.1.0-56-amd64-unsigned")
    result = boot(kernel, [sys.executable, "-m", "kvmtest", ...], outdir=tmp)
    if result.failure():
        ...  # ERROR outcome with result.console_tail()

See NOTES.md in this directory for the measured figures.
"""

from kvmtest.qemu.errors import QemuError
from kvmtest.qemu.kernels import Kernel, ModuleTree, cache_root, resolve_kernel
from kvmtest.qemu.machine import GuestResult, ModuleLoad, boot, choose_accel, find_qemu

__all__ = [
    "GuestResult",
    "Kernel",
    "ModuleLoad",
    "ModuleTree",
    "QemuError",
    "boot",
    "cache_root",
    "choose_accel",
    "find_qemu",
    "resolve_kernel",
]
