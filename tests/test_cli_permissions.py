"""/dev/kvm permission advice, from real device nodes (mknod, major 10 minor
232: the real KVM device) opened by a real unprivileged user.

The CLI runs as `nobody` (setpriv) with one capability kept,
CAP_DAC_READ_SEARCH: this Python lives under /root (mode 0700), which nobody
could not otherwise traverse.  That capability only bypasses read checks,
so opening the node read-write is decided by its mode bits, as for any user.
"""

from __future__ import annotations

import grp
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from clirun import kvmtest, one_line_error

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root (mknod, another user) and setpriv (util-linux)")

KVM_DEV = os.makedev(10, 232)
NOBODY = ("--reuid=nobody", "--clear-groups", "--inh-caps=+dac_read_search",
          "--ambient-caps=+dac_read_search")


@pytest.fixture
def nodes():
    """A directory every user can traverse (pytest's tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="kvmtest-nodes-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


def make_node(d: Path, mode: int, gid: int = 0) -> Path:
    node = d / "kvm"
    os.mknod(node, stat.S_IFCHR | 0o600, KVM_DEV)
    os.chown(node, 0, gid)
    os.chmod(node, mode)
    return node


def as_nobody(node: Path, *args: str, group: str = "nogroup") -> subprocess.CompletedProcess:
    return kvmtest(*(args or ("run", "--backend", "kvm", "-k", "nosvm-vmrun")),
                   env={"KVMTEST_DEV_KVM": str(node)},
                   prefix=("setpriv", f"--regid={group}", *NOBODY))


def advice(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 3, p.stderr
    line = one_line_error(p)
    assert "-aG root" not in line and "group 'root'" not in line
    return line


def test_owner_only_node_is_fixed_by_mode_and_kvm_group(nodes):
    node = make_node(nodes, 0o600)
    line = advice(as_nobody(node))
    assert f"{node} (crw------- root:root): its group may not open it" in line
    assert f"chmod 0660 {node}" in line and "chgrp kvm" in line
    assert "usermod -aG kvm nobody" in line and 'MODE="0660"' in line


def test_group_root_is_never_joined(nodes):
    node = make_node(nodes, 0o660)
    line = advice(as_nobody(node))
    assert "(crw-rw---- root:root)" in line and "joining group root is no fix" in line
    assert "chgrp kvm" in line


def test_group_with_access_is_joined(nodes):
    node = make_node(nodes, 0o660, gid=grp.getgrnam("daemon").gr_gid)
    line = advice(as_nobody(node))
    assert "add nobody to group 'daemon' (usermod -aG daemon nobody, then log in again)" in line
    assert "chmod" not in line


def test_group_in_the_database_but_not_in_this_session(nodes):
    """nobody's primary group is nogroup; this session runs without it."""
    node = make_node(nodes, 0o660, gid=grp.getgrnam("nogroup").gr_gid)
    line = advice(as_nobody(node, group="daemon"))
    assert "nobody is in group 'nogroup' but this session is not: log in again" in line
    assert "usermod" not in line


def test_mode_000(nodes):
    node = make_node(nodes, 0)
    line = advice(as_nobody(node))
    assert "(c--------- root:root): no one may open it" in line


@pytest.mark.kvm
def test_the_same_node_opens_when_the_mode_allows_it(nodes, real_kvm):
    """The control: same node, same user, mode 0666: the run works."""
    node = make_node(nodes, 0o666)
    p = as_nobody(node)
    assert p.returncode == 0, p.stderr
    assert "1 passed" in p.stdout


def test_refusal_from_elsewhere_names_it(nodes):
    """Mode 0666 on a nodev mount: the mode allows it, the mount does not."""
    mnt = nodes / "nodev"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "nodev,size=64k,mode=0755", "tmpfs",
                        str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a nodev tmpfs here (needs CAP_SYS_ADMIN): {r.stderr}")
    try:
        node = make_node(mnt, 0o666)
        line = advice(as_nobody(node))
        assert "its mode allows nobody read and write" in line and "nodev mount" in line
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_info_gives_the_same_advice(nodes):
    node = make_node(nodes, 0o600)
    p = as_nobody(node, "info")
    assert p.returncode == 0
    assert "its group may not open it" in p.stdout and "-aG root" not in p.stdout


def test_unwritable_report_dir_for_this_user(nodes):
    """A report path nobody cannot write: a usage error before anything runs."""
    locked = nodes / "locked"
    locked.mkdir(mode=0o755)
    node = make_node(nodes, 0o666)
    p = as_nobody(node, "run", "--backend", "kvm", "--json", str(locked / "r.json"))
    assert p.returncode == 2
    assert f"--json {locked / 'r.json'}: {locked}: not writable" in one_line_error(p)
