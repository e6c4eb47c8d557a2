"""Record and replay (kvmtest/record.py, csrc/record.c) on this host's real
/dev/kvm: a case run in C and replayed on the host must observe exactly what
drive()'s Python loop observes, exit by exit; and a trace from the guest (a
kernel under test) is checked record by record before anything is replayed.
"""

from __future__ import annotations

import os
import struct
import time

import pytest

from kvmtest import kmsg, layout, params, record, runner
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


def test_odd_timeouts_end_the_same_on_both_paths(backends):
    """A timeout of zero or less expires at once (Timer.arm: 1 ns) on both
    paths; NaN and infinity raise what Timer.arm raises, on both paths."""
    case = _case("spin")
    for seconds in (0.0, -1.0):
        a, b = (runner.run_case(backend, case, seconds) for backend in backends)
        assert a == b and a.outcome == "timeout", seconds
    for seconds, error in ((float("nan"), ValueError), (float("inf"), OverflowError),
                           (1e10, OverflowError)):
        for backend in backends:
            with pytest.raises(error):
                runner.run_case(backend, case, seconds)


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
                 "SNAP", "NESTED", "KMSG", "KMSG_READ", "KMSG_DROPPED"):
        assert getattr(record, name) == getattr(lib, f"KVMTEST_REC_{name}"), name


# ---- a trace from the guest is checked before anything is replayed --------------------

def rec(tag: int, body: bytes = b"") -> bytes:
    return struct.pack("<II", tag, len(body)) + body


IO_UCALL = rec(record.IO, struct.pack("<BBHI", 1, 4, 0x1000, 1) + (3).to_bytes(4, "little"))


HLT = rec(record.HLT)


def snap(gpa: int, data: bytes) -> bytes:
    return rec(record.SNAP, struct.pack("<Q", gpa) + data)


@pytest.mark.parametrize("trace, why", [
    (b"", "an empty trace"),
    (b"\x01\x00\x00\x00\x00\x00\x00", "truncated record header"),
    (struct.pack("<II", record.HLT, 1), "record runs past the trace's end"),
    (HLT + b"\x02\x00\x00\x00", "truncated record header"),
    (rec(99), "unknown record tag 99"),
    (snap(0, bytes(8)), "memory recorded before any exit"),
    (HLT + rec(record.SNAP, bytes(7)), "short SNAP record"),
    (HLT + snap(layout.MEM_SIZE - 4, bytes(5)), "memory recorded outside guest memory at 0x3ffffc"),
    (rec(record.NESTED, struct.pack("<IIQ", 1, 0, 0)), "nested state recorded before any exit"),
    (HLT + rec(record.NESTED, struct.pack("<IIQ", 2, 0, 0)), "bad NESTED record"),
    (HLT + rec(record.NESTED, struct.pack("<IIQ", 1, 0x10000, 0)), "bad NESTED record"),
    (HLT + rec(record.NESTED, bytes(15)), "record of 15 bytes, expected 16"),
    (rec(record.HLT, b"x"), "record of 1 bytes, expected 0"),
    (rec(record.IO, bytes(7)), "short IO record"),
    (rec(record.IO, struct.pack("<BBHI", 1, 2, 0x1000, 3) + bytes(7)),
     "IO record longer than size x count"),
    (rec(record.MMIO, bytes(15)), "bad MMIO record"),
    (rec(record.MMIO, bytes(16 + 9)), "bad MMIO record"),
    (rec(record.MMIO, struct.pack("<QIB3x", 0xFEE00000, 4, 0) + bytes(4)),
     "bad MMIO record"),  # a read carries no data
    (rec(record.MMIO, struct.pack("<QIB3x", 0xFEE00000, 4, 2) + bytes(4)), "bad MMIO record"),
    (rec(record.MMIO, struct.pack("<QIB3x", 0xFEE00000, 4, 1) + bytes(3)), "bad MMIO record"),
    (rec(record.MMIO, struct.pack("<QIB3x", 0xFEE00000, 16, 1) + bytes(7)), "bad MMIO record"),
    (rec(record.MMIO, struct.pack("<QIB3x", 0xFEE00000, 16, 1) + bytes(9)), "bad MMIO record"),
    (HLT + rec(record.NESTED, struct.pack("<IIQ", 0, 1, 0)), "bad NESTED record"),
    (HLT + rec(record.NESTED, struct.pack("<IIQ", 0, 0, 0x9000)), "bad NESTED record"),
    (rec(record.INTERNAL, bytes(7)), "short record"),
    (rec(record.INTERNAL, struct.pack("<II", 1, 17) + bytes(8 * 17)), "bad data count"),
    (rec(record.SYSTEM_EVENT, struct.pack("<II", 1, 2) + bytes(8)), "bad data count"),
    (rec(record.FAIL_ENTRY, bytes(11)), "record of 11 bytes, expected 12"),
    (rec(record.DEBUG, bytes(33)), "record of 33 bytes, expected 32"),
    (rec(record.UNKNOWN, bytes(3)), "record of 3 bytes, expected 4"),
    (rec(record.RUN_ERROR, b"\x01"), "record of 1 bytes, expected 4"),
    (rec(record.RUN_ERROR, struct.pack("<I", 0)), "KVM_RUN failed with errno 0"),
    (rec(record.RUN_ERROR, struct.pack("<I", 4096)), "KVM_RUN failed with errno 4096"),
    (rec(record.RUN_ERROR, struct.pack("<I", 1 << 31)), "KVM_RUN failed with errno 2147483648"),
    (rec(record.RUN_ERROR, struct.pack("<I", 14)) + HLT, "an exit recorded after KVM_RUN failed"),
    (rec(record.RUN_ERROR, struct.pack("<I", 14)) + rec(record.RUN_ERROR, struct.pack("<I", 14)),
     "an exit recorded after KVM_RUN failed"),
    (HLT * (record.MAX_TRACE // 8 + 1),
     f"a trace of {8 * (record.MAX_TRACE // 8 + 1)} bytes (at most {record.MAX_TRACE})"),
])
def test_malformed_traces_are_refused(trace, why):
    with pytest.raises(record.ReplayError) as info:
        record.parse(trace, 5.0)
    assert str(info.value) == why


def test_every_exit_record_becomes_the_exit_vcpu_run_makes():
    """Each tag's body decoded field by field, at the edges of its size
    (MMIO writes of 8 and 16 bytes, 8 of data; 16 data words)."""
    from kvmtest.exits import (
        DebugExit,
        FailEntryExit,
        InternalErrorExit,
        IrqWindowExit,
        MmioExit,
        ShutdownExit,
        SystemEventExit,
        UnknownExit,
    )

    words = tuple(range(1, 17))
    trace = (rec(record.IO, struct.pack("<BBHI", 0, 2, 0x3F8, 3) + b"abcdef")
             + rec(record.MMIO, struct.pack("<QIB3x", 0x40_0000, 8, 1) + b"12345678")
             + rec(record.MMIO, struct.pack("<QIB3x", 0x40_1000, 4, 0))
             + rec(record.MMIO, struct.pack("<QIB3x", 0x40_2000, 16, 1) + b"ABCDEFGH")
             + rec(record.FAIL_ENTRY, struct.pack("<QI", 0xFFFF_FFFF_FFFF_FFFF, 7))
             + rec(record.INTERNAL, struct.pack("<II", 3, 16) + struct.pack("<16Q", *words))
             + rec(record.SYSTEM_EVENT, struct.pack("<II", 2, 1) + struct.pack("<Q", 9))
             + rec(record.DEBUG, struct.pack("<I4xQQQ", 1, 0x10_0000, 0x4000, 0x400))
             + rec(record.UNKNOWN, struct.pack("<I", 77)) + rec(record.SHUTDOWN)
             + rec(record.IRQ_WINDOW) + rec(record.INTERRUPTED) + rec(record.TIMED_OUT) + HLT)
    steps, log = record.parse(trace, 0.75)
    assert log is None  # no read recorded: the log was not checked
    empty, _ = record.parse(rec(record.IO, struct.pack("<BBHI", 1, 4, 0x80, 0))
                           + rec(record.INTERNAL, struct.pack("<II", 1, 0)), 5.0)
    assert [s.exit for s in empty] == [IoExit(1, 0x80, 4, 0, b""), InternalErrorExit(1, ())]
    assert [s.exit for s in steps] == [
        IoExit(0, 0x3F8, 2, 3, b"abcdef"),
        MmioExit(0x40_0000, b"12345678", 8, True),
        MmioExit(0x40_1000, b"", 4, False),
        MmioExit(0x40_2000, b"ABCDEFGH", 16, True),  # data[8]: the first 8 bytes
        FailEntryExit(0xFFFF_FFFF_FFFF_FFFF, 7),
        InternalErrorExit(3, words),
        SystemEventExit(2, (9,)),
        DebugExit(1, 0x10_0000, 0x4000, 0x400),
        UnknownExit(77), ShutdownExit(), IrqWindowExit(), InterruptedExit(), TimedOut(0.75),
        HltExit(),
    ]
    assert all(s.snaps is None and s.nested is False for s in steps)


def test_the_edges_of_what_a_trace_may_hold():
    """Memory up to the end of guest memory, nested-state flags up to 0xFFFF,
    a trace of exactly MAX_TRACE bytes, a header with nothing after it."""
    steps, _ = record.parse(
        HLT + snap(layout.MEM_SIZE - 4, b"wxyz") + snap(0x100, b"")
        + rec(record.NESTED, struct.pack("<IIQ", 1, 0xFFFF, 0x9000)), 5.0)
    assert steps[0].snaps == [(layout.MEM_SIZE - 4, b"wxyz"), (0x100, b"")]
    assert (steps[0].nested.flags, steps[0].nested.vmcb12_gpa) == (0xFFFF, 0x9000)
    assert len(record.parse(HLT * (record.MAX_TRACE // 8), 5.0)[0]) == record.MAX_TRACE // 8
    m = record.ReplayMachine(steps)
    m.run(5.0)
    assert m.read(layout.MEM_SIZE - 2, 2) == b"yz"
    assert m.read(layout.MEM_SIZE - 4, 0) == b""
    with pytest.raises(ValueError) as bad:
        m.read(layout.MEM_SIZE - 2, 3)
    assert str(bad.value) == "GPA range [0x3ffffe, 0x400001) is not guest memory"
    with pytest.raises(ValueError, match="is not guest memory"):
        m.read(-1, 1)
    for gpa in (0, layout.MEM_SIZE - 8):  # in guest memory, but not recorded
        with pytest.raises(record.ReplayError, match="which was not recorded"):
            m.read(gpa, 8)


def test_a_read_is_answered_by_the_snapshot_that_holds_it():
    steps, _ = record.parse(HLT + snap(0x1000, b"abcd") + snap(0x2000, b"efgh"), 5.0)
    m = record.ReplayMachine(steps)
    m.run(5.0)
    assert m.read(0x2001, 3) == b"fgh"
    assert m.read(0x1000, 4) == b"abcd"
    with pytest.raises(record.ReplayError) as info:
        m.read(0x1002, 4)  # runs past the first snapshot
    assert str(info.value) == "drive() read [0x1002, 0x1006), which was not recorded"


LONGEST = (record.MAX_TRACE + 2) // 3 * 4  # base64 of MAX_TRACE bytes


@pytest.mark.parametrize("text, why", [
    ("@@@@", "a trace that is not base64 ("),
    ("QUJD\n", "a trace that is not base64 ("),
    ("QUJ", "a trace that is not base64 ("),
    ("QUJ\u00e9", "a trace that is not base64 (a character outside ASCII)"),
    ("QUJ=", "a trace that is not base64 (not as b64() writes it)"),
    ("QR==", "a trace that is not base64 (not as b64() writes it)"),
    ("QUJDQUJDQUJD=", "a trace that is not base64 ("),
    ("\u0660\u0661\u0662\u0663", "a trace that is not base64 (a character outside ASCII)"),
    (5, f"a trace that is not base64 of at most {record.MAX_TRACE} bytes"),
    ("A" * (LONGEST + 4), f"a trace that is not base64 of at most {record.MAX_TRACE} bytes"),
])
def test_a_trace_must_be_strict_base64_of_a_bounded_size(text, why):
    with pytest.raises(record.ReplayError) as info:
        record.unpack_trace(text)
    assert str(info.value).startswith(why)


def test_base64_round_trip_at_the_largest_trace():
    trace = bytes(range(256)) * (record.MAX_TRACE // 256)
    text = record.b64(trace)
    assert len(text) == LONGEST and "\n" not in text
    assert record.unpack_trace(text) == trace


def test_replay_answers_only_what_was_recorded():
    steps, _ = record.parse(
        IO_UCALL + rec(record.SNAP, struct.pack("<Q", 0x7008) + bytes(range(56)))
        + rec(record.INTERRUPTED) + rec(record.HLT) + rec(record.TIMED_OUT)
        + rec(record.RUN_ERROR, struct.pack("<I", 4)), 0.25)
    m = record.ReplayMachine(steps)
    with pytest.raises(record.ReplayError) as info:
        m.nested_state()
    assert str(info.value) == "drive() read the nested state where it was not recorded"
    assert isinstance(m.run(5.0), IoExit)
    assert m.read(0x7010, 8) == bytes(range(8, 16))
    with pytest.raises(record.ReplayError, match=r"read \[0x7000, 0x7008\)"):
        m.read(0x7000, 8)
    with pytest.raises(ValueError, match="not guest memory"):
        m.read(layout.MEM_SIZE - 4, 8)
    with pytest.raises(record.ReplayError):
        m.nested_state()
    with pytest.raises(record.ReplayError) as info:
        m.finished()
    assert str(info.value) == "4 recorded exits not replayed"
    assert isinstance(m.run(5.0), InterruptedExit)
    assert isinstance(m.run(5.0), HltExit)
    with pytest.raises(record.ReplayError):  # the HLT step recorded no memory
        m.read(0x7010, 8)
    assert m.run(5.0) == TimedOut(0.25)
    with pytest.raises(KvmError) as error:
        m.run(5.0)
    assert (error.value.ioctl, error.value.errno) == ("KVM_RUN", 4)
    m.finished()
    with pytest.raises(record.ReplayError) as info:
        m.run(5.0)
    assert str(info.value) == "drive() ran the vCPU past the recorded exits"


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


# The kernel log read, and KEEP_LINES bad records kept: no room for more.
FULL = rec(record.KMSG_READ) + rec(record.KMSG, b"4,1,2,-;WARNING: x\n") * kmsg.KEEP_LINES


@pytest.mark.parametrize("tail, why", [
    (rec(record.KMSG, b"4,1,2,-;WARNING: x\n"), "a kernel-log record out of place or too long"),
    (rec(record.KMSG_READ) + rec(record.KMSG_READ), "the kernel log read twice"),
    (rec(record.KMSG_READ) + rec(record.KMSG, b"6,1,2,-;kvm: fine\n"),
     "a kernel-log record without a bad word"),
    (rec(record.KMSG_READ) + rec(record.HLT), "a record after the kernel log"),
    (rec(record.KMSG_READ, b"x"), "record of 1 bytes, expected 0"),
    (rec(record.KMSG_DROPPED, struct.pack("<I", 1)),
     "a kernel-log record out of place or too long"),
    (FULL + rec(record.KMSG_DROPPED, struct.pack("<I", 0)), "0 kernel-log records dropped"),
    (FULL + rec(record.KMSG_DROPPED, struct.pack("<I", 1 << 31)),
     "2147483648 kernel-log records dropped"),
    (FULL + rec(record.KMSG_DROPPED, bytes(3)), "record of 3 bytes, expected 4"),
    (FULL + rec(record.KMSG_DROPPED, struct.pack("<I", 1))
     + rec(record.KMSG, b"4,1,2,-;WARNING: x\n"), "a kernel-log record out of place or too long"),
    (FULL + rec(record.KMSG_DROPPED, struct.pack("<I", 1)) * 2,
     "a kernel-log record out of place or too long"),
    (rec(record.KMSG_READ) + rec(record.KMSG_DROPPED, struct.pack("<I", 1)),
     "kernel-log records dropped while there was room"),
    (FULL[:-27] + rec(record.KMSG_DROPPED, struct.pack("<I", 1)),
     "kernel-log records dropped while there was room"),
    (rec(record.KMSG_READ) + rec(record.KMSG, b"4,1,2,-;WARNING: x\n") * 65,
     "more kernel-log records than kmsg.KEEP_LINES/_BYTES"),
    (rec(record.KMSG_READ) + rec(record.KMSG, b"4,1,2,-;WARNING: " + b"x" * 8000) * 4,
     "more kernel-log records than kmsg.KEEP_LINES/_BYTES"),
])
def test_malformed_kernel_log_records_are_refused(tail, why):
    with pytest.raises(record.ReplayError) as info:
        record.parse(rec(record.HLT) + tail, 5.0)
    assert str(info.value) == why


def test_kernel_log_records_at_their_size_limit():
    line = b"4,1,2,-;WARNING: " + b"x" * (8192 - 17)
    assert len(line) == 8192  # kmsg.RECORD_MAX: one read
    _, log = record.parse(HLT + rec(record.KMSG_READ) + rec(record.KMSG, line), 5.0)
    assert log == ["WARNING: " + "x" * (8192 - 17)]
    with pytest.raises(record.ReplayError) as info:
        record.parse(HLT + rec(record.KMSG_READ) + rec(record.KMSG, line + b"x"), 5.0)
    assert str(info.value) == "a kernel-log record out of place or too long"


def test_writes_stay_in_guest_memory():
    w = record._Writes()
    w.write(layout.MEM_SIZE - 2, b"ab")
    w.write(0, b"")
    assert w.blob == struct.pack("<QI", layout.MEM_SIZE - 2, 2) + b"ab" + struct.pack("<QI", 0, 0)
    for gpa, data in ((layout.MEM_SIZE - 1, b"ab"), (-1, b"a")):
        with pytest.raises(ValueError) as info:
            w.write(gpa, data)
        assert str(info.value) == (f"GPA range [{gpa:#x}, {gpa + len(data):#x}) is not "
                                   "guest memory")


def test_a_script_case_compiles_its_log_and_nested_state_reads():
    from kvmtest import eventlog
    from kvmtest.case import SCRIPT

    case = next(c for c in catalogue() if c.scenario == SCRIPT)
    compiled = record.compile_case(case, load_payload(case.payload))
    assert compiled.final == ((case.vmcb12_gpa, 0x400), (params.LOG_GPA, eventlog.SIZE))
    assert compiled.final_nested is True
    again = record.Compiled.from_json(compiled.to_json())
    assert again == compiled


def test_replay_fails_when_drive_stops_before_the_trace_does():
    """DONE, then one more exit recorded: C and drive() disagree on where
    the case ended."""
    done = rec(record.IO, struct.pack("<BBHI", 1, 4, 0x1000, 1) + (3).to_bytes(4, "little"))
    trace = done + snap(0x7008, bytes(56)) + HLT
    case = _case("ping", count=0)
    with pytest.raises(record.ReplayError) as info:
        record.replay(case, load_payload("ping"), record.parse(trace, 5.0)[0], 5.0)
    assert str(info.value) == "1 recorded exits not replayed"
    with pytest.raises(record.ReplayError):  # nothing ran yet: nothing to read
        record.ReplayMachine([]).read(0x7008, 8)


def test_the_edges_of_the_kernel_log_and_a_failed_run():
    """KEEP_LINES records, KEEP_BYTES of them, then KMSG_DROPPED; errno 1 and
    ERRNO_MAX; memory recorded after a failed KVM_RUN (the final reads)."""
    line = rec(record.KMSG, b"4,1,2,-;WARNING: x\n")
    _, log = record.parse(HLT + rec(record.KMSG_READ) + line * kmsg.KEEP_LINES
                          + rec(record.KMSG_DROPPED, struct.pack("<I", (1 << 31) - 1)), 5.0)
    assert log == ["WARNING: x"] * kmsg.KEEP_LINES + [kmsg.dropped((1 << 31) - 1)]
    big = b"4,1,2,-;WARNING: " + b"y" * (kmsg.KEEP_BYTES // 3 - 17)
    _, log = record.parse(HLT + rec(record.KMSG_READ) + rec(record.KMSG, big) * 3, 5.0)
    assert len(big) * 3 == kmsg.KEEP_BYTES and len(log) == 3
    # Dropped only once a record might not fit: more than KEEP_BYTES - RECORD_MAX kept.
    whole = rec(record.KMSG, b"4,1,2,-;WARNING: " + b"y" * (kmsg.RECORD_MAX - 17))
    room = HLT + rec(record.KMSG_READ) + whole * 2  # 16 KiB kept: a whole record fits
    dropped = rec(record.KMSG_DROPPED, struct.pack("<I", 1))
    _, log = record.parse(room + rec(record.KMSG, b"4,1,2,-;Oops") + dropped, 5.0)
    assert log[-2:] == ["Oops", kmsg.dropped(1)]
    with pytest.raises(record.ReplayError, match="while there was room"):
        record.parse(room + dropped, 5.0)
    for err in (1, record.ERRNO_MAX):
        steps, _ = record.parse(rec(record.RUN_ERROR, struct.pack("<I", err))
                                + snap(0x100, b"ab"), 5.0)
        assert (steps[0].exit, steps[0].errno, steps[0].snaps) == (None, err, [(0x100, b"ab")])
        with pytest.raises(KvmError) as info:
            record.ReplayMachine(steps).run(5.0)
        assert info.value.errno == err


def test_the_trace_fits_one_channel_string():
    from kvmtest.qemu.channel import MAX_STRING

    assert record.RUN_SPACE + record.KMSG_SPACE == record.MAX_TRACE
    assert len(record.b64(bytes(record.MAX_TRACE))) <= MAX_STRING
    # the most kvmtest_kmsg_drain writes: READ, KEEP_LINES headers, KEEP_BYTES, DROPPED
    assert record.KMSG_SPACE == 8 + 8 * kmsg.KEEP_LINES + kmsg.KEEP_BYTES + 8 + 4


# ---- the kernel log around a recorded case ------------------------------------------
#
# Lines planted in the real /dev/kmsg hold a word of the test's own
# (KvmBackend(kmsg_words=)): tests running beside these (pytest-xdist, or
# another run on the machine) watch the same log for kmsg.BAD_WORDS, or for
# another test's word, and must see none of them.


def _plant(line: str) -> None:
    # A descriptor per line: /dev/kmsg rate-limits each open file's writes
    # (printk_devkmsg=ratelimit: a burst of 10).
    fd = os.open(kmsg.KMSG, os.O_WRONLY)
    try:
        os.write(fd, f"<6>{line}\n".encode())
    finally:
        os.close(fd)


@pytest.fixture
def word(request) -> str:
    """This test's own word, in this process."""
    return f"kvmtest-test-record-{request.node.name[5:25]}-{os.getpid()}-{time.monotonic_ns()}"


@pytest.fixture
def planting(real_kvm, word):
    """Both paths on the host's KVM, watching the kernel log for WORD."""
    if not os.access(kmsg.KMSG, os.R_OK | os.W_OK):
        pytest.skip("cannot read and write /dev/kmsg: run as root to test the kernel-log read")
    recorded = KvmBackend(kmsg_words=(word,))
    python = KvmBackend(records=False, kmsg_words=(word,))
    yield recorded, python
    recorded.close()
    python.close()


def test_the_kernel_log_during_a_case_is_read_in_c(planting, word):
    """Lines logged while a recorded case runs: those with the word come back
    in the trace, as Kmsg.watch() would report them; the others do not; a
    line logged before the case does not."""
    import threading

    recorded, _ = planting
    case = _case("spin")
    payload = load_payload(case.payload)
    mark = "(a test line)"
    _plant(f"{word} before the case {mark}")

    def log() -> None:
        time.sleep(0.1)
        _plant(f"an ordinary line {mark}")
        _plant(f"{word}: WARN-like line during the case {mark}")

    writer = threading.Thread(target=log)
    writer.start()
    try:
        trace = recorded.record(payload, False, {}, record.compile_case(case, payload), 0.5)
    finally:
        writer.join()
    steps, lines = record.parse(trace, 0.5, recorded.kmsg_bad)
    assert type(steps[-1].exit) is TimedOut
    assert lines == [f"{word}: WARN-like line during the case {mark}"]
    with pytest.raises(record.ReplayError, match="without a bad word"):
        record.parse(trace, 0.5)  # kmsg.BAD_WORDS: the planted line holds none


def test_a_line_logged_while_the_machine_is_taken_counts_on_both_paths(planting, word,
                                                                       monkeypatch):
    """The kernel log is watched from before the machine is taken (a vCPU
    renewed, a VM made) until after it is given back, on both paths: a
    line logged by renew() belongs to the case that caused it.  (renew() is
    wrapped to log a real line at that moment.)"""
    from kvmtest.backends import kvm as kvm_backend

    renew = kvm_backend.KvmMachine.renew
    logged: list[str] = []

    def logging_renew(self, *args, **kwargs):
        line = f"{word} renewing a vCPU {len(logged)}"
        logged.append(line)
        _plant(line)
        return renew(self, *args, **kwargs)

    monkeypatch.setattr(kvm_backend.KvmMachine, "renew", logging_renew)
    seen = []
    for backend in planting:
        runner.run_case(backend, _case("spin"), 0.2)  # not at a ucall: the next case renews
        obs = runner.run_case(backend, _case("ping", count=0), 5.0)
        seen.append(obs.kernel_warnings)
    assert seen == [[logged[0]], [logged[1]]]


def test_a_warn_storm_keeps_the_same_lines_on_both_paths(planting, word):
    """More lines than kmsg.KEEP_LINES: each path keeps the first ones and
    says how many more there were (the trace stays within MAX_TRACE)."""
    import threading

    observed = []
    for backend in planting:
        n = kmsg.KEEP_LINES + 6
        lines = [f"{word} storm {i}" for i in range(n)]

        def storm(lines: list[str]) -> None:
            time.sleep(0.05)
            for line in lines:
                _plant(line)

        writer = threading.Thread(target=storm, args=(lines,))
        writer.start()
        try:
            obs = runner.run_case(backend, _case("spin"), 1.0)
        finally:
            writer.join()
        assert obs.kernel_warnings == [*lines[:kmsg.KEEP_LINES], kmsg.dropped(6)]
        observed.append(obs)
    assert observed[0] == observed[1]


def test_the_c_drain_keeps_what_kmsg_keep_keeps(real_kvm):
    """kvmtest_kmsg_drain with kmsg.BAD_WORDS, against kmsg.keep, record by
    record.  The records come from a SOCK_SEQPACKET socket standing in for
    /dev/kmsg (one read, one record, EAGAIN at the end, as /dev/kmsg): real
    WARNING lines planted in the real log would be seen by tests beside."""
    import socket

    backend = real_kvm["backend"]
    bad = [f"4,{i},5,-;WARNING: CPU: 0 PID: {i} at nested.c\n".encode() for i in range(70)]
    batches = [
        [],
        [b"6,1,2,-;kvm: fine\n", b"4,2,3,-;BUG: kernel NULL pointer\n", b"no prefix Oops",
         b"4,3,4,-;\xff\xfe UBSAN: array-index\n", b"6,4,5,-;WARNING before semicolon;x\n"],
        bad,
        bad[:kmsg.KEEP_LINES],
        [b"4,1,2,-;RCU stall " + b"z" * 8000] * 4,  # over KEEP_BYTES at the fourth
        [b"4,1,2,-;RCU stall " + b"z" * 8000] * 4 + [b"4,1,2,-;BUG: small\n"],  # not kept
        [b"6,1,2,-;fine\n"] * 3 + [b"4,1,2,-;Call Trace:\n"] + [b"4,1,2,-;Oops\n" * 2],
    ]
    for records in batches:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            for r in records:
                a.send(r)
            b.setblocking(False)
            trace = backend._kmsg_drain(b.fileno())
        finally:
            a.close()
            b.close()
        _, log = record.parse(HLT + trace, 5.0)
        assert log == kmsg.keep(records), records[:2]
    assert log != [] and len(kmsg.keep(bad)) == kmsg.KEEP_LINES + 1


def test_keep_takes_the_first_bad_records_then_counts_the_rest():
    """kmsg.keep, what both paths report: bad records only, in order, the
    first KEEP_LINES within KEEP_BYTES; after the first one not kept, none
    is (a prefix of the storm), and one line says how many."""
    line = b"4,1,2,-;WARNING: x\n"
    assert kmsg.keep([]) == [] and kmsg.keep([b"6,1,2,-;fine\n"]) == []
    assert kmsg.keep([line] * kmsg.KEEP_LINES) == ["WARNING: x"] * kmsg.KEEP_LINES
    assert kmsg.keep([line] * (kmsg.KEEP_LINES + 2)) == (
        ["WARNING: x"] * kmsg.KEEP_LINES + [kmsg.dropped(2)])
    big = b"4,1,2,-;Oops " + b"o" * (kmsg.KEEP_BYTES // 2 - 13)
    assert len(big) * 2 == kmsg.KEEP_BYTES
    assert kmsg.keep([big, big]) == [kmsg.message(big)] * 2
    assert kmsg.keep([big, big + b"o", line, b"6,1,2,-;fine\n"]) == [
        kmsg.message(big), kmsg.dropped(2)]
    assert kmsg.keep([b"6,1,2,-;mine\n", line], kmsg.pattern(["mine"])) == ["mine"]
    assert kmsg.dropped(3) == "kvmtest: 3 more kernel-log records with a bad word, not kept"
    assert not kmsg.BAD.search(kmsg.dropped(3))


def test_a_signal_handler_runs_while_a_recorded_case_runs(real_kvm):
    """A stray signal stops KVM_RUN: its Python handler runs at once, as in
    drive()'s loop (not when the case ends), and an exception it raises ends
    the case with the deadline disarmed and its signal unblocked."""
    import signal
    import threading

    from kvmtest.kvm.deadline import SIGNAL

    class Stop(Exception):
        pass

    def handler(signo, frame):
        raise Stop()

    backend = real_kvm["backend"]
    case = _case("spin")
    payload = load_payload(case.payload)
    compiled = record.compile_case(case, payload)
    old = signal.signal(signal.SIGUSR2, handler)
    try:
        seconds = 30.0  # the case's own end, were the handler kept waiting
        timer = threading.Timer(0.2, signal.pthread_kill,
                                (threading.main_thread().ident, signal.SIGUSR2))
        started = time.monotonic()
        timer.start()
        with pytest.raises(Stop):
            backend.record(payload, False, {}, compiled, seconds)
        assert time.monotonic() - started < seconds / 2
        timer.join()
        assert SIGNAL not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        # A harmless stray signal: the case goes on, recorded as an interruption.
        signal.signal(signal.SIGUSR2, lambda *_: None)
        timer = threading.Timer(0.1, signal.pthread_kill,
                                (threading.main_thread().ident, signal.SIGUSR2))
        timer.start()
        steps, _ = record.parse(backend.record(payload, False, {}, compiled, 0.5), 0.5)
        timer.join()
    finally:
        signal.signal(signal.SIGUSR2, old)
    assert [type(s.exit) for s in steps] == [InterruptedExit, TimedOut]
    assert SIGNAL not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_a_failed_kvm_run_closes_the_machine(real_kvm):
    """KVM_RUN fails (here ENOTTY: the C loop is pointed at /dev/null instead
    of the vCPU): the trace says so, the replay raises the KvmError drive()'s
    loop raises, and the machine is closed, not kept for the next case."""
    import errno

    backend = KvmBackend()
    try:
        case = _case("ping", count=0)
        runner.run_case(backend, case, 5.0)
        (m,) = backend._pool.values()
        null = os.open("/dev/null", os.O_RDONLY)
        try:
            m._record_args.vcpu_fd = null
            payload = load_payload(case.payload)
            trace = backend.record(payload, False, {}, record.compile_case(case, payload), 5.0)
        finally:
            os.close(null)
        steps, _ = record.parse(trace, 5.0)
        assert [(s.exit, s.errno) for s in steps] == [(None, errno.ENOTTY)]
        assert backend._pool == {} and m.vm.closed
        with pytest.raises(KvmError) as info:
            runner.replay_case(case, payload, trace, 5.0)
        assert info.value.errno == errno.ENOTTY
        assert runner.run_case(backend, case, 5.0).outcome  # a new machine runs the next
    finally:
        backend.close()
