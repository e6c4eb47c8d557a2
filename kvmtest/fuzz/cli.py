"""``kvmtest fuzz`` and ``kvmtest run --scenario``: the command-line side.

kvmtest/cli.py only registers these (add_fuzz_command, run_scenario); the
logic lives here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..backends import BackendError, KernelError
from ..config import Config, ConfigError
from ..judge import PROFILES

# The campaign machinery (Unicorn included) is imported when a command runs,
# not when the parser is built.
DEFAULT_TIMEOUT = 1.0  # = runners.DEFAULT_TIMEOUT

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE, EXIT_ENV, EXIT_KERNEL = 0, 1, 2, 3, 4
MODEL_PREFIX = "model:"
# Rounds per batch for a kernel under QEMU: one boot runs this many rounds.
QEMU_ROUNDS = 8


class FuzzError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def add_fuzz_command(sub) -> None:
    p = sub.add_parser("fuzz", help="differential exploration with minimised findings",
                       description="Generate nested-SVM scenarios, run them on a kernel (and "
                       "a second kernel or the model), report every behaviour that breaks "
                       "the contract or differs, shrunk to a minimal scenario.")
    p.add_argument("--backend", choices=("qemu", "model"), default=None,
                   help="qemu (default with --kernel) or model (model profile vs profile)")
    p.add_argument("--kernel", metavar="SPEC", help="kernel under test (as for kvmtest run)")
    p.add_argument("--modules", metavar="DIR", help="modules dir for a bzImage --kernel")
    p.add_argument("--kvm-modules", metavar="DIR", help="rebuilt kvm.ko/kvm-amd.ko")
    p.add_argument("--against", metavar="SPEC",
                   help="second target: a kernel SPEC, or model:PROFILE")
    p.add_argument("--profile", choices=PROFILES, default=None,
                   help="the kernel's behaviour profile: the model oracle runs with it "
                   "(backend model: the profile under test, default 7.x)")
    p.add_argument("--against-profile", choices=PROFILES, default=None,
                   help="the --against kernel's profile (explains differences by profile)")
    p.add_argument("--config", metavar="TEXT", default="default",
                   help="configuration: 'npt=0 cpu=EPYC,+vgif' ... (kvmtest.config)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--time", type=float, metavar="S", help="explore for S seconds")
    budget.add_argument("--count", type=int, metavar="N", help="explore N scenarios")
    p.add_argument("--seed", type=int, help="generator seed (scenarios follow from it)")
    p.add_argument("--out", metavar="DIR", help="findings directory (default "
                   "kvmtest-fuzz-SEED)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"per-scenario timeout (s, default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--no-shrink", action="store_true", help="report findings unminimised")
    p.add_argument("--promote", metavar="FINDING",
                   help="turn a finding file into a catalogue row (Python) and exit")
    p.set_defaults(func=cmd_fuzz)


def _usage(msg: str) -> FuzzError:
    return FuzzError(msg, EXIT_USAGE)


def _qemu_runner(spec: str, args: argparse.Namespace, config: Config, profile: str | None,
                 workdir: Path):
    from .qemu_runner import make_runner

    try:
        return make_runner(spec, config=config, profile=profile,
                          kvm_modules=args.kvm_modules if spec == args.kernel else None,
                          modules=args.modules if spec == args.kernel else None,
                          timeout=args.timeout, workdir=str(workdir))
    except BackendError as e:
        raise FuzzError(str(e), EXIT_ENV) from None


def build_targets(args: argparse.Namespace, out: Path):
    from .campaign import Targets
    from .runners import ModelRunner

    try:
        config = Config.parse(args.config)
    except ConfigError as e:
        raise _usage(str(e)) from None
    backend = args.backend or ("qemu" if args.kernel else None)
    if backend is None:
        raise _usage("fuzz needs --kernel SPEC (qemu) or --backend model")
    against = None
    if backend == "model":
        if args.kernel:
            raise _usage("--kernel needs --backend qemu")
        profile = args.profile or "7.x"
        kernel = ModelRunner(profile, args.timeout, config.kvm_amd_params)
        model = None
        if args.against:
            if not args.against.startswith(MODEL_PREFIX):
                raise _usage("--backend model compares with model:PROFILE only")
            against = _model_target(args.against, args, config)
        maxphy = kernel.maxphyaddr
    else:
        if not args.kernel:
            raise _usage("--backend qemu needs --kernel SPEC")
        kernel = _qemu_runner(args.kernel, args, config, args.profile, out / "kernel")
        model = (ModelRunner(args.profile, args.timeout, config.kvm_amd_params)
                 if args.profile else None)
        if args.against:
            against = (_model_target(args.against, args, config)
                       if args.against.startswith(MODEL_PREFIX) else
                       _qemu_runner(args.against, args, config, args.against_profile,
                                    out / "against"))
        maxphy = 40  # QEMU TCG's default phys-bits (kvmtest.model.cpuid)
    against_profile = args.against_profile or (against.profile if against else None)
    meta = {"kernel": getattr(kernel, "spec", kernel.label), "against": args.against,
            "profile": kernel.profile, "against_profile": against_profile,
            "seed": args.seed, "config": config.label, "backend": backend}
    return Targets(kernel, against, model), maxphy, meta


def _model_target(text: str, args: argparse.Namespace, config: Config):
    from .runners import ModelRunner

    profile = text[len(MODEL_PREFIX):]
    if profile not in PROFILES:
        raise _usage(f"unknown model profile {profile!r} (known: {', '.join(PROFILES)})")
    return ModelRunner(profile, args.timeout, config.kvm_amd_params)


def _replay(args: argparse.Namespace, backend: str) -> str:
    if backend == "model":
        profile = args.profile or "7.x"
        return f"kvmtest run --backend model --profile {profile} --scenario '{{spec}}'"
    return f"kvmtest run --backend qemu --kernel {args.kernel} --scenario '{{spec}}'"


def _progress_printer(stream=sys.stderr):
    last = [0.0]
    tty = stream.isatty()

    def show(p) -> None:
        now = time.monotonic()
        if tty:
            stream.write("\r" + p.line()[:200] + "\x1b[K")
            stream.flush()
        elif now - last[0] >= 5.0:
            print(p.line(), file=stream, flush=True)
            last[0] = now
    return show


def cmd_fuzz(args: argparse.Namespace) -> int:
    try:
        if args.promote:
            return _promote(args)
        return _fuzz(args)
    except FuzzError as e:
        print(f"kvmtest: error: {e}", file=sys.stderr)
        return e.code
    except KernelError as e:
        print(f"kvmtest: error: {e}", file=sys.stderr)
        return EXIT_KERNEL


def _fuzz(args: argparse.Namespace) -> int:
    from .campaign import Campaign

    if args.seed is None:
        raise _usage("fuzz needs --seed S (scenarios follow from it)")
    if args.time is None and args.count is None:
        raise _usage("fuzz needs --time S or --count N")
    if (args.time is not None and args.time <= 0) or (args.count is not None and args.count <= 0):
        raise _usage("--time and --count must be positive")
    if args.timeout <= 0:
        raise _usage("--timeout must be positive")
    out = Path(args.out or f"kvmtest-fuzz-{args.seed}")
    try:
        (out / "findings").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FuzzError(f"cannot create {out}: {e.strerror}", EXIT_USAGE) from None
    targets, maxphy, meta = build_targets(args, out)
    meta["replay"] = _replay(args, meta["backend"])
    show = _progress_printer()
    rounds = 1 if meta["backend"] == "model" else QEMU_ROUNDS
    campaign = Campaign(targets, args.seed, maxphy, rounds_per_batch=rounds, on_progress=show)
    try:
        print(f"fuzz: {_describe(targets)}; seed {args.seed}; out {out}", file=sys.stderr)
        campaign.explore(count=args.count, seconds=args.time)
        if not args.no_shrink:
            campaign.shrink()
        findings = campaign.findings(meta)
    finally:
        targets.close()
    if sys.stderr.isatty():
        print(file=sys.stderr)
    print(campaign.progress().line(), file=sys.stderr)
    for f in findings:
        f.write(out / "findings")
    summary = campaign.summary(findings, meta)
    (out / "campaign.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(render(summary))
    new = [f for f in findings if f.explained is None and confirmed(f.to_json())]
    return EXIT_FINDINGS if new else EXIT_OK


def confirmed(f: dict) -> bool:
    """Seen again when its minimal scenario was re-run (a finding seen once
    and never again is listed as flaky: a timing artefact under TCG, or a
    WARN_ON_ONCE that had fired already)."""
    return not str(f.get("reproduced", "")).startswith("0/")


def _describe(t) -> str:
    parts = [f"kernel {t.kernel.label}"]
    if t.against is not None:
        parts.append(f"against {t.against.label}")
    if t.model is not None:
        parts.append(f"model oracle {t.model.label}")
    return ", ".join(parts)


def render(summary: dict) -> str:
    lines = [f"{summary['scenarios']} scenarios in {summary['seconds']} s "
             f"({summary['rate']}/s), {len(summary['behaviours'])} behaviours, "
             f"{len(summary['findings'])} findings"]
    for f in summary["findings"]:
        tag = "known" if f["explained"] else "NEW" if confirmed(f) else "flaky"
        lines.append(f"  {f['id']:<16} {tag:<5} {f['reproduced']:>4}  {f['spec']}")
        for s in f["signatures"]:
            lines.append(f"      {s}")
        if f["explained"]:
            lines.append(f"      explained: {f['explained']}")
    cov = summary["coverage"]
    lines.append("checks reached: " + ", ".join(f"{c} {r}/{t}" for c, (r, t) in cov.items()))
    if summary["unreached_checks"]:
        lines.append("unreached: " + ", ".join(summary["unreached_checks"]))
    if summary.get("known_differences"):
        lines.append("known differences (kvmtest/fuzz/known.py): " + ", ".join(
            f"{k} x{n}" for k, n in summary["known_differences"].items()))
    return "\n".join(lines)


def _promote(args: argparse.Namespace) -> int:
    from .findings import FindingError
    from .promote import promote
    from .spec import SpecError

    try:
        text = promote(args.promote)
    except (FindingError, SpecError) as e:
        raise _usage(str(e)) from None
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text, end="")
    return EXIT_OK


# ---- kvmtest run --scenario --------------------------------------------------------


def run_scenario(args: argparse.Namespace) -> int:
    """Replay one scenario on the chosen backend: the contract oracle's
    verdict and the observation field by field (and as JSON with --json)."""
    from .. import argcheck, outputs
    from . import oracles
    from .spec import SpecError, parse

    if getattr(args, "ktap", None) or getattr(args, "junit", None):
        print("kvmtest: error: --scenario writes --json only (KTAP and JUnit report "
              "catalogue runs)", file=sys.stderr)
        return EXIT_USAGE
    path = getattr(args, "json", None)
    try:
        s = parse(args.scenario)
        if path:
            argcheck.report_path("json", path)
    except (SpecError, argcheck.UsageError) as e:
        print(f"kvmtest: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        runner = _scenario_runner(args)
    except FuzzError as e:
        print(f"kvmtest: error: {e}", file=sys.stderr)
        return e.code
    try:
        result = runner.run([s])[0]
    except KernelError as e:
        print(f"kvmtest: error: {e}", file=sys.stderr)
        return EXIT_KERNEL
    finally:
        runner.close()
    lines = [f"scenario: {s.format()}  ({runner.label})"]
    doc: dict = {"scenario": s.format(), "runner": runner.label}
    obs = result.observation
    if result.skipped:
        lines.append(f"SKIP: {result.skipped}")
        doc.update(result="skip", skip=result.skipped)
        status = 125
    elif result.crash:
        lines.append(f"FAIL: the kernel died\n{result.crash}")
        doc.update(result="crash", crash=result.crash)
        status = EXIT_FINDINGS
    else:
        assert obs is not None  # a run that neither skipped nor crashed observed
        for name, value in sorted(obs.to_json().items()):
            if name == "l1":
                lines += [f"  l1.{reg:<10} {oracles.show('l1', v)}" for reg, v in value.items()]
            else:
                lines.append(f"  {name:<14} {oracles.show(name, value)}")
        signals = oracles.contract(s, s.to_case(), obs) + oracles.warnings(runner.label, obs)
        lines += [f"FAIL: {sig.oracle}: {sig.details[0] if sig.details else sig.signature}"
                  for sig in signals]
        if not signals:
            lines.append("PASS: the contract holds")
        doc.update(result="fail" if signals else "pass", observation=obs.to_json(),
                   signals=[{"oracle": sig.oracle, "signature": sig.signature,
                             "details": list(sig.details)} for sig in signals])
        status = EXIT_FINDINGS if signals else EXIT_OK
    if path != outputs.STDOUT:  # the JSON alone on stdout with --json -
        print("\n".join(lines))
    if path:
        try:
            outputs.write_text(path, json.dumps(doc, indent=2) + "\n")
        except OSError as e:
            print(f"kvmtest: error: cannot write --json {path}: {e.strerror or e}",
                  file=sys.stderr)
            return EXIT_ENV
    return status


def _scenario_runner(args: argparse.Namespace):
    backend = args.backend
    if backend == "auto":
        backend = "qemu" if args.kernel else "model"
    from .runners import ModelRunner

    timeout = min(args.timeout, 5.0)
    if backend == "model":
        return ModelRunner(args.profile or "7.x", timeout)
    if backend == "qemu":
        if not args.kernel:
            raise _usage("--backend qemu needs --kernel SPEC")
        from .qemu_runner import make_runner

        params = {}
        for p in args.kvm_amd_param or []:
            name, eq, value = p.partition("=")
            if not eq or not name:
                raise _usage(f"--kvm-amd-param wants NAME=VALUE, not {p!r}")
            params[name] = value
        try:
            return make_runner(args.kernel, config=Config.from_options(args.cpu, params),
                              profile=args.profile, kvm_modules=args.kvm_modules,
                              modules=args.modules, timeout=timeout, workdir=args.artifacts)
        except BackendError as e:
            raise FuzzError(str(e), EXIT_ENV) from None
    if backend == "kvm":
        return _KvmRunner(timeout)
    raise _usage(f"unknown backend {backend!r}")


class _KvmRunner:
    """This host's /dev/kvm, for --scenario on an AMD host."""

    profile = None

    def __init__(self, timeout: float) -> None:
        from ..backends.kvm import KvmBackend
        from ..kvm import KvmUnavailable

        try:
            self.backend = KvmBackend()
        except KvmUnavailable as e:
            raise FuzzError(str(e), EXIT_ENV) from None
        self.timeout = timeout
        self.label = "kvm"

    def run(self, scenarios):
        from ..runner import run_case
        from ..session import skip_reason
        from .runners import RunResult

        out = []
        for s in scenarios:
            case = s.to_case()
            reason = skip_reason(self.backend, case)
            out.append(RunResult(skipped=reason) if reason else
                       RunResult(observation=run_case(self.backend, case, self.timeout)))
        return out

    def close(self) -> None:
        self.backend.close()
