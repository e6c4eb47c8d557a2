"""The model backend end to end through runner.run_case(), with hand-made
cases (independent of the catalogue)."""

from __future__ import annotations

import errno

import pytest

from kvmtest import layout, params, vmcb, vmcb12
from kvmtest.backends.model import ModelBackend
from kvmtest.case import (
    GIF0,
    GIF1,
    INSN,
    NEED_NO_SVM,
    NEED_SVM,
    NO_FAULT,
    VMEXIT_INVALID,
    VMRUN,
    Case,
    vmexit,
)
from kvmtest.observation import (
    EMULATION_ERROR,
    EXCEPTION,
    KVM_STATE_NESTED_GIF_SET,
    KVM_STATE_NESTED_GUEST_MODE,
    SYNC,
    TIMEOUT,
    UNEXPECTED_EXIT,
)
from kvmtest.payloads import load_payload
from kvmtest.runner import run_case

pytestmark = pytest.mark.model

ERR = 0xFFFF_FFFF_FFFF_FFFF
SVM_ON = params.PF_SET_SVME | params.PF_SET_HSAVE


@pytest.fixture(scope="module", params=("legacy", "fixed", "7.x"))
def backend(request: pytest.FixtureRequest) -> ModelBackend:
    b = ModelBackend(request.param)
    yield b
    b.close()


@pytest.fixture(scope="module")
def upstream() -> ModelBackend:
    b = ModelBackend("7.x")
    yield b
    b.close()


def vmrun_case(gif: str = GIF1, l2_entry: str = "l2_vmmcall", **changes: int) -> Case:
    return Case(id="t", family="control", scenario=VMRUN, expect=VMEXIT_INVALID, source="test",
                gif_mode=gif, vmcb=changes, l2_entry=l2_entry)


def insn_case(insn: str, svm: bool, flags: int = 0, **extra: int) -> Case:
    p = {"flags": flags, "insn": params.INSNS.index(insn), "vmrun_rax": layout.VMCB12_GPA,
         "hsave_pa": layout.HSAVE_GPA, **extra}
    return Case(id="t", family="insn", scenario=INSN, expect=NO_FAULT, source="test",
                payload="svm_insn", params=p,
                needs=frozenset({NEED_SVM if svm else NEED_NO_SVM}))


def assert_l1_intact(l1: dict[str, int]) -> None:
    for reg in ("rsp", "cr0", "cr3", "cr4", "efer"):
        assert l1[reg] == l1[f"pre_{reg}"], reg


@pytest.mark.parametrize("gif", [GIF1, GIF0])
def test_valid_vmrun_runs_l2(backend: ModelBackend, gif: str) -> None:
    obs = run_case(backend, vmrun_case(gif))
    assert obs.outcome == SYNC, obs.detail
    assert (obs.exit_code, obs.exit_info_1, obs.exit_info_2) == (vmcb.SVM_EXIT_VMMCALL, 0, 0)
    # KVM writes the u32 EXITINTINFO (no event pending); EXITINTINFO_ERR,
    # the upper half, keeps VMCB12's poison (measured on every kernel).
    assert obs.exit_int_info == vmcb.POISON & ~0xFFFF_FFFF
    assert obs.gif is False and obs.guest_mode is False
    assert_l1_intact(obs.l1)
    assert obs.kernel_log_checked and obs.kernel_warnings == []


@pytest.mark.parametrize("gif", [GIF1, GIF0])
def test_consistency_failure(backend: ModelBackend, gif: str) -> None:
    obs = run_case(backend, vmrun_case(gif, asid=0))
    assert obs.outcome == SYNC, obs.detail
    assert (obs.exit_code, obs.exit_info_1, obs.exit_info_2) == (ERR, 0, 0)
    assert obs.exit_int_info == vmcb.POISON  # not written for VMEXIT_INVALID
    legacy_bug = backend.profile.name == "legacy" and gif == GIF1
    assert obs.gif is legacy_bug
    assert obs.guest_mode is False
    assert_l1_intact(obs.l1)


def test_event_inj_cleared_only_upstream(backend: ModelBackend) -> None:
    inj = vmcb.EVTINJ_VALID | vmcb.EVTINJ_TYPE_EXEPT | 13 | vmcb.EVTINJ_VALID_ERR
    obs = run_case(backend, vmrun_case(GIF1, asid=0, event_inj=inj))
    assert obs.exit_code == ERR
    assert obs.event_inj == (0 if backend.profile.name == "7.x" else inj)


@pytest.mark.parametrize("insn", ["vmrun", "vmload", "vmsave", "stgi", "clgi", "skinit",
                                  "invlpga"])
def test_no_svm_insn_ud(upstream: ModelBackend, insn: str) -> None:
    obs = run_case(upstream, insn_case(insn, svm=False))
    assert (obs.outcome, obs.vector, obs.error_code) == (EXCEPTION, 6, 0)
    assert obs.rip_symbol == f"insn_{insn}"


def test_no_svm_wrmsr_svme_gp(upstream: ModelBackend) -> None:
    obs = run_case(upstream, insn_case("wrmsr", svm=False, msr_index=0xC000_0080,
                                       msr_value=layout.L1_EFER | layout.EFER_SVME))
    assert (obs.outcome, obs.vector, obs.error_code, obs.rip_symbol) == (
        EXCEPTION, 13, 0, "insn_wrmsr")


def test_no_svm_wrmsr_efer_unchanged_ok(upstream: ModelBackend) -> None:
    obs = run_case(upstream, insn_case("wrmsr", svm=False, msr_index=0xC000_0080,
                                       msr_value=layout.L1_EFER))
    assert obs.outcome == SYNC, obs.detail
    # L1 reads EFER back after the WRMSR: exactly what it wrote (LMA included).
    assert obs.l1["stage"] == params.STAGE_AFTER_VMRUN
    assert obs.l1["efer"] == layout.L1_EFER


def test_wrmsr_efer_svme_with_svm_sets_it(upstream: ModelBackend) -> None:
    """With SVM in the guest CPUID, EFER.SVME is writable: L1 reads it back
    set, still outside guest mode with GIF=1 (no VMRUN ran)."""
    efer = layout.L1_EFER | layout.EFER_SVME
    obs = run_case(upstream, insn_case("wrmsr", svm=True, msr_index=0xC000_0080,
                                       msr_value=efer))
    assert obs.outcome == SYNC, obs.detail
    assert obs.l1["efer"] == efer
    assert (obs.gif, obs.guest_mode) == (True, False)


@pytest.mark.parametrize(("insn", "gif"), [("clgi", False), ("stgi", True)])
def test_clgi_stgi_set_gif(upstream: ModelBackend, insn: str, gif: bool) -> None:
    """CLGI clears GIF, STGI sets it (KVM_GET_NESTED_STATE's GIF_SET), both
    with EFER.SVME=1 and outside guest mode."""
    obs = run_case(upstream, insn_case(insn, svm=True, flags=SVM_ON))
    assert obs.outcome == SYNC, obs.detail
    assert (obs.gif, obs.guest_mode) == (gif, False)
    assert obs.l1["efer"] == layout.L1_EFER | layout.EFER_SVME


@pytest.mark.parametrize("insn", ["vmrun", "vmload", "vmsave", "stgi", "clgi", "invlpga"])
def test_svme0_ud(upstream: ModelBackend, insn: str) -> None:
    obs = run_case(upstream, insn_case(insn, svm=True, flags=params.PF_SET_HSAVE))
    assert (obs.outcome, obs.vector, obs.rip_symbol) == (EXCEPTION, 6, f"insn_{insn}")


@pytest.mark.parametrize("rax", [layout.VMCB12_GPA + 8, 1 << 40])
def test_vmrun_bad_rax_gp(upstream: ModelBackend, rax: int) -> None:
    obs = run_case(upstream, insn_case("vmrun", svm=True, flags=SVM_ON, vmrun_rax=rax))
    assert (obs.outcome, obs.vector, obs.error_code, obs.rip_symbol) == (
        EXCEPTION, 13, 0, "insn_vmrun")


@pytest.mark.parametrize("profile", ["6.12-stable", "7.x"])
def test_vmrun_unbacked_vmcb12(profile: str) -> None:
    """6.x: #GP; 7.x: KVM_EXIT_INTERNAL_ERROR (kvmtest/cases/insn.py)."""
    b = ModelBackend(profile)
    obs = run_case(b, insn_case("vmrun", svm=True, flags=SVM_ON, vmrun_rax=layout.UNBACKED_GPA))
    if profile == "7.x":
        assert (obs.outcome, obs.exit_data) == ("internal_error", [1, 0, 0x80, 0, 0, 0, 0])
    else:
        assert (obs.outcome, obs.vector, obs.rip_symbol) == (EXCEPTION, 13, "insn_vmrun")
    b.close()


def test_vmmcall_in_l1_is_a_hypercall(upstream: ModelBackend) -> None:
    """KVM always intercepts L1's VMMCALL (kvm_emulate_hypercall)."""
    obs = run_case(upstream, insn_case("vmmcall", svm=True, flags=SVM_ON))
    assert obs.outcome == SYNC, obs.detail
    # RAX is the hypercall's return value: no hypercall number the payload
    # can have is known, so -KVM_ENOSYS (include/uapi/linux/kvm_para.h).
    assert obs.l1["rax"] == (-1000) & (2**64 - 1)
    assert (obs.gif, obs.guest_mode) == (True, False)


def test_spin_times_out(upstream: ModelBackend) -> None:
    case = Case(id="t", family="insn", scenario=INSN, expect=NO_FAULT, source="test",
                payload="spin", needs=frozenset({NEED_NO_SVM}))
    obs = run_case(upstream, case, timeout=0.1)
    assert obs.outcome == TIMEOUT


def _l2(upstream: ModelBackend, entry: str, memory: dict | None = None, **changes: int):
    case = Case(id="t", family="negative", scenario=VMRUN, expect=vmexit(0), source="test",
                gif_mode=GIF1, vmcb={"intercept_misc2": vmcb.INTERCEPT_VMRUN
                                     | vmcb.INTERCEPT_VMMCALL, **changes},
                l2_entry=entry, memory=memory or {})
    obs = run_case(upstream, case)
    assert obs.outcome == SYNC, obs.detail
    assert obs.gif is False and obs.guest_mode is False
    assert_l1_intact(obs.l1)
    return obs


def test_l2_hlt_intercept(upstream: ModelBackend) -> None:
    obs = _l2(upstream, "l2_hlt", intercept_misc1=vmcb.INTERCEPT_HLT)
    assert obs.exit_code == vmcb.SVM_EXIT_HLT


def test_l2_ioio_intercept(upstream: ModelBackend) -> None:
    iopm = {layout.IOPM_GPA + 0x80 // 8: b"\x01"}
    obs = _l2(upstream, "l2_ioio", memory=iopm, intercept_misc1=vmcb.INTERCEPT_IOIO_PROT)
    payload = load_payload("vmrun")
    out_rip = payload.sym("l2_ioio") + 4  # mov dx, 0x80 is 4 bytes
    assert obs.exit_code == vmcb.SVM_EXIT_IOIO
    assert obs.exit_info_1 == 0x80 << 16 | 1 << 4 | 1 << 9  # port, SZ8, A64, OUT
    assert obs.exit_info_2 == out_rip + 1


def test_l2_ioio_not_in_iopm_goes_to_host(upstream: ModelBackend) -> None:
    case = Case(id="t", family="negative", scenario=VMRUN, expect=vmexit(0), source="test",
                gif_mode=GIF1, vmcb={"intercept_misc1": vmcb.INTERCEPT_IOIO_PROT},
                l2_entry="l2_ioio")
    obs = run_case(upstream, case)
    assert obs.outcome == UNEXPECTED_EXIT and "port=128" in obs.detail


def test_l2_msr_intercept(upstream: ModelBackend) -> None:
    # EFER (0xC0000080) read bit: second MSRPM range at 0x800, 2 bits per MSR.
    bit = 0x800 * 8 + 2 * 0x80
    msrpm = {layout.MSRPM_GPA + bit // 8: bytes([1 << (bit % 8)])}
    obs = _l2(upstream, "l2_rdmsr", memory=msrpm, intercept_misc1=vmcb.INTERCEPT_MSR_PROT)
    assert (obs.exit_code, obs.exit_info_1) == (vmcb.SVM_EXIT_MSR, 0)


def test_l2_msr_not_intercepted_reads_l2_efer(upstream: ModelBackend) -> None:
    obs = _l2(upstream, "l2_rdmsr", intercept_misc1=vmcb.INTERCEPT_MSR_PROT)
    assert obs.exit_code == vmcb.SVM_EXIT_VMMCALL


def test_l2_exception_intercept(upstream: ModelBackend) -> None:
    obs = _l2(upstream, "l2_ud", intercept_exceptions=1 << 6)
    assert obs.exit_code == vmcb.SVM_EXIT_EXCP_BASE + 6


def test_l2_32bit_pae(upstream: ModelBackend) -> None:
    """L2 in legacy PAE paging (the late-failure negative control)."""
    pdpt, pd = layout.L2_PAGING_GPA, layout.L2_PAGING_GPA + 0x1000
    tables = {pdpt: (pd | 1).to_bytes(8, "little"),
              pd: b"".join(((i << 21) | 0x83).to_bytes(8, "little") for i in range(512))}
    obs = _l2(upstream, "l2_vmmcall32", memory=tables, efer=layout.EFER_SVME,
              cr0=layout.L1_CR0, cr3=pdpt, cr4=layout.L1_CR4,
              **{"cs.attrib": 0xC9B, "ss.attrib": 0xC93, "ds.attrib": 0xC93,
                 "es.attrib": 0xC93})
    assert obs.exit_code == vmcb.SVM_EXIT_VMMCALL


def test_late_pdptr_failure_clears_gif_everywhere(backend: ModelBackend) -> None:
    obs = run_case(backend, vmrun_case(GIF1, "l2_vmmcall32", efer=layout.EFER_SVME,
                                       cr3=layout.UNBACKED_GPA, cr4=layout.L1_CR4,
                                       **{"cs.attrib": 0xC9B}))
    assert (obs.outcome, obs.exit_code, obs.exit_info_1, obs.exit_info_2) == (SYNC, ERR, 0, 0)
    assert obs.gif is False
    assert_l1_intact(obs.l1)


def test_cs_l_d_fails_on_every_profile(backend: ModelBackend) -> None:
    """fixed/upstream check it in software; legacy hands it to the CPU, whose
    VMRUN fails and is reflected through nested_svm_vmexit (GIF cleared).  The
    model's CPU is QEMU TCG's, which writes VMEXIT_INVALID as 32 bits."""
    obs = run_case(backend, vmrun_case(GIF1, **{"cs.attrib": vmcb.ATTR_CODE64 | 1 << 10}))
    code = ERR & 0xFFFF_FFFF if backend.profile.name == "legacy" else ERR
    assert (obs.exit_code, obs.gif) == (code, False)


def _bad(upstream: ModelBackend, which: int):
    case = Case(id="t", family="insn", scenario=INSN, expect=NO_FAULT, source="test",
                payload="model_bad", params={"insn": which}, needs=frozenset({NEED_NO_SVM}))
    return run_case(upstream, case, timeout=2)


def test_bad_jump_to_unbacked(upstream: ModelBackend) -> None:
    obs = _bad(upstream, 0)
    assert obs.outcome == EMULATION_ERROR
    assert "fetch from unbacked GPA 0x30000000" in obs.detail


def test_bad_unknown_instruction(upstream: ModelBackend) -> None:
    obs = _bad(upstream, 1)
    assert obs.outcome == EMULATION_ERROR
    assert "62 f1 7d 48 ef c0" in obs.detail and "bad_insn" in obs.detail


def test_bad_mmio_write(upstream: ModelBackend) -> None:
    obs = _bad(upstream, 2)
    assert obs.outcome == UNEXPECTED_EXIT and "MmioExit(phys_addr=805306368" in obs.detail


def test_divide_error_through_idt(upstream: ModelBackend) -> None:
    obs = _bad(upstream, 3)
    assert (obs.outcome, obs.vector, obs.error_code) == (EXCEPTION, 0, 0)
    assert obs.rip_symbol == "bad_div+0x2"


def test_ud2_through_idt(upstream: ModelBackend) -> None:
    obs = _bad(upstream, 4)
    assert (obs.outcome, obs.vector, obs.rip_symbol) == (EXCEPTION, 6, "bad_ud2")


def test_deterministic_across_instances() -> None:
    cases = [vmrun_case(GIF1), vmrun_case(GIF0, asid=0), insn_case("clgi", svm=False)]
    a, b = ModelBackend(), ModelBackend()
    first = [run_case(a, c).to_json() for c in cases]
    again = [run_case(a, c).to_json() for c in cases]
    fresh = [run_case(b, c).to_json() for c in reversed(cases)][::-1]
    assert first == again == fresh


def test_set_nested_state_requires_svme(upstream: ModelBackend) -> None:
    """svm_set_nested_state() itself: guest mode needs EFER.SVME (the Machine
    wrapper sets SVME from the host side first, as the kvm backend does)."""
    payload = load_payload("vmrun")
    with upstream.machine(payload, svm=True) as m:
        blob = vmcb12.prepare(payload, "l2_vmmcall", {})
        assert m.svm.set_nested_state(KVM_STATE_NESTED_GUEST_MODE, layout.VMCB12_GPA,
                                      blob) == errno.EINVAL
        assert m.nested_state().flags == KVM_STATE_NESTED_GIF_SET


def test_set_nested_state_accepts_valid_state_after_svme(upstream: ModelBackend) -> None:
    payload = load_payload("vmrun")
    case = vmrun_case(GIF1)
    with upstream.machine(payload, svm=True) as m:
        from kvmtest.runner import prepare_memory
        prepare_memory(m, case, payload)
        m.run(5)  # SYNC after VMRUN: EFER.SVME is set now
        v = vmcb12.prepare(payload, "l2_vmmcall", {})
        flags = KVM_STATE_NESTED_GUEST_MODE | KVM_STATE_NESTED_GIF_SET
        assert m.set_nested_state(flags, layout.VMCB12_GPA, v.to_bytes()) == 0
        view = m.nested_state()
        assert view.guest_mode and view.gif and view.vmcb12_gpa == layout.VMCB12_GPA
        bad = vmcb12.prepare(payload, "l2_vmmcall", {"asid": 0})
        assert m.set_nested_state(flags, layout.VMCB12_GPA, bad.to_bytes()) == errno.EINVAL
