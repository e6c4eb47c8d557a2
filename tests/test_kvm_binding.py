"""The KVM binding against the real /dev/kvm (skipped, with the reason, without it).

Guests here are a few hand-assembled real-mode bytes, plus the long-mode
``ping`` payload for the run-to-DONE and benchmark checks.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time

import pytest

from kvmtest.bench import kvm as bench
from kvmtest.exits import HltExit, InterruptedExit, IoExit, MmioExit, TimedOut
from kvmtest.kvm import Kvm, KvmError, KvmUnavailable, lib
from kvmtest.kvm.cpuid import find
from kvmtest.kvm.deadline import SIGNAL

pytestmark = pytest.mark.kvm

MSR_KERNEL_GS_BASE = 0xC000_0102
MSR_BOGUS = 0x4000_DEAD  # in the Hyper-V range KVM leaves unimplemented here

# Real mode at 0x1000 (CS base 0):
OUT_HLT = bytes([0xBA, 0xF8, 0x03, 0xB0, 0x41, 0xEE, 0xF4])  # mov dx,0x3f8; mov al,'A'; out; hlt
SPIN = bytes([0xEB, 0xFE])  # jmp $
MMIO_READ = bytes([0xA1, 0x00, 0x00, 0xF4])  # mov ax,[0] (DS base = unbacked); hlt
MMIO_WRITE = bytes([0xB8, 0x34, 0x12, 0xA3, 0x00, 0x00, 0xF4])  # mov ax,0x1234; mov [0],ax; hlt
CODE, SPIN_AT, MMIO_R_AT, MMIO_W_AT = 0x1000, 0x2000, 0x3000, 0x3100
UNBACKED = 0x20_0000


@pytest.fixture(scope="module")
def kvm():
    try:
        k = Kvm()
    except KvmUnavailable as e:
        pytest.skip(f"needs /dev/kvm: {e}")
    yield k
    k.close()


@pytest.fixture
def real_mode(kvm):
    """A VM with 1 MiB at GPA 0, one vCPU in real mode at CS base 0."""
    with kvm.create_vm() as vm:
        vm.set_user_memory_region(0, 0, 1 << 20)
        for gpa, code in ((CODE, OUT_HLT), (SPIN_AT, SPIN), (MMIO_R_AT, MMIO_READ),
                          (MMIO_W_AT, MMIO_WRITE)):
            vm.write(gpa, code)
        vcpu = vm.create_vcpu(0)
        sregs = vcpu.get_sregs()
        sregs.cs.base = sregs.cs.selector = 0
        vcpu.set_sregs(sregs)
        vcpu.set_regs(rip=CODE, rflags=2)
        yield vm, vcpu


def fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def posix_timers() -> int:
    return bench.timer_count()


def test_system_ioctls(kvm):
    assert kvm.api_version == lib.KVM_API_VERSION == 12
    assert kvm.vcpu_mmap_size >= 4096
    cpuid = kvm.supported_cpuid()
    assert find(cpuid, 0) is not None and find(cpuid, 0x8000_0001) is not None
    assert kvm.msr_index_list()
    assert kvm.check_extension(lib.KVM_CAP_USER_MEMORY) == 1


def test_memory_round_trip(kvm):
    with kvm.create_vm() as vm:
        mem = vm.set_user_memory_region(0, 0, 1 << 20)
        vm.write_u64(0x800, 0x1122_3344_5566_7788)
        assert vm.read(0x800, 8) == bytes.fromhex("8877665544332211")
        assert mem.view[0x800] == 0x88
        vm.write(0xFFFFC, b"\xaa" * 4)
        assert vm.read_u32(0xFFFFC) == 0xAAAA_AAAA
        with pytest.raises(ValueError):
            vm.read(0xFFFFC, 8)  # crosses the end of the slot


def test_out_then_hlt(real_mode):
    _, vcpu = real_mode
    e = vcpu.run()
    assert e == IoExit(lib.KVM_EXIT_IO_OUT, 0x3F8, 1, 1, b"A")
    assert vcpu.run() == HltExit()
    assert vcpu.get_regs().rip == CODE + len(OUT_HLT)


def test_mmio_exits_on_unbacked_gpa(real_mode):
    _, vcpu = real_mode
    sregs = vcpu.get_sregs()
    sregs.ds.base = UNBACKED
    vcpu.set_sregs(sregs)
    vcpu.set_regs(rip=MMIO_R_AT, rflags=2)
    e = vcpu.run()
    assert isinstance(e, MmioExit) and (e.phys_addr, e.len, e.is_write) == (UNBACKED, 2, False)
    vcpu.complete_mmio_read(b"\x34\x12")
    assert vcpu.run() == HltExit()
    assert vcpu.get_regs().rax & 0xFFFF == 0x1234
    vcpu.set_regs(rip=MMIO_W_AT, rflags=2)
    assert vcpu.run() == MmioExit(UNBACKED, b"\x34\x12", 2, True)


def test_regs_and_sregs_round_trip(real_mode):
    _, vcpu = real_mode
    regs = vcpu.get_regs()
    regs.rax, regs.r15, regs.rip = 0xDEAD_BEEF_0000_0001, 0x1515, CODE
    vcpu.set_regs(regs)
    back = vcpu.get_regs()
    assert (back.rax, back.r15, back.rip) == (0xDEAD_BEEF_0000_0001, 0x1515, CODE)
    sregs = vcpu.get_sregs()
    sregs.cr2 = 0x1234_5000
    vcpu.set_sregs(sregs)
    assert vcpu.get_sregs().cr2 == 0x1234_5000


def test_msr_round_trip_and_refusal(real_mode):
    _, vcpu = real_mode
    vcpu.set_msrs({MSR_KERNEL_GS_BASE: 0xFFFF_8000_1234_0000})
    assert vcpu.get_msrs([MSR_KERNEL_GS_BASE]) == {MSR_KERNEL_GS_BASE: 0xFFFF_8000_1234_0000}
    with pytest.raises(KvmError) as info:
        vcpu.set_msrs({MSR_BOGUS: 1})
    assert (info.value.ioctl, info.value.errno) == ("KVM_SET_MSRS", errno.EINVAL)
    assert f"{MSR_BOGUS:#x}" in str(info.value)


def test_cpuid_set_and_get(kvm):
    with kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        entries = kvm.supported_cpuid()
        vcpu.set_cpuid2(entries)
        got = vcpu.get_cpuid2()
        assert len(got) == len(entries)
        leaf0 = find(got, 0)
        assert leaf0 is not None and leaf0.ebx == find(entries, 0).ebx


def test_vcpu_events_round_trip(real_mode):
    _, vcpu = real_mode
    ev = vcpu.get_vcpu_events()
    ev.flags = 0
    vcpu.set_vcpu_events(ev)
    assert vcpu.get_vcpu_events().exception.injected == 0


def test_nested_state_matches_capability(kvm, real_mode):
    """With KVM_CAP_NESTED_STATE=0 (no nested support) the ioctl fails with
    EINVAL; with it, GET returns a state whose size fits the capability."""
    _, vcpu = real_mode
    cap = kvm.check_extension(lib.KVM_CAP_NESTED_STATE)
    if cap == 0:
        with pytest.raises(KvmError) as info:
            vcpu.get_nested_state()
        assert (info.value.ioctl, info.value.errno) == ("KVM_GET_NESTED_STATE", errno.EINVAL)
    else:
        state = vcpu.get_nested_state()
        assert state.size <= cap and not state.guest_mode


def test_spinning_guest_times_out_and_runs_again(real_mode):
    _, vcpu = real_mode
    vcpu.set_regs(rip=SPIN_AT, rflags=2)
    timeout = 0.2
    t0 = time.monotonic()
    e = vcpu.run(timeout=timeout)
    elapsed = time.monotonic() - t0
    assert e == TimedOut(timeout)
    assert timeout <= elapsed < 2 * timeout
    assert vcpu.get_regs().rip == SPIN_AT  # interrupted where it spun
    assert SIGNAL not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    vcpu.set_regs(rip=CODE, rflags=2)
    assert isinstance(vcpu.run(timeout=1.0), IoExit)  # no stale signal, runs on


def test_deadline_expiring_between_runs(real_mode):
    """The timer fires while we are in Python: the signal stays pending and
    the next KVM_RUN returns at once instead of entering the guest."""
    _, vcpu = real_mode
    with vcpu.deadline(0.05) as d:
        assert isinstance(vcpu.run(), IoExit)
        time.sleep(0.1)
        t0 = time.monotonic()
        assert vcpu.run() == TimedOut(0.05)
        assert time.monotonic() - t0 < 0.05
        assert d.expired and vcpu.run() == TimedOut(0.05)
    assert vcpu.run() == HltExit()  # the OUT completed; the HLT was never lost


def test_kick_from_another_thread(real_mode):
    _, vcpu = real_mode
    vcpu.set_regs(rip=SPIN_AT, rflags=2)
    with vcpu.deadline(5.0):
        threading.Timer(0.05, vcpu.kick).start()
        t0 = time.monotonic()
        assert vcpu.run() == InterruptedExit()
        assert time.monotonic() - t0 < 1.0
        assert not vcpu.immediate_exit


def test_immediate_exit(real_mode):
    _, vcpu = real_mode
    vcpu.immediate_exit = True
    assert vcpu.run() == InterruptedExit()
    assert vcpu.get_regs().rip == CODE
    vcpu.immediate_exit = False
    assert isinstance(vcpu.run(), IoExit)


def test_long_mode_payload_runs_to_done(kvm):
    guest = bench.make_guest(kvm, "ping", 3)
    vm, vcpu = bench.setup(kvm, guest)
    with vm:
        assert bench.run_to_done(vcpu) == 4  # 3 PINGs + DONE


def test_no_leaks_after_close(kvm):
    before, timers = fds(), posix_timers()
    for _ in range(3):
        with kvm.create_vm() as vm:
            vm.set_user_memory_region(0, 0, 1 << 20)
            vcpu = vm.create_vcpu(0)
            vcpu.immediate_exit = True
            vcpu.run(timeout=1.0)  # creates the deadline timer
        assert vcpu.closed and vm.regions == {}
    assert fds() == before
    assert posix_timers() == timers


@pytest.mark.bench
def test_bench_prints_ratios(capsys):
    report = bench.run(lifecycles=30, exits=2000, soak_lifecycles=300, rounds=3)
    lines = report.lines()
    print("\n".join(lines))
    assert [f.name for f in report.figures] == ["lifecycle", "per exit"]
    assert all(f.python > 0 and f.c > 0 for f in report.figures)
    s = report.soak
    assert s is not None and s.fd_growth <= 0 and s.timers_after <= s.timers_before
