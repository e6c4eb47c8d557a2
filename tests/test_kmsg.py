"""kvmtest.kmsg on this host's real /dev/kmsg: a record written during a
watch is seen by that watch only, through one descriptor kept across watches.

The records written here are harmless info lines that only this module's
pattern matches: other tests running in parallel (pytest-xdist) watch the
same log for WARN/BUG lines and must not see a planted one."""

from __future__ import annotations

import os
import re

import pytest

from kvmtest import kmsg

MARK = re.compile(r"kvmtest-test-kmsg \S+")


def _writable() -> bool:
    try:
        os.close(os.open(kmsg.KMSG, os.O_WRONLY))
        os.close(os.open(kmsg.KMSG, os.O_RDONLY))
    except OSError:
        return False
    return True


pytestmark = pytest.mark.skipif(
    not _writable(), reason="needs to read and write /dev/kmsg (root, kernel.dmesg_restrict)")


def _log(word: str) -> str:
    line = f"kvmtest-test-kmsg {word}-{os.getpid()}"
    fd = os.open(kmsg.KMSG, os.O_WRONLY)
    try:
        os.write(fd, f"<6>{line}\n".encode())
    finally:
        os.close(fd)
    return line


def test_bad_lines_are_the_kernels_warn_bug_and_oops_headers() -> None:
    assert kmsg.BAD.search("WARNING: CPU: 0 PID: 1 at arch/x86/kvm/svm/nested.c:940")
    assert kmsg.BAD.search("BUG: kernel NULL pointer dereference, address: 0")
    assert not kmsg.BAD.search("kvm: Nested Virtualization enabled")


def test_each_watch_sees_its_own_records_on_one_descriptor() -> None:
    k = kmsg.Kmsg()
    try:
        _log("before")
        with k.watch(MARK) as first:
            one = _log("first")
        fd = k._fd
        with k.watch(MARK) as second:
            two = _log("second")
        with k.watch(MARK) as third:
            pass
    finally:
        k.close()
    assert first == [one]
    assert second == [two]
    assert third == []
    assert fd is not None and k._fd is None


def test_module_watch_opens_and_closes_its_descriptor() -> None:
    before = set(os.listdir("/proc/self/fd"))
    with kmsg.watch(MARK) as found:
        line = _log("module")
    assert found == [line]
    assert set(os.listdir("/proc/self/fd")) == before


def test_close_inside_a_watch_waits_for_its_end() -> None:
    """The backend closes its Kmsg while the CLI watches the VM teardown:
    the teardown's records are still read, then the descriptor closes."""
    k = kmsg.Kmsg()
    with k.watch(MARK) as found:
        k.close()
        line = _log("teardown")
        assert k._fd is not None
    assert found == [line]
    assert k._fd is None


def test_watches_do_not_nest() -> None:
    """One descriptor, one read position: an inner watch would take the outer one's records."""
    k = kmsg.Kmsg()
    try:
        with k.watch(MARK), pytest.raises(RuntimeError, match="inside a watch"), \
                k.watch(MARK):
            pass
        with k.watch(MARK), pytest.raises(RuntimeError) as info:
            k.mark()  # nor does a C helper's watch (KvmBackend.record)
        assert str(info.value) == "Kmsg.mark inside a watch of the same Kmsg"
    finally:
        k.close()


def test_an_unreadable_log_is_not_opened_again(monkeypatch, tmp_path) -> None:
    """A log that cannot be opened is not retried case after case (one open
    per backend): every watch says "not checked" (None), even once the path
    would open."""
    absent = tmp_path / "kmsg"
    monkeypatch.setattr(kmsg, "KMSG", str(absent))
    k = kmsg.Kmsg()
    with k.watch() as found:
        assert found is None
    assert k.mark() is None
    absent.write_bytes(b"")
    with k.watch() as found:
        assert found is None
    assert k.mark() is None
    k.close()
