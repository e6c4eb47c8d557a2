"""The binding's one error type, and the error for an unusable /dev/kvm."""

from __future__ import annotations

import errno as _errno
import grp
import os
import pwd
import stat

# The group udev gives /dev/kvm (systemd's 50-udev-default.rules).
KVM_GROUP = "kvm"


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
        except OSError:
            return KvmUnavailable(f"no permission to open {path}; or use --backend qemu|model",
                                  err.errno)
        return KvmUnavailable(permission_advice(path, st), err.errno)
    if err.errno in (_errno.ENXIO, _errno.ENODEV):
        return KvmUnavailable(
            f"{path} exists but no KVM module backs it: modprobe kvm_amd nested=1 "
            "or use --backend qemu|model",
            err.errno,
        )
    return KvmUnavailable(f"cannot open {path}: {err.strerror}", err.errno)


def _group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _in_group_database(user: str, gid: int) -> bool:
    try:
        if pwd.getpwnam(user).pw_gid == gid:
            return True
    except KeyError:
        pass
    try:
        return user in grp.getgrgid(gid).gr_mem
    except KeyError:
        return False


def permission_advice(path: str, st: os.stat_result, uid: int | None = None,
                      gids: set[int] | None = None) -> str:
    """Why this process may not open the node, and the fix that applies to
    its actual mode, owner and group (never: join group root)."""
    uid = os.geteuid() if uid is None else uid
    gids = set(os.getgroups()) | {os.getegid()} if gids is None else gids
    user = _user_name(uid)
    mode = st.st_mode & 0o777
    group = _group_name(st.st_gid)
    who = (f"{path} ({stat.filemode(st.st_mode)} {_user_name(st.st_uid)}:"
           f"{group or st.st_gid})")
    # The permission class the kernel applies to this process.
    bits = (mode >> 6 if uid == st.st_uid else mode >> 3 if st.st_gid in gids else mode) & 0o6
    tail = "; or use --backend qemu|model"
    if bits == 0o6:
        return (f"no permission to open {who}, although its mode allows {user} read and "
                "write: the refusal comes from elsewhere (a nodev mount, a device cgroup in a "
                f"container, or an LSM such as AppArmor or SELinux){tail}")
    group_rw = mode & 0o060 == 0o060
    if group_rw and st.st_gid != 0 and group and uid != st.st_uid:
        if _in_group_database(user, st.st_gid):
            fix = (f"{user} is in group '{group}' but this session is not: log in again "
                   f"(or run newgrp {group})")
        else:
            fix = f"add {user} to group '{group}' (usermod -aG {group} {user}, then log in again)"
        return f"no permission to open {who}: {fix}{tail}"
    # The group has no access (or it is root's): the node itself needs fixing.
    steps = []
    kvm_gid = _gid_of(KVM_GROUP)
    if kvm_gid is None:
        steps.append(f"groupadd --system {KVM_GROUP}")
    if st.st_gid != kvm_gid:
        steps.append(f"chgrp {KVM_GROUP} {path}")
    steps.append(f"chmod 0660 {path}")
    if uid != 0 and (kvm_gid is None or kvm_gid not in gids):
        steps.append(f"usermod -aG {KVM_GROUP} {user} (then log in again)")
    if mode & 0o666 == 0:
        why = "no one may open it"
    elif not group_rw:
        why = "its group may not open it"
    elif st.st_gid == 0:
        why = "only root's group may open it, and joining group root is no fix"
    else:
        why = "its owner may not open it"
    return (f"no permission to open {who}: {why}. As root: "
            f"{'; '.join(steps)}; to keep it across reboots, a udev rule such as "
            f'KERNEL=="kvm", GROUP="{KVM_GROUP}", MODE="0660" in '
            f"/etc/udev/rules.d/65-kvm.rules{tail}")


def _gid_of(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None
