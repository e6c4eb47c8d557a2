"""The binding's one error type, and the error for an unusable /dev/kvm."""

from __future__ import annotations

import errno as _errno
import grp
import os
import stat


class KvmError(OSError):
    """An ioctl on a KVM file descriptor failed.

    ``str(e)`` is ``"KVM_CREATE_VM: [Errno 13] Permission denied"``; ``e.ioctl``
    names the ioctl and ``e.errno`` is the errno, so callers can match on either.
    """

    def __init__(self, ioctl: str, errno: int, detail: str | None = None) -> None:
        super().__init__(errno, detail or os.strerror(errno))
        self.ioctl = ioctl

    def __str__(self) -> str:
        return f"{self.ioctl}: [Errno {self.errno}] {self.strerror}"

    def __reduce__(self):  # keep ioctl across pickling (xdist reports)
        return (type(self), (self.ioctl, self.errno, self.strerror))


class KvmUnavailable(KvmError):
    """/dev/kvm cannot be used at all; ``str(e)`` is one actionable line."""

    def __init__(self, message: str, errno: int = _errno.ENODEV) -> None:
        super().__init__("open(/dev/kvm)", errno, message)

    def __str__(self) -> str:
        return self.strerror

    def __reduce__(self):
        return (type(self), (self.strerror, self.errno))


def check(ret: int, ioctl: str) -> int:
    """Turn a C helper's ``-errno`` result into a KvmError; pass other values."""
    if ret < 0:
        raise KvmError(ioctl, -ret)
    return ret


def unavailable_reason(path: str, err: OSError) -> KvmUnavailable:
    """The actionable message for a failed ``open(path)``."""
    if err.errno == _errno.ENOENT:
        return KvmUnavailable(
            f"no {path}: load kvm_amd (modprobe kvm_amd nested=1) or use --backend qemu|model",
            err.errno,
        )
    if err.errno in (_errno.EACCES, _errno.EPERM):
        try:
            st = os.stat(path)
            try:
                group = grp.getgrgid(st.st_gid).gr_name
            except KeyError:
                group = str(st.st_gid)
            mode = stat.filemode(st.st_mode)
            owner = "root" if st.st_uid == 0 else str(st.st_uid)
            who = f"{path} ({mode} {owner}:{group})"
        except OSError:
            who, group = path, "kvm"
        return KvmUnavailable(
            f"no permission to open {who}: add the user to group '{group}' "
            f"(usermod -aG {group} $USER, then log in again) or run as root; "
            "or use --backend qemu|model",
            err.errno,
        )
    if err.errno in (_errno.ENXIO, _errno.ENODEV):
        return KvmUnavailable(
            f"{path} exists but no KVM module backs it: modprobe kvm_amd nested=1 "
            "or use --backend qemu|model",
            err.errno,
        )
    return KvmUnavailable(f"cannot open {path}: {err.strerror}", err.errno)
