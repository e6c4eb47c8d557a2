"""The qemu backend's boot layer: a chosen kernel under QEMU, isolated from the host.

Typical use::

    from kvmtest.qemu import QemuSession, resolve_kernel
    kernel = resolve_kernel("debian:linux-image-6.1.0-56-amd64-unsigned")
    with QemuSession(kernel) as session:
        print(session.facts)
        for case_id, result in session.run(cases, timeout=5.0):
            ...

``boot(kernel, command, outdir=...)`` runs one command in the guest instead
(tests, probes).  See docs/qemu.md for the design and the measured figures.
"""

from kvmtest.qemu.errors import GuestFault, QemuError
from kvmtest.qemu.kernels import Kernel, ModuleTree, cache_root, resolve_kernel
from kvmtest.qemu.machine import GuestResult, ModuleLoad, boot, choose_accel, find_qemu
from kvmtest.qemu.runtime import GUEST_PYTHON

__all__ = [
    "GUEST_PYTHON",
    "GuestFault",
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
