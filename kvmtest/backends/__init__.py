"""Backend selection: kvm (this host's /dev/kvm), qemu (a chosen kernel under
QEMU), model (the Unicorn reference model)."""

from __future__ import annotations

from typing import Any

NAMES = ("auto", "kvm", "qemu", "model")


class BackendError(RuntimeError):
    """A backend cannot start here; the message says why and what to do."""


class KernelError(RuntimeError):
    """The kernel under test could not run the cases (panic, no modules, no
    nested SVM, no result): an error for the whole run, with the log tail."""


def make(name: str, profile: str | None = None, **options: Any) -> tuple[Any, str]:
    """The backend object and a one-line note on how it was chosen."""
    if name == "auto":
        return _auto(profile)
    if name == "kvm":
        from ..kvm import KvmUnavailable
        from .kvm import KvmBackend

        try:
            return KvmBackend(profile), "backend kvm: this host's /dev/kvm"
        except KvmUnavailable as e:
            raise BackendError(str(e)) from None
    if name == "model":
        from .model import ModelBackend

        profile = profile or "7.x"
        params = options.get("kvm_amd_params") or {}
        b = ModelBackend(profile, kvm_amd_params=params)
        where = " ".join(f"{k}={v}" for k, v in sorted(params.items()))
        return b, f"backend model: profile {profile}" + (f", kvm_amd {where}" if where else "")
    if name == "qemu":
        from .qemu import QemuBackend

        b = QemuBackend(profile=profile, **options)
        return b, f"backend qemu: kernel {b.kernel_desc}"
    raise BackendError(f"unknown backend {name!r} (choose from {', '.join(NAMES)})")


def _auto(profile: str | None) -> tuple[Any, str]:
    """kvm when this host has nested SVM, else the model, saying why."""
    from ..kvm import KvmUnavailable

    try:
        from .kvm import KvmBackend

        kvm = KvmBackend(profile)
    except KvmUnavailable as e:
        why = str(e)
    else:
        if kvm.svm and kvm.nested_cap:
            return kvm, "auto: backend kvm (host KVM has nested SVM)"
        why = kvm.no_svm_reason()
        kvm.close()
    from .model import ModelBackend

    return ModelBackend(profile or "7.x"), f"auto: backend model ({why})"
