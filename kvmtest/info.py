"""Host facts for ``kvmtest info [--json]``: what this machine's KVM can test.

``host_facts()`` never raises for an unusable /dev/kvm: the facts it cannot
get are ``None`` and ``kvm_error`` says why in one actionable line.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .kvm import DEV_KVM, Kvm, KvmError, lib
from .kvm.cpuid import CpuidEntry, find

SYS_MODULE = Path("/sys/module")
# Vendor KVM modules, most specific first (kvm_pvm can sit on either vendor).
KVM_MODULES = ("kvm_amd", "kvm_intel", "kvm_pvm")

# Capabilities worth knowing for nested-SVM testing (KVM_CAP_<name>).
CAPS = (
    "NESTED_STATE",
    "X86_SMM",
    "IMMEDIATE_EXIT",
    "VCPU_EVENTS",
    "EXCEPTION_PAYLOAD",
    "SMALLER_MAXPHYADDR",
    "X86_USER_SPACE_MSR",
    "X86_MSR_FILTER",
    "SET_TSS_ADDR",
    "EXT_CPUID",
    "GET_MSR_FEATURES",
    "INTERNAL_ERROR_DATA",
    "EXIT_ON_EMULATION_FAILURE",
    "X86_TRIPLE_FAULT_EVENT",
    "SREGS2",
    "VM_GPA_BITS",
    "NR_MEMSLOTS",
    "MAX_VCPUS",
)

CPUID_SVM = (0x8000_0001, "ecx", 1 << 2)  # AMD APM vol. 3, CPUID Fn8000_0001_ECX[SVM]
CPUID_VMX = (0x0000_0001, "ecx", 1 << 5)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def host_vendor(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """CPUID leaf 0's vendor string as the host kernel reports it."""
    text = _read(Path(cpuinfo)) or ""
    m = re.search(r"^vendor_id\s*:\s*(\S+)", text, re.M)
    return m.group(1) if m else None


def host_maxphyaddr(cpuinfo: str = "/proc/cpuinfo") -> int | None:
    text = _read(Path(cpuinfo)) or ""
    m = re.search(r"^address sizes\s*:\s*(\d+) bits physical", text, re.M)
    return int(m.group(1)) if m else None


def kvm_module(sys_module: Path = SYS_MODULE) -> str | None:
    """The loaded vendor KVM module (kvm_amd, kvm_intel, kvm_pvm...), else
    ``"kvm"`` if only the core is loaded, else None."""
    for name in KVM_MODULES:
        if (sys_module / name).is_dir():
            return name
    others = sorted(p.name for p in sys_module.glob("kvm_*") if p.is_dir())
    if others:
        return others[0]
    return "kvm" if (sys_module / "kvm").is_dir() else None


def nested_param(sys_module: Path = SYS_MODULE) -> bool | None:
    """kvm_amd's (or kvm_intel's) ``nested`` parameter; None if neither has one."""
    for name in ("kvm_amd", "kvm_intel"):
        value = _read(sys_module / name / "parameters" / "nested")
        if value is not None:
            return value in ("1", "Y", "y")
    return None


def _cpuid_bit(entries: list[CpuidEntry], bit: tuple[int, str, int]) -> bool:
    function, reg, mask = bit
    e = find(entries, function)
    return bool(e and getattr(e, reg) & mask)


def _kvm_facts(path: str) -> dict:
    with Kvm(path) as kvm:
        cpuid = kvm.supported_cpuid()
        leaf = find(cpuid, 0x8000_0008)
        caps = {}
        for name in CAPS:
            cap = getattr(lib, f"KVM_CAP_{name}", None)
            if cap is not None:
                caps[name] = kvm.check_extension(cap)
        return {
            "api_version": kvm.api_version,
            "svm": _cpuid_bit(cpuid, CPUID_SVM),
            "vmx": _cpuid_bit(cpuid, CPUID_VMX),
            "maxphyaddr": leaf.eax & 0xFF if leaf else None,
            "caps": caps,
        }


def kvm_backend(facts: dict) -> dict:
    """{"usable", "reason"} for the kvm backend from the other facts."""
    where = ", ".join(str(x) for x in (facts["vendor"], facts["kvm_module"]) if x)
    if facts.get("kvm_error"):
        return {"usable": False, "reason": facts["kvm_error"]}
    if not facts["svm"]:
        return {"usable": False,
                "reason": f"host KVM has no SVM: {where}; use --backend qemu or model"}
    if facts["nested"] is False:
        return {"usable": False, "reason": f"{facts['kvm_module']} nested=0: "
                "modprobe -r kvm_amd && modprobe kvm_amd nested=1; or use --backend qemu"}
    if not facts["caps"].get("NESTED_STATE"):
        return {"usable": False, "reason": f"KVM_CAP_NESTED_STATE is 0 on {where}: "
                "a newer kernel is needed; use --backend qemu or model"}
    return {"usable": True, "reason": f"nested SVM on {where}"}


def backends_usable(facts: dict) -> dict:
    """{"kvm"|"qemu"|"model": {"usable", "reason"}}: kvm from the facts; qemu and
    model by their prerequisites only (the lead's backends may refine them)."""
    import importlib.util
    import shutil

    qemu = shutil.which("qemu-system-x86_64")
    unicorn = importlib.util.find_spec("unicorn") is not None
    return {
        "kvm": kvm_backend(facts),
        "qemu": {"usable": bool(qemu),
                 "reason": f"TCG with an AMD CPU model via {qemu}" if qemu else
                 "no qemu-system-x86_64: apt-get install qemu-system-x86"},
        "model": {"usable": unicorn,
                  "reason": "Unicorn reference model" if unicorn else
                  "no unicorn module: pip install unicorn==2.1.4"},
    }


def host_facts(path: str = DEV_KVM) -> dict:
    """Facts about this host's KVM; the lead adds the qemu/model backends."""
    facts: dict = {
        "kernel": os.uname().release,
        "vendor": host_vendor(),
        "kvm_module": kvm_module(),
        "nested": nested_param(),
        "dev_kvm": path,
        "api_version": None,
        "svm": None,
        "vmx": None,
        "maxphyaddr": None,
        "caps": {},
        "kvm_error": None,
    }
    try:
        facts.update(_kvm_facts(path))
    except KvmError as e:  # KvmUnavailable included: one actionable line
        facts["kvm_error"] = str(e)
    if facts["maxphyaddr"] is None:
        facts["maxphyaddr"] = host_maxphyaddr()
    facts["backends"] = {"kvm": kvm_backend(facts)}
    return facts


def summary(facts: dict) -> str:
    """One line: what can be tested here, and how to test the rest."""
    kvm = facts["backends"]["kvm"]
    if kvm["usable"]:
        return (f"here: the whole catalogue on this host's KVM ({kvm['reason']}, kernel "
                f"{facts['kernel']}); other kernels: --backend qemu --kernel SPEC")
    rest = "the rest: --backend model (built-in), or --backend qemu --kernel SPEC (real kernels)"
    if facts.get("kvm_error"):
        return f"here: no KVM ({kvm['reason']}); {rest}"
    return (f"here: only the no-SVM instruction checks on /dev/kvm (API {facts['api_version']}; "
            f"{kvm['reason'].split(';')[0]}); {rest}")


if __name__ == "__main__":  # pragma: no cover - the CLI is kvmtest.cli
    import json
    import sys

    f = host_facts()
    print(json.dumps(f, indent=2) if "--json" in sys.argv else summary(f))
