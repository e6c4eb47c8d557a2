"""Bounding a Unicorn run in time without a thread per emu_start.

``emu_start(..., timeout=us)`` makes Unicorn create and join a timer thread
on every call.  On this machine a thread create+join costs ~0.6 ms (measured:
Python and Unicorn's own alike), and a case needs several emu_start calls
(one per exit to the host or world switch), which alone would break the
2 ms/case budget.  One long-lived polling thread per machine gives the same
guarantee -- a runaway guest is stopped with ``uc.emu_stop()`` -- for the
cost of two attribute writes per run.  ``TIMER_UNICORN`` keeps the stock
``timeout=`` path for comparison (kvmtest/bench/).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable

POLL_S = 0.002

TIMER_WATCHDOG = "watchdog"
TIMER_UNICORN = "unicorn"


class Watchdog:
    """Calls ``stop()`` repeatedly once the armed deadline has passed."""

    def __init__(self, stop: Callable[[], None]) -> None:
        self._stop = stop
        self._lock = threading.Lock()
        self._deadline: float | None = None
        self.expired = False
        self._closed = False
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float) -> None:
        if self._thread is None:
            self._start()
        with self._lock:
            self.expired = False
            self._deadline = time.monotonic() + seconds

    def disarm(self) -> None:
        with self._lock:
            self._deadline = None

    def close(self) -> None:
        self._closed = True

    def _start(self) -> None:
        ref = weakref.ref(self)
        self._thread = threading.Thread(target=_poll, args=(ref,), name="kvmtest-model-watchdog",
                                        daemon=True)
        self._thread.start()

    def _tick(self) -> bool:
        if self._closed:
            return False
        with self._lock:
            if self._deadline is not None and time.monotonic() >= self._deadline:
                # Keep stopping while armed: a stop issued between two
                # emu_start calls of the same run is otherwise lost.
                self.expired = True
                self._stop()
        return True


def _poll(ref: weakref.ReferenceType[Watchdog]) -> None:
    while True:
        time.sleep(POLL_S)
        dog = ref()
        if dog is None or not dog._tick():
            return
        del dog
