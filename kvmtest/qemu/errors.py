"""The one exception type of the qemu backend.

Every expected failure (missing tool, download failure, kernel without kvm
modules, bad kernel spec...) is raised as `QemuError` with a one-line,
actionable message so that callers can print it without a traceback.
"""

from __future__ import annotations


class QemuError(RuntimeError):
    """An expected failure of the qemu backend (one-line message)."""
