"""Record and replay (kvmtest/record.py, csrc/record.c) on this host's real
/dev/kvm: a case run in C and replayed on the host must observe exactly what
drive()'s Python loop observes, exit by exit; and a trace from the guest (a
kernel under test) is checked record by record before anything is replayed.
"""

from __future__ import annotations

import struct

import pytest

from kvmtest import layout, params, record, runner
from kvmtest.backends.kvm import KvmBackend
from kvmtest.case import INSN, NEED_NO_SVM, Case, Expect
from kvmtest.cases import catalogue
from kvmtest.exits import HltExit, InterruptedExit, IoExit, TimedOut
from kvmtest.kvm import KvmError, lib
from kvmtest.payloads import load_payload
from kvmtest.session import skip_reason


def _case(payload: str, **params_: int) -> Case:
    return Case(id=f"{payload}/{params_}", family="test", scenario=INSN, payload=payload,
                expect=Expect("no_fault"), source="tests", params=params_,
                needs=frozenset({NEED_NO_SVM}))


@pytest.fixture
def backends(real_kvm):
    """The same host KVM twice: recording in C, and drive()'s Python loop."""
    recorded = real_kvm["backend"]
    assert recorded.records  # the default
    python = KvmBackend(records=False)
    yield recorded, python
    python.close()


def _cases(backend: KvmBackend, maxphyaddr: int) -> list[Case]:
    """Every catalogue case this host can run (those without SVM), and runs
    that end each way the C loop must tell apart: PINGs up to and over the
    exit budget, a SYNC then DONE, a guest that never reports (timeout)."""
    host = [c for c in catalogue(maxphyaddr) if skip_reason(backend, c) is None]
    return [*host, _case("ping", count=0), _case("ping", count=5),
            _case("ping", count=runner.MAX_EXITS - 1), _case("ping", count=runner.MAX_EXITS),
            _case("echo", insn=0, msr_value=0x0123_4567_89AB_CDEF), _case("spin")]


def test_recorded_cases_observe_what_the_python_loop_observes(backends, real_kvm):
    recorded, python = backends
    cases = _cases(recorded, real_kvm["maxphyaddr"])
    eligible = [c for c in cases if record.eligible(c)]
    assert len(eligible) == len(cases) >= 14
    for case in cases:
        timeout = 0.3 if case.payload == "spin" else 5.0
        a = runner.run_case(recorded, case, timeout)
        b = runner.run_case(python, case, timeout)
        if case.payload == "spin":  # the deadline's own words: same seconds either way
            assert a.outcome == b.outcome == "timeout"
        assert a == b, case.id


def test_the_c_loop_records_what_drive_reads(real_kvm):
    """The trace of a SYNC-then-DONE case: two ucall exits, each with the
    ucall's arguments; the SYNC also with the result block and nested state."""
    b = real_kvm["backend"]
    case = _case("echo", insn=0, msr_value=0x1234)
    payload = load_payload(case.payload)
    trace = b.record(payload, False, {}, record.compile_case(case, payload), 5.0)
    steps, log = record.parse(trace, 5.0)
    assert log == []  # read, nothing bad
    assert [type(s.exit) for s in steps] == [IoExit, IoExit]
    assert all(s.exit.port == 0x1000 for s in steps)
    sync, done = steps
    assert [gpa for gpa, _ in sync.snaps] == [record.UCALL_ARGS[0], record.RESULT[0]]
    assert sync.nested is not False
    assert [gpa for gpa, _ in done.snaps] == [record.UCALL_ARGS[0]]


def test_tags_are_record_c_s():
    for name in ("IO", "HLT", "MMIO", "SHUTDOWN", "FAIL_ENTRY", "INTERNAL", "SYSTEM_EVENT",
                 "IRQ_WINDOW", "DEBUG", "UNKNOWN", "INTERRUPTED", "TIMED_OUT", "RUN_ERROR",
                 "SNAP", "NESTED"):
        assert getattr(record, name) == getattr(lib, f"KVMTEST_REC_{name}"), name


# ---- a trace from the guest is checked before anything is replayed --------------------

def rec(tag: int, body: bytes = b"") -> bytes:
    return struct.pack("<II", tag, len(body)) + body


IO_UCALL = rec(record.IO, struct.pack("<BBHI", 1, 4, 0x1000, 1) + (3).to_bytes(4, "little"))


@pytest.mark.parametrize("trace, why", [
    (b"", "an empty trace"),
    (b"\x01\x00\x00", "truncated record header"),
    (struct.pack("<II", record.HLT, 8), "record runs past the trace's end"),
    (rec(99), "unknown record tag 99"),
    (rec(record.SNAP, bytes(16)), "memory recorded before any exit"),
    (rec(record.HLT) + rec(record.SNAP, struct.pack("<Q", layout.MEM_SIZE - 4) + bytes(8)),
     "outside guest memory"),
    (rec(record.HLT) + rec(record.NESTED, struct.pack("<IIQ", 2, 0, 0)), "bad NESTED record"),
    (rec(record.HLT, b"x"), "record of 1 bytes, expected 0"),
    (rec(record.IO, struct.pack("<BBHI", 1, 1, 0x1000, 1) + b"ab"), "longer than size x count"),
    (rec(record.MMIO, bytes(16 + 9)), "bad MMIO record"),
    (rec(record.INTERNAL, struct.pack("<II", 1, 17) + bytes(8 * 17)), "bad data count"),
    (rec(record.RUN_ERROR, b"\x01"), "expected 4"),
    (rec(record.HLT) * (record.MAX_TRACE // 8 + 1), "a trace of"),
])
def test_malformed_traces_are_refused(trace, why):
    with pytest.raises(record.ReplayError, match=why):
        record.parse(trace, 5.0)[0]


@pytest.mark.parametrize("text", ["@@@@", "QUJD\n", "QUJ", 5, "A" * (record.MAX_TRACE * 2)])
def test_a_trace_must_be_strict_base64_of_a_bounded_size(text):
    with pytest.raises(record.ReplayError):
        record.unpack_trace(text)


def test_replay_answers_only_what_was_recorded():
    steps, _ = record.parse(
        IO_UCALL + rec(record.SNAP, struct.pack("<Q", 0x7008) + bytes(range(56)))
        + rec(record.INTERRUPTED) + rec(record.HLT) + rec(record.TIMED_OUT)
        + rec(record.RUN_ERROR, struct.pack("<I", 4)), 0.25)
    m = record.ReplayMachine(steps)
    with pytest.raises(record.ReplayError, match="not recorded"):
        m.nested_state()
    assert isinstance(m.run(5.0), IoExit)
    assert m.read(0x7010, 8) == bytes(range(8, 16))
    with pytest.raises(record.ReplayError, match=r"read \[0x7000, 0x7008\)"):
        m.read(0x7000, 8)
    with pytest.raises(ValueError, match="not guest memory"):
        m.read(layout.MEM_SIZE - 4, 8)
    with pytest.raises(record.ReplayError):
        m.nested_state()
    with pytest.raises(record.ReplayError):
        m.finished()
    assert isinstance(m.run(5.0), InterruptedExit)
    assert isinstance(m.run(5.0), HltExit)
    with pytest.raises(record.ReplayError):  # the HLT step recorded no memory
        m.read(0x7010, 8)
    assert m.run(5.0) == TimedOut(0.25)
    with pytest.raises(KvmError, match="KVM_RUN"):
        m.run(5.0)
    m.finished()
    with pytest.raises(record.ReplayError, match="past the recorded exits"):
        m.run(5.0)


def test_compiled_writes_are_prepare_memorys():
    """What the guest writes for a compiled case is what prepare_memory
    writes, in order (recorded through a Machine that keeps every write)."""
    case = next(c for c in catalogue() if record.eligible(c) and c.memory)
    payload = load_payload(case.payload)

    class Writes:
        def __init__(self) -> None:
            self.seen: list[tuple[int, bytes]] = []

        def write(self, gpa: int, data: bytes) -> None:
            self.seen.append((gpa, bytes(data)))

    w = Writes()
    runner.prepare_memory(w, case, payload)  # type: ignore[arg-type]
    compiled = record.Compiled.from_json(record.compile_case(case, payload).to_json())
    blob, out = compiled.writes, []
    while blob:
        gpa, n = struct.unpack_from("<QI", blob)
        out.append((gpa, blob[12:12 + n]))
        blob = blob[12 + n:]
    assert out == w.seen
    assert (params.RESULT_GPA, params.RESULT_POISON.to_bytes(8, "little") * len(params.RESULT)
            ) in out
    assert compiled.final == ((case.vmcb12_gpa, 0x400),)


def test_nested_state_records_become_what_nested_state_returns():
    gif, guest_mode = 0x100, 0x1  # KVM_STATE_NESTED_GIF_SET, _GUEST_MODE
    steps, _ = record.parse(
        rec(record.HLT) + rec(record.NESTED, struct.pack("<IIQ", 1, gif | guest_mode, 0x9000))
        + rec(record.HLT) + rec(record.NESTED, struct.pack("<IIQ", 1, 0, 0x9000))
        + rec(record.HLT) + rec(record.NESTED, struct.pack("<IIQ", 0, 0, 0)), 5.0)
    first, second, failed = (s.nested for s in steps)
    assert (first.gif, first.guest_mode, first.vmcb12_gpa) == (True, True, 0x9000)
    assert (second.gif, second.guest_mode, second.vmcb12_gpa) == (False, False, None)
    assert failed is None  # KVM_GET_NESTED_STATE failed: as KvmMachine.nested_state()


@pytest.mark.parametrize("tail, why", [
    (rec(record.KMSG, b"4,1,2,-;WARNING: x\n"), "out of place"),
    (rec(record.KMSG_READ) + rec(record.KMSG_READ), "read twice"),
    (rec(record.KMSG_READ) + rec(record.KMSG, b"6,1,2,-;kvm: fine\n"), "without a bad word"),
    (rec(record.KMSG_READ) + rec(record.HLT), "after the kernel log"),
    (rec(record.KMSG_READ, b"x"), "expected 0"),
])
def test_malformed_kernel_log_records_are_refused(tail, why):
    with pytest.raises(record.ReplayError, match=why):
        record.parse(rec(record.HLT) + tail, 5.0)


def test_the_kernel_log_during_a_case_is_read_in_c(real_kvm):
    """Lines logged while a recorded case runs: the bad ones come back in
    the trace, as Kmsg.watch() would report them; the others do not."""
    import os
    import threading
    import time

    if not os.access("/dev/kmsg", os.W_OK):
        pytest.skip("cannot write /dev/kmsg: run as root to test the kernel-log read")
    case = _case("spin")
    payload = load_payload(case.payload)

    def log() -> None:
        time.sleep(0.1)
        with open("/dev/kmsg", "w") as kmsg:
            kmsg.write("<6>kvmtest: an ordinary line\n")
            kmsg.flush()
            kmsg.write("<4>kvmtest: WARNING: CPU: 0 PID: 1 at test_record.py (a test line)\n")

    writer = threading.Thread(target=log)
    writer.start()
    try:
        trace = real_kvm["backend"].record(payload, False, {},
                                           record.compile_case(case, payload), 0.5)
    finally:
        writer.join()
    steps, lines = record.parse(trace, 0.5)
    assert type(steps[-1].exit) is TimedOut
    assert lines == ["kvmtest: WARNING: CPU: 0 PID: 1 at test_record.py (a test line)"]
