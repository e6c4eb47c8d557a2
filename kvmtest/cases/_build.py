"""Helpers that turn compact rows into concrete cases.

A consistency-check row gives the defect (VMCB12 changes that make it
illegal) and the fix (the same fields made legal again).  Each row becomes a
failing case and its negative control in both GIF modes: the control is the
same VMCB12 with the defect replaced by the fix, so it differs only there.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

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


def vmrun_cases(family: str, rows: list[Row]) -> Iterator[Case]:
    for row in rows:
        for gif in GIF_MODES:
            bad_id = f"{family}/{row.name}[{gif}]"
            yield Case(
                id=bad_id, family=family, scenario=VMRUN, expect=row.expect,
                profiles=row.profiles, source=row.source, gif_mode=gif,
                vmcb=row.defect, l2_entry=row.l2_entry, memory=row.memory,
                needs=frozenset({NEED_SVM}),
            )
            yield Case(
                id=f"negative/{family}-{row.name}[{gif}]", family="negative",
                scenario=VMRUN, expect=vmexit(SVM_EXIT_VMMCALL),
                source=f"negative control of {bad_id}", gif_mode=gif,
                vmcb=row.fix, l2_entry=row.l2_entry,
                memory=row.memory if row.control_memory is None else row.control_memory,
                needs=frozenset({NEED_SVM}), control_of=bad_id,
            )


def bits(prefix: str, field_name: str, base: int, positions: tuple[int, ...],
         source: str) -> list[Row]:
    """A reserved-bit sweep: one row per bit, each setting that bit on base."""
    return [
        Row(f"{prefix}-bit{b}", {field_name: base | (1 << b)}, {field_name: base}, source)
        for b in positions
    ]
