"""The ``model`` backend: payloads on Unicorn, nested SVM in a Python model.

No kernel is involved, so ``kernel_log()`` yields an empty list: there is no
kernel log that could contain a WARN, and an empty list ("checked, clean")
is the honest answer -- unlike the kvm backend, which yields None when it
cannot read /dev/kmsg.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import unicorn

from ..case import NEED_CPU_PCID
from ..kvm_amd import MODEL_DEFAULTS, config_capabilities
from ..model.cpuid import MAXPHYADDR
from ..model.hwstate import KvmAmd
from ..model.machine import ModelMachine
from ..model.profiles import DEFAULT_PROFILE, get_profile
from ..model.watchdog import TIMER_WATCHDOG
from ..payloads import Payload


class ModelBackend:
    """Backend protocol on the Unicorn model.

    One ModelMachine (one Unicorn instance) per payload is created on first
    use and reused for every later case: reset() restores the saved CPU
    context and the guest memory the previous case could have changed, so
    translated code stays cached and a case costs well under a millisecond.
    Guest CPUID with or without SVM is chosen per ``machine(svm=...)``.
    """

    name = "model"

    def __init__(self, profile: str = DEFAULT_PROFILE, timer: str = TIMER_WATCHDOG,
                 kvm_amd_params: dict[str, str] | None = None) -> None:
        self.profile = get_profile(profile)
        # The kvm_amd parameters the model runs under, as kvm_amd would report
        # its effective ones (vls=1 needs npt=1, svm_hardware_setup).  A
        # parameter the model does not emulate is refused (hwstate.KvmAmd.from_params).
        given = dict(kvm_amd_params or {})
        if given.get("nrips", "0") not in ("0", "N", "n"):
            raise ValueError("the model emulates a guest without NRIPS only (nrips=0): "
                             "TCG, where the kernels are measured, has no NRIP save")
        given.pop("nrips", None)
        self.host = KvmAmd.from_params(given)
        self.kvm_amd_params = {**MODEL_DEFAULTS, **given}
        if given.get("vls") and not self.host.vls:
            self.kvm_amd_params["vls"] = "0"  # kvm_amd turns vls off without NPT
        self.timer = timer
        self.maxphyaddr = MAXPHYADDR  # the model guest's CPUID 0x80000008
        self._machines: dict[str, ModelMachine] = {}

    def capabilities(self) -> dict[str, str | None]:
        # SMM (KVM_SMI, RSM): model/smm.py.
        return {"svm": None, "no_svm": None, "nested_state": None, "smm": None,
                **config_capabilities(self.kvm_amd_params),
                NEED_CPU_PCID: "the model's guest CPU (QEMU's EPYC) has no PCID"}

    @contextmanager
    def machine(self, payload: Payload, svm: bool,
                cpuid: Mapping[str, bool] | None = None) -> Iterator[ModelMachine]:
        m = self._machines.get(payload.name)
        if m is None or m.payload is not payload:
            if m is not None:
                m.close()
            m = ModelMachine(payload, self.profile, timer=self.timer, kvm_amd=self.host)
            self._machines[payload.name] = m
        m.reset(self.profile, svm_in_cpuid=svm, cpuid=dict(cpuid or {}))
        yield m

    @contextmanager
    def kernel_log(self) -> Iterator[list[str]]:
        yield []

    def describe(self) -> dict[str, str]:
        return {
            "backend": self.name,
            "profile": self.profile.name,
            "kernel": f"model:{self.profile.name} ({self.profile.kernels})",
            "engine": f"unicorn {unicorn.__version__} on {platform.machine()}",
            "maxphyaddr": str(MAXPHYADDR),
            "timer": self.timer,
            "kvm_amd": " ".join(f"{k}={v}" for k, v in sorted(self.kvm_amd_params.items())),
        }

    def close(self) -> None:
        for m in self._machines.values():
            m.close()
        self._machines.clear()
