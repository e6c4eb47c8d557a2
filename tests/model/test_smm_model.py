"""SMM on the model: each SMM case per profile and npt setting against what
the measured kernels did (Debian 6.1.170 = legacy and 6.1.192 = fixed
re-enter L2 with the corrupted VMCB12; 6.12.95/6.12.117 = 6.12-stable and
7.2.13/7.3.4 = 7.x refuse the RSM; every kernel leaks its hardware CR0/CR4/
EFER bits into L1 through HSAVE), plus the SMM mechanics the catalogue does
not reach.  Field by field against the kernels: tests/qemu/test_kernels.py."""

from __future__ import annotations

import pytest

from kvmtest import judge as j
from kvmtest import layout, params, runner, session, ucall
from kvmtest import smm as host_smm
from kvmtest.backends.model import ModelBackend
from kvmtest.case import NEED_NO_NPT, NEED_NPT, NEED_SMM, NEED_SVM, SMM, Case, vmexit
from kvmtest.cases import catalogue
from kvmtest.model import hwstate
from kvmtest.model.machine import ModelMachine
from kvmtest.observation import EXCEPTION, FAIL_ENTRY, SHUTDOWN, SYNC
from kvmtest.payloads import load_payload
from kvmtest.runner import run_case
from kvmtest.vmcb import INTERCEPT_SHUTDOWN, INTERCEPT_SMI, SVM_EXIT_VMMCALL, Vmcb

pytestmark = pytest.mark.model

SMM_CASES = [c for c in catalogue() if c.scenario == SMM]
SVM_EXIT_SW = 0xF000_0000  # left in VMCB12 by svm_enter_smm's synthetic #VMEXIT
SVM_EXIT_SMI = 0x62
CONFIGS = {"npt1": {"npt": "Y"}, "npt0": {"npt": "0"}}


def _fits(case: Case, config: str) -> bool:
    """The case is about this npt setting (or either)."""
    npt = CONFIGS[config]["npt"] != "0"
    return not ((NEED_NPT in case.needs and not npt) or (NEED_NO_NPT in case.needs and npt))


# Every (profile, npt setting, SMM case) the model runs: the `*-shadow` cases
# under npt=0 only, the `*-npt` ones under npt=1 only.
RUNS = [(p, c, case) for p in j.PROFILES for c in CONFIGS for case in SMM_CASES
        if _fits(case, c)]


@pytest.fixture(scope="module")
def backends():
    """backends(profile, config) -> one ModelBackend each, shared by the module."""
    made: dict[tuple[str, str], ModelBackend] = {}

    def get(profile: str, config: str) -> ModelBackend:
        if (profile, config) not in made:
            made[profile, config] = ModelBackend(profile, kvm_amd_params=CONFIGS[config])
        return made[profile, config]

    yield get
    for b in made.values():
        b.close()


@pytest.fixture(scope="module", params=[(p, c) for p in j.PROFILES for c in CONFIGS],
                ids=lambda pc: f"{pc[0]}-{pc[1]}")
def backend(request: pytest.FixtureRequest, backends) -> ModelBackend:
    return backends(*request.param)


def test_model_runs_smm():
    """The model runs SMM cases rather than skipping them: an SMI while L2
    runs reaches the SMM handler once, RSM re-enters L2 (a valid VMCB12, the
    handler patches nothing) and L1 sees L2's VMMCALL; every SMM case of the
    catalogue runs under one of the npt settings."""
    b = ModelBackend("fixed")
    case = _smm_case()
    assert session.skip_reason(b, case) is None
    obs = run_case(b, case)
    assert (obs.outcome, obs.exit_code, obs.smm_handler_runs) == (SYNC, SVM_EXIT_VMMCALL, 1)
    assert "SMI in guest mode=1" in obs.detail and "svm_guest=1" in obs.detail, obs.detail
    assert (obs.gif, obs.guest_mode) == (False, False)
    assert obs.l1["stage"] == params.STAGE_AFTER_VMRUN
    b.close()
    shadow = ModelBackend("fixed", kvm_amd_params={"npt": "0"})
    assert SMM_CASES and all(session.skip_reason(b, c) is None
                             or session.skip_reason(shadow, c) is None for c in SMM_CASES)
    shadow.close()


@pytest.mark.parametrize(("profile", "config", "case"), RUNS,
                         ids=[f"{p}-{c}-{case.id}" for p, c, case in RUNS])
def test_smm_case_matches_measured_kernel(backends, profile: str, config: str, case: Case):
    backend = backends(profile, config)
    obs = run_case(backend, case)
    # The SMI came from L2 and the handler ran once, as on the kernels
    # (tests/qemu/test_smm.py checks the same detail there).
    assert "SMI in guest mode=1" in obs.detail, obs.detail
    assert "handler ran 1x" in obs.detail, obs.detail
    assert "svm_guest=1 vmcb12=0x9000" in obs.detail or case.smm_vmcb, obs.detail
    want = j.expectation(case, profile)
    if want.kind == "shutdown":  # RSM refused, or svm_leave_smm could not map
        assert obs.outcome == SHUTDOWN, obs.detail
        assert obs.exit_code == SVM_EXIT_SW  # measured on every kernel
        assert obs.detail.startswith("RSM refused (KVM_EXIT_SHUTDOWN)")
    elif want.kind == "fail_entry":  # L1's state from HSAVE refused by the CPU
        assert (obs.outcome, obs.exit_data) == (FAIL_ENTRY, [0xFFFF_FFFF]), obs.detail
    elif want.kind == "exception":  # "SVM guest" cleared: L2's state in L1
        assert (obs.outcome, obs.vector, obs.rip_symbol) == (EXCEPTION, 6, "l2_smi_ud2")
    else:  # L2 re-entered; L1 sees its VMMCALL (or SHUTDOWN for CR0[63:32])
        assert obs.outcome == SYNC, obs.detail
        assert obs.exit_code == want.exit_code
        assert (obs.gif, obs.guest_mode) == (want.gif_after, False)
        assert obs.l1["stage"] == params.STAGE_AFTER_VMRUN
        flipped = dict(want.l1_flipped)
        for reg in j.L1_REGS:  # the leaks (and the handler's edits) only
            assert obs.l1[reg] == obs.l1[f"pre_{reg}"] ^ flipped.get(reg, 0), reg
    assert j.check(case, obs, want) == []
    verdict = j.judge(case, obs, profile)
    assert verdict.verdict == (j.FAIL if want.known_bug else j.PASS), verdict.reason


@pytest.mark.parametrize("npt", [True, False])
def test_hsave_holds_the_hardware_state_under_smm(npt: bool):
    """What svm_enter_smm() saves: vmcb01's hardware CR0/CR4/EFER, per npt
    (hwstate.py), read back by an SMM handler that copies HSAVE + 0x400."""
    kvm = hwstate.KvmAmd(npt=npt)
    b = ModelBackend("7.x", kvm_amd_params={"npt": "Y" if npt else "0"})
    case = next(c for c in SMM_CASES if c.id == "smm/l1-cr0-wp-kept-shadow")
    with b.machine(load_payload("smm"), svm=True) as m:
        runner.prepare_memory(m, case, m.payload)
        host_smm.install_handler(m, m.payload, {})
        obs = host_smm.drive_smm(m, case, m.payload, 5.0)
        saved = Vmcb(m.read(layout.HSAVE_GPA, 0x1000))
        l1 = obs.l1
    assert (saved["cr0"], saved["cr4"], saved["efer"]) == (
        hwstate.cr0(l1["pre_cr0"], kvm), hwstate.cr4(l1["pre_cr4"], kvm),
        hwstate.efer(l1["pre_efer"], kvm))
    assert not l1["pre_cr0"] & layout.CR0_WP  # L1 runs without WP ...
    assert bool(saved["cr0"] & layout.CR0_WP) is (not npt)  # ... shadow paging forces it
    assert saved["cr4"] & hwstate.CR4_MCE
    b.close()


def test_hwstate_is_what_kvm_writes():
    """svm_set_cr0/cr4/efer of Linux 6.1.192, 6.12.117 and 7.3.4."""
    npt, shadow = hwstate.KvmAmd(npt=True), hwstate.KvmAmd(npt=False)
    cd_nw = layout.CR0_CD | layout.CR0_NW
    assert hwstate.cr0(layout.L1_CR0 | cd_nw, npt) == layout.L1_CR0
    assert hwstate.cr0(layout.L1_CR0 & ~layout.CR0_WP, npt) == layout.L1_CR0 & ~layout.CR0_WP
    assert hwstate.cr0(layout.CR0_PE, shadow) == layout.CR0_PE | layout.CR0_PG | layout.CR0_WP
    assert hwstate.cr4(layout.L1_CR4, npt) == layout.L1_CR4 | hwstate.CR4_MCE
    assert hwstate.cr4(0, shadow) == layout.CR4_PAE | hwstate.CR4_MCE
    assert hwstate.efer(layout.L1_EFER, npt) == layout.L1_EFER | layout.EFER_SVME
    assert hwstate.efer(layout.L1_EFER, shadow) == (layout.L1_EFER | layout.EFER_SVME
                                                    | layout.EFER_NXE)
    assert hwstate.efer(layout.EFER_LME, shadow) == layout.EFER_SVME | layout.EFER_NXE
    assert hwstate.KvmAmd.from_params({"npt": "0"}) == shadow
    assert hwstate.KvmAmd.from_params({}) == npt


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

    def table(fields: dict) -> bytes:
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
