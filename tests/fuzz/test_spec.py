"""Scenario specs: one line each, parsed back exactly, errors in one line."""

from __future__ import annotations

import pytest

from kvmtest import layout, params
from kvmtest.case import NEED_NESTED_STATE, NEED_SMM, SET_NESTED_STATE, SMM, VMRUN
from kvmtest.fuzz.generator import Generator
from kvmtest.fuzz.spec import Scenario, SpecError, normalized, parse
from kvmtest.vmcb12 import POISON


def test_example_from_the_brief_parses_and_prints_canonically():
    s = parse("gif0 vmcb:cr0=0x80000031,asid=0 l2=l2_vmmcall")
    assert s.gif == "gif0" and dict(s.vmcb) == {"cr0": 0x80000031, "asid": 0}
    assert s.format() == "gif0 l2=l2_vmmcall vmcb:asid=0x0,cr0=0x80000031"
    assert parse(s.format()) == s


@pytest.mark.parametrize("seed", [0, 1, 7, 1234])
def test_every_generated_scenario_round_trips(seed):
    gen = Generator(seed, 40)
    for s in gen.round(256):
        text = s.format()
        assert "\n" not in text
        assert parse(text) == s, text
        assert parse(text).format() == text


def test_to_case_carries_every_part_of_the_scenario():
    s = parse("gif0 mode=pae l2=l2_hlt l1:hsave_pa=0x8010 vmcb:asid=0x0")
    c = s.to_case()
    assert c.scenario == VMRUN and c.gif_mode == "gif0" and c.l2_entry == "l2_hlt"
    assert c.vmcb["asid"] == 0
    assert c.vmcb["cr4"] == layout.CR4_PAE  # the mode's change
    assert c.memory  # PAE tables
    p = c.guest_params()
    assert p["hsave_pa"] == 0x8010 and p["flags"] & params.PF_CLGI
    assert p["flags"] & params.PF_SET_SVME and p["flags"] & params.PF_SET_HSAVE


def test_smm_and_nstate_become_their_scenarios():
    c = parse("smm gif1 l1:cr4_xor=0x0 smm:asid=0x0").to_case()
    assert c.scenario == SMM and NEED_SMM in c.needs and c.smm_vmcb == {"asid": 0}
    assert c.guest_params()["l1_cr4_xor"] == 0
    c = parse("nstate vmcb:asid=0x0").to_case()
    assert c.scenario == SET_NESTED_STATE and NEED_NESTED_STATE in c.needs


def test_normalized_drops_changes_that_change_nothing():
    s = Scenario(vmcb=(("asid", 1), ("cr4", layout.L1_CR4), ("tlb_ctl", 3)),
                 l1=(("svme", 1),), l2="l2_vmmcall")
    assert normalized(s).format() == "gif1 vmcb:tlb_ctl=0x3"


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("gif2", "cannot read 'gif2'"),
    ("gif1 vmcb:asid", "NAME=VALUE"),
    ("gif1 vmcb:nosuch=1", "unknown VMCB field 'nosuch'"),
    ("gif1 vmcb:asid=zz", "not a number"),
    ("gif1 vmcb:tlb_ctl=0x100", "does not fit its 8 bits"),
    ("gif1 vmcb:exit_code=0", "exit field"),
    ("gif1 vmcb:asid=0,asid=1", "given twice"),
    ("gif1 mode=warp", "unknown L2 mode"),
    ("gif1 l2=l2_vmmcall32", "does not run in mode long"),
    ("gif1 l1:svme=2", "0 or 1"),
    ("gif1 l1:foo=1", "unknown l1 setting"),
    ("gif1 smm:asid=0", "smm: fields need an smm scenario"),
    ("smm gif1 mode=pae", "no mode= or l2="),
    ("nstate gif1", "no GIF mode"),
])
def test_bad_specs_say_what_is_wrong(text, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(")):
        parse(text)


def test_exit_fields_stay_poisoned_in_the_case():
    from kvmtest.payloads import load_payload
    from kvmtest.vmcb12 import prepare

    c = parse("gif1 vmcb:asid=0x0").to_case()
    v = prepare(load_payload(c.payload), c.l2_entry, c.vmcb)
    assert v["exit_code"] == POISON and v["exit_info_1"] == POISON
