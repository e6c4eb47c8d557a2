"""The catalogue-depth machinery as data and pure functions: host actions,
the nested-state request, L1's event log and the judge clauses that read
them.  No backend is involved: observations are built by hand, the way a
kernel would produce them."""

import dataclasses

import pytest

from kvmtest import actions, eventlog, params
from kvmtest import judge as j
from kvmtest import nested_request as nr
from kvmtest import observation as o
from kvmtest.case import SCRIPT, SET_NESTED_STATE
from kvmtest.cases import by_id, catalogue
from kvmtest.kvm import lib
from kvmtest.payloads import load_payload
from kvmtest.vmcb import SVM_EXIT_ERR

CASES = by_id()
EVENTS = load_payload("events")
DEPTH = ("gif", "singlestep", "unmap", "perm", "nested_state")


def test_uapi_constants_match_linux_kvm_h():
    assert (nr.GUEST_MODE, nr.RUN_PENDING, nr.GIF_SET) == (
        lib.KVM_STATE_NESTED_GUEST_MODE, lib.KVM_STATE_NESTED_RUN_PENDING,
        lib.KVM_STATE_NESTED_GIF_SET)
    assert (nr.EVMCS, nr.MTF_PENDING) == (lib.KVM_STATE_NESTED_EVMCS,
                                          lib.KVM_STATE_NESTED_MTF_PENDING)
    assert (nr.FORMAT_VMX, nr.FORMAT_SVM) == (lib.KVM_STATE_NESTED_FORMAT_VMX,
                                              lib.KVM_STATE_NESTED_FORMAT_SVM)
    assert nr.HEADER_SIZE == lib.KVMTEST_NESTED_DATA_OFFSET
    assert nr.SVM_VMCB_SIZE == lib.KVM_STATE_NESTED_SVM_VMCB_SIZE


@pytest.mark.parametrize("text,parsed", [
    ("irq 48", ("irq", 48)), ("nmi", ("nmi", None)), ("delete_memory 0x20000000",
                                                       ("delete_memory", 0x2000_0000)),
    ("nested_roundtrip", ("nested_roundtrip", None))])
def test_actions_parse(text, parsed):
    assert actions.parse(text) == parsed


@pytest.mark.parametrize("bad", ["reboot", "irq", "nmi 2", "irq forty", "delete_memory"])
def test_bad_actions_are_refused_with_a_reason(bad):
    with pytest.raises(actions.ActionError, match=r"host action|unknown"):
        actions.parse(bad)


def test_nested_request_defaults_and_overrides():
    prep, blob = nr.from_case({}, bytes(0x1000))
    assert prep == nr.HostPrep() and blob.flags == nr.GUEST_MODE | nr.GIF_SET
    assert blob.size == nr.FULL_SIZE and len(blob.data) == 0x1000
    prep, blob = nr.from_case({"svme": 0, "flags": nr.GIF_SET}, bytes(0x1000))
    assert not prep.svme and blob.data == b"" and blob.size == nr.HEADER_SIZE
    _, blob = nr.from_case({"size": nr.HEADER_SIZE}, bytes(0x1000))
    assert blob.size == nr.HEADER_SIZE and blob.data  # the header lies, the buffer is full
    with pytest.raises(ValueError, match="unknown nested-state keys"):
        nr.from_case({"flagz": 1}, b"")


def _mem(entries: list[int], count: int | None = None):
    raw = (len(entries) // 2 if count is None else count).to_bytes(8, "little")
    raw += b"".join(e.to_bytes(8, "little") for e in entries)
    raw = raw.ljust(eventlog.SIZE, b"\0")
    return lambda gpa, n: raw[gpa - params.LOG_GPA:gpa - params.LOG_GPA + n]


def test_event_log_poison_and_untrusted_count():
    assert eventlog.read(lambda gpa, n: eventlog.poison()[:n]) is None
    entries = eventlog.read(_mem([params.LOG_MARK, 1] * 3, count=10 ** 9))
    assert entries is not None and len(entries) == 2 * params.LOG_MAX  # clamped


def test_event_log_renders_symbols_and_matches_wildcards():
    after = EVENTS.sym("after_stgi")
    seen = eventlog.render([params.LOG_INTR, after, params.LOG_MARK, after + 1,
                            params.LOG_DR6, 0x4000], EVENTS)
    assert seen == ("intr@after_stgi", "mark@after_stgi+0x1", "dr6=0x4000")
    assert eventlog.matches(seen, ("intr@after_stgi", "mark@after_stgi+0x1", "dr6=*"))
    assert not eventlog.matches(seen, ("intr@after_stgi", "mark@after_stgi+0x1"))


def _log_obs(case, names: tuple[str, ...], exit_code: int) -> o.Observation:
    kinds = {v: k for k, v in eventlog.KINDS.items()}
    entries = []
    for name in names:
        kind, _, where = name.partition("@")
        entries += [kinds[kind], EVENTS.sym(where)]
    return o.Observation(outcome=o.SYNC, exit_code=exit_code, log=entries, kernel_warnings=[])


def test_gif_held_case_passes_on_order_and_fails_on_early_delivery():
    """Seeded bug: the interrupt before STGI (GIF left set) must fail."""
    case = CASES["gif/intr-held[gif0]"]
    good = _log_obs(case, case.expect.log, SVM_EXIT_ERR)
    assert j.judge(case, good).verdict == j.PASS
    early = ("mark@before_vmrun", "mark@after_vmrun", "intr@after_sti", "mark@after_sti",
             "mark@after_stgi")
    v = j.judge(case, _log_obs(case, early, SVM_EXIT_ERR))
    assert v.verdict == j.FAIL and "event log" in v.reason
    assert j.judge(case, dataclasses.replace(good, log=None)).verdict == j.FAIL
    assert j.judge(case, dataclasses.replace(good, exit_code=0x81)).verdict == j.FAIL


def test_gif1_early_delivery_fingerprints_legacy():
    case = CASES["gif/intr-held[gif1]"]
    early = j.expectation(case, "legacy").log
    v = j.judge(case, _log_obs(case, early, SVM_EXIT_ERR))
    assert v.verdict == j.FAIL and v.profiles == ("legacy",) and "known bug" in v.reason


def test_left_l2_clause():
    case = CASES["unmap/vmcb12-at-vmexit"]
    want = case.expect
    assert not j.check(case, o.Observation(outcome=o.SHUTDOWN), want)
    in_l2 = o.Observation(outcome=o.EXCEPTION, vector=13, error_code=0, rip=0, guest_mode=True)
    assert "still in guest mode" in j.check(case, in_l2, want)[0]
    l1 = {"stage": params.STAGE_AFTER_VMRUN}
    assert not j.check(case, o.Observation(outcome=o.SYNC, l1=l1, guest_mode=False), want)
    assert j.check(case, o.Observation(outcome=o.SYNC, l1=l1, guest_mode=True), want)


def test_accepted_l1_clause():
    case = CASES["negative/nested-state-svme0-gif1"]
    ok = o.Observation(outcome=o.ACCEPTED, guest_mode=False)
    assert not j.check(case, ok, case.expect)
    assert j.check(case, dataclasses.replace(ok, guest_mode=True), case.expect)
    assert j.check(case, dataclasses.replace(ok, outcome=o.EINVAL), case.expect)


def test_action_failure_is_a_failure_not_an_error():
    case = CASES["nested_state/roundtrip-in-l2"]
    v = j.judge(case, o.Observation(outcome=o.ACTION_FAILED, detail="errno 22",
                                    kernel_warnings=[]))
    assert v.verdict == j.FAIL


DEPTH_CASES = [c for c in catalogue() if c.family in DEPTH
               or (c.control_of or "").split("/")[0] in DEPTH]


@pytest.mark.parametrize("case", DEPTH_CASES, ids=lambda c: c.id)
def test_depth_cases_are_plain_data(case):
    for stage, acts in case.on_sync.items():
        assert isinstance(stage, int) and isinstance(acts, tuple)
        for a in acts:
            actions.parse(a)
    assert set(case.nested) <= set(nr.KEYS)
    assert all(isinstance(v, int) for v in case.nested.values())
    if case.scenario == SCRIPT:
        payload = load_payload(case.payload)
        if any("smi" in acts for acts in case.on_sync.values()):
            payload.sym("smi_handler")
    if case.expect.log is not None:
        for entry in case.expect.log:
            kind, _, where = entry.partition("@")
            assert kind in eventlog.KINDS.values() or entry.startswith("dr6=")
            if where:
                load_payload(case.payload).sym(where.split("+")[0])


# Cases whose control is another case's: the real-mode cases share
# negative/perm-vmmcall-real-mode, singlestep/vmrun-ok is itself the control
# run of singlestep/vmrun-invalid with DR6 checked.
SHARED_CONTROL = {"singlestep/vmrun-ok[gif1]",
                  *(f"perm/{i}-real-mode" for i in ("vmload", "vmsave", "stgi", "clgi",
                                                     "invlpga"))}


@pytest.mark.parametrize("case", [c for c in DEPTH_CASES if c.family != "negative"
                                  and c.scenario != SET_NESTED_STATE
                                  and c.expect.kind != "no_fault"
                                  and c.id not in SHARED_CONTROL],
                         ids=lambda c: c.id)
def test_depth_failing_cases_have_a_negative_control(case):
    controls = [c for c in catalogue() if c.control_of == case.id]
    assert len(controls) == 1, case.id
    ctl = controls[0]
    assert (ctl.payload, ctl.scenario) == (case.payload, case.scenario)
