"""kvmtest command line: info, list, run, explain, bench (and the qemu tools).

Exit codes are for machines (CI, `git bisect run`) and are documented in the
README; every path out of main() returns one of them.  An uncaught exception
is a kvmtest bug: one line on stderr, the traceback in a log file, and
EXIT_INTERNAL, never the code of a failed case.
"""

from __future__ import annotations

import argparse
import errno
import json
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable

from . import argcheck, outputs
from . import report as rep
from .argcheck import UsageError
from .backends import NAMES, BackendError, KernelError, make
from .bench.kvm import BenchError
from .cases import DEFAULT_MAXPHYADDR, catalogue
from .config import Config, ConfigError
from .console import pipe_safe
from .display import RunDisplay
from .judge import PROFILES
from .kvm import KvmUnavailable
from .payloads import PayloadError
from .selection import SelectionError, select
from .session import Report, run_cases

# Exit codes (the README's tables; tests/test_exit_codes.py checks each row).
EXIT_PASS, EXIT_FAIL, EXIT_USAGE, EXIT_ENV, EXIT_KERNEL = 0, 1, 2, 3, 4
EXIT_INTERNAL = 70  # a bug in kvmtest (sysexits.h EX_SOFTWARE)
EXIT_UNTESTED = 125  # nothing could be tested: `git bisect run` skips
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as a shell reports it)

# OSErrors that say the machine is short of something, not that kvmtest is wrong.
_ENV_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
               errno.EMFILE, errno.ENFILE, errno.ENOMEM}


class CliError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class ParseError(Exception):
    """argparse found a bad command line (raised instead of exiting, so that
    each command can answer with its own usage code)."""

    def __init__(self, parser: Parser, message: str) -> None:
        super().__init__(message)
        self.parser = parser


class Parser(argparse.ArgumentParser):
    """argparse with the usage exit code a command documents (bisect-run: 128)."""

    def __init__(self, *args, usage_exit: int = EXIT_USAGE, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.usage_exit = usage_exit
        self.commands: dict[str, Parser] = {}  # the top-level parser's subcommands

    def error(self, message: str):  # type: ignore[override]
        raise ParseError(self, message)


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


def kvm_amd_params(args: argparse.Namespace) -> dict[str, str]:
    params = {}
    for p in getattr(args, "kvm_amd_param", None) or []:
        name, eq, value = p.partition("=")
        if not eq or not name:
            raise CliError(f"--kvm-amd-param wants NAME=VALUE, not {p!r}", EXIT_USAGE)
        params[name] = value
    return params


def _backend_options(args: argparse.Namespace) -> dict:
    if args.backend != "qemu":
        for opt in ("kernel", "modules", "kvm_modules", "cpu", "artifacts", "keep"):
            if getattr(args, opt, None):
                raise CliError(f"--{opt.replace('_', '-')} needs --backend qemu", EXIT_USAGE)
        if getattr(args, "kvm_amd_param", None):
            if args.backend != "model":  # the model emulates kvm_amd's parameters
                raise CliError("--kvm-amd-param needs --backend qemu or model", EXIT_USAGE)
            return {"kvm_amd_params": kvm_amd_params(args)}
        return {}
    if not args.kernel:
        raise CliError("--backend qemu needs --kernel SPEC (e.g. debian:"
                       "linux-image-6.1.0-56-amd64-unsigned)", EXIT_USAGE)
    params = kvm_amd_params(args)
    return {"kernel": args.kernel, "modules": args.modules, "kvm_modules": args.kvm_modules,
            "cpu": args.cpu, "kvm_amd_params": params, "artifacts": args.artifacts,
            "keep": getattr(args, "keep", False)}


def report_paths(args: argparse.Namespace) -> dict[str, str]:
    """--json/--ktap/... FILE given on this command line: option -> path."""
    return {name: getattr(args, name) for name in rep.FORMATS if getattr(args, name, None)}


def check_run_args(args: argparse.Namespace, kernel_paths: bool = True) -> None:
    """Every usage error a run can have, before anything runs (UsageError/CliError)."""
    argcheck.selection(args.k)
    if args.k and not select(catalogue(DEFAULT_MAXPHYADDR), args.k):
        raise UsageError(f"no case matches -k {args.k!r}")
    argcheck.report_paths(report_paths(args))
    _backend_options(args)
    if args.backend == "model" and getattr(args, "kvm_amd_param", None):
        _check_model_params(args)
    if getattr(args, "artifacts", None):
        argcheck.writable_dir("--artifacts", args.artifacts)
    if kernel_paths:
        argcheck.kernel_paths(args)


def _check_model_params(args: argparse.Namespace) -> None:
    """The kvm_amd parameters the model cannot emulate, refused by the model itself."""
    from .backends.model import ModelBackend

    try:
        ModelBackend(args.profile or PROFILES[-1],
                     kvm_amd_params=_backend_options(args).get("kvm_amd_params")).close()
    except ValueError as e:
        raise UsageError(str(e)) from None


def write_reports(report: Report, paths: dict[str, str]) -> None:
    """Every report file asked for, each written atomically; a failure to
    write one is an environment error once all were tried."""
    failed = []
    for name, path in paths.items():
        try:
            outputs.write_text(path, rep.FORMATS[name][1](report))
        except OSError as e:
            failed.append(f"cannot write --{name} {path}: {e.strerror or e}")
    if failed:
        raise CliError("; ".join(failed), EXIT_ENV)


def make_backend(args: argparse.Namespace, **extra) -> tuple[object, str]:
    """The backend ARGS ask for and how it was chosen (CliError if it cannot start)."""
    try:
        return make(args.backend, args.profile, **_backend_options(args), **extra)
    except BackendError as e:
        raise CliError(str(e), EXIT_ENV) from None


OpenBackend = Callable[[argparse.Namespace], tuple[object, str]]
Finish = Callable[[object], list[str]]


def run_report(args: argparse.Namespace, quiet: bool = False,
               display: RunDisplay | None = None, open_backend: OpenBackend | None = None,
               finish: Finish | None = None) -> Report:
    """Run the selection on the chosen backend; display shows progress.
    OPEN_BACKEND gives the backend and its note (default: make_backend;
    kvmtest.cellgroup: a shared boot); FINISH ends its run and returns the
    kernel-log lines no case saw (default: close_watched)."""
    if display is None and not quiet:
        display = RunDisplay(verbose=getattr(args, "verbose", False))
    backend, note = (open_backend or make_backend)(args)
    finish = finish or close_watched
    maxphy = getattr(backend, "maxphyaddr", DEFAULT_MAXPHYADDR)
    cases = select(catalogue(maxphy), args.k)
    if not cases:
        finish(backend)
        raise CliError(f"no case matches -k {args.k!r}", EXIT_USAGE)
    progress = None
    if display is not None:
        display.note(note)
        display.start(len(cases), args.backend if args.backend != "auto" else backend.name)
        progress = display.progress
    try:
        results = run_cases(backend, cases, args.profile, progress, timeout=args.timeout)
    except KernelError as e:
        raise CliError(str(e), EXIT_KERNEL) from None
    finally:
        if display is not None:
            display.status.clear()
        outside = finish(backend)
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


def cmd_run(args: argparse.Namespace, open_backend: OpenBackend | None = None,
            finish: Finish | None = None) -> int:
    """OPEN_BACKEND, FINISH: as for run_report."""
    if args.scenario:  # one generated scenario (kvmtest fuzz): kvmtest/fuzz/cli.py
        from .fuzz.cli import run_scenario

        return run_scenario(args)
    check_run_args(args)
    paths = report_paths(args)
    # A report on stdout ('-') keeps stdout clean: people read stderr then.
    to_stdout = outputs.STDOUT in paths.values()
    display = RunDisplay(out=sys.stderr if to_stdout else sys.stdout, verbose=args.verbose)
    report = run_report(args, display=display, open_backend=open_backend, finish=finish)
    display.finish(report)
    write_reports(report, paths)
    return report.exit_code()


def cmd_explain(args: argparse.Namespace) -> int:
    from .explain import explain

    return explain(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_all

    return run_all(args)


def add_run_options(p: argparse.ArgumentParser, selection: bool = True) -> None:
    p.add_argument("--backend", choices=NAMES, default="auto")
    p.add_argument("--profile", choices=PROFILES, default=None,
                   help="kernel behaviour expected (model: behaviour to emulate)")
    if selection:
        p.add_argument("-k", metavar="EXPR", help="select cases, e.g. 'save and gif1'")
    p.add_argument("--timeout", type=argcheck.seconds, default=5.0,
                   help="per-case run timeout in seconds (positive)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="every case as it runs, then the whole table")
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
    p.add_argument("--keep", action="store_true",
                   help="qemu: keep the temporary artifacts directory (kept anyway on failure)")


def add_report_options(p: argparse.ArgumentParser) -> None:
    """One --NAME FILE option per report format ('-': standard output)."""
    for name, (text, _render) in rep.FORMATS.items():
        p.add_argument(f"--{name}", metavar="FILE", help=f"{text} ('-': stdout)")


def parser() -> Parser:
    ap = Parser(prog="kvmtest", description=__doc__.splitlines()[0])
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
    p.add_argument("--scenario", metavar="SPEC",
                   help="run one kvmtest fuzz scenario, e.g. 'gif1 vmcb:asid=0'")
    add_report_options(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("explain", help="what a case does and expects; with --backend, "
                       "also run it and compare field by field")
    p.add_argument("case_id", metavar="ID", help="a case id, e.g. 'save/cr0-cd0-nw1[gif1]'")
    add_run_options(p, selection=False)
    p.set_defaults(func=cmd_explain, backend=None)
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
    ap.commands = sub.choices
    return ap


def _add_qemu_commands(sub) -> None:
    try:
        from .qemu_cli import add_commands
    except ImportError:
        return
    add_commands(sub, add_run_options)


def _traceback_log(exc: BaseException) -> str | None:
    """Write exc's traceback to a new file in the temp dir; its path, or None."""
    try:
        with tempfile.NamedTemporaryFile("w", prefix="kvmtest-traceback-", suffix=".log",
                                         delete=False) as f:
            f.write(f"kvmtest {' '.join(sys.argv[1:])}\n{time.ctime()}\n\n")
            f.write("".join(traceback.format_exception(exc)))
            return f.name
    except OSError:
        return None


def _unexpected(exc: Exception) -> int:
    """One line for an exception nobody handled, the traceback in a log."""
    log = _traceback_log(exc)
    where = f"traceback in {log}" if log else "traceback below"
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:  # where it happened, for a message without a file name
        f = frames[-1]
        where = f"in {f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}; {where}"
    if isinstance(exc, OSError) and exc.errno in _ENV_ERRNOS:
        print(f"kvmtest: error: {exc} ({where})", file=sys.stderr)
        code = EXIT_ENV
    else:
        print(f"kvmtest: internal error (a kvmtest bug): {type(exc).__name__}: {exc} "
              f"({where})", file=sys.stderr)
        code = EXIT_INTERNAL
    if log is None:
        traceback.print_exception(exc, file=sys.stderr)
    return code


def dispatch(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except CliError as e:
        print(f"kvmtest: error: {e}", file=sys.stderr)
        return e.code
    except (UsageError, SelectionError, ConfigError) as e:
        print(f"kvmtest: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (PayloadError, BackendError, KvmUnavailable, BenchError) as e:
        print(f"kvmtest: error: {e}", file=sys.stderr)
        return EXIT_ENV
    except KernelError as e:
        print(f"kvmtest: error: {e}", file=sys.stderr)
        return EXIT_KERNEL
    except KeyboardInterrupt:
        print("kvmtest: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        return _unexpected(e)


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["agent"]:  # the qemu backend's guest side (not for users)
        from .agent import main as agent_main

        return agent_main(argv[1:])
    # SIGTERM (a CI job cancelled, a matrix stopping its cells) unwinds like
    # ^C: QEMU stopped, temporary directories removed, exit 130.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    if argv[:1] == ["cells"]:  # a matrix group on one boot (kvmtest.matrix; not for users)
        from .cellgroup import main as cells_main

        return cells_main(argv[1:])
    with pipe_safe():
        try:
            ap = parser()
            args, extra = ap.parse_known_args(argv)
            if extra:  # reported by the command's parser, with its usage exit code
                command = ap.commands.get(getattr(args, "cmd", None), ap)
                command.error(f"unrecognized arguments: {' '.join(extra)}")
        except ParseError as e:
            print(f"kvmtest: error: {e} (see {e.parser.prog} -h)", file=sys.stderr)
            return e.parser.usage_exit
        code = dispatch(args)
        # A command may speak another language (bisect-run: git bisect's).
        translate = getattr(args, "exit_code", None)
        return translate(code) if translate else code


if __name__ == "__main__":
    sys.exit(main())
