"""KVM_SET_NESTED_STATE: the whole validation matrix, and GET->SET round trips.

KVM validates a nested state in two places: the generic ioctl
(x86.c kvm_arch_vcpu_ioctl, KVM_SET_NESTED_STATE: size at least the header,
known flags, RUN_PENDING only with GUEST_MODE) and svm_set_nested_state()
(nested.c: SVM format, SVM flags, EFER.SVME, SMM, vmcb_pa, size of the VMCB,
__nested_vmcb_check_controls on the control area, L2's current CR0, and L1's
saved state: CR0.PG, CR0.PE, RFLAGS.VM and __nested_vmcb_check_save).  Every
refusal is EINVAL, and L1 must still run afterwards: the host then lets it
VMRUN the default VMCB12 (runner.set_nested_state).

The request is data (Case.nested, kvmtest.nested_request): the VMCB12
changes go into the blob (control area: VMCB12's; save area: L1's state),
the nested keys into the header and the host's preparation.  Where kernels
differ the profiles say so, from the sources of Linux 6.1 (Debian 6.1.192),
6.12 (6.12.117) and 7.3 (7.3.4) and from the kernels measured.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from .. import layout, params
from .. import nested_request as nr
from ..case import (
    ACCEPTED,
    EINVAL,
    NEED_NESTED_STATE,
    NEED_NPT,
    NEED_SMM,
    NEED_SVM,
    SCRIPT,
    SET_NESTED_STATE,
    Case,
    Expect,
    vmexit,
)
from ..vmcb import (
    ATTR_CS_DB,
    EVTINJ_TYPE_EXEPT,
    EVTINJ_VALID,
    INTERCEPT_VMMCALL,
    NESTED_CTL_NP_ENABLE,
    SVM_EXIT_VMMCALL,
)
from ..vmcb12 import DR6_INIT, DR7_INIT

KVM = "KVM nested.c svm_set_nested_state"
X86 = "KVM x86.c kvm_arch_vcpu_ioctl(KVM_SET_NESTED_STATE)"
ACCEPTED_L1 = Expect("accepted_l1")
EFER = layout.L1_EFER | layout.EFER_SVME
CR0 = layout.L1_CR0
CR4 = layout.L1_CR4
CS_ATTR = 0xA9B
GM_GIF = nr.GUEST_MODE | nr.GIF_SET
# Checks only newer kernels make (sources: 6.1.192, 6.12.117, 7.3.4).
SINCE_7 = {"legacy": ACCEPTED, "fixed": ACCEPTED, "7.x": EINVAL}
SINCE_FIXED = {"legacy": ACCEPTED, "fixed": EINVAL, "7.x": EINVAL}


@dataclass(frozen=True)
class Row:
    name: str
    why: str
    vmcb: Mapping[str, int] = field(default_factory=dict)
    nested: Mapping[str, int] = field(default_factory=dict)
    expect: Expect = EINVAL
    profiles: Mapping[str, Expect] = field(default_factory=dict)
    needs: frozenset[str] = frozenset()
    control: str = "nested_state/valid"  # the request minus the defect


def rows(maxphyaddr: int) -> list[Row]:
    top = 1 << maxphyaddr
    return [
        # Kept from the first catalogue: control area and L1 state.
        Row("asid0", f"{KVM}: control: ASID 0 (__nested_vmcb_check_controls)", {"asid": 0}),
        Row("vmrun-intercept0", f"{KVM}: control: VMRUN intercept clear "
            "(__nested_vmcb_check_controls)", {"intercept_misc2": INTERCEPT_VMMCALL}),
        Row("l1-efer-svme0", f"{KVM}: save (L1 host state): EFER.SVME clear "
            "(__nested_vmcb_check_save)", {"efer": layout.L1_EFER}),
        Row("l1-cr0-pg0", f"{KVM}: save (L1 host state): CR0.PG clear",
            {"cr0": CR0 & ~layout.CR0_PG}),
        # The header.
        Row("format-vmx", f"{KVM}: format != KVM_STATE_NESTED_FORMAT_SVM",
            nested={"format": nr.FORMAT_VMX}),
        Row("format-unknown", f"{KVM}: format != KVM_STATE_NESTED_FORMAT_SVM",
            nested={"format": 2}),
        Row("flags-evmcs", f"{KVM}: flags beyond GUEST_MODE|RUN_PENDING|GIF_SET (EVMCS)",
            nested={"flags": GM_GIF | nr.EVMCS}),
        Row("flags-mtf-pending", f"{KVM}: flags beyond GUEST_MODE|RUN_PENDING|GIF_SET "
            "(MTF_PENDING)", nested={"flags": GM_GIF | nr.MTF_PENDING}),
        Row("flags-unknown", f"{X86}: unknown flag bit", nested={"flags": GM_GIF | 0x8000}),
        Row("flags-run-pending-no-guest-mode", f"{X86}: RUN_PENDING without GUEST_MODE",
            nested={"flags": nr.RUN_PENDING | nr.GIF_SET}),
        Row("size-below-header", f"{X86}: size < sizeof(struct kvm_nested_state)",
            nested={"size": nr.HEADER_SIZE - 8}),
        Row("size-header-only", f"{KVM}: guest mode, size < header + "
            "KVM_STATE_NESTED_SVM_VMCB_SIZE", nested={"size": nr.HEADER_SIZE}),
        Row("size-vmcb-short", f"{KVM}: guest mode, size < header + "
            "KVM_STATE_NESTED_SVM_VMCB_SIZE", nested={"size": nr.FULL_SIZE - 1}),
        # EFER.SVME of the vCPU.
        Row("svme0-guest-mode", f"{KVM}: EFER.SVME=0 allows no guest mode",
            nested={"svme": 0}, control="negative/nested-state-svme0-gif1"),
        # 7.x accepts GIF=0 without SVME ("clearing SVME does NOT set GIF");
        # 6.1 and 6.12 want exactly GIF_SET.  A CPU can be there (CLGI, then
        # EFER.SVME cleared), so accepting it is the contract.
        Row("svme0-gif0", f"{KVM}: EFER.SVME=0 with neither GIF nor guest mode",
            nested={"svme": 0, "flags": 0}, expect=ACCEPTED_L1,
            profiles={"legacy": EINVAL, "fixed": EINVAL, "7.x": ACCEPTED_L1},
            control="negative/nested-state-svme0-gif1"),
        # SMM.
        Row("smm-guest-mode", f"{KVM}: SMM temporarily disables SVM, no guest mode in SMM",
            nested={"smm": 1}, needs=frozenset({NEED_SMM}),
            control="negative/nested-state-smm-gif1"),
        # vmcb_pa: page_address_valid() only (aligned, below MAXPHYADDR).
        Row("vmcb-pa-unaligned", f"{KVM}: vmcb_pa not page aligned (page_address_valid)",
            nested={"vmcb_pa": layout.VMCB12_GPA + 0x10}),
        Row("vmcb-pa-above-maxphyaddr", f"{KVM}: vmcb_pa above MAXPHYADDR "
            "(page_address_valid)", nested={"vmcb_pa": top}),
        # Legal but unbacked: page_address_valid() does not map it, so KVM
        # takes it; only the #VMEXIT would need it (see unmap/*).
        Row("vmcb-pa-unbacked", f"{KVM}: vmcb_pa legal but unbacked (page_address_valid "
            "does not map it)", nested={"vmcb_pa": layout.UNBACKED_GPA}, expect=ACCEPTED),
        # L2's CR0 is the vCPU's: KVM_SET_SREGS already refuses CD=0,NW=1
        # (kvm_is_valid_cr0), so the defect cannot reach svm_set_nested_state.
        Row("l2-cr0-cd0-nw1", f"{KVM}: L2 CR0.CD=0 && CR0.NW=1 (and x86.c "
            "kvm_is_valid_sregs before it)", nested={"l2_cr0": CR0 | layout.CR0_NW}),
        # L1's saved state: svm_set_nested_state's own checks ...
        Row("l1-cr0-pe0", f"{KVM}: save (L1): CR0.PE clear", {"cr0": CR0 & ~layout.CR0_PE}),
        Row("l1-rflags-vm", f"{KVM}: save (L1): RFLAGS.VM set",
            {"rflags": layout.L1_RFLAGS | 1 << 17}),
        # ... and every __nested_vmcb_check_save defect.
        Row("l1-cr0-cd0-nw1", f"{KVM}: save (L1): CR0.CD=0 && CR0.NW=1 "
            "(__nested_vmcb_check_save)", {"cr0": CR0 | layout.CR0_NW}),
        Row("l1-cr0-hi-bit32", f"{KVM}: save (L1): CR0[63:32] (__nested_vmcb_check_save)",
            {"cr0": CR0 | 1 << 32}),
        Row("l1-dr6-hi", f"{KVM}: save (L1): DR6[63:32] (kvm_dr6_valid)",
            {"dr6": DR6_INIT | 1 << 32}),
        Row("l1-dr7-hi", f"{KVM}: save (L1): DR7[63:32] (kvm_dr7_valid)",
            {"dr7": DR7_INIT | 1 << 32}),
        Row("l1-lme-pg-pae0", f"{KVM}: save (L1): EFER.LME && CR0.PG && !CR4.PAE "
            "(__nested_vmcb_check_save)", {"cr4": CR4 & ~layout.CR4_PAE}),
        Row("l1-cr3-above-maxphyaddr", f"{KVM}: save (L1): CR3 above MAXPHYADDR in long "
            "mode (__nested_vmcb_check_save)", {"cr3": layout.L1_CR3 | top}),
        # Debian 6.1.176 added the CS.L && CS.D check; 6.1.170 has none.
        Row("l1-cs-l-d", f"{KVM}: save (L1): EFER.LME && CR0.PG && CS.L && CS.D "
            "(__nested_vmcb_check_save)", {"cs.attrib": CS_ATTR | ATTR_CS_DB},
            profiles=SINCE_FIXED),
        Row("l1-cr4-rsvd", f"{KVM}: save (L1): CR4 reserved bit 15 (__kvm_is_valid_cr4)",
            {"cr4": CR4 | 1 << 15}),
        Row("l1-efer-rsvd", f"{KVM}: save (L1): EFER reserved bit 2 (kvm_valid_efer)",
            {"efer": EFER | 1 << 2}),
        # Linux 7.x: (save->efer & EFER_LMA) && !(save->efer & EFER_LME).
        Row("l1-efer-lma-no-lme", f"{KVM}: save (L1): EFER.LMA without EFER.LME (7.x)",
            {"efer": (EFER & ~layout.EFER_LME) | layout.EFER_LMA}, profiles=SINCE_7),
        # The control area: the other __nested_vmcb_check_controls checks.
        Row("msrpm-above-maxphyaddr", f"{KVM}: control: MSRPM above MAXPHYADDR "
            "(nested_svm_check_bitmap_pa)", {"msrpm_base_pa": top}),
        Row("iopm-above-maxphyaddr", f"{KVM}: control: IOPM above MAXPHYADDR "
            "(nested_svm_check_bitmap_pa)", {"iopm_base_pa": top}),
        # Needs npt=1: without NPT, NP_ENABLE alone is refused on every kernel.
        Row("np-ncr3-above-maxphyaddr", f"{KVM}: control: nCR3 illegal with NP_ENABLE",
            {"nested_ctl": NESTED_CTL_NP_ENABLE, "nested_cr3": top}, profiles=SINCE_FIXED,
            needs=frozenset({NEED_NPT}), control="negative/nested-state-np-ncr3-legal"),
        Row("eventinj-exept-nmi", f"{KVM}: control: EVENTINJ exception with vector 2 "
            "(EVENTINJ validity, 7.x)",
            {"event_inj": EVTINJ_VALID | EVTINJ_TYPE_EXEPT | 2}, profiles=SINCE_7),
    ]


def controls() -> list[Row]:
    return [
        Row("valid", f"negative control of nested_state/*: {KVM}", expect=ACCEPTED),
        Row("svme0-gif1", f"negative control: {KVM}: EFER.SVME=0 with exactly GIF_SET",
            nested={"svme": 0, "flags": nr.GIF_SET}, expect=ACCEPTED_L1),
        Row("smm-gif1", f"negative control: {KVM}: in SMM without guest mode",
            nested={"smm": 1, "flags": nr.GIF_SET}, expect=ACCEPTED_L1,
            needs=frozenset({NEED_SMM})),
        Row("np-ncr3-legal", f"negative control: {KVM}: NP_ENABLE with a legal nCR3",
            {"nested_ctl": NESTED_CTL_NP_ENABLE, "nested_cr3": layout.PML4_GPA},
            expect=ACCEPTED, needs=frozenset({NEED_NPT})),
    ]


def cases(maxphyaddr: int = 40) -> Iterator[Case]:
    base = frozenset({NEED_SVM, NEED_NESTED_STATE})
    ids = {r.name: f"nested_state/{r.name}" for r in rows(maxphyaddr)}
    for r in rows(maxphyaddr):
        yield Case(id=ids[r.name], family="nested_state", scenario=SET_NESTED_STATE,
                   expect=r.expect, profiles=r.profiles, source=r.why, vmcb=r.vmcb,
                   nested=r.nested, needs=base | r.needs)
    for r in controls():
        cid = "nested_state/valid" if r.name == "valid" else f"negative/nested-state-{r.name}"
        of = next((ids[x.name] for x in rows(maxphyaddr) if x.control == cid), None)
        yield Case(id=cid, family="negative", scenario=SET_NESTED_STATE, expect=r.expect,
                   source=r.why, vmcb=r.vmcb, nested=r.nested, needs=base | r.needs,
                   control_of=of)


# GET -> SET round trips: the state KVM hands out must be taken back, and L2
# must go on from it.  Payload pause.S: L2 stops twice (STAGE_HOST_ACTION,
# then STAGE_L2_PAUSE), an SMI handler stops once in SMM (STAGE_SMM).
ROUNDTRIP = "KVM nested.c svm_get_nested_state/svm_set_nested_state"
ROUND_TRIPS = (
    ("in-l2", {params.STAGE_HOST_ACTION: (), params.STAGE_L2_PAUSE: ("nested_roundtrip",)},
     frozenset(), f"{ROUNDTRIP}: the state of a vCPU in L2"),
    # After an SMI in L2 and RSM (svm_leave_smm re-entered L2), at L2's next exit.
    ("after-rsm", {params.STAGE_HOST_ACTION: ("smi",), params.STAGE_SMM: (),
                   params.STAGE_L2_PAUSE: ("nested_roundtrip",)},
     frozenset({NEED_SMM}), f"{ROUNDTRIP}; svm.c svm_leave_smm: L2 after RSM"),
    # In SMM entered from L2: no guest mode, the VMCB12 GPA lives in SMRAM.
    ("in-smm", {params.STAGE_HOST_ACTION: ("smi",), params.STAGE_SMM: ("nested_roundtrip",),
                params.STAGE_L2_PAUSE: ()},
     frozenset({NEED_SMM}), f"{ROUNDTRIP}; svm.c svm_enter_smm: SMM entered from L2"),
)


def roundtrip_cases() -> Iterator[Case]:
    for name, on_sync, needs, why in ROUND_TRIPS:
        bad = f"nested_state/roundtrip-{name}"
        plain = {stage: tuple(a for a in acts if a != "nested_roundtrip")
                 for stage, acts in on_sync.items()}
        common = dict(scenario=SCRIPT, payload="pause", l2_entry="l2_pause",
                      expect=vmexit(SVM_EXIT_VMMCALL),
                      needs=frozenset({NEED_SVM, NEED_NESTED_STATE}) | needs)
        yield Case(id=bad, family="nested_state", source=why, on_sync=on_sync, **common)
        yield Case(id=f"negative/nested-state-roundtrip-{name}", family="negative",
                   source=f"negative control of {bad}: the same stops without the round trip",
                   on_sync=plain, control_of=bad, **common)
