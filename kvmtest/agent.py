"""The guest side of the qemu backend: run cases on the guest kernel's KVM.

The host writes a request (case ids, timeout) to the shared directory; the
guest, booted by kvmtest.qemu, runs ``python3 -m kvmtest agent REQ OUT``
with the host's Python and source tree (the host's / is the guest's root
over 9p).  Observations go back as JSON and are judged on the host.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .backends.kvm import KvmBackend, kvm_module
from .cases import catalogue
from .kvm import KvmUnavailable
from .kvm_amd import module_params
from .runner import run_case
from .session import skip_reason


def run(request: dict) -> dict:
    started = time.monotonic()
    facts = {"kernel": platform.release(), "kvm_module": kvm_module(),
             "kvm_amd": module_params()}
    try:
        backend = KvmBackend()
    except KvmUnavailable as e:
        return {"facts": facts, "error": str(e)}
    facts["maxphyaddr"] = backend.maxphyaddr
    facts["svm"] = backend.svm
    facts["nested_state"] = backend.nested_cap
    try:
        return {"facts": facts, **_run_cases(backend, request), "seconds":
                time.monotonic() - started}
    finally:
        backend.close()


def _run_cases(backend: KvmBackend, request: dict) -> dict:
    cases = {c.id: c for c in catalogue(backend.maxphyaddr)}
    results: dict[str, dict] = {}
    for case_id in request["cases"]:
        case = cases.get(case_id)
        if case is None:
            results[case_id] = {"error": f"unknown case {case_id}"}
            continue
        reason = skip_reason(backend, case)
        if reason:
            results[case_id] = {"skip": reason}
            continue
        t0 = time.monotonic()
        obs = run_case(backend, case, request.get("timeout", 5.0))
        results[case_id] = {"observation": asdict(obs), "seconds": time.monotonic() - t0}
    return {"results": results}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python3 -m kvmtest agent REQUEST.json RESULT.json", file=sys.stderr)
        return 2
    request = json.loads(Path(argv[0]).read_text())
    out = run(request)
    tmp = Path(argv[1] + ".tmp")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, argv[1])  # the host never sees a half-written result
    return 0 if "error" not in out else 3
