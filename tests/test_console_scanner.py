"""The console scanner's per-configuration bookkeeping on a shared boot
(kvmtest.qemu.process.ConsoleScanner): markers and the WARN cap."""

from kvmtest.qemu.process import MAX_OOPSES, ConsoleScanner


def _warn(i: int) -> bytes:
    return f"[    1.0] WARNING: CPU: 0 PID: 1 at fake.c:{i} x\n".encode()


def test_a_marker_records_where_its_configuration_ends():
    s = ConsoleScanner()
    s.feed(_warn(1) + _warn(2) + b"[    2.0] kvmtest-sync reload-1\n" + _warn(3))
    assert s.syncs == {"reload-1": 2}
    assert s.oopses[s.syncs["reload-1"]:] == ["WARNING: CPU: 0 PID: 1 at fake.c:3 x"]
    s.feed(b"kvmtest-sync reload-1\n")  # a repeat (or a guest's forgery) moves nothing
    assert s.syncs == {"reload-1": 2}


def test_the_warn_cap_counts_per_configuration():
    """A configuration that fills the cap does not silence the next one."""
    s = ConsoleScanner()
    s.feed(b"".join(_warn(i) for i in range(MAX_OOPSES + 50)))
    assert len(s.oopses) == MAX_OOPSES
    s.feed(b"kvmtest-sync reload-1\n" + _warn(9999))
    assert s.oopses[s.syncs["reload-1"]:] == ["WARNING: CPU: 0 PID: 1 at fake.c:9999 x"]
