"""A confirmed finding -> a catalogue entry with its negative control.

``kvmtest fuzz --promote FINDING`` prints Python data for kvmtest/cases:
a ``Row`` (vmrun findings: the failing case and its negative control in
both GIF modes come from kvmtest.cases._build.vmrun_cases) or, for smm and
nstate findings, the two ``Case`` objects.  The defect is the minimised
scenario's changes; the fix sets the same fields to the default VMCB12's
values, so the control differs from the case only by the defect.  The
expectations are the contract (kvmtest.judge); where the finding's kernels
behaved differently, a profile entry per kernel records what each did, from
the observations in the finding (never from what a kernel "should" do).

Before printing, the control is run on the model: it must VMRUN and come
back with L2's #VMEXIT, or the promotion is refused.
"""

from __future__ import annotations

import re
from typing import Any

from ..observation import SYNC, Observation
from ..vmcb import SVM_EXIT_ERR
from .findings import Finding, FindingError
from .l2modes import DEFAULT_MODE
from .oracles import ERR32, arch_failures, contract, show
from .runners import ModelRunner
from .spec import KIND_NSTATE, KIND_SMM, KIND_VMRUN, Scenario, parse


def _observation(obs: dict[str, Any]) -> Observation:
    return Observation(**{k: v for k, v in obs.items() if k in Observation.__dataclass_fields__})


def _expect_code(obs: dict[str, Any], contract: bool) -> str:
    """An Expect(...) expression for what this observation shows (contract:
    whether it keeps the contract)."""
    o = _observation(obs)
    if o.outcome == SYNC and o.exit_code in (SVM_EXIT_ERR, ERR32):
        args = ['"vmexit_invalid"']
        if o.exit_code == ERR32:
            args.append("hw_checked=True")
        if o.gif:
            args.append("gif_after=True")
        if o.gif or not contract:
            args.append('known_bug="FILL IN: what breaks the contract, and the fix"')
        return f"Expect({', '.join(args)})"
    if o.outcome == SYNC:
        bug = "" if contract else ', known_bug="FILL IN: what breaks the contract, and the fix"'
        return f'Expect("vmexit", exit_code={o.exit_code:#x}{bug})'
    if o.outcome == "shutdown":
        return "SHUTDOWN"
    if o.outcome in ("einval", "accepted"):
        return o.outcome.upper()
    return f"Expect({o.outcome!r})  # FILL IN: observed {o.describe()}"


def _name(s: Scenario) -> str:
    keys = [k.replace(".", "-").replace("_", "-") for k, _ in (*s.vmcb, *s.smm, *s.l1)]
    if s.mode != DEFAULT_MODE:
        keys.insert(0, s.mode)
    return re.sub(r"[^a-z0-9-]", "", "fuzz-" + "-".join(keys or ["default"]))


def _dict(pairs) -> str:
    return "{" + ", ".join(f'"{k}": {v:#x}' for k, v in pairs) + "}"


def promote(path: str) -> str:
    f = Finding.read(path)
    if not f.reproduced or f.reproduced.startswith("0/"):
        raise FindingError(f"{path}: not confirmed (reproduced {f.reproduced or 'never'}); "
                           "replay it before promoting")
    s = parse(f.spec)
    if s.l1:
        raise FindingError(f"{path}: the scenario changes L1's own state ({s.format()}); "
                           "the catalogue's rows change VMCB12 only: write this case by hand")
    fix_scenario = Scenario(kind=s.kind, gif=s.gif, mode=s.mode, l2=s.l2,
                            vmcb=tuple((k, _default(s, "vmcb", k)) for k, _ in s.vmcb),
                            smm=tuple((k, _default(s, "smm", k)) for k, _ in s.smm))
    _check_control(fix_scenario, path)
    meta = f.campaign
    profiles = {}
    for role, prof in (("kernel", meta.get("profile")), ("against", meta.get("against_profile"))):
        obs = f.observations.get(role)
        if prof and obs and "outcome" in obs:
            profiles[prof] = _expect_code(obs, contract=not contract(s, s.to_case(),
                                                                     _observation(obs)))
    header = [f"# kvmtest fuzz finding {f.id} (seed {meta.get('seed')}, "
              f"{meta.get('kernel')} vs {meta.get('against')}): {f.spec}"]
    header += [f"#   {sig}" for sig in f.signatures]
    for role, obs in f.observations.items():
        header.append(f"#   {role}: " + ", ".join(f"{k}={show(k, v)}" for k, v in obs.items()
                                                   if k in ("outcome", "exit_code", "gif",
                                                            "vector", "event_inj")))
    source = (f"kvmtest fuzz {f.id}: {'; '.join(f.signatures)}"
              .replace('"', "'"))
    if s.kind == KIND_VMRUN:
        return "\n".join(header) + "\n" + _row(s, fix_scenario, source, profiles) + "\n"
    return "\n".join(header) + "\n" + _cases(s, fix_scenario, source, profiles) + "\n"


def _default(s: Scenario, group: str, key: str) -> int:
    without = s.without([c for c in s.changes() if c[0] == group and c[1] == key])
    return without.vmcb12_image()[key]


def _check_control(control: Scenario, path: str) -> None:
    model = ModelRunner("7.x")
    try:
        obs = model.run_one(control).observation
    finally:
        model.close()
    ok = obs is not None and ((obs.outcome == SYNC and obs.exit_code not in (SVM_EXIT_ERR, ERR32))
                              or (control.kind == KIND_NSTATE and obs.outcome == "accepted"))
    if not ok:
        raise FindingError(f"{path}: the negative control '{control.format()}' does not run L2 "
                           f"on the model ({obs.describe() if obs else 'no observation'})")


def _row(s: Scenario, fix: Scenario, source: str, profiles: dict[str, str]) -> str:
    defect = s.vmcb_changes()
    fix_changes = fix.vmcb_changes()
    illegal = arch_failures(s.vmcb12_image())
    lines = [f'Row("{_name(s)}", {_dict(sorted(defect.items()))},',
             f"    {_dict(sorted(fix_changes.items()))},",
             f'    "{source}",']
    if not illegal:
        lines.append("    expect=Expect(\"vmexit\", exit_code=...),  # FILL IN: the contract")
    if profiles:
        lines.append("    profiles={")
        lines += [f'        "{p}": {e},' for p, e in profiles.items()]
        lines.append("    },")
    if s.entry != "l2_vmmcall":
        lines.append(f'    l2_entry="{s.entry}",')
    if s.mode != DEFAULT_MODE:
        lines.append(f'    memory=MODES["{s.mode}"].memory(),  # kvmtest.fuzz.l2modes')
    lines[-1] = lines[-1].rstrip(",") + ")"
    return "\n".join(lines)


def _cases(s: Scenario, fix: Scenario, source: str, profiles: dict[str, str]) -> str:
    name = _name(s)
    if s.kind == KIND_SMM:
        expect = "SHUTDOWN" if arch_failures(_patched(s)) else "vmexit(SVM_EXIT_VMMCALL)"
        common = ('scenario=SMM, payload="smm", l2_entry="l2_smi", '
                  "needs=frozenset({NEED_SVM, NEED_SMM})")
        return "\n".join([
            f'Case(id="smm/{name}", family="smm", expect={expect},',
            f"     profiles={{{', '.join(f'{p!r}: {e}' for p, e in profiles.items())}}},",
            f'     source="{source}", smm_vmcb={_dict(s.smm)}, vmcb={_dict(s.vmcb)},',
            f"     gif_mode={s.gif!r}, {common}),",
            f'Case(id="negative/smm-{name}", family="negative", expect=vmexit(SVM_EXIT_VMMCALL),',
            f'     source="negative control of smm/{name}", smm_vmcb={_dict(fix.smm)},',
            f'     vmcb={_dict(fix.vmcb)}, gif_mode={s.gif!r}, control_of="smm/{name}", {common}),',
        ])
    assert s.kind == KIND_NSTATE
    expect = "EINVAL" if arch_failures(s.vmcb12_image()) else "ACCEPTED"
    needs = "needs=frozenset({NEED_SVM, NEED_NESTED_STATE})"
    return "\n".join([
        f'Case(id="nested_state/{name}", family="nested_state", scenario=SET_NESTED_STATE,',
        f"     expect={expect}, source=\"{source}\", vmcb={_dict(s.vmcb)}, {needs}),",
        f'Case(id="negative/nested_state-{name}", family="negative", scenario=SET_NESTED_STATE,',
        f'     expect=ACCEPTED, source="negative control of nested_state/{name}",',
        f'     vmcb={_dict(fix.vmcb)}, control_of="nested_state/{name}", {needs}),',
    ])


def _patched(s: Scenario):
    v = s.vmcb12_image()
    for k, value in s.smm:
        v[k] = value
    return v
