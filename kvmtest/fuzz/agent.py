"""Guest side of the fuzz qemu runner: scenarios in, observations out.

    python3 -S -m kvmtest.fuzz.agent REQUEST.json RESULTS.jsonl

The request holds scenario specs (their one-line text: the spec is the
codec) and a per-scenario timeout.  Each scenario runs on the guest
kernel's KVM through the shared host loop (kvmtest.runner) and the kvm
backend, which also collects the kernel-log lines of its window.  RESULTS
gets one JSON line when a scenario starts and one when it ends, flushed and
synced each time: if the kernel dies, the host knows which scenario was in
flight.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import IO


def _emit(out: IO[str], record: dict) -> None:
    out.write(json.dumps(record) + "\n")
    out.flush()
    os.fsync(out.fileno())


def run(request: dict, out: IO[str]) -> int:
    from ..backends.kvm import KvmBackend, kvm_module
    from ..kvm import KvmUnavailable
    from ..kvm_amd import module_params
    from ..runner import run_case
    from ..session import skip_reason
    from .spec import SpecError, parse

    facts = {"kernel": platform.release(), "kvm_module": kvm_module(), "kvm_amd": module_params()}
    try:
        backend = KvmBackend()
    except KvmUnavailable as e:
        _emit(out, {"facts": facts, "error": str(e)})
        return 3
    facts.update(maxphyaddr=backend.maxphyaddr, svm=backend.svm,
                 nested_state=bool(backend.nested_cap), smm=bool(backend.smm_cap))
    _emit(out, {"facts": facts})
    timeout = float(request.get("timeout", 1.0))
    try:
        for i, text in enumerate(request["specs"]):
            try:
                case = parse(text).to_case()
            except SpecError as e:
                _emit(out, {"i": i, "error": str(e)})
                continue
            reason = skip_reason(backend, case)
            if reason:
                _emit(out, {"i": i, "skip": reason})
                continue
            _emit(out, {"i": i, "begin": True})
            t0 = time.monotonic()
            obs = run_case(backend, case, timeout)
            _emit(out, {"i": i, "observation": asdict(obs), "s": round(time.monotonic() - t0, 4)})
    finally:
        backend.close()
    _emit(out, {"done": True})
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python3 -m kvmtest.fuzz.agent REQUEST.json RESULTS.jsonl", file=sys.stderr)
        return 2
    request = json.loads(Path(argv[0]).read_text())
    with open(argv[1], "w") as out:
        return run(request, out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
