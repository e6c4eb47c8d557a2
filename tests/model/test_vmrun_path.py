"""The model's VMRUN path (kvmtest/model/svm.py) end to end, on the paths
and boundaries the catalogue does not reach on its own: which failure the
model says it modelled, nCR3 outside every memslot, VMCB12 in the last page
of guest memory, EVENTINJ after the #VMEXIT per profile, a VMRUN the CPU
refuses, L2's own VMMCALL, the MSR permission map's layout.

Expected values come from the APM and KVM's source as cited, and from the
kernels measured (kvmtest/model/profiles.py), not from the model's code.
"""

from __future__ import annotations

import dataclasses

import pytest

from kvmtest import layout, runner, vmcb12
from kvmtest.backends.model import ModelBackend
from kvmtest.case import GIF1, VMRUN, Case, vmexit
from kvmtest.cases import by_id
from kvmtest.exits import EmulationError
from kvmtest.model import checks, profiles
from kvmtest.model.svm import msrpm_bit
from kvmtest.observation import SYNC
from kvmtest.payloads import load_payload
from kvmtest.vmcb import (
    ATTR_CODE64,
    ATTR_CS_DB,
    EVTINJ_TYPE_EXEPT,
    EVTINJ_VALID,
    INTERCEPT_VMRUN,
    POISON,
    SVM_EXIT_ERR,
    SVM_EXIT_EXCP_BASE,
    SVM_EXIT_NPF,
    SVM_EXIT_SHUTDOWN,
    SVM_EXIT_VMMCALL,
    VMCB_SIZE,
    Vmcb,
)

pytestmark = pytest.mark.model

CASES = by_id()
ERR32 = SVM_EXIT_ERR & 0xFFFF_FFFF
# KVM's page-fault error code bits (arch/x86/include/asm/kvm_host.h).
PFERR_USER_MASK = 1 << 2
PFERR_FETCH_MASK = 1 << 4
PFERR_GUEST_FINAL_MASK = 1 << 32


def case(gif: str = GIF1, l2_entry: str = "l2_vmmcall", memory=None, **vmcb: int) -> Case:
    return Case(id="t", family="control", scenario=VMRUN, expect=vmexit(0), source="test",
                gif_mode=gif, vmcb=vmcb, l2_entry=l2_entry, memory=memory or {})


def drive(profile: str, c: Case, **params: str):
    """Run c on a fresh model; return the observation and the nested state."""
    b = ModelBackend(profile, kvm_amd_params=params or None)
    payload = load_payload(c.payload)
    with b.machine(payload, svm=True) as m:
        runner.prepare_memory(m, c, payload)
        obs = runner.drive(m, c, payload, 5.0)
        svm = m.svm
    b.close()
    return obs, svm


def assert_l1_back(obs) -> None:
    assert obs.outcome == SYNC, obs.detail
    assert (obs.gif, obs.guest_mode) == (False, False)
    for reg in ("rsp", "cr0", "cr3", "cr4", "efer", "rax", "rflags"):
        assert obs.l1[reg] == obs.l1[f"pre_{reg}"], reg


# ---- what the model says it modelled -------------------------------------------

FAILURES = [
    ("7.x", "control/asid0[gif1]", ("consistency", ["asid=0"])),
    ("7.x", "save/efer-svme0[gif1]", ("consistency", ["efer.svme=0"])),
    ("legacy", "save/lme-pg-cs-l-d[gif1]", ("hardware", ["CS.L && CS.D with long mode"])),
    ("fixed", "eventinj/type1[gif1]", ("hardware", ["invalid EVENTINJ"])),
    ("7.x", "eventinj/type1[gif1]", ("consistency", ["event_inj-invalid"])),
    ("7.x", "late/pae-pdptrs-unbacked[gif1]", ("late", ["PDPTRs not loadable"])),
    ("7.x", "late/msrpm-unbacked[gif1]", ("late", ["MSRPM not readable"])),
    ("7.x", "late/pae-cr3-above-maxphyaddr[gif1]", ("late", ["cr3 beyond MAXPHYADDR"])),
    ("7.x", "negative/control-asid0[gif1]", None),
]


@pytest.mark.parametrize(("profile", "case_id", "failure"), FAILURES,
                         ids=[f"{p}-{c}" for p, c, _ in FAILURES])
def test_the_model_names_the_failure_it_modelled(profile, case_id, failure):
    """NestedSvm.last_failure: which layer refused the VMRUN (KVM's checks,
    the CPU, or a late step) and why; what fuzzing and event scripts read."""
    _, svm = drive(profile, CASES[case_id])
    assert svm.last_failure == failure


# ---- nCR3 outside every memslot -------------------------------------------------

def test_unbacked_ncr3_is_a_nested_page_fault_on_7x():
    """7.x: L2's first fetch walks L1's NPT from nCR3 and fails:
    nested_svm_inject_npf_exit(), a fault on the final GPA of a user-mode
    instruction fetch, EXITINFO2 = L2's RIP (identity-mapped)."""
    obs, svm = drive("7.x", case(nested_ctl=1, nested_cr3=layout.UNBACKED_GPA))
    assert obs.exit_code == SVM_EXIT_NPF
    assert obs.exit_info_1 == PFERR_GUEST_FINAL_MASK | PFERR_USER_MASK | PFERR_FETCH_MASK
    assert obs.exit_info_2 == load_payload("vmrun").sym("l2_vmmcall")
    assert obs.exit_int_info == POISON & ~0xFFFF_FFFF
    assert_l1_back(obs)
    assert svm.last_failure == ("late", ["nested CR3 not mappable"])


def test_unbacked_ncr3_is_a_triple_fault_on_6x():
    """6.x: mmu_check_root() fails, KVM requests a triple fault, which L1's
    SHUTDOWN intercept turns into #VMEXIT(SHUTDOWN) (nested_svm_triple_fault)."""
    obs, _ = drive("fixed", case(nested_ctl=1, nested_cr3=layout.UNBACKED_GPA + 0x1000))
    assert (obs.exit_code, obs.exit_info_1, obs.exit_info_2) == (SVM_EXIT_SHUTDOWN, 0, 0)
    assert_l1_back(obs)


def test_ncr3_in_the_last_backed_page_is_mappable():
    """The NPT root must be backed as a whole: the last page of guest memory
    is.  With a copy of L1's PML4 there (identity map, as the negative
    control control-np-ncr3-above-maxphyaddr uses L1's own), L2 runs to its
    VMMCALL; one page further is outside the memslot."""
    last = layout.MEM_SIZE - 0x1000
    b = ModelBackend("fixed")
    with b.machine(load_payload("vmrun"), svm=True) as m:
        pml4 = m.read(layout.PML4_GPA, 0x1000)
    b.close()
    obs, svm = drive("fixed", case(memory={last: pml4}, nested_ctl=1, nested_cr3=last))
    assert (obs.exit_code, svm.last_failure) == (SVM_EXIT_VMMCALL, None)
    assert_l1_back(obs)
    _, svm = drive("fixed", case(nested_ctl=1, nested_cr3=layout.MEM_SIZE))
    assert svm.last_failure == ("late", ["nested CR3 not mappable"])


# ---- VMCB12 location -------------------------------------------------------------

@pytest.mark.parametrize("profile", ["fixed", "7.x"])
def test_vmcb12_in_the_last_page_of_guest_memory(profile):
    """VMRUN maps the whole 4 KiB VMCB12: the last backed page works."""
    payload = load_payload("vmrun")
    last = layout.MEM_SIZE - 0x1000
    image = vmcb12.prepare(payload, "l2_vmmcall", {}).to_bytes()
    c = dataclasses.replace(case(memory={last: image}), params={"vmrun_rax": last})
    b = ModelBackend(profile)
    with b.machine(payload, svm=True) as m:
        runner.prepare_memory(m, c, payload)
        obs = runner.drive(m, c, payload, 5.0)
        v = Vmcb(m.read(last, VMCB_SIZE))
    b.close()
    assert_l1_back(obs)
    assert obs.l1["rax"] == last
    assert (v["exit_code"], v["exit_info_1"], v["exit_info_2"]) == (SVM_EXIT_VMMCALL, 0, 0)


# ---- EVENTINJ after the #VMEXIT -----------------------------------------------------

@pytest.mark.parametrize(("profile", "left"), [("legacy", 0x1234 << 32), ("fixed", 0x1234 << 32),
                                               ("6.12-stable", 0), ("7.x", 0)])
def test_eventinj_after_l2_took_the_event(profile, left):
    """The CPU clears EVENTINJ.V once it delivered the event; 6.1 copies the
    rest of vmcb02's EVENTINJ back (its ERRORCODE half stays), 6.12 and 7.x
    write 0 on every #VMEXIT (profiles.py clear_event_inj_on_vmexit)."""
    obs, _ = drive(profile, CASES["eventinj/exept-gp-ec[gif1]"])
    assert (obs.exit_code, obs.event_inj) == (SVM_EXIT_VMMCALL, left)
    assert obs.l1["l2_event_vector"] == 13


def test_cpu_refused_vmrun_on_legacy():
    """Legacy kernels leave CS.L&&CS.D to the CPU: its VMRUN fails, writes
    VMEXIT_INVALID as 32 bits (QEMU TCG) and clears EVENTINJ; KVM reflects
    that without writing EXITINTINFO (the code is SVM_EXIT_ERR)."""
    inj = EVTINJ_VALID | EVTINJ_TYPE_EXEPT | 6
    obs, _ = drive("legacy", case(event_inj=inj, **{"cs.attrib": ATTR_CODE64 | ATTR_CS_DB}))
    assert (obs.exit_code, obs.exit_info_1, obs.exit_info_2) == (ERR32, 0, 0)
    assert (obs.event_inj, obs.exit_int_info) == (0, POISON)
    assert_l1_back(obs)


def test_cs_d_without_cs_l_is_compatibility_mode():
    """CS.D alone in long mode is a 32-bit compatibility-mode segment, not
    a failed check: L2 runs to its VMMCALL on every profile."""
    for profile in ("legacy", "7.x"):
        obs, svm = drive(profile, case(**{"cs.attrib": (ATTR_CODE64 & ~(1 << 9)) | ATTR_CS_DB}))
        assert obs.exit_code == SVM_EXIT_VMMCALL, (profile, svm.last_failure)
        assert_l1_back(obs)


# ---- L2's own instructions -----------------------------------------------------------

def test_l2_vmmcall_without_intercept_is_ud():
    """KVM never hands L2's VMMCALL to its hypercall handler: not intercepted
    by L1, it is #UD in L2 (here intercepted by L1 as an exception)."""
    obs, _ = drive("7.x", case(intercept_misc2=INTERCEPT_VMRUN, intercept_exceptions=1 << 6))
    assert (obs.exit_code, obs.exit_info_1) == (SVM_EXIT_EXCP_BASE + 6, 0)
    assert_l1_back(obs)


def test_no_resume_after_an_internal_error():
    """7.x: VMCB12 outside every memslot ends KVM_RUN with an internal
    error; the model will not pretend to carry on from there."""
    payload = load_payload("svm_insn")
    c = CASES["insn/vmrun-rax-unbacked"]
    b = ModelBackend("7.x")
    with b.machine(payload, svm=True) as m:
        runner.prepare_memory(m, c, payload)
        obs = runner.drive(m, c, payload, 5.0)
        again = m.run(1.0)
    b.close()
    assert obs.outcome == "internal_error"
    assert isinstance(again, EmulationError)
    assert again.message == "KVM_EXIT_INTERNAL_ERROR: VMCB12 not mappable"


# ---- the MSR permission map ---------------------------------------------------------

MSRPM_TABLE = [
    # (MSR, bit of its read intercept): APM vol. 2 15.11, the three 2 KiB
    # vectors at MSRPM bytes 0x000, 0x800, 0x1000, two bits per MSR.
    (0x0000_0000, 0), (0x0000_0001, 2), (0x0000_1FFF, 2 * 0x1FFF),
    (0xC000_0000, 8 * 0x800), (0xC000_0080, 8 * 0x800 + 2 * 0x80),
    (0xC000_1FFF, 8 * 0x800 + 2 * 0x1FFF),
    (0xC001_0000, 8 * 0x1000), (0xC001_1FFF, 8 * 0x1000 + 2 * 0x1FFF),
    (0x0000_2000, None), (0xBFFF_FFFF, None), (0xC000_2000, None), (0xC001_2000, None),
    (0xC000_FFFF, None), (0xFFFF_FFFF, None),
]


@pytest.mark.parametrize(("msr", "bit"), MSRPM_TABLE, ids=[hex(m) for m, _ in MSRPM_TABLE])
def test_msrpm_bit(msr, bit):
    assert msrpm_bit(msr) == bit


def test_tlb_ctl_check_of_older_kernels():
    """nested_svm_check_tlb_ctl() (5.13 until a484755ab252 reverted it):
    only DO_NOTHING and FLUSH_ALL_ASID pass.  No measured profile has it;
    the model keeps it for older kernels."""
    reject = dataclasses.replace(profiles.PROFILES["fixed"], tlb_ctl=profiles.TLB_CTL_REJECT)
    v = vmcb12.default_vmcb12(load_payload("vmrun"))
    for value, refused in ((0, False), (1, False), (3, True), (7, True), (2, True)):
        v["tlb_ctl"] = value
        got = checks.failed_control_checks(checks.Control12.from_vmcb(v), reject)
        assert got == (["tlb_ctl"] if refused else []), value
        assert checks.failed_control_checks(checks.Control12.from_vmcb(v),
                                            profiles.PROFILES["fixed"]) == []


def test_checks_take_a_bare_svm_flag():
    """failed_checks(..., ctx=bool): SVM in the guest CPUID or not.  Without
    SVM, EFER.SVME is a reserved bit (kvm_valid_efer)."""
    v = vmcb12.default_vmcb12(load_payload("vmrun"))
    fixed = profiles.PROFILES["fixed"]
    assert checks.failed_checks(v, fixed, True) == checks.failed_checks(v, fixed) == []
    assert checks.failed_checks(v, fixed, False) == ["efer-reserved"]


# ---- what the #VMEXIT writes into VMCB12's save area -----------------------------

def run_reading_vmcb12(profile: str, c: Case):
    b = ModelBackend(profile)
    payload = load_payload(c.payload)
    with b.machine(payload, svm=True) as m:
        runner.prepare_memory(m, c, payload)
        obs = runner.drive(m, c, payload, 5.0)
        v = Vmcb(m.read(layout.VMCB12_GPA, VMCB_SIZE))
        view = m.nested_state()
    b.close()
    return obs, v, view


def test_vmexit_saves_l2_s_state_into_vmcb12():
    """nested_svm_vmexit() copies L2's state into VMCB12's save area (APM
    15.6): after an L2 that only VMMCALLed, what VMRUN loaded, with DR6/DR7
    as KVM loaded them (| DR6_ACTIVE_LOW, | DR7_FIXED_1) and RIP at the
    intercepted VMMCALL.  KVM_GET_NESTED_STATE then reports no VMCB12."""
    dr6, dr7 = 0xFFFF_0FF1, 0x401  # B0, L0: bits of L2's own
    obs, v, view = run_reading_vmcb12("7.x", case(dr6=dr6 & ~0xFFFF_0FF0, dr7=1,
                                                  rflags=0x246, rax=0x1234))
    assert obs.exit_code == SVM_EXIT_VMMCALL
    assert (v["dr6"], v["dr7"]) == (dr6, dr7)
    assert (v["rip"], v["rflags"], v["rax"]) == (load_payload("vmrun").sym("l2_vmmcall"),
                                                 0x246, 0x1234)
    assert v["rsp"] == layout.L2_STACK_TOP
    assert v["efer"] & layout.EFER_SVME
    assert (view.flags, view.vmcb12_gpa) == (0, 0)


def test_intercepted_exception_saves_the_faulting_rip():
    """L2's unintercepted VMMCALL is #UD at the VMMCALL itself, not after it
    (KVM never emulates it as a hypercall for L2)."""
    _, v, _ = run_reading_vmcb12("7.x", case(intercept_misc2=INTERCEPT_VMRUN,
                                             intercept_exceptions=1 << 6))
    assert (v["exit_code"], v["rip"]) == (SVM_EXIT_EXCP_BASE + 6,
                                          load_payload("vmrun").sym("l2_vmmcall"))
    assert v["rax"] == 0  # VMCB12's RAX, not a hypercall's return value


def test_late_failure_writes_l2_s_state_back():
    """A late failure (PDPTRs not loadable) on every measured kernel: vmcb02
    already holds L2's state, and the full nested_svm_vmexit() writes it back
    into VMCB12 with VMEXIT_INVALID (RFLAGS with its fixed bit 1)."""
    c = CASES["late/pae-pdptrs-unbacked[gif1]"]
    c = dataclasses.replace(c, vmcb={**c.vmcb, "rflags": 0x244})
    obs, v, _ = run_reading_vmcb12("fixed", c)
    assert obs.exit_code == SVM_EXIT_ERR
    assert (v["rflags"], v["cr3"], v["rip"]) == (0x246, c.vmcb["cr3"],
                                                 load_payload("vmrun").sym(c.l2_entry))


# ---- late failures at their edges ------------------------------------------------

def test_msrpm_merge_reads_only_the_words_kvm_needs():
    """nested_svm_vmrun_msrpm() reads the MSRPM words of the MSRs L1 may
    access directly, all in the MSRPM's first page: a map whose second page
    is outside guest memory still merges; one that starts outside fails."""
    from kvmtest.vmcb import INTERCEPT_MSR_PROT, INTERCEPT_SHUTDOWN

    misc1 = INTERCEPT_MSR_PROT | INTERCEPT_SHUTDOWN
    obs, svm = drive("7.x", case(intercept_misc1=misc1, msrpm_base_pa=layout.MEM_SIZE - 0x1000))
    assert (obs.exit_code, svm.last_failure) == (SVM_EXIT_VMMCALL, None)
    obs, svm = drive("7.x", case(intercept_misc1=misc1, msrpm_base_pa=layout.MEM_SIZE))
    assert (obs.exit_code, svm.last_failure) == (SVM_EXIT_ERR, ("late", ["MSRPM not readable"]))


def test_pae_without_paging_loads_no_pdptrs():
    """CR4.PAE with CR0.PG=0 is not PAE paging (is_pae_paging()): KVM loads no
    PDPTRs, so a CR3 no memslot backs does not fail the VMRUN."""
    late = CASES["late/pae-pdptrs-unbacked[gif1]"]
    vmcb = {**late.vmcb, "cr0": late.vmcb["cr0"] & ~layout.CR0_PG}
    obs, svm = drive("7.x", dataclasses.replace(late, vmcb=vmcb))
    assert svm.last_failure is None
    assert obs.exit_code == SVM_EXIT_VMMCALL
    assert_l1_back(obs)


def test_l2_state_the_model_cannot_hold_is_said_not_guessed():
    """A null CS selector in VMCB12 (legal; the hidden state comes from the
    VMCB) is beyond the model: the run stops with an emulation error naming
    it instead of running L2 on made-up state."""
    obs, svm = drive("7.x", case(**{"cs.selector": 0}))
    assert obs.outcome == "emulation_error"
    assert obs.detail.startswith("VMRUN: null CS selector in VMCB12 (not modelled) at RIP ")
    assert not svm.guest_mode


def test_triple_fault_in_l2_leaves_the_vcpu_in_guest_mode_and_stopped():
    """6.x, nCR3 outside memory and no SHUTDOWN intercept: KVM_EXIT_SHUTDOWN
    with the vCPU still in guest mode; it cannot run again."""
    c = case(nested_ctl=1, nested_cr3=layout.MEM_SIZE, intercept_misc1=0)
    b = ModelBackend("fixed")
    payload = load_payload("vmrun")
    with b.machine(payload, svm=True) as m:
        runner.prepare_memory(m, c, payload)
        obs = runner.drive(m, c, payload, 5.0)
        view = m.nested_state()
        again = m.run(1.0)
    b.close()
    assert obs.outcome == "shutdown"
    assert view.guest_mode and view.vmcb12_gpa == layout.VMCB12_GPA
    assert isinstance(again, EmulationError) and again.message == "the vCPU is in shutdown state"


def test_injected_event_whose_delivery_faults_becomes_a_double_fault():
    """EVENTINJ #GP into an L2 whose IDT cannot hold vector 13: delivering
    it faults (#GP on the IDT limit), a contributory exception during a
    contributory one is #DF (error code 0), which L1 intercepts."""
    from kvmtest.vmcb import EVTINJ_VALID_ERR

    inj = EVTINJ_VALID | EVTINJ_TYPE_EXEPT | EVTINJ_VALID_ERR | 13
    obs, _ = drive("7.x", case(event_inj=inj, intercept_exceptions=1 << 8,
                               **{"idtr.limit": 0}))
    assert (obs.exit_code, obs.exit_info_1) == (SVM_EXIT_EXCP_BASE + 8, 0)
    assert_l1_back(obs)


# ---- vGIF: GIF restored by KVM_SET_NESTED_STATE -----------------------------------

@pytest.mark.parametrize(("flags", "insn", "runs"), [
    (None, "stgi", False), (0x100, "stgi", True), (0x100, "clgi", False)])
def test_vgif_stgi_intercept_follows_gif(flags, insn, runs):
    """7.x with vGIF keeps STGI/CLGI intercepted while EFER.SVME=0 (#UD);
    svm_set_gif(true), here from KVM_SET_NESTED_STATE restoring GIF=1, drops
    the STGI intercept (it only guards the GIF=0 window), so STGI then runs
    on the CPU, which checks no EFER.SVME.  CLGI stays intercepted."""
    from kvmtest import params
    from kvmtest.observation import EXCEPTION

    c = Case(id="t", family="insn", scenario="insn", expect=vmexit(0), source="test",
             payload="svm_insn", params={"flags": 0, "insn": params.INSNS.index(insn)},
             needs=frozenset({"svm"}))
    b = ModelBackend("7.x", kvm_amd_params={"vgif": "1"})
    payload = load_payload("svm_insn")
    with b.machine(payload, svm=True) as m:
        runner.prepare_memory(m, c, payload)
        if flags is not None:
            assert m.svm.set_nested_state(flags, 0, Vmcb()) == 0
        obs = runner.drive(m, c, payload, 5.0)
    b.close()
    if runs:
        assert (obs.outcome, obs.gif) == (SYNC, True), obs.detail
    else:
        assert (obs.outcome, obs.vector, obs.rip_symbol) == (EXCEPTION, 6, f"insn_{insn}")
