"""`kvmtest bench`: every benchmark, figures side by side in one run.

The package holds one module per benchmark: ``kvm`` (the binding next to
the C reference ``csrc/bench_ref.c``), ``model`` (Unicorn instance reuse);
the qemu per-kernel verdict is timed here.

Targets are reported here (and exit 1 when one is missed), never asserted
with a clock in the unit tests.
"""

from __future__ import annotations

import argparse
import shutil
import threading
import time

MODEL_MS_TARGET = 2.0  # per case, reused Unicorn instance
MODEL_RATE_TARGET = 500  # cases/s on one core
QEMU_VERDICT_TARGET = 20.0  # s: boot + the whole catalogue, one kernel
QEMU_KERNELS = ("debian:linux-image-6.1.0-47-amd64-unsigned",
                "debian:linux-image-6.1.0-56-amd64-unsigned")


def _section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def _mark(ok: bool) -> str:
    return "ok" if ok else "OVER"


def bench_kvm(args: argparse.Namespace) -> bool:
    from . import kvm as bench

    _section("KVM ioctl path: Python vs the C reference (csrc/bench_ref.c), same guest")
    quick = args.quick
    r = bench.run(lifecycles=60 if quick else 300, exits=4000 if quick else 20000,
                  soak_lifecycles=min(args.soak, 1000) if quick else args.soak,
                  rounds=3 if quick else 5)
    for line in r.lines():
        print(line)
    return r.ok


def bench_model_section(args: argparse.Namespace) -> bool:
    from .model import bench_model

    _section("model backend: reused Unicorn instance vs instance per case, same cases")
    res = bench_model(100 if args.quick else 1000)
    print(f"{'':28} {'ms/case':>8} {'p95 ms':>8} {'cases/s':>8}")
    for name, s in res.items():
        print(f"{name:28} {s['mean_ms']:8.2f} {s['p95_ms']:8.2f} {s['cases_per_s']:8.0f}")
    reuse, fresh = res["reuse"], res["fresh"]
    print(f"reuse is {fresh['mean_ms'] / reuse['mean_ms']:.1f}x faster than an instance per case")
    ok = reuse["mean_ms"] <= MODEL_MS_TARGET and reuse["cases_per_s"] >= MODEL_RATE_TARGET
    print(f"targets: <= {MODEL_MS_TARGET} ms/case, >= {MODEL_RATE_TARGET} cases/s  {_mark(ok)}")
    return ok


def _verdict(kernel: str) -> dict:
    """One per-kernel verdict: boot + the whole catalogue, with its parts."""
    from ..backends.qemu import QemuBackend
    from ..cases import catalogue
    from ..session import run_cases

    t0 = time.monotonic()
    backend = QemuBackend(kernel)
    results = run_cases(backend, catalogue(), None)
    wall = time.monotonic() - t0
    t = backend.timings
    return {"kernel": backend.describe()["kernel"], "wall": wall, "cases": len(results),
            "boot": (t.get("boot_s") or 0) + (t.get("overhead_s") or 0),
            "modules": (t.get("mount_s") or 0) + (t.get("modload_s") or 0),
            "run": t.get("command_s") or 0}


def bench_qemu(args: argparse.Namespace) -> bool:
    if shutil.which("qemu-system-x86_64") is None:
        _section("qemu backend: skipped (no qemu-system-x86_64: apt-get install qemu-system-x86)")
        return True
    kernels = args.kernel or list(QEMU_KERNELS)
    _section("qemu backend: per-kernel verdict under TCG (boot + whole catalogue)")
    print(f"{'kernel':20} {'wall s':>7} {'boot s':>7} {'9p+mod s':>9} {'cases s':>8} {'cases':>6}")
    ok = True
    for kernel in kernels:
        v = _verdict(kernel)
        ok &= v["wall"] <= QEMU_VERDICT_TARGET
        print(f"{v['kernel']:20} {v['wall']:7.1f} {v['boot']:7.1f} {v['modules']:9.1f} "
              f"{v['run']:8.1f} {v['cases']:6}  {_mark(v['wall'] <= QEMU_VERDICT_TARGET)}")
    if len(kernels) > 1:
        out: list[dict] = []
        threads = [threading.Thread(target=lambda k=k: out.append(_verdict(k))) for k in kernels]
        t0 = time.monotonic()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        both = time.monotonic() - t0
        print(f"{len(kernels)} kernels in parallel: {both:.1f} s wall "
              f"(slowest alone in parallel: {max(v['wall'] for v in out):.1f} s)")
    print(f"target: <= {QEMU_VERDICT_TARGET:.0f} s per kernel  {_mark(ok)}")
    return ok


def run_all(args: argparse.Namespace) -> int:
    ok = True
    if "kvm" in args.only:
        ok &= bench_kvm(args)
    if "model" in args.only:
        ok &= bench_model_section(args)
    if "qemu" in args.only:
        ok &= bench_qemu(args)
    return 0 if ok else 1
