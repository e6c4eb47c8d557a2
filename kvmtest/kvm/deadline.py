"""Bounding KVM_RUN in time: a per-thread timer signal that only KVM_RUN sees.

How it works (QEMU's SIG_IPI scheme, plus a POSIX timer):

* ``SIGNAL`` is blocked in the vCPU thread for the life of a deadline, and the
  vCPU's KVM_SET_SIGNAL_MASK is the thread's mask *without* it, so the signal
  can only be taken inside KVM_RUN, which then returns EINTR.
* A one-shot CLOCK_MONOTONIC timer (timer_create with SIGEV_THREAD_ID) sends
  it to this thread only.  Whether it fires inside KVM_RUN (kicks the guest
  out) or between two KVM_RUNs (stays pending, so the next KVM_RUN returns
  EINTR at once), no exit is lost and no handler runs: the kernel does not
  apply SIGUSR1's default action (terminate) to a signal blocked in the
  thread's real mask, and we dequeue it with sigtimedwait.
* Nothing is left behind: the timer is disarmed and pending signals are eaten
  on exit, the thread mask is restored, and the timer is deleted with the vCPU.

Arming costs a few syscalls, so a host run loop arms once
(``with vcpu.deadline(t): ...``), not per KVM_RUN.
"""

from __future__ import annotations

import signal
import time
from typing import TYPE_CHECKING

from ._ffi import ffi, lib
from .errors import KvmError

if TYPE_CHECKING:
    from .vcpu import Vcpu

SIGNAL = signal.SIGUSR1


_SIGNAL_BIT = 1 << (SIGNAL - 1)  # the kernel's sigset layout: bit n-1 for signal n
_old_mask = ffi.new("uint64_t *")  # scratch for kvmtest_block_signal (GIL-held use)


def kernel_sigset(signals: set[int]) -> int:
    """The kernel's 64-bit sigset (bit n-1 for signal n) for KVM_SET_SIGNAL_MASK."""
    bits = 0
    for s in signals:
        bits |= 1 << (int(s) - 1)
    return bits


class Timer:
    """A POSIX timer that delivers ``SIGNAL`` to the thread that created it."""

    def __init__(self) -> None:
        out = ffi.new("void **")
        r = lib.kvmtest_timer_create(SIGNAL, out)
        if r < 0:
            raise KvmError("timer_create", -r)
        self._timer = out[0]
        self.tid = lib.kvmtest_gettid()

    @property
    def handle(self):
        """The timer_t, for C helpers (kvmtest_case, csrc/record.c)."""
        return self._timer

    def arm(self, seconds: float) -> None:
        # 0 ns would disarm; a non-positive timeout means "expire at once".
        ns = max(1, int(seconds * 1e9))
        r = lib.kvmtest_timer_arm(self._timer, ns)
        if r < 0:
            raise KvmError("timer_settime", -r)

    def disarm(self) -> None:
        lib.kvmtest_timer_arm(self._timer, 0)

    def delete(self) -> None:
        if self._timer is not None:
            lib.kvmtest_timer_delete(self._timer)
            self._timer = None


class Deadline:
    """``with vcpu.deadline(seconds):`` every ``vcpu.run()`` inside returns
    ``TimedOut`` once ``seconds`` have passed, even if the guest never exits."""

    __slots__ = ("_blocked_before", "_vcpu", "expired", "seconds", "when")

    def __init__(self, vcpu: Vcpu, seconds: float) -> None:
        self._vcpu = vcpu
        self.seconds = seconds
        self.expired = False
        self.when = 0.0
        self._blocked_before = False

    def __enter__(self) -> Deadline:
        vcpu = self._vcpu
        if vcpu._deadline is not None:
            raise RuntimeError("a deadline is already active on this vCPU")
        old = _old_mask
        r = lib.kvmtest_block_signal(SIGNAL, old)
        if r < 0:
            raise KvmError("pthread_sigmask", -r)
        self._blocked_before = bool(old[0] & _SIGNAL_BIT)
        try:
            vcpu._use_signal_mask(old[0] & ~_SIGNAL_BIT)
            timer = vcpu._thread_timer()
            self.when = time.monotonic() + self.seconds
            timer.arm(self.seconds)
        except BaseException:
            self._restore()
            raise
        vcpu._deadline = self
        return self

    def __exit__(self, *exc: object) -> None:
        self._vcpu._deadline = None
        timer = self._vcpu._timer
        if timer is not None:
            timer.disarm()
        self._restore()

    def _restore(self) -> None:
        lib.kvmtest_signal_consume(SIGNAL)
        if not self._blocked_before:
            lib.kvmtest_unblock_signal(SIGNAL)

    def interrupted(self) -> bool:
        """Called when KVM_RUN returned EINTR: was it our timer?"""
        lib.kvmtest_signal_consume(SIGNAL)  # ours or stray: never leave it pending
        # The timer cannot fire before `when` (taken before arming), so the
        # clock, not the signal, decides: a stray SIGNAL is just an interruption.
        if time.monotonic() >= self.when:
            self.expired = True
        return self.expired
