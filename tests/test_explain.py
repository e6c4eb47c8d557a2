"""`kvmtest explain ID`: what it says about a case is the catalogue's data,
and with --backend what it compares is what was observed."""

from __future__ import annotations

from dataclasses import replace

import pytest
from clirun import kvmtest, one_line_error

from kvmtest import explain, judge, vmcb12
from kvmtest.case import NEED_NO_NPT, NEED_SVM
from kvmtest.cases import by_id, catalogue
from kvmtest.payloads import load_payload
from kvmtest.vmcb import FIELDS


def test_vmcb12_changes_are_exactly_the_case_fields_that_differ():
    """Independently of explain: a field is listed iff the case sets it to a
    value other than the default VMCB12's (the L2 entry moves RIP)."""
    checked = 0
    for case in catalogue():
        if NEED_SVM not in case.needs:
            continue
        default = vmcb12.default_vmcb12(load_payload(case.payload))
        want = {n for n, v in case.vmcb.items()
                if n not in vmcb12.EXIT_FIELDS and default[n] != v & ((1 << 8 * FIELDS[n].size)
                                                                    - 1)}
        if case.l2_entry != "l2_vmmcall":
            want.add("rip")
        assert {n for n, _, _ in explain.vmcb12_changes(case)} == want, case.id
        checked += 1
    assert checked > 100


def test_every_failing_vmrun_case_names_its_control_and_back():
    cases = by_id()
    for case in cases.values():
        if case.control_of:
            bad = cases[case.control_of]
            assert explain.controls_of(bad, cases) == [case]
            assert explain.controlled(case, cases) == [bad]


def test_explain_output_names_fields_profiles_and_source():
    case = by_id()["control/np-ncr3-above-maxphyaddr[gif1]"]
    p = kvmtest("explain", case.id)
    assert p.returncode == 0
    out = p.stdout
    for name, old, new in explain.vmcb12_changes(case):
        assert f"{name}  {old:#x} -> {new:#x}".replace("  ", " ") in " ".join(out.split()), name
    assert "nested_ctl" in out and "+bit 0 NP_ENABLE" in out
    assert "negative control: negative/control-np-ncr3-above-maxphyaddr[gif1]" in out
    flat = " ".join(out.split())
    for profile in judge.PROFILES:
        assert f"{profile} {judge.expectation(case, profile).describe()}" in flat, profile
    assert "FAILS: known bug" in out  # legacy accepted the illegal nCR3
    assert f"source {case.source}" in flat


def test_explain_configuration_needs():
    case = by_id()["control/asid0[gif1]"]
    assert "configuration: any" in explain.expectations(case)
    shadow = replace(case, needs=case.needs | {NEED_NO_NPT})
    assert "configuration: only with kvm_amd npt=0 (L1 on shadow paging)" in \
        explain.expectations(shadow)


def test_unknown_id_is_one_line_with_close_matches():
    p = kvmtest("explain", "control/asid0")
    assert p.returncode == 2
    line = one_line_error(p)
    assert "control/asid0[gif1]" in line and "control/asid0[gif0]" in line


def test_run_on_the_model_compares_field_by_field():
    p = kvmtest("explain", "smm/l1-cr4-kept", "--backend", "model", "--profile", "fixed")
    assert p.returncode == 1
    out = p.stdout
    assert "expected (the contract; fixed has a known bug here) against observed:" in out
    assert "l1.cr4            0x620       0x660  <-- differs" in out
    assert "l1.cr0            0x80010033  0x80010033\n" in out


@pytest.mark.kvm
def test_run_on_this_kernel_also_compares_with_the_model(real_kvm):
    p = kvmtest("explain", "insn/nosvm-vmrun", "--backend", "kvm")
    assert p.returncode == 0, p.stderr
    assert "verdict: PASS" in p.stdout
    assert "model (7.x) and this kernel observed the same in every field" in p.stdout


@pytest.mark.parametrize("profile", ["legacy", "7.x"])
def test_explain_marks_a_difference_exactly_where_the_judge_finds_one(profile):
    """Every case on the model: explain's rows disagree somewhere iff the
    judge finds the observation breaks the same expectation."""
    from kvmtest import report
    from kvmtest.backends.model import ModelBackend
    from kvmtest.session import run_cases

    backend = ModelBackend(profile)
    try:
        results = run_cases(backend, catalogue(backend.maxphyaddr), profile)
    finally:
        backend.close()
    differing = 0
    for r in results:
        if r.observation is None:
            continue
        _, want = report.reference(r.case, r.verdict.profiles, profile)
        rows = explain.field_rows(r.case, want, r.observation)
        bad = judge.check(r.case, r.observation, want)
        assert any(not ok for *_, ok in rows) == bool(bad), (r.case.id, rows, bad)
        differing += bool(bad)
    assert differing  # both profiles have known bugs: the comparison is not vacuous
