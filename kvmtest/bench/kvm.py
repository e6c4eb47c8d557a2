"""``kvmtest bench``: the binding's cost next to a C reference doing the same work.

Three figures, one run:

* **lifecycle**: KVM_CREATE_VM, guest memory + KVM_SET_USER_MEMORY_REGION,
  KVM_CREATE_VCPU + kvm_run mmap, KVM_SET_CPUID2, KVM_GET/SET_SREGS (long
  mode), KVM_SET_REGS, load the ``ping`` payload (count 0), KVM_RUN to its
  DONE ucall, then unmap and close everything.  /dev/kvm is opened once, by
  both sides, outside the timed loop (a test session opens it once too).
* **per exit**: one VM runs ``ping`` with N PING ucalls; time per KVM_RUN.
* **soak**: many Python lifecycles; fd count and RSS before/after.

The C side is ``csrc/bench_ref.c``, compiled on first use with ``cc -O2``
into ``$XDG_CACHE_HOME/kvmtest`` (``~/.cache/kvmtest``), keyed by a hash of
its source and of ``<linux/kvm.h>``.  Python writes the guest into a spec
file (memory chunks, CPUID, regs/sregs as raw ``<linux/kvm.h>`` structs) so
both run the identical guest.
"""

from __future__ import annotations

import gc
import hashlib
import os
import shutil
import statistics
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .. import l1, layout, params
from ..exits import IoExit
from ..kvm import Kvm, Vcpu, Vm, ffi, pack_cpuid2
from ..payloads import load_payload
from ..ucall import UCALL_PORT, Ucall

C_SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "bench_ref.c"
KVM_HEADER = Path("/usr/include/linux/kvm.h")

TARGET_LIFECYCLE = 1.3
TARGET_EXIT = 1.5
SOAK_RSS_LIMIT = 10 << 20

# Spec record tags (csrc/bench_ref.c).
TAG_MEM_SIZE, TAG_CHUNK, TAG_REGS, TAG_SREGS, TAG_CPUID, TAG_UCALL = range(1, 7)

_DONE = int(Ucall.DONE)
_PING = int(Ucall.PING)


class BenchError(RuntimeError):
    """The benchmark cannot run (no compiler, unexpected guest exit...)."""


# -- the guest both sides run -----------------------------------------------------


@dataclass
class Guest:
    """Everything needed to start L1 running a payload: backend-neutral data
    plus the raw structs (``sregs`` holds only the fields setup() copies)."""

    memory: dict[int, bytes]
    regs: object  # struct kvm_regs *
    sregs: object  # struct kvm_sregs *
    cpuid: object  # struct kvm_cpuid2 *, packed once


def _set_segment(dst, seg: l1.Segment) -> None:
    dst.base, dst.limit, dst.selector, dst.type = seg.base, seg.limit, seg.selector, seg.type
    dst.present, dst.dpl, dst.db, dst.s = seg.present, seg.dpl, seg.db, seg.s
    dst.l, dst.g, dst.avl, dst.unusable = seg.l, seg.g, seg.avl, seg.unusable


def make_guest(kvm: Kvm, payload_name: str, count: int) -> Guest:
    payload = load_payload(payload_name)
    state = l1.initial_state(payload)
    memory = l1.memory_image(payload)
    memory[layout.PARAMS_GPA] = params.pack(params.PARAMS, {"count": count})
    regs = ffi.new("struct kvm_regs *")
    regs.rip, regs.rsp, regs.rflags = state.rip, state.rsp, state.rflags
    sregs = ffi.new("struct kvm_sregs *")
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
        _set_segment(getattr(sregs, name), getattr(state, name))
    sregs.gdt.base, sregs.gdt.limit = state.gdt
    sregs.idt.base, sregs.idt.limit = state.idt
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = state.cr0, state.cr3, state.cr4, state.efer
    return Guest(memory, regs, sregs, pack_cpuid2(kvm.supported_cpuid()))


_SREG_FIELDS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt", "gdt", "idt",
                "cr0", "cr3", "cr4", "efer")


def setup(kvm: Kvm, guest: Guest) -> tuple[Vm, Vcpu]:
    """The Python half of bench_ref.c's vm_setup(): same ioctls, same order."""
    vm = kvm.create_vm()
    try:
        mem = vm.set_user_memory_region(0, 0, layout.MEM_SIZE)
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid2(guest.cpuid)
        sregs = vcpu.get_sregs()
        t = guest.sregs
        for name in _SREG_FIELDS:
            setattr(sregs, name, getattr(t, name))
        vcpu.set_sregs(sregs)
        vcpu.set_regs(guest.regs)
        view = mem.view
        for gpa, data in guest.memory.items():
            view[gpa : gpa + len(data)] = data
    except BaseException:
        vm.close()
        raise
    return vm, vcpu


def run_to_done(vcpu: Vcpu) -> int:
    """KVM_RUN until the DONE ucall; returns the number of exits."""
    exits = 0
    run = vcpu.run
    while True:
        e = run()
        exits += 1
        if type(e) is not IoExit or e.port != UCALL_PORT:
            raise BenchError(f"unexpected exit {e!r}")
        cmd = int.from_bytes(e.data, "little")
        if cmd == _DONE:
            return exits
        if cmd != _PING:
            raise BenchError(f"unexpected ucall {cmd}")


def lifecycle(kvm: Kvm, guest: Guest, timeout: float | None = None) -> int:
    """One VM from creation to destruction; with ``timeout`` the run loop is
    bounded by a deadline (the soak uses it to prove timers are cleaned up)."""
    vm, vcpu = setup(kvm, guest)
    with vm:
        if timeout is None:
            return run_to_done(vcpu)
        with vcpu.deadline(timeout):
            return run_to_done(vcpu)


# -- the C reference ---------------------------------------------------------------


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "kvmtest"


def build_reference() -> Path:
    """Compile csrc/bench_ref.c once per (source, kvm.h) into the cache dir."""
    if not C_SOURCE.exists():
        raise BenchError(f"C reference {C_SOURCE} not found: run from a kvmtest source checkout")
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        raise BenchError("no C compiler (cc): apt-get install gcc")
    h = hashlib.sha256(C_SOURCE.read_bytes())
    if KVM_HEADER.exists():
        h.update(KVM_HEADER.read_bytes())
    exe = cache_dir() / f"bench_ref-{h.hexdigest()[:16]}"
    if not exe.exists():
        exe.parent.mkdir(parents=True, exist_ok=True)
        tmp = exe.with_suffix(f".{os.getpid()}.tmp")
        r = subprocess.run([cc, "-O2", "-Wall", "-o", str(tmp), str(C_SOURCE)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise BenchError(f"cc failed to build {C_SOURCE.name}:\n{r.stderr.strip()}")
        tmp.replace(exe)  # atomic: concurrent builders (xdist) do not clash
    return exe


def _record(tag: int, payload: bytes) -> bytes:
    return struct.pack("<II", tag, len(payload)) + payload


def write_spec(guest: Guest, path: Path) -> None:
    out = [_record(TAG_MEM_SIZE, struct.pack("<Q", layout.MEM_SIZE))]
    for gpa, data in guest.memory.items():
        out.append(_record(TAG_CHUNK, struct.pack("<Q", gpa) + data))
    out.append(_record(TAG_REGS, bytes(ffi.buffer(guest.regs))))
    out.append(_record(TAG_SREGS, bytes(ffi.buffer(guest.sregs))))
    out.append(_record(TAG_CPUID, bytes(ffi.buffer(guest.cpuid))))
    out.append(_record(TAG_UCALL, struct.pack("<III", UCALL_PORT, _DONE, _PING)))
    path.write_bytes(b"".join(out))


def run_reference(exe: Path, spec: Path, mode: str, n: int) -> tuple[float, int, list[float]]:
    """(seconds, exits, per-iteration seconds for lifecycle) from one bench_ref run."""
    r = subprocess.run([str(exe), str(spec), mode, str(n)], capture_output=True, text=True)
    if r.returncode != 0:
        raise BenchError(f"bench_ref {mode} failed: {r.stderr.strip()}")
    lines = r.stdout.splitlines()
    _, _, ns, exits = lines[0].split()
    samples = [int(x) / 1e9 for x in lines[1].split()] if len(lines) > 1 else []
    return int(ns) / 1e9, int(exits), samples


# -- measurements ------------------------------------------------------------------------


@dataclass
class Figure:
    name: str
    unit: str
    python: float
    c: float
    target: float

    @property
    def ratio(self) -> float:
        return self.python / self.c

    @property
    def ok(self) -> bool:
        return self.ratio <= self.target


@dataclass
class Soak:
    lifecycles: int
    seconds: float
    fds_before: int
    fds_after: int
    rss_before: int
    rss_after: int
    timers_before: int = 0
    timers_after: int = 0

    @property
    def fd_growth(self) -> int:
        return self.fds_after - self.fds_before

    @property
    def rss_growth(self) -> int:
        return self.rss_after - self.rss_before

    @property
    def ok(self) -> bool:
        return (self.fd_growth <= 0 and self.rss_growth < SOAK_RSS_LIMIT
                and self.timers_after <= self.timers_before)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def timer_count() -> int:
    """POSIX timers of this process (/proc/self/timers; 0 if the kernel lacks it)."""
    try:
        with open("/proc/self/timers") as f:
            return sum(1 for line in f if line.startswith("ID:"))
    except OSError:
        return 0


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bench_lifecycle(kvm: Kvm, exe: Path, n: int, rounds: int = 5) -> Figure:
    """Median lifecycle, Python vs C, over ``rounds`` alternating batches of n/rounds:
    other load on the host shifts both sides alike, and the median drops outliers."""
    guest = make_guest(kvm, "ping", 0)
    batch = max(1, n // rounds)
    py: list[float] = []
    c: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "lifecycle.spec"
        write_spec(guest, spec)
        lifecycle(kvm, guest)  # warm up (payload, imports, page cache)
        for _ in range(rounds):
            for _ in range(batch):
                t0 = time.perf_counter()
                lifecycle(kvm, guest)
                py.append(time.perf_counter() - t0)
            c += run_reference(exe, spec, "lifecycle", batch)[2]
    return Figure("lifecycle", "µs", statistics.median(py) * 1e6,
                  statistics.median(c) * 1e6, TARGET_LIFECYCLE)


def bench_exits(kvm: Kvm, exe: Path, n: int, rounds: int = 5) -> Figure:
    """Per-exit cost, Python vs C: best of ``rounds`` alternating runs of n exits."""
    guest = make_guest(kvm, "ping", n)
    py: list[float] = []
    c: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "exits.spec"
        write_spec(guest, spec)
        for _ in range(rounds):
            vm, vcpu = setup(kvm, guest)
            with vm:
                t0 = time.perf_counter()
                exits = run_to_done(vcpu)
                py.append((time.perf_counter() - t0) / exits)
            seconds, exits, _ = run_reference(exe, spec, "exits", n)
            c.append(seconds / exits)
    return Figure("per exit", "µs", min(py) * 1e6, min(c) * 1e6, TARGET_EXIT)


def soak(kvm: Kvm, n: int) -> Soak:
    guest = make_guest(kvm, "ping", 0)
    lifecycle(kvm, guest, timeout=10.0)  # first-use allocations are not growth
    gc.collect()
    fds0, rss0, timers0 = fd_count(), rss_bytes(), timer_count()
    t0 = time.perf_counter()
    for _ in range(n):
        lifecycle(kvm, guest, timeout=10.0)
    seconds = time.perf_counter() - t0
    gc.collect()
    return Soak(n, seconds, fds0, fd_count(), rss0, rss_bytes(), timers0, timer_count())


@dataclass
class Report:
    figures: list[Figure]
    soak: Soak | None

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.figures) and (self.soak is None or self.soak.ok)

    def as_dict(self) -> dict:
        d: dict = {
            f.name: {"python_us": round(f.python, 2), "c_us": round(f.c, 2),
                     "ratio": round(f.ratio, 3), "target": f.target, "ok": f.ok}
            for f in self.figures
        }
        if self.soak is not None:
            s = self.soak
            d["soak"] = {"lifecycles": s.lifecycles, "seconds": round(s.seconds, 2),
                         "fd_growth": s.fd_growth, "rss_growth_bytes": s.rss_growth,
                         "timers_left": s.timers_after - s.timers_before,
                         "ok": s.ok}
        d["ok"] = self.ok
        return d

    def lines(self) -> list[str]:
        out = [f"{'':10} {'Python':>10} {'C':>10} {'ratio':>7} {'target':>7}"]
        for f in self.figures:
            mark = "ok" if f.ok else "OVER"
            out.append(f"{f.name:10} {f.python:8.2f}{f.unit} {f.c:8.2f}{f.unit} "
                       f"{f.ratio:6.2f}x {f.target:6.2f}x  {mark}")
        if self.soak is not None:
            s = self.soak
            out.append(
                f"soak       {s.lifecycles} lifecycles in {s.seconds:.1f}s: "
                f"fds {s.fds_before}->{s.fds_after} ({s.fd_growth:+d}), "
                f"RSS {s.rss_growth / 2**20:+.2f} MiB, "
                f"timers {s.timers_after - s.timers_before:+d}  {'ok' if s.ok else 'OVER'}"
            )
        return out


def run(lifecycles: int = 300, exits: int = 20000, soak_lifecycles: int = 10000,
        rounds: int = 5) -> Report:
    """The whole benchmark (``kvmtest bench``); soak_lifecycles=0 skips the soak."""
    exe = build_reference()
    with Kvm() as kvm:
        figures = [bench_lifecycle(kvm, exe, lifecycles, rounds),
                   bench_exits(kvm, exe, exits, rounds)]
        s = soak(kvm, soak_lifecycles) if soak_lifecycles else None
    return Report(figures, s)


if __name__ == "__main__":
    for line in run().lines():
        print(line)
