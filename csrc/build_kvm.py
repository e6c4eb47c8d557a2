"""cffi builder for kvmtest._kvm_cffi (API mode, against the system <linux/kvm.h>).

Used by setup.py (``cffi_modules=["csrc/build_kvm.py:ffibuilder"]``); run it
directly (``python3 csrc/build_kvm.py``) to build the extension in place next
to the ``kvmtest`` package.
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent


def check_toolchain() -> None:
    """Fail the build with the missing piece and its Debian package, not a
    compiler error three screens long."""
    import os
    import shutil

    cc = os.environ.get("CC", "gcc").split()[0]
    if shutil.which(cc) is None:
        raise SystemExit(f"kvmtest: cannot build the KVM binding: '{cc}' not found; "
                         "install the Debian package 'gcc' (apt-get install gcc)")
    if not any(Path(d, "linux/kvm.h").exists()
               for d in ("/usr/include", "/usr/local/include")):
        raise SystemExit("kvmtest: cannot build the KVM binding: <linux/kvm.h> not found; "
                         "install the Debian package 'linux-libc-dev'")


check_toolchain()

# The C side stays tiny: it names kvm_run's anonymous union members so cffi can
# describe them, returns -errno instead of going through ffi.errno (one call on
# the hot path), and wraps the POSIX timer that interrupts a spinning guest
# (Python has no timer_create with SIGEV_THREAD_ID).
SOURCE = r"""
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <signal.h>
#include <stddef.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <linux/kvm.h>

#define KVMTEST_MEMBER(type, m) __typeof__(((type *)0)->m)
typedef KVMTEST_MEMBER(struct kvm_run, hw) kvmtest_run_hw;
typedef KVMTEST_MEMBER(struct kvm_run, fail_entry) kvmtest_run_fail_entry;
typedef KVMTEST_MEMBER(struct kvm_run, io) kvmtest_run_io;
typedef KVMTEST_MEMBER(struct kvm_run, mmio) kvmtest_run_mmio;
typedef KVMTEST_MEMBER(struct kvm_run, internal) kvmtest_run_internal;
typedef KVMTEST_MEMBER(struct kvm_run, system_event) kvmtest_run_system_event;
typedef struct kvm_debug_exit_arch kvmtest_run_debug;
typedef struct kvm_guest_debug_arch kvmtest_guest_debug_arch;
#define KVMTEST_RUN_HW_OFFSET offsetof(struct kvm_run, hw)
#define KVMTEST_RUN_FAIL_ENTRY_OFFSET offsetof(struct kvm_run, fail_entry)
#define KVMTEST_RUN_IO_OFFSET offsetof(struct kvm_run, io)
#define KVMTEST_RUN_MMIO_OFFSET offsetof(struct kvm_run, mmio)
#define KVMTEST_RUN_INTERNAL_OFFSET offsetof(struct kvm_run, internal)
#define KVMTEST_RUN_SYSTEM_EVENT_OFFSET offsetof(struct kvm_run, system_event)
#define KVMTEST_RUN_DEBUG_OFFSET offsetof(struct kvm_run, debug.arch)
#define KVMTEST_RUN_SYSTEM_EVENT_DATA_OFFSET offsetof(struct kvm_run, system_event.data)

typedef KVMTEST_MEMBER(struct kvm_vcpu_events, exception) kvmtest_events_exception;
typedef KVMTEST_MEMBER(struct kvm_vcpu_events, interrupt) kvmtest_events_interrupt;
typedef KVMTEST_MEMBER(struct kvm_vcpu_events, nmi) kvmtest_events_nmi;
typedef KVMTEST_MEMBER(struct kvm_vcpu_events, smi) kvmtest_events_smi;

typedef struct kvm_svm_nested_state_hdr kvmtest_nested_svm_hdr;
#define KVMTEST_NESTED_HDR_OFFSET offsetof(struct kvm_nested_state, hdr)
#define KVMTEST_NESTED_DATA_OFFSET offsetof(struct kvm_nested_state, data)

static int kvmtest_ioctl(int fd, unsigned long request, void *arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

static int kvmtest_ioctl_int(int fd, unsigned long request, unsigned long arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

static int kvmtest_run(int fd)
{
    int r = ioctl(fd, KVM_RUN, 0);
    return r < 0 ? -errno : r;
}

static int kvmtest_gettid(void)
{
    return (int)syscall(SYS_gettid);
}

/* A one-shot CLOCK_MONOTONIC timer whose expiry sends `signo` to the calling
 * thread only (SIGEV_THREAD_ID): a process-directed signal could land on a
 * thread where it is unblocked and kill the process by default action. */
static int kvmtest_timer_create(int signo, void **timer_out)
{
    struct sigevent sev;
    timer_t t;

    memset(&sev, 0, sizeof(sev));
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = signo;
    sev._sigev_un._tid = (pid_t)syscall(SYS_gettid);
    if (timer_create(CLOCK_MONOTONIC, &sev, &t) < 0)
        return -errno;
    *timer_out = (void *)t;
    return 0;
}

/* ns > 0 arms (one shot), ns == 0 disarms. */
static int kvmtest_timer_arm(void *timer, long long ns)
{
    struct itimerspec its;

    memset(&its, 0, sizeof(its));
    its.it_value.tv_sec = ns / 1000000000LL;
    its.it_value.tv_nsec = ns % 1000000000LL;
    return timer_settime((timer_t)timer, 0, &its, NULL) < 0 ? -errno : 0;
}

static int kvmtest_timer_delete(void *timer)
{
    return timer_delete((timer_t)timer) < 0 ? -errno : 0;
}

/* Block `signo` in the calling thread; *old_mask gets the previous mask in
 * the kernel's layout (bit n-1 for signal n), ready for KVM_SET_SIGNAL_MASK.
 * Python's signal.pthread_sigmask builds sets of all 64 signals: ~6 us. */
static int kvmtest_block_signal(int signo, uint64_t *old_mask)
{
    sigset_t set, old;
    uint64_t bits = 0;
    int r, sig;

    sigemptyset(&set);
    sigaddset(&set, signo);
    r = pthread_sigmask(SIG_BLOCK, &set, &old);
    if (r)
        return -r;
    for (sig = 1; sig <= 64; sig++)
        if (sigismember(&old, sig) == 1)
            bits |= 1ULL << (sig - 1);
    *old_mask = bits;
    return 0;
}

static int kvmtest_unblock_signal(int signo)
{
    sigset_t set;

    sigemptyset(&set);
    sigaddset(&set, signo);
    return -pthread_sigmask(SIG_UNBLOCK, &set, NULL);
}

/* Dequeue every pending instance of `signo` (blocked in this thread) without
 * running a handler; returns how many were pending, or -errno. */
static int kvmtest_signal_consume(int signo)
{
    static const struct timespec zero = {0, 0};
    sigset_t set;
    int n = 0;

    sigemptyset(&set);
    sigaddset(&set, signo);
    for (;;) {
        int r = sigtimedwait(&set, NULL, &zero);
        if (r == signo) {
            n++;
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && errno != EAGAIN)
            return -errno;
        return n;
    }
}
"""

ffibuilder = FFI()
ffibuilder.cdef((HERE / "kvm_cdef.h").read_text())
# record.c: a case's reset and run loop in C (docs/record.md).
ffibuilder.set_source("kvmtest._kvm_cffi", SOURCE + (HERE / "record.c").read_text(),
                      extra_compile_args=["-O2", "-Wall"])

if __name__ == "__main__":
    import shutil

    # Build in place for a source checkout: compile under build/ (keeps the
    # generated .c/.o out of the package) and copy the .so into kvmtest/.
    tmp = HERE.parent / "build" / "cffi"
    so = Path(ffibuilder.compile(tmpdir=str(tmp), verbose=False))
    shutil.copy2(so, HERE.parent / "kvmtest" / so.name)
    print(HERE.parent / "kvmtest" / so.name)
