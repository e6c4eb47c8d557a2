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
# And the host save area's RAX and RFLAGS (APM 15.5.1/15.6, judge
# _check_host_rax_rflags): RAX is VMRUN's operand, the VMCB12 GPA.
HOST_SAVE_REGS = ("rax", "rflags")
L1 |= {f"pre_{k}": L1[k] for k in CONTRACT_REGS + HOST_SAVE_REGS}


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


# ---- clauses added with the EVENTINJ/kvm-unit-tests families ----------------

def vmexit_ok(**kw) -> o.Observation:
    """A successful VMRUN whose L2 VMMCALLed: EXITINTINFO[31:0] written as 0,
    its error-code half left alone (the poison), as KVM does."""
    return good(**{"exit_code": SVM_EXIT_VMMCALL, "exit_int_info": POISON & ~0xFFFF_FFFF, **kw})


@pytest.mark.parametrize("gif", GIFS)
@pytest.mark.parametrize("reg", HOST_SAVE_REGS)
def test_host_save_area_rax_rflags(gif, reg):
    """L1 RAX/RFLAGS after the VMRUN are those VMRUN saw (host save area)."""
    l1 = dict(L1, **{reg: L1[reg] ^ 0x40})
    v = verdict(gif, good(l1=l1))
    assert v.verdict == j.FAIL and f"L1 {reg.upper()}" in v.reason and "host save" in v.reason
    v = verdict(gif, good(l1=dict(L1, **{f"pre_{reg}": params.RESULT_POISON})))
    assert v.verdict == j.FAIL and "not recorded" in v.reason


@pytest.mark.parametrize("gif", GIFS)
def test_exit_int_info_after_failed_vmrun(gif):
    """Unwritten (KVM's failure paths) or V=0 passes; an event L1 did not
    inject fails; the undelivered EVENTINJ itself is accepted."""
    assert verdict(gif, good(exit_int_info=POISON)).verdict == j.PASS
    event = 1 << 31 | 3 << 8 | 13
    v = verdict(gif, good(exit_int_info=event))
    assert v.verdict == j.FAIL and "EXITINTINFO" in v.reason
    case = CASES[f"control/eventinj-after-invalid[{gif}]"]
    injected = case.vmcb["event_inj"]
    obs = good(exit_int_info=injected & 0xFFFF_FFFF, event_inj=injected)
    assert j.check(case, obs, case.profiles["fixed"]) == []


@pytest.mark.parametrize("gif", GIFS)
def test_exit_int_info_after_vmexit(gif):
    """A #VMEXIT that interrupted no event delivery: EXITINTINFO[31:0] = 0;
    bits 63:32 (ERRORCODE, defined only with V and EV) are not judged."""
    case = CASES[f"negative/control-asid0[{gif}]"]
    want = case.expect
    assert j.check(case, vmexit_ok(), want) == []
    assert j.check(case, vmexit_ok(exit_int_info=0xFFFF_FFFF_0000_0000), want) == []
    bad = j.check(case, vmexit_ok(exit_int_info=1 << 31 | 0x30), want)
    assert any("EXITINTINFO" in b for b in bad)


@pytest.mark.parametrize("gif", GIFS)
def test_control_write_back(gif):
    """TLB_CTL and INT_CTL (but V_TPR/V_IRQ/V_GIF) come back as L1 wrote them."""
    case = CASES[f"control/control-write-back[{gif}]"]
    want = case.profiles.get("fixed", case.expect)
    tlb, ctl = case.vmcb["tlb_ctl"], case.vmcb["int_ctl"]
    ok = good(tlb_ctl=tlb, int_ctl=ctl)
    assert j.check(case, ok, want) == []
    assert j.check(case, dataclasses.replace(ok, int_ctl=ctl ^ 0x10F), want) == []  # CPU-owned
    assert any("TLB_CTL" in b for b in j.check(case, dataclasses.replace(ok, tlb_ctl=tlb & 7),
                                               want))
    assert any("INT_CTL" in b for b in j.check(
        case, dataclasses.replace(ok, int_ctl=ctl & ~(1 << 24)), want))


def l2_took(vector: int, error_code: int | None) -> dict[str, int]:
    frame = 48 if error_code is not None else 40
    return dict(L1, l2_event_vector=vector, l2_event_rsp=0x28000 - frame,
                l2_event_word=error_code if error_code is not None else 0x100000)


@pytest.mark.parametrize("gif", GIFS)
def test_l2_event_clause(gif):
    """The event EVENTINJ delivered, as L2's own IDT saw it."""
    gp = CASES[f"eventinj/exept-gp-ec[{gif}]"]
    want = gp.expect
    assert want.l2_event == (13, 0x1234)
    ok = vmexit_ok(l1=l2_took(13, 0x1234), event_inj=0x1234 << 32)
    assert j.check(gp, ok, want) == []
    for l1, words in ((l2_took(14, 0x1234), "L2 took vector"),
                      (l2_took(13, None), "no error code pushed"),
                      (l2_took(13, 0x4321), "error code"),
                      (dict(L1, l2_event_vector=params.RESULT_POISON), "no event reached L2")):
        bad = j.check(gp, dataclasses.replace(ok, l1=l1), want)
        assert any(words in b for b in bad), (words, bad)
    # Taken means EVENTINJ.V clear afterwards.
    bad = j.check(gp, dataclasses.replace(ok, event_inj=gp.vmcb["event_inj"]), want)
    assert any("still valid" in b for b in bad)
    # No event may reach L2 when VMRUN fails.
    bad_type = CASES[f"eventinj/type1[{gif}]"]
    assert j.check(bad_type, good(), bad_type.profiles["7.x"]) == []
    bad = j.check(bad_type, good(l1=l2_took(0x30, None)), bad_type.profiles["7.x"])
    assert any("no event was due" in b for b in bad)


@pytest.mark.parametrize("gif", GIFS)
def test_a_racy_alternative_is_accepted_as_a_known_bug(gif):
    """A reserved EVENTINJ TYPE on 6.x: the CPU refusing it passes; the event
    dropped on a cancelled entry (L2 ran) matches the alternative, a known
    bug; anything else matches nothing."""
    case = CASES[f"eventinj/type5[{gif}]"]
    refused = good(exit_code=0xFFFF_FFFF)
    assert j.judge(case, refused, "fixed").verdict == j.PASS
    dropped = vmexit_ok()
    v = j.judge(case, dropped, "fixed")
    assert v.verdict == j.FAIL and "known bug" in v.reason and "dropped" in v.reason
    assert "fixed" in v.profiles and "7.x" not in v.profiles
    assert j.judge(case, dropped, "7.x").verdict == j.FAIL
    other = vmexit_ok(exit_code=0x7F)
    assert j.judge(case, other, None).verdict == j.FAIL and not j.judge(case, other).profiles
