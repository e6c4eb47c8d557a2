"""One configuration under test: the CPU model and the kvm_amd parameters.

kvm_amd's module parameters (npt, vgif, nrips, vls, avic, lbrv ...) and the
CPU features L0 gives L1 change which paths a failed VMRUN takes in KVM
(shadow paging with npt=0; STGI/CLGI no longer intercepted with vGIF), so a
result is only meaningful together with its configuration.

Written as text on the command line and in reports: whitespace-separated
NAME=VALUE settings, where ``cpu=MODEL[,FLAGS]`` is QEMU's ``-cpu`` and every
other name is a kvm_amd parameter; ``default`` is the empty configuration.
Examples: ``default``, ``npt=0``, ``cpu=EPYC,+vgif``, ``npt=0 cpu=EPYC,+vgif``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

DEFAULT_LABEL = "default"
_NAME = re.compile(r"[a-z_][a-z0-9_]*\Z")
_VALUE = re.compile(r"[A-Za-z0-9_.,+\-]+\Z")


class ConfigError(ValueError):
    """A configuration text that cannot be parsed (a usage error)."""


@dataclass(frozen=True)
class Config:
    cpu: str | None = None  # QEMU -cpu; None: the backend's default
    kvm_amd: tuple[tuple[str, str], ...] = ()  # sorted (name, value) pairs

    @classmethod
    def parse(cls, text: str) -> Config:
        cpu: str | None = None
        params: dict[str, str] = {}
        for token in text.split():
            if token == DEFAULT_LABEL:
                continue
            name, eq, value = token.partition("=")
            if not eq or not _NAME.match(name) or not _VALUE.match(value):
                raise ConfigError(f"configuration setting {token!r} is not NAME=VALUE "
                                  "(e.g. npt=0 or cpu=EPYC,+vgif)")
            if name == "cpu":
                if cpu is not None:
                    raise ConfigError(f"cpu given twice in {text!r}")
                cpu = value
            elif name in params:
                raise ConfigError(f"{name} given twice in {text!r}")
            else:
                params[name] = value
        return cls(cpu=cpu, kvm_amd=tuple(sorted(params.items())))

    @classmethod
    def from_options(cls, cpu: str | None, kvm_amd: dict[str, str] | None) -> Config:
        return cls(cpu=cpu, kvm_amd=tuple(sorted((kvm_amd or {}).items())))

    @property
    def kvm_amd_params(self) -> dict[str, str]:
        return dict(self.kvm_amd)

    @property
    def label(self) -> str:
        parts = [f"{k}={v}" for k, v in self.kvm_amd]
        if self.cpu:
            parts.append(f"cpu={self.cpu}")
        return " ".join(parts) or DEFAULT_LABEL

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "cpu": self.cpu, "kvm_amd": self.kvm_amd_params}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Config:
        return cls.from_options(data.get("cpu"), data.get("kvm_amd") or {})
