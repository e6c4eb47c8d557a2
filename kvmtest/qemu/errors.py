"""The exception types of the qemu backend.

Every expected failure (missing tool, download failure, kernel without kvm
modules, bad kernel spec...) is raised as `QemuError` with a one-line,
actionable message so that callers can print it without a traceback.

`GuestFault` is what went wrong with a booted guest: QEMU hung, was
stopped, killed or crashed, the kernel panicked, the agent died or broke
the protocol.  Its first line names what happened, the phase (boot,
modules, agent, cases, shutdown) with the case in flight, and QEMU's exit
status; the console tail follows.
"""

from __future__ import annotations


class QemuError(RuntimeError):
    """An expected failure of the qemu backend (one-line message)."""


class GuestFault(QemuError):
    """A booted guest failed; ``str()`` is the summary line plus the console tail."""

    def __init__(
        self,
        what: str,
        *,
        phase: str,
        case: str | None = None,
        qemu_status: str | None = None,
        console_tail: str = "",
        elapsed: float | None = None,
        artifacts: str | None = None,
    ) -> None:
        self.what = what
        self.phase = phase
        self.case = case
        self.qemu_status = qemu_status
        self.console_tail = console_tail
        self.elapsed = elapsed
        self.artifacts = artifacts
        super().__init__(self.summary)

    @property
    def summary(self) -> str:
        where = f"during {self.phase}"
        if self.case:
            where += f" (case {self.case})"
        parts = [f"{self.what} {where}"]
        if self.elapsed is not None:
            parts.append(f"{self.elapsed:.1f} s after QEMU started")
        if self.qemu_status:
            parts.append(f"QEMU {self.qemu_status}")
        return "; ".join(parts)

    def __str__(self) -> str:
        text = self.summary
        if self.artifacts:
            text += f" (artifacts: {self.artifacts})"
        tail = self.console_tail.strip("\n")
        return f"{text}\n--- console tail ---\n{tail}" if tail else f"{text}\n(console empty)"
