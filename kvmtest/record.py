"""Record and replay: a case's KVM_RUN loop in C, its verdict logic in Python.

Under QEMU's TCG the guest agent's Python is ~20x slower than the host's,
and most of a case's time was that Python (docs/qemu.md, section 5).  For a
case whose run needs no host action between exits (``eligible``):

1. the host compiles it (``compile_case``): the memory ``prepare_memory``
   writes, and what ``drive()`` will read after the loop;
2. the guest runs it with ``kvmtest_case()`` (csrc/record.c): the writes,
   then KVM_RUN until the case ends, appending to a trace every exit as KVM
   reported it and the guest memory ``drive()`` reads at that moment (the
   ucall's arguments, the result block and nested state at a SYNC, an
   ASSERT's strings, then VMCB12, the event log, the nested state), then
   the kernel log's bad records (``kvmtest_kmsg_drain()``);
3. the host replays ``runner.drive()`` itself on a ``ReplayMachine`` that
   answers ``run()``, ``read()`` and ``nested_state()`` from the trace.

The verdict logic thus exists once.  A read the trace cannot answer raises
``ReplayError``: a gap in what C records, never a guess.  The trace comes
from a kernel under test: ``parse`` checks every record's tag and size.
docs/record.md has the format and the checks that keep both paths equal.
"""

from __future__ import annotations

import binascii
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from . import eventlog, kmsg, layout, params, ucall
from .case import INSN, NEED_SVM, SCRIPT, VMRUN, Case
from .exits import (
    DebugExit,
    Exit,
    FailEntryExit,
    HltExit,
    InternalErrorExit,
    InterruptedExit,
    IoExit,
    IrqWindowExit,
    MmioExit,
    ShutdownExit,
    SystemEventExit,
    TimedOut,
    UnknownExit,
)
from .kvm.errors import KvmError
from .observation import KVM_STATE_NESTED_GUEST_MODE, NestedView
from .payloads import Payload
from .vmcb import SAVE_AREA

# Record tags (csrc/record.c; kept equal by tests/test_record.py).
IO, HLT, MMIO, SHUTDOWN, FAIL_ENTRY, INTERNAL, SYSTEM_EVENT = 1, 2, 3, 4, 5, 6, 7
IRQ_WINDOW, DEBUG, UNKNOWN, INTERRUPTED, TIMED_OUT, RUN_ERROR = 8, 9, 10, 11, 12, 13
SNAP, NESTED, KMSG, KMSG_READ, KMSG_DROPPED = 20, 21, 22, 23, 24

# Bytes of one case's trace: it records ~4.5 KiB (VMCB12 and a few exits);
# base64, it must fit one channel string (qemu.channel.MAX_STRING).  The
# kernel log's part is bounded by kmsg.KEEP_*, the run's gets the rest.
MAX_TRACE = 128 * 1024
KMSG_SPACE = 8 + kmsg.KEEP_LINES * 8 + kmsg.KEEP_BYTES + 12  # READ, records, DROPPED
RUN_SPACE = MAX_TRACE - KMSG_SPACE
ERRNO_MAX = 4095  # the kernel's -MAX_ERRNO: what a failed KVM_RUN can return
_HEAD = struct.Struct("<II")
_WRITE = struct.Struct("<QI")
_IO = struct.Struct("<BBHI")
_MMIO = struct.Struct("<QIB3x")
_FAIL = struct.Struct("<QI")
_N = struct.Struct("<II")
_DEBUG = struct.Struct("<I4xQQQ")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_NESTED = struct.Struct("<IIQ")


def b64(data: bytes) -> str:
    """Bytes in a JSON frame (binascii: no Python loop, which TCG makes slow)."""
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def unpack_trace(text: object) -> bytes:
    """A trace from the guest (base64, ~1.3 KiB: not compressed, as deflate
    under TCG costs more than the bytes it saves); ReplayError if it is not
    strict base64 of at most MAX_TRACE bytes."""
    if not isinstance(text, str) or len(text) > (MAX_TRACE + 2) // 3 * 4:
        raise ReplayError(f"a trace that is not base64 of at most {MAX_TRACE} bytes")
    if not text.isascii():  # a2b_base64 raises ValueError, not binascii.Error, on those
        raise ReplayError("a trace that is not base64 (a character outside ASCII)")
    try:
        data = binascii.a2b_base64(text, strict_mode=True)
    except binascii.Error as e:
        raise ReplayError(f"a trace that is not base64 ({e})") from None
    if b64(data) != text:  # strict_mode still takes "QUJ=" or "QR=="
        raise ReplayError("a trace that is not base64 (not as b64() writes it)")
    return data


class ReplayError(RuntimeError):
    """The trace cannot answer what drive() asked (or is malformed)."""


def eligible(case: Case) -> bool:
    """A case drive() runs without host actions, extra memslots or SMM: its
    run is a plain loop of exits (set_nested_state and SMM cases, and every
    case with on_sync actions, stay on the Python path)."""
    return case.scenario in (VMRUN, INSN, SCRIPT) and not case.on_sync and not case.extra_memory


class _Writes:
    """A Machine that only records prepare_memory's writes (memslot 0 only,
    as KvmMachine.write checks for a case without extra memory)."""

    def __init__(self) -> None:
        self.blob = bytearray()

    def write(self, gpa: int, data: bytes) -> None:
        if not (gpa >= 0 and gpa + len(data) <= layout.MEM_SIZE):
            raise ValueError(f"GPA range [{gpa:#x}, {gpa + len(data):#x}) is not guest memory")
        self.blob += _WRITE.pack(gpa, len(data)) + data


@dataclass(frozen=True)
class Compiled:
    """What the guest needs to record one case (sent in the batch frame)."""

    writes: bytes  # [u64 gpa][u32 len][data]...
    final: tuple[tuple[int, int], ...]  # (gpa, len) read after the loop
    final_nested: bool

    def to_json(self) -> dict:
        # zlib: the writes are mostly VMCB12's zeros, 17x smaller compressed,
        # and every byte of the batch frame is read and decoded under TCG.
        return {"writes": b64(zlib.compress(self.writes, 1)),
                "final": [list(r) for r in self.final], "nested": self.final_nested}

    @classmethod
    def from_json(cls, data: dict) -> Compiled:
        """The host's frame (trusted: the guest decodes it loosely)."""
        return cls(zlib.decompress(binascii.a2b_base64(data["writes"])),
                   tuple(tuple(r) for r in data["final"]), bool(data["nested"]))


def compile_case(case: Case, payload: Payload) -> Compiled:
    """prepare_memory's writes and drive()'s reads after the loop, for CASE."""
    from .runner import prepare_memory  # runner imports this module

    w = _Writes()
    prepare_memory(w, case, payload)  # type: ignore[arg-type]  (write() is all it uses)
    final = []
    if NEED_SVM in case.needs:
        final.append((case.vmcb12_gpa, SAVE_AREA))  # runner._read_vmcb12 reads no more
    if case.scenario == SCRIPT:
        final.append((params.LOG_GPA, eventlog.SIZE))
    return Compiled(bytes(w.blob), tuple(final), case.scenario == SCRIPT)


# ---- the trace ------------------------------------------------------------------


@dataclass
class Step:
    """One run() result and the memory and nested state recorded with it."""

    exit: Exit | None  # None: KVM_RUN failed (errno)
    errno: int = 0
    snaps: list[tuple[int, bytes]] | None = None
    nested: NestedView | bool | None = False  # False: not recorded


def _exit(tag: int, body: bytes, timeout: float) -> Exit:
    n = len(body)
    if tag == IO:
        if n < _IO.size:
            raise ReplayError("short IO record")
        direction, size, port, count = _IO.unpack_from(body)
        data = body[_IO.size:]
        if len(data) > size * count:
            raise ReplayError("IO record longer than size x count")
        return IoExit(direction, port, size, count, data)
    if tag == MMIO:
        if n < _MMIO.size:
            raise ReplayError("bad MMIO record")
        phys, length, is_write = _MMIO.unpack_from(body)
        # record.c keeps a write's data, min(len, 8) bytes, and none of a read's
        if is_write > 1 or n - _MMIO.size != (min(length, 8) if is_write else 0):
            raise ReplayError("bad MMIO record")
        return MmioExit(phys, body[_MMIO.size:], length, bool(is_write))
    if tag == FAIL_ENTRY:
        _size(body, _FAIL.size)
        return FailEntryExit(*_FAIL.unpack(body))
    if tag in (INTERNAL, SYSTEM_EVENT):
        if n < _N.size:
            raise ReplayError("short record")
        first, ndata = _N.unpack_from(body)
        if ndata > 16 or n != _N.size + 8 * ndata:
            raise ReplayError("bad data count")
        data = struct.unpack_from(f"<{ndata}Q", body, _N.size)
        return InternalErrorExit(first, data) if tag == INTERNAL else SystemEventExit(first, data)
    if tag == DEBUG:
        _size(body, _DEBUG.size)
        return DebugExit(*_DEBUG.unpack(body))
    if tag == UNKNOWN:
        _size(body, 4)
        return UnknownExit(_U32.unpack(body)[0])
    _size(body, 0)
    simple = {HLT: HltExit, SHUTDOWN: ShutdownExit, IRQ_WINDOW: IrqWindowExit,
              INTERRUPTED: InterruptedExit}
    if tag in simple:
        return simple[tag]()
    if tag == TIMED_OUT:
        return TimedOut(timeout)
    raise ReplayError(f"unknown record tag {tag}")


def _size(body: bytes, n: int) -> None:
    if len(body) != n:
        raise ReplayError(f"record of {len(body)} bytes, expected {n}")


def _records(trace: bytes) -> Iterator[tuple[int, bytes]]:
    pos = 0
    while pos < len(trace):
        if len(trace) - pos < _HEAD.size:
            raise ReplayError("truncated record header")
        tag, length = _HEAD.unpack_from(trace, pos)
        pos += _HEAD.size
        if length > len(trace) - pos:
            raise ReplayError("record runs past the trace's end")
        yield tag, trace[pos:pos + length]
        pos += length


def _kmsg_line(body: bytes, bad: re.Pattern[str]) -> str:
    """A KMSG record's line (kvmtest_kmsg_drain keeps only BAD ones)."""
    if len(body) > kmsg.RECORD_MAX:
        raise ReplayError("a kernel-log record out of place or too long")
    line = kmsg.message(body)
    if not bad.search(line):
        raise ReplayError("a kernel-log record without a bad word")
    return line


def _kmsg_dropped(body: bytes) -> str:
    """A KMSG_DROPPED record's line: how many bad records were not kept."""
    _size(body, 4)
    n = _U32.unpack(body)[0]
    if not 0 < n < 1 << 31:
        raise ReplayError(f"{n} kernel-log records dropped")
    return kmsg.dropped(n)


def parse(trace: bytes, timeout: float, bad: re.Pattern[str] = kmsg.BAD
          ) -> tuple[list[Step], list[str] | None]:
    """The trace as steps, and the kernel log's bad lines during the case
    (None: the log was not read; BAD: the words the log was read for);
    ReplayError if anything is malformed."""
    if len(trace) > MAX_TRACE:
        raise ReplayError(f"a trace of {len(trace)} bytes (at most {MAX_TRACE})")
    steps: list[Step] = []
    log: list[str] | None = None
    kept, closed = 0, False  # bytes of KMSG records; KMSG_DROPPED seen (the last)
    for tag, body in _records(trace):
        if tag == KMSG_READ:
            _size(body, 0)
            if log is not None:
                raise ReplayError("the kernel log read twice")
            log = []
        elif tag in (KMSG, KMSG_DROPPED):
            if log is None or closed:
                raise ReplayError("a kernel-log record out of place or too long")
            if tag == KMSG:
                log.append(_kmsg_line(body, bad))
                kept += len(body)
                if len(log) > kmsg.KEEP_LINES or kept > kmsg.KEEP_BYTES:
                    raise ReplayError("more kernel-log records than kmsg.KEEP_LINES/_BYTES")
            else:
                # record.c drops a record only when the next might not fit
                if len(log) < kmsg.KEEP_LINES and kept + kmsg.RECORD_MAX <= kmsg.KEEP_BYTES:
                    raise ReplayError("kernel-log records dropped while there was room")
                log.append(_kmsg_dropped(body))
                closed = True
        elif log is not None:
            raise ReplayError("a record after the kernel log")
        elif tag == SNAP:
            if len(body) < 8 or not steps:
                raise ReplayError("memory recorded before any exit" if not steps
                                  else "short SNAP record")
            gpa = _U64.unpack_from(body)[0]
            data = body[8:]
            if gpa + len(data) > layout.MEM_SIZE:
                raise ReplayError(f"memory recorded outside guest memory at {gpa:#x}")
            step = steps[-1]
            if step.snaps is None:
                step.snaps = []
            step.snaps.append((gpa, data))
        elif tag == NESTED:
            _size(body, _NESTED.size)
            if not steps:
                raise ReplayError("nested state recorded before any exit")
            ok, flags, vmcb_pa = _NESTED.unpack(body)
            if ok not in (0, 1) or flags > 0xFFFF or (not ok and (flags or vmcb_pa)):
                raise ReplayError("bad NESTED record")
            guest_mode = flags & KVM_STATE_NESTED_GUEST_MODE
            steps[-1].nested = NestedView(flags, vmcb_pa if guest_mode else None) if ok else None
        elif steps and steps[-1].exit is None:
            raise ReplayError("an exit recorded after KVM_RUN failed")
        elif tag == RUN_ERROR:
            _size(body, 4)
            err = _U32.unpack(body)[0]
            if not 0 < err <= ERRNO_MAX:
                raise ReplayError(f"KVM_RUN failed with errno {err}")
            steps.append(Step(None, err))
        else:
            steps.append(Step(_exit(tag, body, timeout)))
    if not steps:
        raise ReplayError("an empty trace")
    return steps, log


class ReplayMachine:
    """The Machine drive() sees on the host: run() returns the recorded exits
    in order; read() and nested_state() answer from what was recorded with
    the last exit returned (the guest did not run in between).  Anything
    else drive() could ask is not part of an eligible case: it raises."""

    def __init__(self, steps: list[Step]) -> None:
        self._steps = steps
        self._next = 0
        self._now: Step | None = None

    def run(self, timeout: float) -> Exit:
        if self._next >= len(self._steps):
            raise ReplayError("drive() ran the vCPU past the recorded exits")
        self._now = step = self._steps[self._next]
        self._next += 1
        if step.exit is None:
            raise KvmError("KVM_RUN", step.errno)
        return step.exit

    def read(self, gpa: int, n: int) -> bytes:
        for base, data in (self._now.snaps or []) if self._now else []:
            if base <= gpa and gpa + n <= base + len(data):
                return data[gpa - base:gpa - base + n]
        if not (gpa >= 0 and gpa + n <= layout.MEM_SIZE):  # as KvmMachine.read
            raise ValueError(f"GPA range [{gpa:#x}, {gpa + n:#x}) is not guest memory")
        raise ReplayError(f"drive() read [{gpa:#x}, {gpa + n:#x}), which was not recorded")

    def nested_state(self) -> NestedView | None:
        if self._now is None or self._now.nested is False:
            raise ReplayError("drive() read the nested state where it was not recorded")
        return self._now.nested  # type: ignore[return-value]

    def finished(self) -> None:
        """Every recorded exit was replayed (else C and drive() disagree on
        where the case ended)."""
        if self._next != len(self._steps):
            raise ReplayError(f"{len(self._steps) - self._next} recorded exits not replayed")


def replay(case: Case, payload: Payload, steps: list[Step], timeout: float):
    """drive()'s Observation for CASE from its parsed trace."""
    from .runner import drive

    m = ReplayMachine(steps)
    obs = drive(m, case, payload, timeout)  # type: ignore[arg-type]
    m.finished()
    return obs


# ucall's layout as record.c needs it (the trace's SNAPs come from these).
UCALL_ARGS = (layout.UCALL_GPA + 8, 8 * ucall.UCALL_NARGS)
RESULT = (params.RESULT_GPA, 8 * len(params.RESULT))
