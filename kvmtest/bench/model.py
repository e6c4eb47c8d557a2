"""Model backend benchmark: per-case cost with and without instance reuse.

``bench_model(n)`` runs a small representative mix of cases (a successful
VMRUN to L2's VMMCALL, a consistency-check failure in gif1 and gif0 mode,
an instruction-level #UD) through runner.run_case() and reports wall-clock
figures side by side:

- ``reuse``: one ModelBackend, so one Unicorn instance per payload, reset
  between cases (context_restore + rewrite of the memory a case can touch);
- ``fresh``: a new ModelBackend (new Unicorn instances, cold translation
  cache) for every case;
- ``reuse_unicorn_timer``: as ``reuse`` but bounding each emu_start with
  Unicorn's own ``timeout=`` (a timer thread per call) instead of the
  watchdog, to show why the watchdog is the default.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from ..backends.model import ModelBackend
from ..case import GIF0, GIF1, INSN, NEED_NO_SVM, VMEXIT_INVALID, VMRUN, Case, exception, vmexit
from ..model.watchdog import TIMER_UNICORN, TIMER_WATCHDOG
from ..observation import EXCEPTION, SYNC
from ..runner import run_case


def bench_cases() -> list[Case]:
    return [
        Case(id="bench/vmrun-ok", family="negative", scenario=VMRUN, expect=vmexit(0x81),
             source="bench", gif_mode=GIF1),
        Case(id="bench/asid0[gif1]", family="control", scenario=VMRUN, expect=VMEXIT_INVALID,
             source="bench", gif_mode=GIF1, vmcb={"asid": 0}),
        Case(id="bench/asid0[gif0]", family="control", scenario=VMRUN, expect=VMEXIT_INVALID,
             source="bench", gif_mode=GIF0, vmcb={"asid": 0}),
        Case(id="bench/clgi-nosvm", family="insn", scenario=INSN,
             expect=exception(6, "insn_clgi"), source="bench", payload="svm_insn",
             params={"insn": 5, "flags": 0}, needs=frozenset({NEED_NO_SVM})),
    ]


def _timed(n: int, backend_for: Callable[[], ModelBackend]) -> list[float]:
    cases = bench_cases()
    times = []
    for i in range(n):
        case = cases[i % len(cases)]
        t0 = time.perf_counter()
        backend = backend_for()
        obs = run_case(backend, case, timeout=5.0)
        times.append(time.perf_counter() - t0)
        if obs.outcome not in (SYNC, EXCEPTION):
            raise RuntimeError(f"{case.id}: benchmark case failed: {obs.outcome} {obs.detail}")
    return times


def _summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "cases": len(times),
        "mean_ms": statistics.fmean(times) * 1e3,
        "median_ms": statistics.median(times) * 1e3,
        "p95_ms": ordered[int(0.95 * (len(ordered) - 1))] * 1e3,
        "cases_per_s": len(times) / sum(times),
    }


def bench_model(n: int = 400, fresh_n: int | None = None) -> dict[str, dict[str, float]]:
    """Per-case timings of the model backend; see the module docstring."""
    reuse = ModelBackend(timer=TIMER_WATCHDOG)
    _timed(len(bench_cases()), lambda: reuse)  # warm the translation caches
    result = {"reuse": _summary(_timed(n, lambda: reuse))}
    slow = ModelBackend(timer=TIMER_UNICORN)
    _timed(len(bench_cases()), lambda: slow)
    result["reuse_unicorn_timer"] = _summary(_timed(max(n // 8, 8), lambda: slow))
    result["fresh"] = _summary(_timed(fresh_n or max(n // 8, 8), ModelBackend))
    reuse.close()
    slow.close()
    return result


if __name__ == "__main__":
    for name, row in bench_model().items():
        print(f"{name:22s} " + "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in row.items()))
