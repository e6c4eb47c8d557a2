"""`kvmtest bench`: every benchmark, figures side by side in one run.

Targets are reported, never asserted with a clock in the unit tests.
"""

from __future__ import annotations

import argparse
import importlib


def _section(title: str) -> None:
    print(f"\n== {title}")


def run_all(args: argparse.Namespace) -> int:
    from . import bench

    ok = True
    _section("KVM ioctl path: Python vs the C reference (csrc/bench_ref.c), same guest")
    quick = args.quick
    r = bench.run(lifecycles=60 if quick else 300, exits=4000 if quick else 20000,
                  soak_lifecycles=min(args.soak, 1000) if quick else args.soak,
                  rounds=3 if quick else 5)
    for line in r.lines():
        print(line)
    ok &= r.ok
    model = importlib.util.find_spec("kvmtest.model.bench")
    if model is not None:
        from .model.bench import bench_model, format_report

        _section("model backend: Unicorn instance reuse vs instance per case")
        result = bench_model(100 if quick else 1000)
        print(format_report(result))
        ok &= bool(result.get("ok", True))
    return 0 if ok else 1
