"""kvmtest.kmsg on this host's real /dev/kmsg: a record written during a
watch is seen by that watch only, through one descriptor kept across watches."""

from __future__ import annotations

import os

import pytest

from kvmtest import kmsg


def _writable() -> bool:
    try:
        os.close(os.open(kmsg.KMSG, os.O_WRONLY))
        os.close(os.open(kmsg.KMSG, os.O_RDONLY))
    except OSError:
        return False
    return True


pytestmark = pytest.mark.skipif(
    not _writable(), reason="needs to read and write /dev/kmsg (root, kernel.dmesg_restrict)")


def _log(text: str) -> None:
    fd = os.open(kmsg.KMSG, os.O_WRONLY)
    try:
        os.write(fd, f"<4>{text}\n".encode())
    finally:
        os.close(fd)


def test_each_watch_sees_its_own_records_on_one_descriptor() -> None:
    k = kmsg.Kmsg()
    try:
        _log("WARNING: kvmtest test_kmsg before any watch")
        with k.watch() as first:
            _log("WARNING: kvmtest test_kmsg first")
            _log("kvmtest test_kmsg harmless line")
        fd = k._fd
        with k.watch() as second:
            _log("WARNING: kvmtest test_kmsg second")
        with k.watch() as third:
            pass
    finally:
        k.close()
    assert first == ["WARNING: kvmtest test_kmsg first"]
    assert second == ["WARNING: kvmtest test_kmsg second"]
    assert third == []
    assert fd is not None and k._fd is None


def test_module_watch_opens_and_closes_its_descriptor() -> None:
    before = set(os.listdir("/proc/self/fd"))
    with kmsg.watch() as found:
        _log("BUG: kvmtest test_kmsg module watch")
    assert found == ["BUG: kvmtest test_kmsg module watch"]
    assert set(os.listdir("/proc/self/fd")) == before


def test_close_inside_a_watch_waits_for_its_end() -> None:
    """The backend closes its Kmsg while the CLI watches the VM teardown:
    the teardown's records are still read, then the descriptor closes."""
    k = kmsg.Kmsg()
    with k.watch() as found:
        k.close()
        _log("WARNING: kvmtest test_kmsg teardown")
        assert k._fd is not None
    assert found == ["WARNING: kvmtest test_kmsg teardown"]
    assert k._fd is None
