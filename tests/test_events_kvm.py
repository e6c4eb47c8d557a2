"""Host actions and L1's event log on this host's real /dev/kvm, against the
model: the events payload without SVM (EV_NO_SVM: no CLGI, VMRUN or STGI)
runs on any KVM, so the plumbing under the GIF cases -- KVM_NMI, the log,
single-step traps, memslots added and deleted -- is checked for real here,
and the model must observe the same.

Not compared here: the interrupt window (kvm_pvm, this host's KVM, opens it
only at its next exit rather than right after STI) and IRET ending NMI
blocking (tracked differently by VMX-style KVMs than by SVM's IRET
intercept).  Both are SVM behaviour, measured under QEMU (tests/qemu)."""

import pytest

from kvmtest import eventlog, params
from kvmtest.backends.model import ModelBackend
from kvmtest.case import NEED_NO_SVM, SCRIPT, Case, Expect
from kvmtest.payloads import load_payload
from kvmtest.runner import run_case

pytestmark = pytest.mark.kvm
EVENTS = load_payload("events")
START = ("mark@before_vmrun",)
TAIL = ("mark@after_vmrun", "mark@after_sti", "mark@after_stgi")


def events_case(name: str, actions: tuple[str, ...], mode: int = 0,
                on_sync_before: tuple[str, ...] = (), **kw) -> Case:
    on_sync = {params.STAGE_HOST_ACTION: actions}
    if on_sync_before:
        on_sync[params.STAGE_BEFORE_L1] = on_sync_before
    return Case(id=f"test/{name}", family="test", scenario=SCRIPT, payload="events",
                expect=Expect("log"), source="tests/test_events_kvm.py",
                params={"flags": 0, "mode": params.EV_NO_SVM | mode},
                on_sync=on_sync, needs=frozenset({NEED_NO_SVM}), **kw)


CASES = {
    # No GIF without SVM: the NMI arrives as the vCPU resumes after the
    # host's action, i.e. on return from the ucall's OUT.
    "nmi": (events_case("nmi", ("nmi",)), ("nmi@ucall+0x39", *START, *TAIL)),
    # POPF sets TF; the trap comes after the next instruction (the JMP).
    "tf": (events_case("tf", (), params.EV_TF),
           (*START, "db@after_vmrun", "dr6=0x4000", *TAIL)),
    # The host single-steps L1's first instruction before it runs.
    "step": (events_case("step", (), on_sync_before=("step",)), (*START, *TAIL)),
    # An extra memslot at 512 MiB, deleted while L1 waits: L1 does not touch
    # it, the host still reads what it held.
    "memslot": (events_case("memslot", ("delete_memory 0x20000000",),
                            extra_memory={0x2000_0000: 0x1000},
                            memory={0x2000_0000: b"kept"}), (*START, *TAIL)),
}


@pytest.fixture(scope="module")
def model():
    return ModelBackend("7.x")


@pytest.mark.parametrize("name", CASES)
def test_event_log_on_real_kvm_and_model(name, real_kvm, model):
    case, want = CASES[name]
    for backend in (real_kvm["backend"], model):
        obs = run_case(backend, case)
        assert obs.outcome == "sync", (backend.name, obs.detail)
        assert eventlog.render(obs.log, EVENTS) == want, backend.name
        assert all(a.endswith(": ok") for a in obs.actions), obs.actions


def test_refused_action_ends_the_case(real_kvm, model):
    """Deleting a memslot that is not there is the backend's EINVAL, not a crash."""
    case = events_case("bad-delete", ("delete_memory 0x20000000",))
    for backend in (real_kvm["backend"], model):
        obs = run_case(backend, case)
        assert obs.outcome == "action_failed" and "errno 22" in obs.detail, backend.name


def test_guest_debug_single_step_binding(real_kvm):
    """KVM_SET_GUEST_DEBUG single-step: each KVM_RUN stops after one guest
    instruction with KVM_EXIT_DEBUG (#DB, DR6.BS), the host's own stepping
    (for a fuzzer stopping right after an emulated instruction such as RSM)."""
    from kvmtest.exits import DebugExit
    from kvmtest.kvm import lib

    backend = real_kvm["backend"]
    if not backend.kvm.check_extension(lib.KVM_CAP_SET_GUEST_DEBUG):
        pytest.skip("host KVM lacks KVM_CAP_SET_GUEST_DEBUG")
    ping = load_payload("ping")
    with backend.machine(ping, svm=False) as m:
        m.touched_nested_state = True  # host debugging must not outlive this VM
        m.vcpu.set_guest_debug(lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_SINGLESTEP)
        first, second = m.run(2.0), m.run(2.0)
        assert isinstance(first, DebugExit) and isinstance(second, DebugExit)
        assert first.exception == 1 and first.dr6 & 0x4000
        assert ping.entry < first.pc < second.pc
