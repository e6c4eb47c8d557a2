"""What Kvm, Vm and Vcpu share: owning one file descriptor."""

from __future__ import annotations

import os
from typing import Self


class FdObject:
    """Owns ``_fd``; ``close()`` is idempotent and the object is a context
    manager.  Subclasses release their own resources, then call
    ``_close_fd()``."""

    _fd: int

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def _close_fd(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def close(self) -> None:
        self._close_fd()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
