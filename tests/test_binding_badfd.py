"""Error paths of the KVM binding that need no KVM: bad, closed and non-KVM fds.

Every wrapper must raise KvmError naming its ioctl with the kernel's errno
(EBADF for a bad fd, ENOTTY for a pipe), and cleanup must be idempotent.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import signal

import pytest

from kvmtest.kvm import CpuidEntry, Kvm, KvmError, KvmUnavailable, NestedState, Vcpu, Vm, ffi
from kvmtest.kvm.deadline import SIGNAL
from kvmtest.kvm.errors import unavailable_reason


@pytest.fixture
def pipe_fd():
    r, w = os.pipe()
    yield r
    for fd in (r, w):
        with contextlib.suppress(OSError):  # a test may have closed it already
            os.close(fd)


KVM_CALLS = {
    "KVM_GET_API_VERSION": lambda k: k.api_version,
    "KVM_CHECK_EXTENSION": lambda k: k.check_extension(0),
    "KVM_GET_VCPU_MMAP_SIZE": lambda k: k.vcpu_mmap_size,
    "KVM_GET_SUPPORTED_CPUID": lambda k: k.supported_cpuid(),
    "KVM_GET_MSR_INDEX_LIST": lambda k: k.msr_index_list(),
    "KVM_CREATE_VM": lambda k: k.create_vm(),
}

VM_CALLS = {
    "KVM_SET_USER_MEMORY_REGION": lambda v: v.set_user_memory_region(0, 0, 0x1000),
    "KVM_CREATE_VCPU": lambda v: v.create_vcpu(0),
    "KVM_CHECK_EXTENSION": lambda v: v.check_extension(0),
    "KVM_ENABLE_CAP": lambda v: v.enable_cap(0),
    "KVM_SET_TSS_ADDR": lambda v: v.set_tss_addr(0xFFFB_D000),
}

VCPU_CALLS = {
    "KVM_RUN": lambda c: c.run(),
    "KVM_GET_REGS": lambda c: c.get_regs(),
    "KVM_SET_REGS": lambda c: c.set_regs(rip=0),
    "KVM_GET_SREGS": lambda c: c.get_sregs(),
    "KVM_SET_SREGS": lambda c: c.set_sregs(ffi.new("struct kvm_sregs *")),
    "KVM_GET_MSRS": lambda c: c.get_msrs([0x10]),
    "KVM_SET_MSRS": lambda c: c.set_msrs({0xC000_0102: 0}),
    "KVM_SET_CPUID2": lambda c: c.set_cpuid2([CpuidEntry(0)]),
    "KVM_GET_CPUID2": lambda c: c.get_cpuid2(),
    "KVM_GET_VCPU_EVENTS": lambda c: c.get_vcpu_events(),
    "KVM_SET_VCPU_EVENTS": lambda c: c.set_vcpu_events(ffi.new("struct kvm_vcpu_events *")),
    "KVM_GET_NESTED_STATE": lambda c: c.get_nested_state(),
    "KVM_SET_NESTED_STATE": lambda c: c.set_nested_state(NestedState.svm(0, 0x9000)),
    "KVM_SET_SIGNAL_MASK": lambda c: c.set_signal_mask(0),
    "KVM_SMI": lambda c: c.smi(),
}


def _expect(call, obj, ioctl: str, err: int) -> None:
    with pytest.raises(KvmError) as info:
        call(obj)
    e = info.value
    assert isinstance(e, OSError)
    assert (e.ioctl, e.errno) == (ioctl, err)
    assert str(e) == f"{ioctl}: [Errno {err}] {os.strerror(err)}"


FD_OWNERS = ((Kvm, KVM_CALLS), (Vm, VM_CALLS), (Vcpu, VCPU_CALLS))
WRAPPERS = [(cls, ioctl, calls[ioctl]) for cls, calls in FD_OWNERS for ioctl in sorted(calls)]
WRAPPER_IDS = [f"{cls.__name__}-{ioctl}" for cls, ioctl, _ in WRAPPERS]


@pytest.mark.parametrize(("cls", "ioctl", "call"), WRAPPERS, ids=WRAPPER_IDS)
def test_bad_fd(cls, ioctl, call):
    _expect(call, cls.from_fd(-1), ioctl, errno.EBADF)


@pytest.mark.parametrize(("cls", "ioctl", "call"), WRAPPERS, ids=WRAPPER_IDS)
def test_not_a_kvm_fd(cls, ioctl, call, pipe_fd):
    _expect(call, cls.from_fd(pipe_fd), ioctl, errno.ENOTTY)


def test_closed_vcpu_raises_ebadf(pipe_fd):
    vcpu = Vcpu.from_fd(os.dup(pipe_fd))
    vcpu.close()
    _expect(VCPU_CALLS["KVM_GET_REGS"], vcpu, "KVM_GET_REGS", errno.EBADF)
    _expect(VCPU_CALLS["KVM_RUN"], vcpu, "KVM_RUN", errno.EBADF)


def test_vcpu_mmap_of_pipe_names_the_mapping(pipe_fd):
    with pytest.raises(KvmError) as info:
        Vcpu.from_fd(pipe_fd, mmap_size=4096)
    assert info.value.ioctl == "mmap(vcpu fd)"


def test_failed_memory_region_unmaps(pipe_fd):
    vm = Vm.from_fd(pipe_fd)
    with pytest.raises(KvmError):
        vm.set_user_memory_region(0, 0, 1 << 20)
    assert vm.regions == {}


def test_kvm_error_pickles():
    e = pickle.loads(pickle.dumps(KvmError("KVM_RUN", errno.EINTR)))
    assert (e.ioctl, e.errno, str(e)) == ("KVM_RUN", errno.EINTR,
                                          f"KVM_RUN: [Errno 4] {os.strerror(errno.EINTR)}")
    u = pickle.loads(pickle.dumps(KvmUnavailable("no /dev/kvm: x")))
    assert str(u) == "no /dev/kvm: x"


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_double_close_and_context_managers():
    fds = [os.dup(0) for _ in range(3)]
    with Kvm.from_fd(fds[0]) as kvm, Vm.from_fd(fds[1]) as vm, Vcpu.from_fd(fds[2]) as vcpu:
        assert not (kvm.closed or vm.closed or vcpu.closed)
    assert kvm.closed and vm.closed and vcpu.closed
    assert not any(_fd_open(fd) for fd in fds)
    for obj in (kvm, vm, vcpu):
        obj.close()  # idempotent
        assert obj.fd == -1


def test_context_manager_closes_on_exception():
    fd = os.dup(0)
    with pytest.raises(RuntimeError), Vcpu.from_fd(fd):
        raise RuntimeError("boom")
    assert not _fd_open(fd)


def test_vm_close_closes_its_vcpus():
    vm = Vm.from_fd(os.dup(0))
    vcpu = Vcpu.from_fd(os.dup(0))
    vm._vcpus.append(vcpu)  # what create_vcpu() does after KVM_CREATE_VCPU
    vm.close()
    assert vcpu.closed


def test_missing_dev_kvm_is_actionable(tmp_path):
    with pytest.raises(KvmUnavailable) as info:
        Kvm(str(tmp_path / "kvm"))
    assert "modprobe kvm_amd nested=1" in str(info.value)
    assert "--backend qemu|model" in str(info.value)


def test_non_kvm_device_is_unavailable():
    with pytest.raises(KvmUnavailable) as info:
        Kvm("/dev/null")
    assert "not a KVM device" in str(info.value)


def test_permission_message_names_mode_and_group(tmp_path):
    dev = tmp_path / "kvm"
    dev.touch(mode=0o600)
    e = unavailable_reason(str(dev), PermissionError(errno.EACCES, "Permission denied"))
    assert isinstance(e, KvmUnavailable) and e.errno == errno.EACCES
    assert "-rw-------" in str(e) and "group" in str(e) and "root" in str(e)


def test_deadline_failure_restores_signal_mask(pipe_fd):
    """KVM_SET_SIGNAL_MASK fails on a pipe: the deadline must undo its block."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with pytest.raises(KvmError) as info, Vcpu.from_fd(pipe_fd).deadline(0.01):
        pass
    assert info.value.ioctl == "KVM_SET_SIGNAL_MASK"
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
    assert SIGNAL not in before
