"""Invariants of the case catalogue (pure data: no backend involved)."""

import pytest

from kvmtest import layout, smm
from kvmtest.case import GIF0, GIF1, SMM, VMRUN
from kvmtest.cases import catalogue
from kvmtest.judge import PROFILES
from kvmtest.payloads import load_payload
from kvmtest.vmcb import FIELDS

CASES = catalogue()
BY_ID = {c.id: c for c in CASES}


def test_enough_cases_and_unique_ids():
    assert len(CASES) >= 60
    assert len(BY_ID) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_case_is_well_formed(case):
    assert case.source, "every case cites its source"
    assert set(case.vmcb) <= set(FIELDS)
    assert set(case.profiles) <= set(PROFILES)
    payload = load_payload(case.payload)
    if case.expect.kind == "exception":
        payload.sym(case.expect.at)
    if case.scenario == VMRUN:
        payload.sym(case.l2_entry)
        assert case.gif_mode in (GIF0, GIF1)
    if case.scenario == SMM:
        payload.sym(case.l2_entry)
        assert not case.vmcb, "VMCB12 is valid at VMRUN"
        for name in case.smm_vmcb:
            smm.write_target(name)  # every handler write names a real target


def failing(c):
    return c.scenario == VMRUN and c.family != "negative" and (
        c.expect.kind == "vmexit_invalid" or any(
            e.kind == "vmexit_invalid" for e in c.profiles.values()))


@pytest.mark.parametrize("case", [c for c in CASES if failing(c)], ids=lambda c: c.id)
def test_failing_case_has_negative_control_differing_only_by_the_defect(case):
    controls = [c for c in CASES if c.control_of == case.id]
    assert len(controls) == 1, f"{case.id} has {len(controls)} negative controls"
    ctl = controls[0]
    assert ctl.expect.kind == "vmexit" and ctl.gif_mode == case.gif_mode
    assert set(ctl.vmcb) <= set(case.vmcb), "the control only undoes the defect"
    assert ctl.vmcb != case.vmcb
    assert (ctl.payload, ctl.l2_entry, ctl.params) == (case.payload, case.l2_entry, case.params)


@pytest.mark.parametrize("case", [c for c in CASES if c.scenario == SMM and c.family != "negative"],
                         ids=lambda c: c.id)
def test_smm_case_has_negative_control_differing_only_by_the_defect(case):
    """The control's handler writes the same VMCB12 fields, legally."""
    controls = [c for c in CASES if c.control_of == case.id]
    assert len(controls) == 1, f"{case.id} has {len(controls)} negative controls"
    ctl = controls[0]
    assert ctl.expect.kind == "vmexit" and ctl.scenario == SMM
    assert (ctl.payload, ctl.l2_entry, ctl.vmcb) == (case.payload, case.l2_entry, case.vmcb)
    if case.smm_vmcb:  # the handler's defect, written legally in the control
        assert set(ctl.smm_vmcb) == set(case.smm_vmcb) and ctl.smm_vmcb != case.smm_vmcb
        assert ctl.params == case.params
    else:  # L1's own setup is the difference (the smm/l1-* leak family)
        assert ctl.smm_vmcb == case.smm_vmcb and ctl.params != case.params
    assert (ctl.needs, ctl.memory) == (case.needs, case.memory)


def test_both_gif_modes_for_every_vmrun_row():
    """gif1 <-> gif0 in both directions, with the same VMCB12 and expectations."""
    by = {c.id: c for c in CASES if c.scenario == VMRUN}
    for i, c in by.items():
        for mine, other in ((GIF1, GIF0), (GIF0, GIF1)):
            if i.endswith(f"[{mine}]"):
                twin = by.get(i[: -len(mine) - 2] + f"[{other}]")
                assert twin is not None, f"{i} has no [{other}] twin"
                assert c.gif_mode == mine and twin.gif_mode == other
                assert (twin.vmcb, twin.memory, twin.l2_entry) == (c.vmcb, c.memory, c.l2_entry)
    assert all(c.gif_mode in (GIF1, GIF0) for c in by.values() if not c.id.startswith("insn/"))


def test_catalogue_tracks_maxphyaddr_but_not_ids():
    a, b = catalogue(40), catalogue(48)
    assert [c.id for c in a] == [c.id for c in b]
    ma = {c.id: c for c in a}["control/msrpm-above-maxphyaddr[gif1]"].vmcb["msrpm_base_pa"]
    mb = {c.id: c for c in b}["control/msrpm-above-maxphyaddr[gif1]"].vmcb["msrpm_base_pa"]
    assert (ma, mb) == (1 << 40, 1 << 48)


def test_unbacked_gpa_is_outside_the_memslot_but_mapped():
    assert layout.MEM_SIZE <= layout.UNBACKED_GPA < 1 << 30
