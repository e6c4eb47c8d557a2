"""The VMCB12 a case starts from: a valid VMCB whose L2 is a copy of L1.

L2 shares L1's long-mode state and page tables (no nested paging), runs at
an L2 entry point of the vmrun payload on its own stack, and has VMRUN and
VMMCALL intercepted, so a VMRUN on this VMCB succeeds and L2's VMMCALL exits
with SVM_EXIT_VMMCALL.  Cases change fields on top of it.
"""

from __future__ import annotations

from collections.abc import Mapping

from . import l1, layout
from .payloads import Payload
from .vmcb import (
    INTERCEPT_SHUTDOWN,
    INTERCEPT_VMMCALL,
    INTERCEPT_VMRUN,
    POISON,
    Vmcb,
)

# Written by the CPU/KVM on #VMEXIT: poisoned so a missing write shows.
EXIT_FIELDS = ("exit_code", "exit_info_1", "exit_info_2", "exit_int_info")

DR6_INIT = 0xFFFF0FF0
DR7_INIT = 0x400
PAT_INIT = 0x0007040600070406


def default_vmcb12(payload: Payload, l2_entry: str = "l2_vmmcall") -> Vmcb:
    # Built once per payload and L2 entry: every case starts from it.
    key = (payload.name, payload.image, payload.entry, payload.sym(l2_entry))
    image = _DEFAULTS.get(key)
    if image is None:
        image = _DEFAULTS[key] = _default_vmcb12(payload, l2_entry).to_bytes()
    return Vmcb(image)


_DEFAULTS: dict[tuple[str, bytes, int, int], bytes] = {}


def _default_vmcb12(payload: Payload, l2_entry: str) -> Vmcb:
    state = l1.initial_state(payload)
    v = Vmcb()
    v["intercept_misc1"] = INTERCEPT_SHUTDOWN
    v["intercept_misc2"] = INTERCEPT_VMRUN | INTERCEPT_VMMCALL
    v["iopm_base_pa"] = layout.IOPM_GPA
    v["msrpm_base_pa"] = layout.MSRPM_GPA
    v["asid"] = 1
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr"):
        seg: l1.Segment = getattr(state, name)
        v[f"{name}.selector"] = seg.selector
        v[f"{name}.attrib"] = seg.vmcb_attrib
        v[f"{name}.limit"] = seg.limit
        v[f"{name}.base"] = seg.base
    v["gdtr.base"], v["gdtr.limit"] = state.gdt
    v["idtr.base"], v["idtr.limit"] = state.idt
    v["efer"] = state.efer | layout.EFER_SVME
    v["cr0"] = state.cr0
    v["cr3"] = state.cr3
    v["cr4"] = state.cr4
    v["dr6"] = DR6_INIT
    v["dr7"] = DR7_INIT
    v["rflags"] = layout.L1_RFLAGS
    v["rip"] = payload.sym(l2_entry)
    v["rsp"] = layout.L2_STACK_TOP
    v["g_pat"] = PAT_INIT
    return v


def prepare(payload: Payload, l2_entry: str, changes: Mapping[str, int]) -> Vmcb:
    """Default VMCB12, the case's changes, then the exit fields poisoned."""
    v = default_vmcb12(payload, l2_entry)
    for name, value in changes.items():
        v[name] = value
    for name in EXIT_FIELDS:
        if name not in changes:
            v[name] = POISON
    return v
