"""kvmtest/cases/_build.py: how a compact row becomes cases.

A consistency-check row gives a failing case and its negative control in
both GIF modes; the control is the same VMCB12 with the defect replaced by
the fix and must run L2 to its VMMCALL (README, "negative control"); legacy
kernels show the GIF bug only where KVM detects the defect itself with GIF=1
(cases/_build.py GIF_BUG).  These tests build cases from hand-made rows, so a
builder that drops a field, pairs the wrong control or mislabels a GIF mode
fails here (tests/test_catalogue_data.py checks the same invariants over the
real catalogue).
"""

from __future__ import annotations

from kvmtest import params
from kvmtest.case import (
    GIF0,
    GIF1,
    NEED_NPT,
    NEED_SVM,
    VMEXIT_INVALID,
    VMEXIT_INVALID_HW,
    VMRUN,
    Expect,
    vmexit,
)
from kvmtest.cases._build import (
    APM_CC,
    GIF_BUG,
    Row,
    accepted_cases,
    bits,
    vmrun_cases,
    with_legacy_gif,
)
from kvmtest.vmcb import SVM_EXIT_HLT, SVM_EXIT_VMMCALL

BASE = params.PF_SET_SVME | params.PF_SET_HSAVE
ROW = Row("asid0", {"asid": 0}, {}, "APM 15.5.1: ASID 0")
MEM = {0x30000: b"\x01\x02"}


def by_id(cases) -> dict:
    return {c.id: c for c in cases}


def test_a_row_gives_case_and_control_in_both_gif_modes():
    cases = list(vmrun_cases("control", [ROW]))
    assert [c.id for c in cases] == [
        "control/asid0[gif1]", "negative/control-asid0[gif1]",
        "control/asid0[gif0]", "negative/control-asid0[gif0]"]
    bad, ctl = cases[0], cases[1]
    assert (bad.family, bad.scenario, bad.gif_mode, bad.expect) == (
        "control", VMRUN, GIF1, VMEXIT_INVALID)
    assert (bad.vmcb, bad.source, bad.control_of) == ({"asid": 0}, ROW.source, None)
    assert (ctl.family, ctl.scenario, ctl.gif_mode, ctl.expect) == (
        "negative", VMRUN, GIF1, vmexit(SVM_EXIT_VMMCALL))
    assert ctl.vmcb == {} and ctl.control_of == "control/asid0[gif1]"
    assert ctl.source == "negative control of control/asid0[gif1]"
    assert [c.gif_mode for c in cases[2:]] == [GIF0, GIF0]
    assert cases[3].control_of == "control/asid0[gif0]"
    for c in cases:
        assert (c.needs, c.l2_entry, c.params, c.memory, c.cpuid) == (
            frozenset({NEED_SVM}), "l2_vmmcall", {}, {}, {})


def test_row_fields_reach_both_case_and_control():
    row = Row("ncr3", {"nested_ctl": 1, "nested_cr3": 1 << 52}, {"nested_ctl": 1},
              "APM 15.25.4", l2_entry="l2_hlt", memory=MEM, needs=frozenset({NEED_NPT}),
              cpuid={"pcid": True}, control_expect=vmexit(SVM_EXIT_HLT))
    for c in vmrun_cases("control", [row]):
        assert c.needs == frozenset({NEED_SVM, NEED_NPT})
        assert (c.l2_entry, c.memory, c.cpuid) == ("l2_hlt", MEM, {"pcid": True})
    ctl = by_id(vmrun_cases("control", [row]))["negative/control-ncr3[gif0]"]
    assert ctl.expect == vmexit(SVM_EXIT_HLT) and ctl.vmcb == {"nested_ctl": 1}


def test_control_memory_overrides_the_defect_s_memory():
    row = Row("pdptr", {"cr3": 0x30000}, {}, "late", memory=MEM,
              control_memory={0x30000: b"\x03"})
    cases = by_id(vmrun_cases("late", [row]))
    assert cases["late/pdptr[gif1]"].memory == MEM
    assert cases["negative/late-pdptr[gif1]"].memory == {0x30000: b"\x03"}


def test_params_flags_follow_the_gif_mode():
    """Extra flags come on top of what every VMRUN case does (SVME, HSAVE)
    plus STGI for gif1 and CLGI for gif0; rows without flags use the
    payload's defaults ({})."""
    row = Row("idt", {"asid": 0}, {}, "src", flags=params.PF_L2_IDT)
    cases = by_id(vmrun_cases("eventinj", [row]))
    gif1 = BASE | params.PF_STGI | params.PF_L2_IDT
    gif0 = BASE | params.PF_CLGI | params.PF_L2_IDT
    assert cases["eventinj/idt[gif1]"].params == {"flags": gif1}
    assert cases["negative/eventinj-idt[gif1]"].params == {"flags": gif1}
    assert cases["eventinj/idt[gif0]"].params == {"flags": gif0}
    assert cases["negative/eventinj-idt[gif0]"].params == {"flags": gif0}
    # The default flags a case without extras gets from guest_params: the
    # same GIF choice.
    plain = by_id(vmrun_cases("control", [ROW]))
    assert plain["control/asid0[gif1]"].guest_params()["flags"] & params.PF_CLGI == 0
    assert plain["control/asid0[gif0]"].guest_params()["flags"] & params.PF_CLGI


def test_legacy_gif_bug_only_where_kvm_checks_in_software_with_gif1():
    cases = by_id(vmrun_cases("control", [ROW]))
    gif1 = cases["control/asid0[gif1]"].profiles
    assert set(gif1) == {"legacy", "fixed", "7.x"}
    assert gif1["legacy"] == Expect("vmexit_invalid", gif_after=True, known_bug=GIF_BUG)
    assert gif1["fixed"] == gif1["7.x"] == VMEXIT_INVALID
    # CLGI first: GIF is 0 either way, nothing tells legacy apart.
    assert cases["control/asid0[gif0]"].profiles == {}
    # Controls never carry the bug.
    assert cases["negative/control-asid0[gif1]"].profiles == {}
    # A late failure (software_checked=False) takes KVM's full #VMEXIT path.
    late = by_id(vmrun_cases("late", [ROW], software_checked=False))
    assert late["late/asid0[gif1]"].profiles == {}


def test_legacy_gif_bug_keeps_a_row_s_own_profiles():
    fixed = Expect("vmexit_invalid", event_inj_cleared=False)
    row = Row("ev", {"asid": 0}, {}, "src",
              profiles={"legacy": fixed, "fixed": fixed, "7.x": VMEXIT_INVALID})
    got = with_legacy_gif(row, GIF1)
    assert got["legacy"] == Expect("vmexit_invalid", event_inj_cleared=False, gif_after=True,
                                   known_bug=GIF_BUG)
    assert (got["fixed"], got["7.x"]) == (fixed, VMEXIT_INVALID)
    assert row.profiles["legacy"] == fixed  # the row itself is left alone
    assert with_legacy_gif(row, GIF0) == row.profiles


def test_no_gif_bug_where_the_cpu_or_another_outcome_decides():
    """A defect the legacy kernels leave to the CPU (hw_checked) is reflected
    through the full #VMEXIT (GIF cleared); a legacy outcome that is no
    failed VMRUN has no GIF to leave set."""
    hw = Row("csld", {"cs.attrib": 0x69B}, {}, "src",
             profiles={"legacy": VMEXIT_INVALID_HW, "fixed": VMEXIT_INVALID})
    assert with_legacy_gif(hw, GIF1) == hw.profiles
    ran = Row("ncr3", {"nested_cr3": 1 << 52}, {}, "src",
              profiles={"legacy": vmexit(SVM_EXIT_VMMCALL), "fixed": VMEXIT_INVALID})
    assert with_legacy_gif(ran, GIF1) == ran.profiles
    assert by_id(vmrun_cases("control", [ran]))["control/ncr3[gif1]"].profiles == ran.profiles


def test_accepted_rows_have_no_failing_twin():
    row = Row("cr3-bit", {"cr3": 0x4008}, {}, "kvm-unit-tests", expect=vmexit(SVM_EXIT_VMMCALL),
              memory=MEM, needs=frozenset({NEED_NPT}), cpuid={"pcid": True},
              flags=params.PF_L2_IDT, l2_entry="l2_hlt")
    cases = list(accepted_cases("kut", [row]))
    assert [c.id for c in cases] == ["kut/cr3-bit[gif1]", "kut/cr3-bit[gif0]"]
    for c, gif, flag in zip(cases, (GIF1, GIF0), (params.PF_STGI, params.PF_CLGI), strict=True):
        assert (c.family, c.scenario, c.gif_mode, c.expect, c.source) == (
            "kut", VMRUN, gif, vmexit(SVM_EXIT_VMMCALL), "kvm-unit-tests")
        assert (c.vmcb, c.memory, c.l2_entry, c.cpuid) == (
            {"cr3": 0x4008}, MEM, "l2_hlt", {"pcid": True})
        assert c.needs == frozenset({NEED_SVM, NEED_NPT}) and c.control_of is None
        assert c.params == {"flags": BASE | flag | params.PF_L2_IDT}
        assert c.profiles == {}
    ran = vmexit(SVM_EXIT_VMMCALL)
    hw = Row("tlb", {"tlb_ctl": 3}, {}, "src", expect=ran, profiles={"legacy": VMEXIT_INVALID_HW,
                                                                        "7.x": ran})
    for c in accepted_cases("control", [hw]):
        assert c.profiles == {"legacy": VMEXIT_INVALID_HW, "7.x": ran}


def test_reserved_bit_sweep():
    rows = bits("cr4-rsvd", "cr4", 0x620, (15, 63), APM_CC)
    assert [(r.name, r.defect, r.fix, r.source) for r in rows] == [
        ("cr4-rsvd-bit15", {"cr4": 0x620 | 1 << 15}, {"cr4": 0x620}, APM_CC),
        ("cr4-rsvd-bit63", {"cr4": 0x620 | 1 << 63}, {"cr4": 0x620}, APM_CC)]
    assert all(r.expect == VMEXIT_INVALID for r in rows)
