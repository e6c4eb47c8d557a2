"""The host loop (kvmtest/runner.py) on real components: this host's /dev/kvm
where the payload needs no SVM, the model where it does.  What the loop hands
the judge must be what the guest and the VMCB12 hold: every VMCB12 field it
reads, the exits it counted, how a run ended and the words it says about it.
"""

from __future__ import annotations

import pytest

from kvmtest import layout, params, runner
from kvmtest.backends.model import ModelBackend
from kvmtest.case import GIF1, INSN, NEED_NO_SVM, VMRUN, Case, Expect, vmexit
from kvmtest.cases import by_id
from kvmtest.observation import (
    EINVAL,
    SHUTDOWN,
    SYNC,
    TIMEOUT,
    UNEXPECTED_EXIT,
)
from kvmtest.payloads import load_payload
from kvmtest.vmcb import POISON, SVM_EXIT_ERR, SVM_EXIT_VMMCALL

CASES = by_id()


@pytest.fixture
def any_backend(kvm_or_model):
    return kvm_or_model


@pytest.fixture(scope="module")
def model():
    b = ModelBackend("7.x")
    yield b
    b.close()


def ping(count: int) -> Case:
    return Case(id=f"ping/{count}", family="test", scenario=INSN, payload="ping",
                expect=Expect("no_fault"), source="tests", params={"count": count},
                needs=frozenset({NEED_NO_SVM}))


# ---- how a run ends ------------------------------------------------------------

def test_done_without_a_report(any_backend):
    obs = runner.run_case(any_backend, ping(3))
    assert (obs.outcome, obs.detail) == (UNEXPECTED_EXIT, "DONE without a report")
    assert obs.exits == ["IoExit"] * 4  # three PINGs, then DONE


def test_exit_budget_is_64(any_backend):
    """A case needs a handful of exits; the 64th may still be DONE, a 65th
    means the guest is looping."""
    last = runner.run_case(any_backend, ping(runner.MAX_EXITS - 1))
    assert (last.outcome, last.detail) == (UNEXPECTED_EXIT, "DONE without a report")
    assert len(last.exits) == 64
    over = runner.run_case(any_backend, ping(runner.MAX_EXITS))
    assert (over.outcome, over.detail) == (TIMEOUT, "more than 64 exits")
    assert len(over.exits) == 64


def test_timeout_detail(model):
    spin = Case(id="spin", family="test", scenario=INSN, payload="spin",
                expect=Expect("no_fault"), source="tests", needs=frozenset({NEED_NO_SVM}))
    obs = runner.run_case(model, spin, timeout=0.25)
    assert (obs.outcome, obs.detail) == (TIMEOUT, "no report within 0.25 s")


def test_sync_then_done_keeps_the_report(any_backend):
    """echo mode 0: SYNC with the result block, then DONE: the outcome stays
    SYNC and the report is the block."""
    case = Case(id="echo", family="test", scenario=INSN, payload="echo",
                expect=Expect("no_fault"), source="tests",
                params={"insn": 0, "msr_value": 0x0123_4567_89AB_CDEF},
                needs=frozenset({NEED_NO_SVM}))
    obs = runner.run_case(any_backend, case)
    assert (obs.outcome, obs.detail, obs.exits) == (SYNC, "", ["IoExit", "IoExit"])
    assert obs.l1["stage"] == 0x0123_4567_89AB_CDEF
    assert obs.exit_code is None  # no VMCB12 without SVM: nothing read
    assert obs.kernel_log_checked is (obs.kernel_warnings is not None)


def test_triple_fault_detail():
    """nCR3 outside every memslot with no SHUTDOWN intercept on 6.x: KVM's
    triple fault in guest mode becomes KVM_EXIT_SHUTDOWN (model/svm.py
    _late_shutdown); the VMCB12 is still read."""
    model = ModelBackend("fixed")
    case = Case(id="t", family="control", scenario=VMRUN, expect=vmexit(0), source="test",
                gif_mode=GIF1, vmcb={"nested_ctl": 1, "nested_cr3": layout.UNBACKED_GPA,
                                     "intercept_misc1": 0})
    obs = runner.run_case(model, case)
    assert (obs.outcome, obs.detail) == (SHUTDOWN, "L1 triple fault (KVM_EXIT_SHUTDOWN)")
    assert obs.exits == ["ShutdownExit"]
    assert obs.exit_code == POISON  # no #VMEXIT was written
    model.close()


def test_internal_error_detail():
    b = ModelBackend("7.x")
    case = Case(id="t", family="insn", scenario=INSN, expect=Expect("internal_error"),
                source="test", payload="svm_insn",
                params={"flags": params.PF_SET_SVME | params.PF_SET_HSAVE, "insn": 0,
                        "vmrun_rax": layout.UNBACKED_GPA, "hsave_pa": layout.HSAVE_GPA})
    obs = runner.run_case(b, case)
    b.close()
    assert obs.exit_data == [1, 0, 0x80, 0, 0, 0, 0]
    assert obs.detail == "KVM_EXIT_INTERNAL_ERROR suberror 1 data [0, 128, 0, 0, 0, 0]"


def test_unknown_scenario_is_refused(model):
    case = Case(id="x/odd", family="x", scenario="odd", expect=Expect("no_fault"),
                source="test", payload="ping", needs=frozenset({NEED_NO_SVM}))
    with pytest.raises(ValueError, match="x/odd: unknown scenario 'odd'"):
        runner.run_case(model, case)


# ---- what comes back from VMCB12 -------------------------------------------------

def test_every_vmcb12_field_the_judge_reads(model):
    """Distinct values in each field, read back one by one: a field read
    from the wrong place or left out shows."""
    case = CASES["control/control-write-back[gif1]"]
    obs = runner.run_case(model, case)
    assert obs.outcome == SYNC, obs.detail
    assert obs.tlb_ctl == case.vmcb["tlb_ctl"] != 0
    assert obs.int_ctl == case.vmcb["int_ctl"] != 0
    vmmcall = Case(id="t", family="negative", scenario=VMRUN, expect=vmexit(0x81),
                   source="test", gif_mode=GIF1,
                   vmcb={"event_inj": 0x1234 << 32, "int_ctl": 1 << 24, "tlb_ctl": 1})
    obs = runner.run_case(model, vmmcall)
    assert (obs.exit_code, obs.exit_info_1, obs.exit_info_2) == (SVM_EXIT_VMMCALL, 0, 0)
    assert obs.exit_int_info == POISON & ~0xFFFF_FFFF  # KVM wrote the low half only
    assert (obs.event_inj, obs.int_ctl, obs.tlb_ctl) == (0, 1 << 24, 1)
    assert (obs.gif, obs.guest_mode) == (False, False)
    assert obs.exits == ["IoExit", "IoExit"]  # SYNC, DONE


def test_vmcb12_is_read_even_when_l1_never_reports(model):
    """A failed VMRUN whose L1 then faults: the judge still gets VMCB12."""
    case = CASES["control/asid0[gif1]"]
    obs = runner.run_case(model, case)
    assert (obs.exit_code, obs.exit_info_1, obs.exit_info_2) == (SVM_EXIT_ERR, 0, 0)
    assert obs.event_inj == 0 and obs.exit_int_info == POISON


def test_exit_info_fields_are_not_swapped(model):
    """L2's OUT to port 0x80 intercepted: EXITINFO1 (port, size, direction)
    and EXITINFO2 (next RIP) differ, so each lands in its own field."""
    case = Case(id="t", family="negative", scenario=VMRUN, expect=vmexit(0x7B), source="test",
                gif_mode=GIF1, l2_entry="l2_ioio", memory={layout.IOPM_GPA + 0x10: b"\x01"},
                vmcb={"intercept_misc1": 1 << 27})
    obs = runner.run_case(model, case)
    assert obs.exit_code == 0x7B
    assert obs.exit_info_1 == 0x80 << 16 | 1 << 4 | 1 << 9
    assert obs.exit_info_2 == load_payload("vmrun").sym("l2_ioio") + 5


# ---- KVM_SET_NESTED_STATE ------------------------------------------------------

def test_refused_nested_state_reports_l1_s_run_afterwards(model):
    case = CASES["nested_state/asid0"]
    obs = runner.run_case(model, case)
    assert (obs.outcome, obs.detail, obs.after_outcome) == (
        EINVAL, "KVM_SET_NESTED_STATE: errno 22", SYNC)
    # L1's VMRUN of the default VMCB12 afterwards: L2 ran to its VMMCALL.
    assert obs.exit_code == SVM_EXIT_VMMCALL
    assert (obs.gif, obs.guest_mode) == (False, False)
    assert obs.exits == ["IoExit", "IoExit"]
    assert obs.l1["stage"] == params.STAGE_AFTER_VMRUN
    assert obs.l1["rax"] == obs.l1["pre_rax"] == layout.VMCB12_GPA


def test_accepted_nested_state_is_in_guest_mode(model):
    case = CASES["nested_state/valid"]
    obs = runner.run_case(model, case)
    # The request's default flags are GUEST_MODE | GIF_SET (nested_request.py).
    assert (obs.outcome, obs.detail, obs.guest_mode, obs.gif) == ("accepted", "accepted",
                                                                  True, True)
    assert obs.after_outcome is None and obs.exits == [] and obs.l1 is None


# ---- symbols --------------------------------------------------------------------

def test_symbolize():
    p = load_payload("ping")
    first = min(p.symbols.values())
    last, name = max((a, n) for n, a in p.symbols.items())
    assert runner.symbolize(p, last) == name
    assert runner.symbolize(p, last + 3) == f"{name}+0x3"
    assert runner.symbolize(p, last + 0x1000) == f"{name}+0x1000"
    assert runner.symbolize(p, last + 0x1001) is None
    assert runner.symbolize(p, first - 1) is None


def test_a_stray_signal_does_not_end_the_case(real_kvm):
    """KVM_RUN interrupted by a signal that is not the deadline's (EINTR):
    the loop runs the guest again, and the case ends at its own deadline."""
    import signal

    spin = Case(id="spin", family="test", scenario=INSN, payload="spin",
                expect=Expect("no_fault"), source="tests", needs=frozenset({NEED_NO_SVM}))
    fired = []
    old = signal.signal(signal.SIGALRM, lambda *_: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        obs = runner.run_case(real_kvm["backend"], spin, timeout=0.5)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert fired == [1]
    assert (obs.outcome, obs.detail, obs.exits) == (TIMEOUT, "no report within 0.5 s",
                                                    ["TimedOut"])


def test_failed_entry_detail():
    """L1's state from HSAVE that the CPU refuses after an SMI in L2
    (smm/hsave-l1-cr0-hi): KVM_EXIT_FAIL_ENTRY with the CPU's exit code."""
    b = ModelBackend("fixed")
    obs = runner.run_case(b, CASES["smm/hsave-l1-cr0-hi"])
    b.close()
    assert (obs.outcome, obs.exit_data) == ("fail_entry", [0xFFFF_FFFF])
    assert obs.detail.startswith("KVM_EXIT_FAIL_ENTRY reason 0xffffffff (cpu 0); SMI in guest")
