"""A scenario: a Case as data, printed and parsed as one line.

    [smm|nstate] gif1|gif0 [mode=M] [l2=ENTRY] [l1:K=V,...] [vmcb:F=V,...] [smm:F=V,...]

e.g. ``gif0 vmcb:cr0=0x80000031,asid=0 l2=l2_vmmcall``.  Tokens may come in
any order; ``format`` writes them in the order above with keys sorted, so a
scenario has exactly one spelling.

- kind: ``vmrun`` (default, not written): L1 runs VMRUN on the VMCB12;
  ``smm``: VMRUN a VMCB12, an SMI in L2, the SMM handler writes ``smm:``
  fields into VMCB12, RSM (kvmtest.smm); ``nstate``: KVM_SET_NESTED_STATE
  in guest mode with this VMCB12's control area (kvmtest.runner).
- gif1: STGI before VMRUN; gif0: CLGI first.
- mode: L2's execution mode (l2modes.py); l2: the L2 entry point.
- l1: L1's own state (L1_KNOBS); vmcb: VMCB12 fields (kvmtest.vmcb names)
  changed from the default VMCB12 of the mode.

``changes`` lists a scenario's components: what the shrinker removes one at
a time, and what "distance from the default" counts.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from .. import layout, params
from ..case import (
    GIF0,
    GIF1,
    NEED_NESTED_STATE,
    NEED_SMM,
    NEED_SVM,
    NO_FAULT,
    SET_NESTED_STATE,
    SMM,
    VMRUN,
    Case,
    Expect,
)
from ..payloads import load_payload
from ..smm import PATCH_SLOTS
from ..vmcb import FIELDS, Vmcb
from ..vmcb12 import EXIT_FIELDS, default_vmcb12
from .l2modes import DEFAULT_MODE, MODES

KIND_VMRUN, KIND_SMM, KIND_NSTATE = "vmrun", "smm", "nstate"
KINDS = (KIND_VMRUN, KIND_SMM, KIND_NSTATE)
GIFS = (GIF1, GIF0)
SMM_ENTRY = "l2_smi"
# Fields a scenario may not set: the exit fields are the outputs, poisoned
# before every run so that a missing write shows.
OUTPUT_FIELDS = frozenset(EXIT_FIELDS)

# L1's own state, as the payloads take it (kvmtest.params): knob -> default.
#   svme      L1 sets EFER.SVME before VMRUN
#   hsave     L1 writes MSR_VM_HSAVE_PA (with hsave_pa)
#   hsave_pa  the value it writes
#   rax       VMRUN's operand (the VMCB12 GPA)
#   cr0_xor, cr4_xor, efer_xor
#             smm payload: bits L1 flips in its own CR0/CR4/EFER before VMRUN.
#             By default L1 sets CR4.MCE, as KVM holds it in the hardware
#             CR4 (svm.c svm_set_cr4): L1's own state is then what the
#             hardware VMCB01 says, and an SMI in L2 has nothing to leak.
L1_KNOBS: dict[str, int] = {"svme": 1, "hsave": 1, "hsave_pa": layout.HSAVE_GPA,
                            "rax": layout.VMCB12_GPA, "cr0_xor": 0, "cr4_xor": 1 << 6,
                            "efer_xor": 0}
L1_BOOLEAN = frozenset({"svme", "hsave"})
L1_SMM_ONLY = frozenset({"cr0_xor", "cr4_xor", "efer_xor"})
FIELD_WIDTH = {name: 8 * f.size for name, f in FIELDS.items()}


class SpecError(ValueError):
    """A scenario spec that cannot be parsed or names something unknown."""


Pairs = tuple[tuple[str, int], ...]


def _pairs(m: Mapping[str, int] | Iterable[tuple[str, int]]) -> Pairs:
    items = m.items() if isinstance(m, Mapping) else m
    return tuple(sorted((str(k), int(v)) for k, v in items))


@dataclass(frozen=True)
class Scenario:
    kind: str = KIND_VMRUN
    gif: str = GIF1
    mode: str = DEFAULT_MODE
    l2: str | None = None  # None: the mode's first entry
    l1: Pairs = ()
    vmcb: Pairs = ()
    smm: Pairs = ()

    def __post_init__(self) -> None:
        for name in ("l1", "vmcb", "smm"):
            object.__setattr__(self, name, _pairs(getattr(self, name)))
        _validate(self)

    # ---- derived ------------------------------------------------------------

    @property
    def entry(self) -> str:
        if self.kind == KIND_SMM:
            return SMM_ENTRY
        return self.l2 or MODES[self.mode].entries[0]

    @property
    def payload_name(self) -> str:
        return "smm" if self.kind == KIND_SMM else "vmrun"

    @property
    def scenario_class(self) -> str:
        """A coarse class for progress and coverage: kind, plus what varies."""
        if self.kind != KIND_VMRUN:
            return self.kind
        if self.l1:
            return "vmrun/l1"
        if self.mode != DEFAULT_MODE:
            return "vmrun/mode"
        return "vmrun/multi" if len(self.vmcb) > 1 else "vmrun/single"

    def vmcb_changes(self) -> dict[str, int]:
        """Every VMCB12 change from the default VMCB12: the mode's, then the
        scenario's own."""
        payload = load_payload(self.payload_name)
        mode = MODES[self.mode] if self.kind != KIND_SMM else MODES[DEFAULT_MODE]
        return {**mode.changes(payload, self.entry), **dict(self.vmcb)}

    def l1_state(self) -> dict[str, int]:
        return {**L1_KNOBS, **dict(self.l1)}

    def changes(self) -> list[tuple[str, str, object]]:
        """The scenario's components, each undoable on its own: (group, key,
        value).  gif0 counts as a change from GIF=1 (as after reset)."""
        out: list[tuple[str, str, object]] = []
        if self.gif != GIF1 and self.kind != KIND_NSTATE:
            out.append(("gif", "gif", self.gif))
        if self.mode != DEFAULT_MODE:
            out.append(("mode", "mode", self.mode))
        if self.l2 is not None:
            out.append(("l2", "l2", self.l2))
        out += [("l1", k, v) for k, v in self.l1]
        out += [("vmcb", k, v) for k, v in self.vmcb]
        out += [("smm", k, v) for k, v in self.smm]
        return out

    def without(self, drop: Iterable[tuple[str, str, object]]) -> Scenario:
        """This scenario with some of its components undone."""
        gone = set(drop)
        keep = [c for c in self.changes() if c not in gone]
        return from_changes(self.kind, keep)

    # ---- text ---------------------------------------------------------------

    def format(self) -> str:
        words = [] if self.kind == KIND_VMRUN else [self.kind]
        if self.kind != KIND_NSTATE:
            words.append(self.gif)
        if self.mode != DEFAULT_MODE:
            words.append(f"mode={self.mode}")
        if self.l2 is not None:
            words.append(f"l2={self.l2}")
        if self.l1:
            words.append("l1:" + ",".join(f"{k}={_show(k, v, l1=True)}" for k, v in self.l1))
        if self.vmcb:
            words.append("vmcb:" + ",".join(f"{k}={v:#x}" for k, v in self.vmcb))
        if self.smm:
            words.append("smm:" + ",".join(f"{k}={v:#x}" for k, v in self.smm))
        return " ".join(words)

    __str__ = format

    # ---- as a Case ----------------------------------------------------------

    def to_case(self, expect: Expect = NO_FAULT) -> Case:
        """The Case every backend runs unchanged.  expect is for reports
        only: the fuzz oracles judge scenarios (oracles.py)."""
        l1 = self.l1_state()
        flags = 0
        if l1["svme"]:
            flags |= params.PF_SET_SVME
        if l1["hsave"]:
            flags |= params.PF_SET_HSAVE
        if self.kind != KIND_NSTATE:
            flags |= params.PF_CLGI if self.gif == GIF0 else params.PF_STGI
        case_params = {"flags": flags, "vmrun_rax": l1["rax"], "hsave_pa": l1["hsave_pa"]}
        if self.kind == KIND_SMM:
            case_params |= {"l1_cr0_xor": l1["cr0_xor"], "l1_cr4_xor": l1["cr4_xor"],
                            "l1_efer_xor": l1["efer_xor"]}
        mode = MODES[self.mode]
        common = dict(id=f"fuzz/{self.format()}", family="fuzz", expect=expect,
                      source="kvmtest fuzz scenario", params=case_params,
                      vmcb=self.vmcb_changes(), l2_entry=self.entry)
        if self.kind == KIND_SMM:
            return Case(scenario=SMM, payload="smm", gif_mode=self.gif, smm_vmcb=dict(self.smm),
                        needs=frozenset({NEED_SVM, NEED_SMM}), **common)
        if self.kind == KIND_NSTATE:
            return Case(scenario=SET_NESTED_STATE, memory=mode.memory(),
                        needs=frozenset({NEED_SVM, NEED_NESTED_STATE}), **common)
        return Case(scenario=VMRUN, gif_mode=self.gif, memory=mode.memory(),
                    needs=frozenset({NEED_SVM}), **common)

    def vmcb12_image(self) -> Vmcb:
        """The VMCB12 L1 runs VMRUN on (before any SMM patch)."""
        v = default_image(self.payload_name, self.entry)
        for name, value in self.vmcb_changes().items():
            v[name] = value
        return v


@functools.cache
def _default_bytes(payload: str, entry: str) -> bytes:
    return default_vmcb12(load_payload(payload), entry).to_bytes()


def default_image(payload: str, entry: str) -> Vmcb:
    """A fresh copy of the default VMCB12 for this payload and L2 entry."""
    return Vmcb(_default_bytes(payload, entry))


def _show(key: str, value: int, l1: bool = False) -> str:
    return str(value) if l1 and key in L1_BOOLEAN else f"{value:#x}"


def from_changes(kind: str, changes: Iterable[tuple[str, str, object]]) -> Scenario:
    """The inverse of Scenario.changes()."""
    kw: dict[str, object] = {"kind": kind}
    groups: dict[str, list[tuple[str, int]]] = {"l1": [], "vmcb": [], "smm": []}
    for group, key, value in changes:
        if group in groups:
            groups[group].append((key, int(value)))  # type: ignore[call-overload]
        else:
            kw[group] = value
    return Scenario(**kw, **groups)  # type: ignore[arg-type]


def _validate(s: Scenario) -> None:
    if s.kind not in KINDS:
        raise SpecError(f"unknown scenario kind {s.kind!r} (known: {', '.join(KINDS)})")
    if s.gif not in GIFS:
        raise SpecError(f"unknown GIF mode {s.gif!r} (gif1 or gif0)")
    if s.mode not in MODES:
        raise SpecError(f"unknown L2 mode {s.mode!r} (known: {', '.join(MODES)})")
    if s.kind == KIND_SMM and (s.mode != DEFAULT_MODE or s.l2 is not None):
        raise SpecError("smm scenarios run L2 at l2_smi in long mode: no mode= or l2=")
    if s.l2 is not None and s.l2 not in MODES[s.mode].entries:
        raise SpecError(f"L2 entry {s.l2!r} does not run in mode {s.mode} "
                        f"(known: {', '.join(MODES[s.mode].entries)})")
    for key, value in s.l1:
        if key not in L1_KNOBS:
            raise SpecError(f"unknown l1 setting {key!r} (known: {', '.join(L1_KNOBS)})")
        if key in L1_BOOLEAN and value not in (0, 1):
            raise SpecError(f"l1:{key} is 0 or 1, not {value}")
        if key in L1_SMM_ONLY and s.kind != KIND_SMM:
            raise SpecError(f"l1:{key} needs an smm scenario (the smm payload flips L1's bits)")
        if not 0 <= value < 1 << 64:
            raise SpecError(f"l1:{key}={value:#x} does not fit 64 bits")
    for group, pairs in (("vmcb", s.vmcb), ("smm", s.smm)):
        for key, value in pairs:
            if key not in FIELDS:
                raise SpecError(f"unknown VMCB field {key!r} in {group}:")
            if key in OUTPUT_FIELDS:
                raise SpecError(f"{group}:{key} is an exit field (an output, poisoned "
                                "before each run)")
            if not 0 <= value < 1 << FIELD_WIDTH[key]:
                raise SpecError(f"{group}:{key}={value:#x} does not fit its "
                                f"{FIELD_WIDTH[key]} bits")
    if s.smm and s.kind != KIND_SMM:
        raise SpecError("smm: fields need an smm scenario")
    if len(s.smm) >= PATCH_SLOTS:
        raise SpecError(f"at most {PATCH_SLOTS - 1} smm: fields")


_ASSIGN = re.compile(r"([a-z_0-9.]+)=([^,=\s]+)\Z")


def _parse_assignments(group: str, body: str) -> list[tuple[str, int]]:
    out = []
    seen = set()
    for item in body.split(","):
        m = _ASSIGN.match(item)
        if not m:
            raise SpecError(f"{group}: wants NAME=VALUE[,NAME=VALUE...], not {item!r}")
        key, text = m.groups()
        try:
            value = int(text, 0)
        except ValueError:
            raise SpecError(f"{group}:{key}: {text!r} is not a number") from None
        if key in seen:
            raise SpecError(f"{group}:{key} given twice")
        seen.add(key)
        out.append((key, value))
    return out


def parse(text: str) -> Scenario:
    """The Scenario a one-line spec describes (SpecError if it describes none)."""
    kw: dict[str, object] = {}
    groups: dict[str, list[tuple[str, int]]] = {}
    words = text.split()
    if not words:
        raise SpecError("empty scenario spec")
    for word in words:
        if word in KINDS and "kind" not in kw:
            kw["kind"] = word
        elif word in GIFS and "gif" not in kw:
            kw["gif"] = word
        elif word.startswith(("mode=", "l2=")):
            key, _, value = word.partition("=")
            if key in kw:
                raise SpecError(f"{key}= given twice")
            kw[key] = value
        elif word.startswith(("l1:", "vmcb:", "smm:")):
            group, _, body = word.partition(":")
            if group in groups:
                raise SpecError(f"{group}: given twice")
            groups[group] = _parse_assignments(group, body)
        else:
            raise SpecError(f"cannot read {word!r} in scenario spec {text!r}")
    if kw.get("kind") == KIND_NSTATE and "gif" in kw:
        raise SpecError("nstate scenarios have no GIF mode")
    return Scenario(**kw, **groups)  # type: ignore[arg-type]


def normalized(s: Scenario) -> Scenario:
    """s without changes that change nothing: VMCB12 fields already at the
    value the default VMCB12 (of the mode) has, L1 knobs at their default,
    l2 at the mode's default entry."""
    base = default_image(s.payload_name, s.entry)
    mode = MODES[s.mode] if s.kind != KIND_SMM else MODES[DEFAULT_MODE]
    mode_changes = mode.changes(load_payload(s.payload_name), s.entry)
    vmcb = [(k, v) for k, v in s.vmcb if v != mode_changes.get(k, base[k])]
    l1 = [(k, v) for k, v in s.l1 if v != L1_KNOBS[k]]
    l2 = None if s.l2 == MODES[s.mode].entries[0] else s.l2
    return replace(s, vmcb=tuple(vmcb), l1=tuple(l1), l2=l2)
