"""KVM_SET_NESTED_STATE with an invalid VMCB12 control area or L1 save area."""

from __future__ import annotations

from collections.abc import Iterator

from .. import layout
from ..case import ACCEPTED, EINVAL, NEED_NESTED_STATE, NEED_SVM, SET_NESTED_STATE, Case
from ..vmcb import INTERCEPT_VMMCALL

KVM = "KVM nested.c svm_set_nested_state"
ROWS = (
    ("asid0", {"asid": 0}, "control: ASID 0 (__nested_vmcb_check_controls)"),
    ("vmrun-intercept0", {"intercept_misc2": INTERCEPT_VMMCALL},
     "control: VMRUN intercept clear (__nested_vmcb_check_controls)"),
    ("l1-efer-svme0", {"efer": layout.L1_EFER},
     "save (L1 host state): EFER.SVME clear (__nested_vmcb_check_save)"),
    ("l1-cr0-pg0", {"cr0": layout.L1_CR0 & ~layout.CR0_PG},
     "save (L1 host state): CR0.PG clear"),
)


def cases() -> Iterator[Case]:
    needs = frozenset({NEED_SVM, NEED_NESTED_STATE})
    for name, change, why in ROWS:
        bad = f"nested_state/{name}"
        yield Case(id=bad, family="nested_state", scenario=SET_NESTED_STATE, expect=EINVAL,
                   source=f"{KVM}: {why}", vmcb=change, needs=needs)
    yield Case(id="nested_state/valid", family="negative", scenario=SET_NESTED_STATE,
               expect=ACCEPTED, source=f"negative control of nested_state/*: {KVM}",
               needs=needs, control_of="nested_state/asid0")
