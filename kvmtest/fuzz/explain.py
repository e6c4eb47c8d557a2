"""Which findings the project can already explain, and how.

A signal is explained when

- the model's profiles reproduce it: two kernels differ exactly as the
  model's profiles of those kernels differ on the same scenario
  (``against``), or the model with the kernel's profile breaks the contract
  the same way (``contract``: a known bug the profile records, e.g. the GIF
  left set by legacy kernels, or CR4.MCE after an SMI in L2);
- or it matches an entry of DOCUMENTED: a difference docs/findings.md
  describes, with its source lines.

Everything else is unexplained: a new finding.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import oracles
from .runners import ModelRunner
from .spec import Scenario, parse

if TYPE_CHECKING:
    from .campaign import Targets
    from .findings import Finding

def _vmcb(s: Scenario):
    v = s.vmcb12_image()
    for k, val in s.smm:
        v[k] = val
    return v


def _l2_vmmcall_unintercepted(s: Scenario) -> bool:
    return s.entry in ("l2_vmmcall", "l2_ioio", "l2_rdmsr", "l2_smi") and not (
        _vmcb(s)["intercept_misc2"] & (1 << 1))


def _np_tables_shared(s: Scenario) -> bool:
    v = _vmcb(s)
    return bool(v["nested_ctl"] & 1) and v["nested_cr3"] & ~0xFFF == 0x4000


def _cr3_unbacked(s: Scenario) -> bool:
    return _vmcb(s)["cr3"] >= 0x40_0000 and s.mode == "long"


def _rsm_unchecked(s: Scenario) -> bool:
    return s.kind == "smm"


def _soft_event_injected(s: Scenario) -> bool:
    """EVENTINJ holds a software interrupt (TYPE 4) or #BP/#OF (TYPE 3,
    vector 3 or 4): KVM re-injects those through svm_update_soft_interrupt_rip."""
    ev = _vmcb(s)["event_inj"]
    kind, vector = (ev >> 8) & 7, ev & 0xFF
    return bool(ev & 1 << 31) and (kind == 4 or (kind == 3 and vector in (3, 4)))


def _pae_l2_under_np(s: Scenario) -> bool:
    return s.mode == "pae" and bool(_vmcb(s)["nested_ctl"] & 1)


# (oracle family, signature pattern, scenario condition or None, explanation
# with its docs/findings.md entry).  Oracle "warn" matches warn:kernel and
# warn:against.
DOCUMENTED: list[tuple[str, re.Pattern[str], Callable[[Scenario], bool] | None, str]] = [
    ("warn", re.compile(r"nested\.c:940 nested_svm_vmexit"), None,
     "6.1.170 accepts an illegal nCR3, L2 shuts down and nested_svm_vmexit WARNs "
     "(docs/findings.md section 3)"),
    ("warn", re.compile(r"nested\.c:957 nested_svm_vmexit"), _rsm_unchecked,
     "6.1.192: RSM into a VMCB12 KVM should have refused, then "
     "WARN_ON_ONCE(nested_run_pending) in nested_svm_vmexit (docs/findings.md section 2)"),
    ("contract", re.compile(r"^RSM did not refuse a VMCB12 failing "), _rsm_unchecked,
     "RSM re-enters L2 with a VMCB12 failing the VMRUN checks on kernels without "
     "be5fa8737d42 (docs/findings.md section 2)"),
    ("model", re.compile(r"^outcome=timeout\|"), _l2_vmmcall_unintercepted,
     "L2's VMMCALL that L1 does not intercept livelocks 6.1 (KVM re-executes it after "
     "'fixing' the hypercall): docs/findings.md, kvmtest fuzz 1"),
    ("model", re.compile(r"^outcome=timeout\|"), _np_tables_shared,
     "a nested page fault while L2's exception is delivered livelocks the vCPU on 6.1 "
     "and 6.12 (docs/findings.md, kvmtest fuzz 2)"),
    ("model", re.compile(r"^outcome=timeout\|"), _cr3_unbacked,
     "L2's page tables in memory no memslot backs: the #PF is re-injected forever on 6.1 "
     "and 6.12 (docs/findings.md, kvmtest fuzz 2)"),
    ("model", re.compile(r"^outcome=sync\|"), _soft_event_injected,
     "an injected software interrupt, #BP or #OF is dropped when its delivery exits to "
     "L0 or the entry is cancelled (svm_update_soft_interrupt_rip finds no INTn to skip): "
     "docs/findings.md section 6 and kvmtest fuzz 8"),
    ("model", re.compile(r"^outcome=internal_error\|"), _pae_l2_under_np,
     "a legacy-PAE L2 under nested paging: without NRIPS KVM cannot emulate the skip of "
     "an instruction it completed (KVM_EXIT_INTERNAL_ERROR): docs/findings.md, kvmtest "
     "fuzz 9"),
    ("crash", re.compile(r"^qemu: fatal: "), None,
     "QEMU TCG itself aborted (the emulator under the kernel, not KVM): "
     "docs/findings.md, kvmtest fuzz 3"),
]

_models: dict[str, ModelRunner] = {}


def _model(profile: str) -> ModelRunner:
    if profile not in _models:
        _models[profile] = ModelRunner(profile)
    return _models[profile]


def explain_signal(sig: oracles.Signal, spec: str, targets: Targets) -> str | None:
    family = sig.oracle.split(":")[0]
    s = parse(spec)
    for oracle, pattern, when, why in DOCUMENTED:
        if oracle == family and pattern.search(sig.signature) and (when is None or when(s)):
            return why
    kernel_profile = targets.kernel.profile
    if family == "against" and targets.against is not None:
        theirs = targets.against.profile
        if kernel_profile and theirs and kernel_profile != theirs:
            left = _model(kernel_profile).run_one(s).observation
            right = _model(theirs).run_one(s).observation
            again = (oracles.differential("against", left, right, s)
                     if left and right else None)
            if again is not None and again.signature == sig.signature:
                return f"profile difference {kernel_profile} vs {theirs} (kvmtest.model.profiles)"
    if family == "contract" and kernel_profile:
        obs = _model(kernel_profile).run_one(s).observation
        if obs is not None and sig.key in {x.key for x in oracles.contract(s, s.to_case(), obs)}:
            return f"known in profile {kernel_profile} (kvmtest.model.profiles)"
    return None


def explain(f: Finding, targets: Targets) -> str | None:
    """Why every signal of the finding is known, or None if one is not."""
    reasons = []
    for d in f.signals:
        sig = oracles.Signal(d["oracle"], d["signature"], tuple(d.get("details", ())))
        why = explain_signal(sig, f.spec, targets)
        if why is None:
            return None
        reasons.append(f"{sig.oracle}: {why}")
    return "; ".join(dict.fromkeys(reasons)) or None
