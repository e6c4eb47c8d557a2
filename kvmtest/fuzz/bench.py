"""Fuzz throughput, side by side: the model and kernels under QEMU TCG.

    python3 -m kvmtest.fuzz.bench [--quick] [--kernel SPEC ...] [--seed S]

(`kvmtest bench` calls ``bench_fuzz``.)  The same generated scenarios (one
seed) run on

- a model target: scenarios per second of wall time and of CPU time
  (generation and oracles excluded, then included: a model-vs-model
  campaign of the same length);
- each kernel: inside one boot (the guest agent's own per-scenario times)
  and per batch including the boot.

Targets (reported, never asserted in unit tests): 1,000 scenarios/s on the
model, 20 scenarios/s per kernel under TCG inside one boot.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

MODEL_TARGET = 1000.0
KERNEL_TARGET = 20.0
DEFAULT_KERNELS = ("debian:linux-image-6.1.0-47-amd64-unsigned",
                   "debian:linux-image-6.1.0-56-amd64-unsigned")


@dataclass
class Figure:
    name: str
    scenarios: int
    wall_s: float
    cpu_s: float | None = None

    @property
    def rate(self) -> float:
        return self.scenarios / self.wall_s if self.wall_s else 0.0

    @property
    def cpu_rate(self) -> float | None:
        return self.scenarios / self.cpu_s if self.cpu_s else None


def _scenarios(seed: int, n: int):
    from .generator import Generator

    g = Generator(seed, 40)
    out = []
    while len(out) < n:
        out += g.round()
    return out[:n]


def bench_model(n: int, seed: int) -> list[Figure]:
    from .campaign import Campaign, Targets
    from .runners import ModelRunner

    scenarios = _scenarios(seed, n)
    runner = ModelRunner("fixed")
    runner.run(scenarios[:64])  # translation caches warm
    t, c = time.perf_counter(), time.process_time()
    runner.run(scenarios)
    one = Figure("model: one target, execution only", n, time.perf_counter() - t,
                 time.process_time() - c)
    runner.close()
    targets = Targets(kernel=ModelRunner("legacy"), against=ModelRunner("fixed"))
    campaign = Campaign(targets, seed, 40)
    campaign.explore(count=64)
    t, c = time.perf_counter(), time.process_time()
    campaign.explore(count=64 + n)
    pair = Figure("model: legacy vs fixed campaign (2 targets + oracles)", n,
                  time.perf_counter() - t, time.process_time() - c)
    targets.close()
    return [one, pair]


def bench_kernel(spec: str, n: int, seed: int, workdir: str | None = None) -> list[Figure]:
    """Two batches of n scenarios on one kernel: the first pays the boot,
    the second runs inside the same boot."""
    from .qemu_runner import make_runner

    runner = make_runner(spec, workdir=workdir)
    scenarios = _scenarios(seed, 2 * n)
    try:
        t = time.perf_counter()
        runner.run(scenarios[:n])
        first = time.perf_counter() - t
        t = time.perf_counter()
        runner.run(scenarios[n:])
        second = time.perf_counter() - t
    finally:
        runner.close()
    label = runner.label
    return [Figure(f"{label}: inside one boot (a second batch)", n, second),
            Figure(f"{label}: first batch including the boot", n, first)]

def bench_fuzz(quick: bool = False, kernels: list[str] | None = None, seed: int = 1,
               only: tuple[str, ...] = ("model", "qemu")) -> bool:
    """Print the figures; True if every target was met."""
    print("\n== kvmtest fuzz: scenarios/s, same seed on every target", flush=True)
    figures: list[Figure] = []
    if "model" in only:
        figures += bench_model(300 if quick else 2000, seed)
    if "qemu" in only:
        for spec in kernels or DEFAULT_KERNELS:
            figures += bench_kernel(spec, 64 if quick else 256, seed)
    print(f"{'':58} {'scen.':>6} {'wall s':>7} {'/s':>7} {'/s CPU':>7}")
    for f in figures:
        cpu = f"{f.cpu_rate:7.0f}" if f.cpu_rate else f"{'-':>7}"
        print(f"{f.name:58} {f.scenarios:6d} {f.wall_s:7.2f} {f.rate:7.1f} {cpu}")
    ok = True
    model = next((f for f in figures if f.name.startswith("model: one")), None)
    inside = [f for f in figures if "inside one boot" in f.name]
    if model:
        met = model.rate >= MODEL_TARGET
        ok &= met
        print(f"model target {MODEL_TARGET:.0f}/s: {model.rate:.0f}/s wall, "
              f"{model.cpu_rate or 0:.0f}/s CPU: {'ok' if met else 'OVER'}")
    for f in inside:
        met = f.rate >= KERNEL_TARGET
        ok &= met
        print(f"{f.name.split(':')[0]} target {KERNEL_TARGET:.0f}/s inside one boot: "
              f"{f.rate:.1f}/s: {'ok' if met else 'OVER'}")
        if model:
            print(f"  model/kernel ratio: {model.rate / f.rate:.0f}x")
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m kvmtest.fuzz.bench", description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--kernel", action="append", metavar="SPEC")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", nargs="+", choices=("model", "qemu"), default=["model", "qemu"])
    args = ap.parse_args(argv)
    return 0 if bench_fuzz(args.quick, args.kernel, args.seed, tuple(args.only)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
