"""One test per contract clause, in both GIF modes: start from an observation
that keeps the contract and break exactly one field; the judge must fail it
and its reason must name the clause.  Plus the harness outcomes (ERROR, not a
verdict on the kernel) and the fingerprint rules.

Pure functions on hand-made observations: no backend is involved (or mocked).
"""

from __future__ import annotations

import dataclasses

import pytest

from kvmtest import judge as j
from kvmtest import observation as o
from kvmtest import params
from kvmtest.case import VMEXIT_INVALID, VMEXIT_INVALID_HW, Expect
from kvmtest.cases import by_id
from kvmtest.vmcb import POISON, SVM_EXIT_ERR, SVM_EXIT_VMMCALL

CASES = by_id()
GIFS = ("gif1", "gif0")
# A late failure: no profiles, the contract alone decides.
LATE = "late/msrpm-unbacked[{}]"
L1 = {"stage": params.STAGE_AFTER_VMRUN, "rsp": 0x1FFF8, "cr0": 0x80050033,
      "cr3": 0x4000, "cr4": 0x620, "efer": 0x1D00, "rflags": 0x2, "rax": 0x9000}
# The registers the contract says L1 gets back (README, contract clause 3):
# written out here, not taken from the judge, so dropping one there fails.
CONTRACT_REGS = ("rsp", "cr0", "cr3", "cr4", "efer")
L1 |= {f"pre_{k}": L1[k] for k in CONTRACT_REGS}


def good(**kw) -> o.Observation:
    base = o.Observation(outcome=o.SYNC, exit_code=SVM_EXIT_ERR, exit_info_1=0,
                         exit_info_2=0, exit_int_info=0, event_inj=0, gif=False,
                         guest_mode=False, l1=dict(L1), kernel_warnings=[],
                         kernel_log_checked=True)
    return dataclasses.replace(base, **kw)


def verdict(gif: str, obs: o.Observation) -> j.Verdict:
    return j.judge(CASES[LATE.format(gif)], obs)


@pytest.mark.parametrize("gif", GIFS)
def test_the_starting_observation_passes(gif):
    assert verdict(gif, good()).verdict == j.PASS


BROKEN = [
    # (field changes, words the reason must contain)
    ({"exit_code": POISON}, "EXITCODE"),
    ({"exit_code": 0xFFFF_FFFF}, "EXITCODE"),
    ({"exit_code": SVM_EXIT_VMMCALL}, "EXITCODE"),
    ({"exit_info_1": 1}, "EXITINFO1"),
    ({"exit_info_1": POISON}, "EXITINFO1"),
    ({"exit_info_2": 1 << 63}, "EXITINFO2"),
    ({"gif": True}, "GIF=1"),
    ({"gif": None}, "GIF unknown"),
    ({"guest_mode": True}, "guest mode"),
    ({"outcome": o.EXCEPTION, "vector": 13, "error_code": 0, "rip": 0x1000},
     "did not resume"),
    ({"kernel_warnings": ["WARNING: CPU: 0 PID: 1 at arch/x86/kvm/svm/nested.c:940"]},
     "kernel log"),
]


@pytest.mark.parametrize("gif", GIFS)
@pytest.mark.parametrize(("change", "words"), BROKEN, ids=[w for _, w in BROKEN])
def test_one_broken_field_fails_naming_the_clause(gif, change, words):
    v = verdict(gif, good(**change))
    assert v.verdict == j.FAIL and words in v.reason, v.reason


@pytest.mark.parametrize("gif", GIFS)
@pytest.mark.parametrize("reg", CONTRACT_REGS)
def test_each_l1_register_must_survive(gif, reg):
    l1 = dict(L1, **{reg: L1[reg] ^ 0x1000})
    v = verdict(gif, good(l1=l1))
    assert v.verdict == j.FAIL and f"L1 {reg.upper()}" in v.reason, v.reason
    # the register's pre-VMRUN copy is what it is compared with
    l1 = dict(L1, **{f"pre_{reg}": L1[reg] ^ 0x1000})
    assert verdict(gif, good(l1=l1)).verdict == j.FAIL


@pytest.mark.parametrize("gif", GIFS)
def test_result_block_must_be_written_after_vmrun(gif):
    for stage in (params.RESULT_POISON, params.STAGE_BEFORE_VMRUN):
        v = verdict(gif, good(l1=dict(L1, stage=stage)))
        assert v.verdict == j.FAIL and "result block" in v.reason


@pytest.mark.parametrize("gif", GIFS)
def test_exit_code_width_depends_on_who_checked(gif):
    """A software check writes all 64 bits of -1; a CPU-detected failure that
    KVM reflects may carry QEMU TCG's 32-bit -1 (hw_checked)."""
    case = CASES[LATE.format(gif)]
    narrow = good(exit_code=0xFFFF_FFFF)
    assert j.check(case, good(), VMEXIT_INVALID) == []
    assert j.check(case, good(), VMEXIT_INVALID_HW) == []
    assert any("EXITCODE" in b for b in j.check(case, narrow, VMEXIT_INVALID))
    assert j.check(case, narrow, VMEXIT_INVALID_HW) == []
    assert any("EXITCODE" in b for b in j.check(case, good(exit_code=POISON), VMEXIT_INVALID_HW))


@pytest.mark.parametrize("gif", GIFS)
def test_event_inj_clause(gif):
    case = CASES[f"control/eventinj-after-invalid[{gif}]"]
    injected = case.vmcb["event_inj"]
    cleared = Expect("vmexit_invalid", event_inj_cleared=True)
    kept = Expect("vmexit_invalid", event_inj_cleared=False)
    assert j.check(case, good(event_inj=0), cleared) == []
    assert any("EVENTINJ" in b for b in j.check(case, good(event_inj=injected), cleared))
    assert j.check(case, good(event_inj=injected), kept) == []
    assert any("EVENTINJ" in b for b in j.check(case, good(event_inj=0), kept))


@pytest.mark.parametrize("outcome", sorted(j.HARNESS_OUTCOMES))
def test_harness_outcomes_are_errors_not_verdicts(outcome):
    v = verdict("gif1", good(outcome=outcome, detail="what happened"))
    assert v.verdict == j.ERROR and outcome in v.reason and "what happened" in v.reason


def _v(*profiles: str) -> j.Verdict:
    return j.Verdict(j.PASS, profiles=tuple(profiles))


def test_fingerprint_exact():
    assert j.fingerprint([_v(*j.PROFILES), _v("legacy")]) == "legacy"


def test_fingerprint_tie_names_every_profile():
    tie = [p for p in j.PROFILES if p != "legacy"]
    assert j.fingerprint([_v(*tie)]) == " or ".join(tie)


def test_fingerprint_closest_counts_disagreements():
    last = j.PROFILES[-1]
    fp = j.fingerprint([_v(last), _v(last), _v("legacy")])
    assert fp == f"unknown (closest: {last}, 1 of 3 cases disagree)"


def test_fingerprint_without_distinguishing_cases():
    assert j.fingerprint([_v(*j.PROFILES)]).startswith("unknown (no case run")
    assert j.fingerprint([j.Verdict(j.ERROR)]).startswith("unknown")
