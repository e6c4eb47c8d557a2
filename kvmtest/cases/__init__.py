"""The case catalogue: every family, built for one MAXPHYADDR.

Case ids do not depend on MAXPHYADDR; values such as "the first GPA above
MAXPHYADDR" do, so a backend builds the catalogue for its own vCPU.
"""

from __future__ import annotations

import functools

from ..case import Case
from . import control, eventinj, gif, insn, kut, late, nested_state, permission, save, smm, unmap
from ._build import accepted_cases, vmrun_cases

# Used for listing and collection; backends pass their real value.
DEFAULT_MAXPHYADDR = 40


@functools.cache
def catalogue(maxphyaddr: int = DEFAULT_MAXPHYADDR) -> tuple[Case, ...]:
    cases: list[Case] = [*insn.no_svm_cases(), *insn.svm_cases(maxphyaddr)]
    cases += vmrun_cases("save", save.rows(maxphyaddr))
    cases += vmrun_cases("control", control.rows(maxphyaddr))
    cases += vmrun_cases("control", control.observation_rows(maxphyaddr))
    # Late failures take KVM's full #VMEXIT path on every kernel: GIF cleared.
    cases += vmrun_cases("late", late.rows(maxphyaddr), software_checked=False)
    cases += vmrun_cases(eventinj.FAMILY, eventinj.rows(maxphyaddr))
    cases += accepted_cases(eventinj.FAMILY, eventinj.accepted(maxphyaddr))
    cases += vmrun_cases(kut.FAMILY, kut.rows(maxphyaddr))
    cases += accepted_cases(kut.FAMILY, kut.accepted(maxphyaddr))
    cases += nested_state.cases(maxphyaddr)
    cases += nested_state.roundtrip_cases()
    cases += smm.all_cases()
    cases += gif.cases()
    cases += gif.singlestep_cases()
    cases += unmap.cases()
    cases += permission.cases()
    cases += permission.smm_cases()
    seen: set[str] = set()
    for c in cases:
        if c.id in seen:
            raise ValueError(f"duplicate case id {c.id}")
        seen.add(c.id)
    return tuple(cases)


def by_id(maxphyaddr: int = DEFAULT_MAXPHYADDR) -> dict[str, Case]:
    return {c.id: c for c in catalogue(maxphyaddr)}
