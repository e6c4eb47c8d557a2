"""`kvmtest explain ID`: one case, in a screen or two.

What the case does (scenario, payload, GIF mode, L2 entry), the VMCB12
fields it changes from the default VMCB12 (vmcb12.prepare with no changes,
compared field by field over the VMCB layout of kvmtest.vmcb), its negative
control, what each kernel profile and configuration is expected to do, and
where the case comes from.  With --backend it also runs the case and shows
expected against observed field by field; on a real kernel it runs the
model of the matching profile too and lists every field where the two
observations differ (kvmtest.parity).
"""

from __future__ import annotations

import argparse
import difflib
import fnmatch
import re
import textwrap

from . import eventlog, params, parity, vmcb12
from . import judge as j
from . import report as rep
from .case import (
    GIF0,
    GIF1,
    INSN,
    NEED_NESTED_STATE,
    NEED_NO_NPT,
    NEED_NO_SVM,
    NEED_NO_VGIF,
    NEED_NPT,
    NEED_SMM,
    NEED_SVM,
    NEED_VGIF,
    SCRIPT,
    SET_NESTED_STATE,
    SMM,
    VMRUN,
    Case,
    Expect,
)
from .cases import DEFAULT_MAXPHYADDR, catalogue
from .observation import Observation
from .payloads import load_payload
from .session import Result
from .vmcb import FIELDS, POISON, SVM_EXIT_ERR, SVM_EXIT_VMMCALL

SCENARIO = {
    VMRUN: "L1 runs VMRUN on the VMCB12 below; afterwards the host reads VMCB12's exit "
           "fields, GIF (KVM_GET_NESTED_STATE) and L1's own report of its registers",
    INSN: "L1 executes one SVM instruction (or WRMSR) and reports whether it faulted",
    SET_NESTED_STATE: "the host hands KVM the VMCB12 below through KVM_SET_NESTED_STATE "
                      "(guest mode); if KVM refuses it, L1 must still VMRUN the default "
                      "VMCB12 and see L2's VMMCALL",
    SMM: "an SMI arrives while L2 runs; the SMM handler writes the VMCB12 fields below "
         "into guest memory, then RSM",
    SCRIPT: "L1 (or L2, or an SMM handler) stops at SYNC stages where the host acts "
            "(interrupts, NMI, SMI, memslots, nested-state round trips: on_sync below); "
            "L1 logs the order of markers and events",
}
GIF_MODE = {GIF1: "GIF=1 at VMRUN (STGI first)", GIF0: "GIF=0 at VMRUN (CLGI first)"}
NEEDS = {
    NEED_SVM: "nested SVM (SVM in L1's CPUID, kvm_amd nested=1)",
    NEED_NO_SVM: "a guest CPUID without SVM (any KVM)",
    NEED_NESTED_STATE: "KVM_CAP_NESTED_STATE",
    NEED_SMM: "KVM_CAP_X86_SMM (KVM_SMI, RSM)",
    NEED_NPT: "kvm_amd npt=1 (L1 may set NP_ENABLE)",
    NEED_NO_NPT: "kvm_amd npt=0 (L1 on shadow paging)",
    NEED_VGIF: "vGIF on (STGI/CLGI not intercepted)",
    NEED_NO_VGIF: "vGIF off",
}
KIND = {
    "vmexit_invalid": "the VMRUN fails: EXITCODE = VMEXIT_INVALID (-1), EXITINFO1 = EXITINFO2 "
                      "= 0, GIF = 0, L1 back after VMRUN with its own RSP, CR0, CR3, CR4, EFER",
    "vmexit": "the VMRUN succeeds and L2 exits with the given EXITCODE; GIF = 0, L1 intact",
    "exception": "L1 takes the exception at the given instruction",
    "no_fault": "the instruction completes without a fault",
    "einval": "KVM_SET_NESTED_STATE fails with EINVAL, and L1 still runs",
    "accepted": "KVM_SET_NESTED_STATE succeeds and the vCPU is in guest mode",
    "shutdown": "the vCPU shuts down (KVM_EXIT_SHUTDOWN): RSM refuses to re-enter L2",
    "accepted_l1": "KVM_SET_NESTED_STATE succeeds and the vCPU is not in guest mode",
    "log": "L1 reports after its VMRUN and its event log (markers, interrupts, NMIs, "
           "SMIs, #DBs in the order they came) reads as given",
    "left_l2": "L2 does not go on: L1 resumes after its VMRUN out of guest mode, or the "
               "vCPU shuts down",
}
# Bit names of the VMCB12 fields cases change most (APM vol. 2: CR0 and CR4
# in 3.1, EFER in 3.1.7, the VMRUN/VMMCALL intercepts in appendix B).
BIT_NAMES: dict[str, dict[int, str]] = {
    "cr0": {0: "PE", 1: "MP", 2: "EM", 3: "TS", 4: "ET", 5: "NE", 16: "WP", 18: "AM",
            29: "NW", 30: "CD", 31: "PG"},
    "cr4": {0: "VME", 1: "PVI", 2: "TSD", 3: "DE", 4: "PSE", 5: "PAE", 6: "MCE", 7: "PGE",
            8: "PCE", 9: "OSFXSR", 10: "OSXMMEXCPT", 11: "UMIP", 12: "LA57", 16: "FSGSBASE",
            17: "PCIDE", 18: "OSXSAVE", 20: "SMEP", 21: "SMAP", 22: "PKE", 23: "CET"},
    "efer": {0: "SCE", 8: "LME", 10: "LMA", 11: "NXE", 12: "SVME", 13: "LMSLE", 14: "FFXSR",
             15: "TCE"},
    "intercept_misc2": {0: "VMRUN", 1: "VMMCALL", 2: "VMLOAD", 3: "VMSAVE", 4: "STGI",
                        5: "CLGI", 6: "SKINIT"},
    "nested_ctl": {0: "NP_ENABLE"},
    "event_inj": {31: "V", 11: "EV"},
}
_FLAGS = {name.removeprefix("PF_"): getattr(params, name)
          for name in dir(params) if name.startswith("PF_")}


class UnknownCase(LookupError):
    pass


def find_case(case_id: str, maxphyaddr: int = DEFAULT_MAXPHYADDR) -> Case:
    cases = {c.id: c for c in catalogue(maxphyaddr)}
    if case_id in cases:
        return cases[case_id]
    near = [i for i in cases if case_id in i][:5]
    near += [i for i in difflib.get_close_matches(case_id, list(cases), n=5, cutoff=0.6)
             if i not in near]
    hint = f"; close matches: {', '.join(near[:5])}" if near else ""
    raise UnknownCase(f"no case {case_id!r}{hint}")


def _hex(value: int) -> str:
    return f"{value:#x}"


def _bits(name: str, old: int, new: int) -> str:
    """'+bit 29 NW, -bit 31 PG' when few bits changed (a flag), else ''."""
    changed = old ^ new
    if not changed or bin(changed).count("1") > 4:
        return ""
    names = BIT_NAMES.get(name, {})
    return ", ".join(f"{'+' if new >> b & 1 else '-'}bit {b}"
                     + (f" {names[b]}" if b in names else "")
                     for b in range(64) if changed >> b & 1)


def vmcb12_changes(case: Case) -> list[tuple[str, int, int]]:
    """(field, default value, case value) for every VMCB12 field the case's
    prepared VMCB12 has different from the default one (exit fields aside:
    both poison them)."""
    payload = load_payload(case.payload)
    default = vmcb12.prepare(payload, "l2_vmmcall", {})
    mine = vmcb12.prepare(payload, case.l2_entry, case.vmcb)
    return [(name, default[name], mine[name]) for name in FIELDS
            if default[name] != mine[name]]


def _field_lines(changes: list[tuple[str, int, int]]) -> list[str]:
    width = max((len(n) for n, _, _ in changes), default=0)
    out = []
    for name, old, new in changes:
        bits = _bits(name, old, new)
        out.append(f"  {name:<{width}}  {_hex(old)} -> {_hex(new)}" + (f"  ({bits})" if bits
                                                                        else ""))
    return out


def _inputs(case: Case) -> dict[str, object]:
    """Everything the host hands the guest for this case, flattened."""
    out: dict[str, object] = {f"params.{k}": v for k, v in case.guest_params().items()}
    if NEED_SVM in case.needs:
        payload = load_payload(case.payload)
        v = vmcb12.prepare(payload, case.l2_entry, case.vmcb)
        out.update({f"vmcb12.{n}": v[n] for n in FIELDS})
    out.update({f"smm handler writes {k}": v for k, v in case.smm_vmcb.items()})
    out.update({f"memory at {gpa:#x}": len(data) for gpa, data in case.memory.items()})
    out.update({f"host at stage {stage:#x}": " ".join(acts) for stage, acts in
                case.on_sync.items()})
    out.update({f"nested.{k}": v for k, v in case.nested.items()})
    out.update({f"memslot at {gpa:#x}": size for gpa, size in case.extra_memory.items()})
    return out


def input_differences(a: Case, b: Case) -> list[str]:
    """How b's inputs differ from a's, one line per field."""
    ia, ib = _inputs(a), _inputs(b)
    lines = []
    for key in sorted(ia.keys() | ib.keys()):
        va, vb = ia.get(key), ib.get(key)
        if va != vb:
            show = [_hex(v) if isinstance(v, int) else "-" for v in (va, vb)]
            bits = _bits(key.removeprefix("vmcb12."), va, vb) if isinstance(va, int) and \
                isinstance(vb, int) else ""
            lines.append(f"  {key}: {show[0]} -> {show[1]}" + (f"  ({bits})" if bits else ""))
    return lines


def _controlled_by_source(control: Case, cases: dict[str, Case]) -> list[Case]:
    m = re.match(r"negative control of (\S+)", control.source)
    if not m:
        return []
    return [c for i, c in cases.items() if fnmatch.fnmatchcase(i, m.group(1).rstrip(":,;"))
            and c.id != control.id]


def controls_of(case: Case, cases: dict[str, Case]) -> list[Case]:
    """The negative controls of case (linked by control_of, else named in their source)."""
    linked = [c for c in cases.values() if c.control_of == case.id]
    return linked or [c for c in cases.values() if case in _controlled_by_source(c, cases)]


def controlled(case: Case, cases: dict[str, Case]) -> list[Case]:
    """The cases this case is the negative control of."""
    if case.control_of:
        return [cases[case.control_of]] if case.control_of in cases else []
    return _controlled_by_source(case, cases)


WIDTH = 100


def _wrap(head: str, text: str) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=head,
                         subsequent_indent=" " * len(head)) or [head]


def describe(case: Case, maxphyaddr: int = DEFAULT_MAXPHYADDR) -> list[str]:
    cases = {c.id: c for c in catalogue(maxphyaddr)}
    lines = [f"{case.id}  (family {case.family})",
             *_wrap("  what      ", SCENARIO.get(case.scenario, case.scenario)),
             f"  payload   {case.payload}"
             + (f", L2 entry {case.l2_entry}" if NEED_SVM in case.needs else "")]
    if case.gif_mode:
        lines.append(f"  GIF       {GIF_MODE[case.gif_mode]}")
    if case.scenario == INSN:
        p = case.guest_params()
        flags = [n for n, bit in _FLAGS.items() if p.get("flags", 0) & bit]
        lines.append(f"  insn      {params.INSNS[p.get('insn', 0)]}; flags "
                     f"{'|'.join(flags) or '0'}")
    lines += _wrap("  source    ", case.source)
    lines.append("")
    if NEED_SVM not in case.needs:
        lines.append("VMCB12: none (the guest has no SVM)")
    else:
        changes = vmcb12_changes(case)
        lines.append("VMCB12 fields changed from the default (vmcb12.prepare, "
                     f"MAXPHYADDR {maxphyaddr}):")
        lines += _field_lines(changes) or ["  none: the default VMCB12"]
        lines += _wrap("  ", f"exit fields poisoned with {POISON:#x} before the run: "
                             f"{', '.join(vmcb12.EXIT_FIELDS)}")
    if case.smm_vmcb:
        lines.append("SMM handler writes into VMCB12 (then RSM):")
        lines += [f"  {k} = {_hex(v)}" for k, v in case.smm_vmcb.items()]
    if case.memory:
        lines.append("extra guest memory: " + ", ".join(
            f"{len(d)} bytes at {gpa:#x}" for gpa, d in case.memory.items()))
    lines.append("")
    for ctl in controls_of(case, cases):
        lines.append(f"negative control: {ctl.id} ({ctl.expect.describe()}); it differs in:")
        lines += input_differences(case, ctl)[:12] or ["  nothing (same inputs)"]
    for bad in controlled(case, cases):
        lines.append(f"negative control of: {bad.id} ({bad.expect.describe()}); "
                     "that case differs in:")
        lines += input_differences(case, bad)[:12] or ["  nothing (same inputs)"]
    if not controls_of(case, cases) and not controlled(case, cases):
        lines.append("negative control: none (this case is not a failing VMRUN check)")
    lines.append("")
    lines += expectations(case)
    return lines


def expectations(case: Case) -> list[str]:
    lines = _wrap("expected: ", KIND.get(case.expect.kind, case.expect.kind))
    if not case.profiles:
        lines.append(f"  every kernel  {case.expect.describe()}")
    else:
        for p in j.PROFILES:
            want = j.expectation(case, p)
            own = "" if p in case.profiles else f"  (as {j.PROFILE_BASE.get(p, 'the contract')})"
            bug = "  -> FAILS: known bug" if want.known_bug else ""
            lines += _wrap(f"  {p:<12}  ", f"{want.describe()}{own}{bug}")
    needs = sorted(case.needs)
    lines.append("configuration: " + ("any" if not case.configs else
                                      "only with " + "; ".join(NEEDS[n] for n in case.configs)))
    lines.append("needs: " + "; ".join(NEEDS.get(n, n) for n in needs))
    return lines


# -- expected against observed ------------------------------------------------------


Row = tuple[str, str, str, bool]  # field, expected, observed, agrees


def _fmt(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(int(value))
    return _hex(value) if isinstance(value, int) else str(value)


def _row(name: str, allowed: tuple, observed: object, text: str | None = None) -> Row:
    return (name, text or " or ".join(_fmt(a) for a in allowed), _fmt(observed),
            observed in allowed)


def _vmexit_rows(case: Case, want: Expect, obs: Observation) -> list[Row]:
    code = SVM_EXIT_ERR if want.kind == "vmexit_invalid" else want.exit_code
    codes = (code, SVM_EXIT_ERR & 0xFFFF_FFFF) if want.hw_checked else (code,)
    rows = [_row("outcome", ("sync",), obs.outcome), _row("exit_code", codes, obs.exit_code)]
    if want.kind == "vmexit_invalid":
        rows += [_row("exit_info_1", (0,), obs.exit_info_1),
                 _row("exit_info_2", (0,), obs.exit_info_2)]
    rows += [_row("gif", (want.gif_after,), obs.gif),
             _row("guest_mode", (False,), obs.guest_mode)]
    l1 = obs.l1 or {}
    flipped = dict(want.l1_flipped)  # bits a known bug flips in L1's registers
    for reg in j.L1_REGS:
        pre = l1.get(f"pre_{reg}")
        if pre is None:
            rows.append((f"l1.{reg}", "as before VMRUN", _fmt(l1.get(reg)), False))
            continue
        rows.append(_row(f"l1.{reg}", (pre ^ flipped.get(reg, 0),), l1.get(reg)))
    if want.event_inj_cleared is not None:
        before = case.vmcb.get("event_inj", 0)
        rows.append(_row("event_inj", (0 if want.event_inj_cleared else before,),
                         obs.event_inj))
    return rows


def field_rows(case: Case, want: Expect, obs: Observation) -> list[Row]:
    """(field, expected, observed, agrees) for what the judge looks at in this case."""
    if want.kind in ("vmexit_invalid", "vmexit"):
        rows = _vmexit_rows(case, want, obs)
    elif want.kind == "exception":
        at = load_payload(case.payload).sym(want.at or "")
        rows = [_row("outcome", ("exception",), obs.outcome),
                (("vector", str(want.vector), str(obs.vector), obs.vector == want.vector)),
                _row("rip", (at,), obs.rip, f"{at:#x} ({want.at})")]
        rows[-1] = (*rows[-1][:2], f"{_fmt(obs.rip)} ({obs.rip_symbol})", rows[-1][3])
        if want.error_code is not None:
            rows.append(_row("error_code", (want.error_code,), obs.error_code))
    elif want.kind == "no_fault":
        rows = [_row("outcome", ("sync",), obs.outcome)]
        if want.exit_code is not None:
            rows.append(_row("exit_code", (want.exit_code,), obs.exit_code))
    elif want.kind == "einval":
        rows = [_row("outcome", ("einval",), obs.outcome),
                _row("after_outcome", ("sync",), obs.after_outcome),
                _row("exit_code", (SVM_EXIT_VMMCALL,), obs.exit_code)]
    elif want.kind == "accepted":
        rows = [_row("outcome", ("accepted",), obs.outcome),
                _row("guest_mode", (True,), obs.guest_mode)]
    elif want.kind == "accepted_l1":
        rows = [_row("outcome", ("accepted",), obs.outcome),
                _row("guest_mode", (False,), obs.guest_mode)]
    elif want.kind == "log":
        rows = _log_rows(case, want, obs)
    elif want.kind == "left_l2":
        rows = [(("outcome", "shutdown, or sync out of guest mode",
                  f"{obs.outcome}, guest mode {obs.guest_mode}",
                  not j.check(case, obs, want)))]
    else:
        rows = [_row("outcome", (want.kind,), obs.outcome)]
    if case.scenario == SMM:
        runs = obs.smm_handler_runs or 0
        rows.append(("smm_handler_runs", ">= 1", str(runs), runs >= 1))
    if obs.kernel_warnings:
        rows.append(("kernel log", "no WARN/BUG", obs.kernel_warnings[0], False))
    return rows


def _log_rows(case: Case, want: Expect, obs: Observation) -> list[Row]:
    seen = eventlog.render(obs.log, load_payload(case.payload))
    rows = [_row("outcome", ("sync",), obs.outcome)]
    if want.exit_code is not None:
        rows.append(_row("exit_code", (want.exit_code,), obs.exit_code))
    shown = " ".join(seen) if seen is not None else "(never started)"
    ok = seen is not None and (want.log is None or eventlog.matches(seen, want.log))
    rows.append(("event log", " ".join(want.log or ("(any)",)), shown, ok))
    return rows


def comparison(r: Result, profile: str | None) -> list[str]:
    v = r.verdict
    head = f"verdict: {v.verdict.upper()}" + (f" ({v.reason})" if v.reason else "")
    if r.observation is None:
        return [head]
    title, want = rep.reference(r.case, v.profiles, profile)
    rows = field_rows(r.case, want, r.observation)
    width = max(len(f) for f, _, _, _ in rows)
    ewidth = max(len(e) for _, e, _, _ in rows)
    lines = [head, f"expected ({title}) against observed:"]
    for name, expect, seen, ok in rows:
        mark = "" if ok else "  <-- differs"
        lines.append(f"  {name:<{width}}  {expect:<{ewidth}}  {seen}{mark}")
    return lines


def _run(args: argparse.Namespace, case_id: str) -> tuple[Result, object]:
    """Run one case on the chosen backend: (result, backend's describe())."""
    from .backends import BackendError, KernelError, make
    from .cli import EXIT_ENV, EXIT_KERNEL, CliError, _backend_options, close_watched
    from .session import run_cases

    try:
        backend, note = make(args.backend, args.profile, **_backend_options(args))
    except BackendError as e:
        raise CliError(str(e), EXIT_ENV) from None
    try:
        case = find_case(case_id, getattr(backend, "maxphyaddr", DEFAULT_MAXPHYADDR))
        print(note)
        (result,) = run_cases(backend, [case], args.profile, timeout=args.timeout)
    except KernelError as e:
        raise CliError(str(e), EXIT_KERNEL) from None
    finally:
        close_watched(backend)
    return result, backend.describe()


def model_parity(result: Result, profile: str | None, timeout: float) -> list[str]:
    """Fields where this kernel's observation differs from the model's for
    the profile it matched (or the one asked for)."""
    from .backends.model import ModelBackend
    from .runner import run_case

    v = result.verdict
    name = profile or (v.profiles[-1] if v.profiles else j.PROFILES[-1])
    model = ModelBackend(name)
    try:
        case = find_case(result.case.id, model.maxphyaddr)
        obs = run_case(model, case, timeout)
    finally:
        model.close()
    assert result.observation is not None
    diffs = parity.diff(obs, result.observation)
    if not diffs:
        return [f"model ({name}) and this kernel observed the same in every field"]
    return [f"model ({name}) against this kernel, fields that differ:"] + [
        f"  {d.describe()}" for d in diffs]


def explain(args: argparse.Namespace) -> int:
    from .cli import EXIT_FAIL, EXIT_PASS, EXIT_UNTESTED, CliError, check_run_args

    try:
        case = find_case(args.case_id)
    except UnknownCase as e:
        from .argcheck import UsageError

        raise UsageError(str(e)) from None
    if args.backend is None:
        for opt in ("kernel", "modules", "kvm_modules", "cpu", "kvm_amd_param", "artifacts"):
            if getattr(args, opt, None):
                raise CliError(f"--{opt.replace('_', '-')} needs --backend qemu", 2)
        print("\n".join(describe(case)))
        return EXIT_PASS
    args.k = None
    check_run_args(args)
    print("\n".join(describe(case)))
    print()
    result, desc = _run(args, case.id)
    print(f"ran on backend {desc['backend']}, kernel {desc.get('kernel', '?')}")
    print("\n".join(comparison(result, args.profile)))
    if result.observation is not None and desc["backend"] != "model":
        print("\n".join(model_parity(result, args.profile, args.timeout)))
    return {j.PASS: EXIT_PASS, j.SKIP: EXIT_UNTESTED}.get(result.verdict.verdict, EXIT_FAIL)
