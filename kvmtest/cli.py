"""kvmtest command line: info, list, run, bench (and the qemu tools)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import report as rep
from .backends import NAMES, BackendError, KernelError, make
from .cases import DEFAULT_MAXPHYADDR, catalogue
from .config import Config
from .judge import PROFILES
from .payloads import PayloadError
from .selection import SelectionError, select
from .session import Report, run_cases

# Exit codes (documented in the README).
EXIT_PASS, EXIT_FAIL, EXIT_USAGE, EXIT_ENV, EXIT_KERNEL, EXIT_UNTESTED = 0, 1, 2, 3, 4, 125


class CliError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def cmd_info(args: argparse.Namespace) -> int:
    from .backends.kvm import dev_kvm
    from .info import backends_usable, host_facts, summary

    facts = host_facts(dev_kvm())
    facts["backends"] = backends_usable(facts)
    if args.json:
        print(json.dumps(facts, indent=1, sort_keys=True))
    else:
        print(summary(facts))
    return EXIT_PASS


def cmd_list(args: argparse.Namespace) -> int:
    cases = select(catalogue(DEFAULT_MAXPHYADDR), args.k)
    rows = [{"id": c.id, "family": c.family, "gif_mode": c.gif_mode,
             "expect": (c.expect.describe() if not c.profiles else
                        {p: e.describe() for p, e in c.profiles.items()}),
             "source": c.source, "needs": sorted(c.needs), "configs": c.configs,
             "control_of": c.control_of}
            for c in cases]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            exp = r["expect"] if isinstance(r["expect"], str) else "profile-dependent"
            print(f"{r['id']:<50} {exp}")
        print(f"{len(rows)} cases")
    return EXIT_PASS


def _kvm_amd_params(args: argparse.Namespace) -> dict[str, str]:
    params = {}
    for p in getattr(args, "kvm_amd_param", None) or []:
        name, eq, value = p.partition("=")
        if not eq or not name:
            raise CliError(f"--kvm-amd-param wants NAME=VALUE, not {p!r}", EXIT_USAGE)
        params[name] = value
    return params


def _backend_options(args: argparse.Namespace) -> dict:
    if args.backend != "qemu":
        for opt in ("kernel", "modules", "kvm_modules", "cpu", "artifacts"):
            if getattr(args, opt, None):
                raise CliError(f"--{opt.replace('_', '-')} needs --backend qemu", EXIT_USAGE)
        if getattr(args, "kvm_amd_param", None):
            if args.backend != "model":  # the model emulates kvm_amd's parameters
                raise CliError("--kvm-amd-param needs --backend qemu or model", EXIT_USAGE)
            return {"kvm_amd_params": _kvm_amd_params(args)}
        return {}
    if not args.kernel:
        raise CliError("--backend qemu needs --kernel SPEC (e.g. debian:"
                       "linux-image-6.1.0-56-amd64-unsigned)", EXIT_USAGE)
    params = _kvm_amd_params(args)
    return {"kernel": args.kernel, "modules": args.modules, "kvm_modules": args.kvm_modules,
            "cpu": args.cpu, "kvm_amd_params": params, "artifacts": args.artifacts}


def run_report(args: argparse.Namespace, quiet: bool = False) -> Report:
    try:
        backend, note = make(args.backend, args.profile, **_backend_options(args))
    except BackendError as e:
        raise CliError(str(e), EXIT_ENV) from None
    maxphy = getattr(backend, "maxphyaddr", DEFAULT_MAXPHYADDR)
    cases = select(catalogue(maxphy), args.k)
    if not cases:
        raise CliError(f"no case matches -k {args.k!r}", EXIT_USAGE)
    if not quiet:
        print(note, file=sys.stderr)
    progress = None if quiet else (
        lambda r, i, n: print(rep.progress_line(r, i, n), file=sys.stderr, flush=True))
    try:
        results = run_cases(backend, cases, args.profile, progress, timeout=args.timeout)
    except KernelError as e:
        raise CliError(str(e), EXIT_KERNEL) from None
    finally:
        outside = close_watched(backend)
    desc = backend.describe()  # the qemu guest reports its release only now
    notes = [note]
    if outside:
        notes.append(f"kernel log outside any case: {outside[0]}")
    if getattr(backend, "timings", None):
        notes.append("timings: " + ", ".join(
            f"{k} {v}" for k, v in backend.timings.items() if v is not None))
    if getattr(backend, "outdir", None):
        notes.append(f"artifacts: {backend.outdir}")
    unchecked = [r for r in results if r.observation and not r.observation.kernel_log_checked]
    if unchecked:
        notes.append(f"kernel log not checked for {len(unchecked)} cases: /dev/kmsg is not "
                     "readable here (run as root, or with CAP_SYSLOG)")
    config = Config.from_options(getattr(args, "cpu", None),
                                 _backend_options(args).get("kvm_amd_params"))
    return Report(backend=desc["backend"], profile=args.profile,
                  kernel=desc.get("kernel", "?"), results=results, notes=notes,
                  kernel_warnings_outside_cases=outside, config=config.to_json())


def close_watched(backend) -> list[str]:
    """Close the backend (pooled VMs are destroyed here) with the kernel log
    watched; returns WARN/BUG lines no case saw."""
    outside = list(getattr(backend, "unattributed_warnings", []))
    watch = getattr(backend, "kernel_log", None)
    close = getattr(backend, "close", None)
    if watch is None:
        if close:
            close()
        return outside
    with watch() as lines:
        if close:
            close()
    return outside + (lines or [])


def cmd_run(args: argparse.Namespace) -> int:
    if args.scenario:  # one generated scenario (kvmtest fuzz): kvmtest/fuzz/cli.py
        from .fuzz.cli import run_scenario

        return run_scenario(args)
    if getattr(args, "junit", None):
        from .outputs import check_writable

        try:
            check_writable(args.junit)
        except OSError as e:
            raise CliError(f"cannot write {args.junit}: {e}", EXIT_USAGE) from None
    report = run_report(args)
    print(rep.table(report))
    for line in report.notes[1:]:
        print(line)
    print(rep.summary_line(report))
    if args.json:
        rep.write_json(report, Path(args.json))
    if args.ktap:
        Path(args.ktap).write_text(rep.ktap(report))
    if getattr(args, "junit", None):
        from . import junit
        from .outputs import write_text

        write_text(args.junit, junit.from_run(report.to_json()))
    return report.exit_code()


def cmd_bench(args: argparse.Namespace) -> int:
    from .benchmarks import run_all

    return run_all(args)


def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=NAMES, default="auto")
    p.add_argument("--profile", choices=PROFILES, default=None,
                   help="kernel behaviour expected (model: behaviour to emulate)")
    p.add_argument("-k", metavar="EXPR", help="select cases, e.g. 'save and gif1'")
    p.add_argument("--timeout", type=float, default=5.0, help="per-case run timeout (s)")
    p.add_argument("--kernel", metavar="SPEC",
                   help="qemu: bzImage path, kernel build tree, or debian:PACKAGE")
    p.add_argument("--modules", metavar="DIR", help="qemu: modules dir for a bzImage")
    p.add_argument("--kvm-modules", metavar="DIR", help="qemu: rebuilt kvm.ko/kvm-amd.ko")
    p.add_argument("--cpu", default=None,
                   help="qemu: CPU model (default: EPYC under TCG, host with -enable-kvm)")
    p.add_argument("--kvm-amd-param", action="append", metavar="NAME=VALUE",
                   help="qemu: extra kvm_amd parameter (nested=1 is always set); "
                   "model: the parameters to emulate (npt, vgif, vls)")
    p.add_argument("--artifacts", metavar="DIR", help="qemu: keep console and logs here")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvmtest", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("info", help="what this host's KVM can test")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("list", help="list the case catalogue")
    p.add_argument("--json", action="store_true")
    p.add_argument("-k", metavar="EXPR")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("run", help="run cases and judge them")
    add_run_options(p)
    p.add_argument("--json", metavar="FILE", help="write the JSON report here")
    p.add_argument("--ktap", metavar="FILE", help="write a KTAP v1 report here")
    p.add_argument("--scenario", metavar="SPEC",
                   help="run one kvmtest fuzz scenario, e.g. 'gif1 vmcb:asid=0'")
    p.add_argument("--junit", metavar="FILE", help="write JUnit XML here")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("bench", help="benchmarks (Python vs C, model reuse)")
    p.add_argument("--quick", action="store_true", help="fewer iterations")
    p.add_argument("--soak", type=int, default=10_000, help="lifecycles in the soak")
    p.add_argument("--only", nargs="+", choices=("kvm", "model", "qemu"),
                   default=["kvm", "model", "qemu"], help="which benchmarks")
    p.add_argument("--kernel", action="append", metavar="SPEC",
                   help="qemu: kernel(s) to time (default: Debian 6.1.170 and 6.1.192)")
    p.set_defaults(func=cmd_bench)
    from .fuzz.cli import add_fuzz_command

    add_fuzz_command(sub)
    _add_qemu_commands(sub)
    from .report_cli import add_commands as add_report_commands  # matrix, report

    add_report_commands(sub)
    from .cache_cli import add_command as add_cache_command

    add_cache_command(sub)
    return ap


def _add_qemu_commands(sub) -> None:
    try:
        from .qemu_cli import add_commands
    except ImportError:
        return
    add_commands(sub, add_run_options)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["agent"]:  # the qemu backend's guest side (not for users)
        from .agent import main as agent_main

        return agent_main(argv[1:])
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as e:
        print(f"kvmtest: error: {e}", file=sys.stderr)
        return e.code
    except (SelectionError, ValueError) as e:
        print(f"kvmtest: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except PayloadError as e:
        print(f"kvmtest: error: {e}", file=sys.stderr)
        return EXIT_ENV
    except KeyboardInterrupt:
        print("kvmtest: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
