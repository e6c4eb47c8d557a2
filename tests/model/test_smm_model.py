"""SMM on the model: each SMM case per profile against what the measured
kernels did (Debian 6.1.170 = legacy and 6.1.192 = fixed re-enter L2 with
the corrupted VMCB12; 6.12.95 = upstream refuses the RSM), plus the SMM
mechanics the catalogue does not reach."""

from __future__ import annotations

import pytest

from kvmtest import judge as j
from kvmtest import layout, params, runner, ucall
from kvmtest import smm as host_smm
from kvmtest.backends.model import ModelBackend
from kvmtest.case import NEED_SMM, NEED_SVM, SMM, Case, vmexit
from kvmtest.cases import catalogue
from kvmtest.model.machine import ModelMachine
from kvmtest.observation import SHUTDOWN, SYNC
from kvmtest.payloads import load_payload
from kvmtest.runner import run_case
from kvmtest.vmcb import INTERCEPT_SHUTDOWN, INTERCEPT_SMI, SVM_EXIT_VMMCALL

pytestmark = pytest.mark.model

SMM_CASES = [c for c in catalogue() if c.scenario == SMM]
SVM_EXIT_SW = 0xF000_0000  # left in VMCB12 by svm_enter_smm's synthetic #VMEXIT
SVM_EXIT_SMI = 0x62


@pytest.fixture(scope="module", params=j.PROFILES)
def backend(request: pytest.FixtureRequest) -> ModelBackend:
    b = ModelBackend(request.param)
    yield b
    b.close()


def test_model_runs_smm():
    assert ModelBackend("fixed").capabilities()["smm"] is None
    assert len(SMM_CASES) == 12


@pytest.mark.parametrize("case", SMM_CASES, ids=lambda c: c.id)
def test_smm_case_matches_measured_kernel(backend: ModelBackend, case: Case):
    profile = backend.profile.name
    obs = run_case(backend, case)
    # The SMI came from L2 and the handler ran once, as on the kernels
    # (tests/qemu/test_smm.py checks the same detail there).
    assert "SMI in guest mode=1" in obs.detail, obs.detail
    assert "handler ran 1x" in obs.detail, obs.detail
    assert "svm_guest=1 vmcb12=0x9000" in obs.detail, obs.detail
    want = j.expectation(case, profile)
    if want.kind == "shutdown":  # upstream: RSM refused
        assert obs.outcome == SHUTDOWN, obs.detail
        assert obs.exit_code == SVM_EXIT_SW  # measured on 6.12.95
        assert obs.detail.startswith("RSM refused (KVM_EXIT_SHUTDOWN)")
    else:  # L2 re-entered; L1 sees its VMMCALL (or SHUTDOWN for CR0[63:32])
        assert obs.outcome == SYNC, obs.detail
        assert obs.exit_code == want.exit_code
        assert (obs.gif, obs.guest_mode) == (False, False)
        assert obs.l1["stage"] == params.STAGE_AFTER_VMRUN
        for reg in j.L1_REGS:  # (CR4: plus the MCE leak where it is the subject)
            gained = want.l1_cr4_gained if reg == "cr4" else 0
            assert obs.l1[reg] == obs.l1[f"pre_{reg}"] | gained, reg
    assert j.check(case, obs, want) == []
    verdict = j.judge(case, obs, profile)
    assert verdict.verdict == (j.FAIL if want.known_bug else j.PASS), verdict.reason


def test_smm_observations_repeat_on_a_reused_machine():
    b = ModelBackend("fixed")
    first = [run_case(b, c) for c in SMM_CASES]
    again = [run_case(b, c) for c in SMM_CASES]
    assert [o.to_json() for o in first] == [o.to_json() for o in again]
    b.close()


def _smm_case(**vmcb: int) -> Case:
    return Case(id="t-smm", family="smm", scenario=SMM, expect=vmexit(SVM_EXIT_VMMCALL),
                source="test", payload="smm", l2_entry="l2_smi",
                needs=frozenset({NEED_SVM, NEED_SMM}), vmcb=vmcb)


def test_smi_intercepted_by_l1_is_a_vmexit(backend: ModelBackend):
    """svm_check_nested_events(): L1 intercepts SMI -> #VMEXIT(SMI) and the
    SMI stays pending (GIF=0 after the #VMEXIT: never taken here)."""
    case = _smm_case(intercept_misc1=INTERCEPT_SHUTDOWN | INTERCEPT_SMI)
    obs = run_case(backend, case)
    assert (obs.outcome, obs.exit_code, obs.gif) == (SYNC, SVM_EXIT_SMI, False), obs.detail
    assert "handler ran 0x" in obs.detail and "svm_guest=0" in obs.detail


def test_smm_data_segment_reaches_above_64k(monkeypatch: pytest.MonkeyPatch):
    """KVM's SMM DS has a 4 GiB limit: the handler's [edx] store reaches a
    GPA above 64 KiB in the model too."""
    target = layout.CODE_GPA - 0x10  # 1 MiB - 16: backed, below the payload

    def table(gpa: int, fields: dict) -> bytes:
        entry = target.to_bytes(4, "little") + (1).to_bytes(4, "little") + b"\x5a".ljust(8, b"\0")
        return entry.ljust(host_smm.PATCH_SIZE * host_smm.PATCH_SLOTS, b"\0")

    monkeypatch.setattr(host_smm, "patch_table", table)
    b = ModelBackend("fixed")
    with b.machine(load_payload("smm"), svm=True) as m:
        case = _smm_case()
        runner.prepare_memory(m, case, m.payload)
        obs = host_smm.drive_smm(m, case, m.payload, 5.0)
        assert m.read(target, 1) == b"\x5a"
    assert (obs.outcome, obs.exit_code) == (SYNC, SVM_EXIT_VMMCALL), obs.detail
    b.close()


def test_rsm_outside_smm_is_ud():
    """RSM outside SMM: #UD (em_rsm), delivered to L1's IDT as usual."""
    b = ModelBackend("fixed")
    with b.machine(load_payload("smm"), svm=True) as m:
        assert isinstance(m, ModelMachine)
        assert not m.smm.active
        m.uc.mem_write(m.rip, b"\x0f\xaa")  # L1's first instruction becomes RSM
        ex = m.run(5.0)
        # L1's #UD stub reports the exception through a ucall.
        u = ucall.decode(m.read, ex.value)
        assert u.cmd == ucall.Ucall.EXCEPTION
        assert ucall.GuestException.from_ucall(u).vector == 6
    b.close()
