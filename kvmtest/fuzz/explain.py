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
from typing import TYPE_CHECKING

from . import oracles
from .runners import ModelRunner
from .spec import parse

if TYPE_CHECKING:
    from .campaign import Targets
    from .findings import Finding

# (oracle, signature pattern, explanation).  Oracle "warn" matches
# warn:kernel and warn:against.
DOCUMENTED: list[tuple[str, re.Pattern[str], str]] = [
    ("warn", re.compile(r"WARNING: at arch/x86/kvm/svm/nested\.c:\d+ nested_svm_vmexit"),
     "legacy kernels accept an illegal nCR3, L2 shuts down and nested_svm_vmexit WARNs "
     "(README profiles table: legacy)"),
]

_models: dict[str, ModelRunner] = {}


def _model(profile: str) -> ModelRunner:
    if profile not in _models:
        _models[profile] = ModelRunner(profile)
    return _models[profile]


def explain_signal(sig: oracles.Signal, spec: str, targets: Targets) -> str | None:
    family = sig.oracle.split(":")[0]
    for oracle, pattern, why in DOCUMENTED:
        if oracle == family and pattern.search(sig.signature):
            return why
    s = parse(spec)
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
