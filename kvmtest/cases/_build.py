"""Helpers that turn compact rows into concrete cases.

A consistency-check row gives the defect (VMCB12 changes that make it
illegal) and the fix (the same fields made legal again).  Each row becomes a
failing case and its negative control in both GIF modes: the control is the
same VMCB12 with the defect replaced by the fix, so it differs only there.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace

from .. import params
from ..case import GIF0, GIF1, NEED_SVM, VMEXIT_INVALID, VMRUN, Case, Expect, vmexit
from ..vmcb import SVM_EXIT_VMMCALL

GIF_MODES = (GIF1, GIF0)
APM_CC = "APM vol. 2 15.5.1 (VMRUN consistency checks)"


@dataclass(frozen=True)
class Row:
    name: str  # e.g. "cr0-cd0-nw1"
    defect: Mapping[str, int]
    fix: Mapping[str, int]  # {} = the default VMCB12's values of those fields
    source: str
    expect: Expect = VMEXIT_INVALID
    profiles: Mapping[str, Expect] = field(default_factory=dict)
    l2_entry: str = "l2_vmmcall"
    memory: Mapping[int, bytes] = field(default_factory=dict)
    control_memory: Mapping[int, bytes] | None = None  # None: same as memory
    # Shared by the case and its control: configuration needs (NEED_NPT ...),
    # guest CPUID feature overrides, extra params flags (PF_L2_IDT ...).
    needs: frozenset[str] = frozenset()
    cpuid: Mapping[str, bool] = field(default_factory=dict)
    flags: int = 0
    # What the control must show (default: L2's VMMCALL).
    control_expect: Expect | None = None


# Before "KVM: nSVM: Clear GIF on nested #VMEXIT(INVALID)" (f85a6ce06e4a;
# Debian 6.1.176) KVM's early consistency-check failure skipped the #VMEXIT
# cleanup: GIF stayed as L1 left it.  Only visible when L1 ran VMRUN with GIF=1.
GIF_BUG = ("GIF left set after #VMEXIT(INVALID) (fixed by 'KVM: nSVM: Clear GIF on "
           "nested #VMEXIT(INVALID)')")


def with_legacy_gif(row: Row, gif: str) -> Mapping[str, Expect]:
    """The row's profiles, plus the legacy kernels' GIF bug where it shows:
    a failure KVM detects in software, run with GIF=1."""
    profiles = dict(row.profiles) or {p: row.expect for p in ("legacy", "fixed", "7.x")}
    legacy = profiles["legacy"]
    if gif != GIF1 or legacy.kind != "vmexit_invalid" or legacy.hw_checked:
        return row.profiles
    profiles["legacy"] = replace(legacy, gif_after=True, known_bug=GIF_BUG)
    return profiles


def vmrun_cases(family: str, rows: list[Row], software_checked: bool = True) -> Iterator[Case]:
    """software_checked: KVM detects these rows' defects itself before
    running L2 (the early path), so legacy kernels show the GIF bug."""
    for row in rows:
        needs = frozenset({NEED_SVM, *row.needs})
        for gif in GIF_MODES:
            bad_id = f"{family}/{row.name}[{gif}]"
            profiles = with_legacy_gif(row, gif) if software_checked else row.profiles
            common = dict(scenario=VMRUN, gif_mode=gif, l2_entry=row.l2_entry, needs=needs,
                          cpuid=row.cpuid, params=_params(row.flags, gif))
            yield Case(
                id=bad_id, family=family, expect=row.expect, profiles=profiles,
                source=row.source, vmcb=row.defect, memory=row.memory, **common,
            )
            yield Case(
                id=f"negative/{family}-{row.name}[{gif}]", family="negative",
                expect=row.control_expect or vmexit(SVM_EXIT_VMMCALL),
                source=f"negative control of {bad_id}", vmcb=row.fix,
                memory=row.memory if row.control_memory is None else row.control_memory,
                control_of=bad_id, **common,
            )


def _params(flags: int, gif: str) -> dict[str, int]:
    """Extra params flags on top of the VMRUN defaults ({} when none)."""
    if not flags:
        return {}
    base = params.PF_SET_SVME | params.PF_SET_HSAVE
    base |= params.PF_CLGI if gif == GIF0 else params.PF_STGI
    return {"flags": base | flags}


def accepted_cases(family: str, rows: list[Row]) -> Iterator[Case]:
    """Rows whose VMCB12 must be accepted (values a check must not reject,
    kvm-unit-tests style): one case per GIF mode, expecting L2's VMMCALL
    (or row.expect), with no failing twin."""
    for row in rows:
        for gif in GIF_MODES:
            yield Case(
                id=f"{family}/{row.name}[{gif}]", family=family, scenario=VMRUN,
                expect=row.expect, profiles=row.profiles, source=row.source, gif_mode=gif,
                vmcb=row.defect, l2_entry=row.l2_entry, memory=row.memory,
                needs=frozenset({NEED_SVM, *row.needs}), cpuid=row.cpuid,
                params=_params(row.flags, gif),
            )


def bits(prefix: str, field_name: str, base: int, positions: tuple[int, ...],
         source: str) -> list[Row]:
    """A reserved-bit sweep: one row per bit, each setting that bit on base."""
    return [
        Row(f"{prefix}-bit{b}", {field_name: base | (1 << b)}, {field_name: base}, source)
        for b in positions
    ]
