"""Import the compiled cffi extension with an actionable message if missing."""

from __future__ import annotations

try:
    from kvmtest._kvm_cffi import ffi, lib
except ImportError as e:  # pragma: no cover - depends on the build
    raise ImportError(
        "kvmtest's KVM binding (kvmtest._kvm_cffi) is not built: run "
        "'pip install -e .' (needs gcc, linux-libc-dev) or 'python3 csrc/build_kvm.py'"
    ) from e

__all__ = ["ffi", "lib"]
