"""The model's VMRUN consistency checks against a table written from the AMD
APM vol. 2 15.5.1 ("Canonicalization and Consistency Checks") and KVM's
nested.c, independently of kvmtest/model/checks.py.

Each row: VMCB12 changes on top of the default valid VMCB12, whether KVM's
software checks reject it per profile (legacy, fixed, upstream), and where
the rule comes from.  MAXPHYADDR is the model's 40 bits.
"""

from __future__ import annotations

import pytest

from kvmtest import vmcb12
from kvmtest.model import checks, profiles
from kvmtest.payloads import load_payload

pytestmark = pytest.mark.model

L1_CR0 = 0x8001_0033  # PE MP ET NE WP PG
L1_CR4 = 0x620
L1_EFER = 0x1500  # LME LMA SVME
ALL = (True, True, True)  # rejected on legacy, fixed, upstream
NONE = (False, False, False)
UPSTREAM_ONLY = (False, False, True)
NOT_LEGACY = (False, True, True)

ROWS = [
    # (name, changes, rejected per (legacy, fixed, upstream), source)
    ("default", {}, NONE, "vmcb12.py: a valid VMCB12"),
    ("efer.svme=0", {"efer": 0x500}, ALL, "APM 15.5.1 EFER.SVME is zero"),
    ("cr0 cd=0 nw=1", {"cr0": L1_CR0 | 1 << 29}, ALL, "APM 15.5.1 CR0.CD=0 && CR0.NW=1"),
    ("cr0 cd=1 nw=1", {"cr0": L1_CR0 | 3 << 29}, NONE, "APM: legal CR0 cache combination"),
    ("cr0 cd=1 nw=0", {"cr0": L1_CR0 | 1 << 30}, NONE, "APM: legal CR0 cache combination"),
    ("cr0 bit 32", {"cr0": L1_CR0 | 1 << 32}, ALL, "APM 15.5.1 CR0[63:32] not zero"),
    ("cr0 bit 63", {"cr0": L1_CR0 | 1 << 63}, ALL, "APM 15.5.1 CR0[63:32] not zero"),
    ("cr3 bit 40", {"cr3": 1 << 40}, ALL, "APM 15.5.1 CR3 MBZ (long mode); KVM illegal GPA"),
    ("cr3 bit 39", {"cr3": 1 << 39}, NONE, "below MAXPHYADDR=40: legal"),
    ("cr3 bit 63", {"cr3": 1 << 63}, ALL, "APM 15.5.1 CR3 MBZ"),
    ("cr4 bit 15", {"cr4": L1_CR4 | 1 << 15}, ALL, "APM 15.5.1 CR4 MBZ; kvm_is_valid_cr4"),
    ("cr4 bit 12 (LA57, not in EPYC)", {"cr4": L1_CR4 | 1 << 12}, ALL,
     "kvm_is_valid_cr4: guest CPUID has no LA57"),
    ("cr4 bit 40", {"cr4": L1_CR4 | 1 << 40}, ALL, "APM 15.5.1 CR4 MBZ"),
    ("cr4 fsgsbase", {"cr4": L1_CR4 | 1 << 16}, NONE, "EPYC has FSGSBASE"),
    ("dr6 bit 32", {"dr6": 0xFFFF0FF0 | 1 << 32}, ALL, "APM 15.5.1 DR6[63:32]"),
    ("dr7 bit 63", {"dr7": 0x400 | 1 << 63}, ALL, "APM 15.5.1 DR7[63:32]"),
    ("efer bit 2", {"efer": L1_EFER | 1 << 2}, ALL, "APM 15.5.1 EFER MBZ"),
    ("efer bit 9", {"efer": L1_EFER | 1 << 9}, ALL, "APM 15.5.1 EFER MBZ"),
    ("efer bit 40", {"efer": L1_EFER | 1 << 40}, ALL, "APM 15.5.1 EFER MBZ"),
    ("efer nxe", {"efer": L1_EFER | 1 << 11}, NONE, "NXE is a valid EFER bit"),
    ("lme pg !pae", {"cr4": L1_CR4 & ~0x20}, ALL, "APM 15.5.1 LME && PG && !PAE"),
    ("lme pg !pe", {"cr0": L1_CR0 & ~1}, ALL, "APM 15.5.1 LME && PG && !PE"),
    ("cs.l && cs.d", {"cs.attrib": 0xA9B | 1 << 10}, NOT_LEGACY,
     "APM 15.5.1 LME&&PG&&PAE&&CS.L&&CS.D; KVM checks it since 'Add missing consistency "
     "check for EFER, CR0, CR4, and CS' (Debian 6.1.176 changelog; 6.1.192 nested.c)"),
    ("vmrun intercept clear", {"intercept_misc2": 0x2}, ALL, "APM 15.5.1 VMRUN intercept"),
    ("asid 0", {"asid": 0}, ALL, "APM 15.5.1 ASID = 0"),
    ("msrpm ends above maxphyaddr", {"msrpm_base_pa": (1 << 40) - 0x1000}, ALL,
     "nested_svm_check_bitmap_pa: base + 8 KiB - 1 illegal"),
    ("msrpm at the legal edge", {"msrpm_base_pa": (1 << 40) - 0x2000}, NONE,
     "nested_svm_check_bitmap_pa: last byte legal"),
    ("iopm ends above maxphyaddr", {"iopm_base_pa": (1 << 40) - 0x2000}, ALL,
     "nested_svm_check_bitmap_pa: base + 12 KiB - 1 illegal"),
    ("iopm at the legal edge", {"iopm_base_pa": (1 << 40) - 0x3000}, NONE,
     "nested_svm_check_bitmap_pa"),
    ("msrpm low bits ignored", {"msrpm_base_pa": 0x10FFF}, NONE,
     "bits 11:0 ignored (__nested_copy_vmcb_control_to_cache)"),
    ("np with ncr3 above maxphyaddr", {"nested_ctl": 1, "nested_cr3": 1 << 40},
     (False, True, True),
     "APM 15.25: nCR3 MBZ; 'KVM: nSVM: Add missing consistency check for nCR3 validity' "
     "(7.1, with the GIF fix in stable)"),
    ("np with legal ncr3", {"nested_ctl": 1, "nested_cr3": 0x4000}, NONE, "host has NPT"),
    ("eventinj type 1", {"event_inj": 1 << 31 | 1 << 8 | 32}, UPSTREAM_ONLY,
     "APM 15.20 reserved TYPE; KVM checks it from 7.1"),
    ("eventinj exception vector 2", {"event_inj": 1 << 31 | 3 << 8 | 2}, UPSTREAM_ONLY,
     "APM 15.20: NMI cannot be injected as an exception"),
    ("eventinj valid #GP", {"event_inj": 1 << 31 | 1 << 11 | 3 << 8 | 13}, NONE,
     "APM 15.20: legal injection"),
    ("eventinj not valid", {"event_inj": 3 << 8 | 2}, NONE, "V=0: ignored"),
    ("tlb_ctl 0x3 (flush asid)", {"tlb_ctl": 3}, NONE,
     "a484755ab252 reverted KVM's TLB_CTL check (6.7, stable); 7.1 masks"),
    ("tlb_ctl 0x80", {"tlb_ctl": 0x80}, NONE, "reserved encodings are not a VMRUN check"),
]

PROFILE_ORDER = ("legacy", "fixed", "7.x")


@pytest.mark.parametrize("name,changes,rejected,source", ROWS, ids=[r[0] for r in ROWS])
@pytest.mark.parametrize("index,profile", list(enumerate(PROFILE_ORDER)))
def test_check_table(name: str, changes: dict, rejected: tuple, source: str, index: int,
                     profile: str) -> None:
    v = vmcb12.default_vmcb12(load_payload("vmrun"))
    for field, value in changes.items():
        v[field] = value
    failed = checks.failed_checks(v, profiles.PROFILES[profile])
    assert bool(failed) == rejected[index], f"{name} ({source}): model says {failed}"


def test_every_model_check_has_a_row() -> None:
    """A check the model gains without a row here is untested."""
    covered = {
        "efer.svme=0", "cr0.cd=0&&nw=1", "cr0[63:32]", "dr6[63:32]", "dr7[63:32]",
        "lme&&pg&&!pae", "lme&&pg&&!pe", "cr3>maxphyaddr", "cr4-reserved", "efer-reserved",
        "lme&&pg&&cs.l&&cs.d", "vmrun-intercept", "asid=0", "np-without-host-npt",
        "msrpm>maxphyaddr", "iopm>maxphyaddr", "ncr3-illegal", "event_inj-invalid",
    }
    names = {c.name for c in checks.SAVE_CHECKS + checks.CONTROL_CHECKS}
    assert names == covered
    for c in checks.SAVE_CHECKS + checks.CONTROL_CHECKS:
        assert c.apm and c.kvm, f"{c.name} must cite the APM and KVM"


# ---- checks whose answer depends on the configuration or the guest CPUID ----

EV = 1 << 31
EXEPT = 3 << 8


def _ctx(npt: bool = True, **cpuid: bool) -> checks.Context:
    from kvmtest.model.cpuid import GuestCpu
    from kvmtest.model.hwstate import KvmAmd

    return checks.Context(GuestCpu.build(svm=True, overrides=cpuid), KvmAmd(npt=npt))


CONTEXT_ROWS = [
    # (name, changes, context, rejected per (legacy, fixed, upstream), source)
    ("np with npt=0", {"nested_ctl": 1, "nested_cr3": 0x4000}, _ctx(npt=False),
     (True, True, False),
     "6.1/6.12 __nested_vmcb_check_controls: NP_ENABLE && !npt_enabled; 7.x clears NP "
     "in __nested_copy_vmcb_control_to_cache"),
    ("np with npt=0, illegal ncr3", {"nested_ctl": 1, "nested_cr3": 1 << 40}, _ctx(npt=False),
     (True, True, False), "7.x: NP dropped before the nCR3 check"),
    ("np with npt=1, legal ncr3", {"nested_ctl": 1, "nested_cr3": 0x4000}, _ctx(),
     NONE, "the default configuration"),
    ("cr4 fsgsbase, cpuid without", {"cr4": L1_CR4 | 1 << 16}, _ctx(fsgsbase=False), ALL,
     "__kvm_is_valid_cr4: FSGSBASE reserved without the CPUID bit"),
    ("cr4 pcide, cpuid with pcid", {"cr4": L1_CR4 | 1 << 17}, _ctx(pcid=True), NONE,
     "__kvm_is_valid_cr4: PCIDE legal with PCID"),
    ("cr4 osxsave, cpuid without", {"cr4": L1_CR4 | 1 << 18}, _ctx(xsave=False), ALL,
     "__kvm_is_valid_cr4"),
    ("efer nxe, cpuid without nx", {"efer": L1_EFER | 1 << 11}, _ctx(nx=False), ALL,
     "__kvm_valid_efer: NX needs the CPUID bit"),
    ("efer ffxsr, cpuid with ffxsr", {"efer": L1_EFER | 1 << 14}, _ctx(ffxsr=True), ALL,
     "efer_reserved_bits: svm_hardware_setup opens FFXSR only with the host's FXSR_OPT "
     "(TCG's EPYC has none)"),
]
for _vec in (9, 15, 20, 21, 22, 27, 29, 31, 32, 0xFF):
    CONTEXT_ROWS.append((f"eventinj exception vector {_vec}", {"event_inj": EV | EXEPT | _vec},
                         _ctx(), UPSTREAM_ONLY,
                         "7.x nested_svm_event_inj_valid_exept: not a defined exception"))
for _vec in (0, 1, 3, 8, 13, 14, 17, 28, 30):
    CONTEXT_ROWS.append((f"eventinj exception vector {_vec}", {"event_inj": EV | EXEPT | _vec},
                         _ctx(), NONE, "a defined exception"))
for _type in (1, 5, 6, 7):
    CONTEXT_ROWS.append((f"eventinj type {_type}", {"event_inj": EV | _type << 8 | 0x30},
                         _ctx(), UPSTREAM_ONLY, "APM 15.20 reserved TYPE"))


@pytest.mark.parametrize("name,changes,ctx,rejected,source", CONTEXT_ROWS,
                         ids=[r[0] for r in CONTEXT_ROWS])
@pytest.mark.parametrize("index,profile", list(enumerate(PROFILE_ORDER)))
def test_check_table_in_context(name, changes, ctx, rejected, source, index, profile):
    v = vmcb12.default_vmcb12(load_payload("vmrun"))
    for field, value in changes.items():
        v[field] = value
    failed = checks.failed_checks(v, profiles.PROFILES[profile], ctx)
    assert bool(failed) == rejected[index], f"{name} ({source}): model says {failed}"


# The CPU's own VMRUN check of EVENTINJ where the older kernels leave it to
# the CPU: QEMU TCG's helper_vmrun (the CPU the kernels are measured on).
CPU_EVENT_ROWS = [
    (EV | 1 << 8 | 0x30, True), (EV | 7 << 8, True), (EV | EXEPT | 2, True),
    (EV | EXEPT | 31, True), (EV | EXEPT | 32, True), (EV | EXEPT | 15, False),
    (EV | EXEPT | 30, False), (EV | 2 << 8 | 0x30, False), (EV | 4 << 8 | 0x80, False),
    (EXEPT | 2, False),
]


@pytest.mark.parametrize("event,refused", CPU_EVENT_ROWS, ids=[hex(e) for e, _ in CPU_EVENT_ROWS])
def test_cpu_event_check(event, refused):
    assert checks.cpu_refuses_event(event) == refused


def test_a_vmcb12_fails_exactly_the_rules_it_breaks() -> None:
    """The list of failed checks names each broken APM rule once and no
    other: CS.L&&CS.D is a rule about long mode with PAE, so without PAE
    only LME&&PG&&!PAE fails."""
    v = vmcb12.default_vmcb12(load_payload("vmrun"))
    v["cs.attrib"] = 0xA9B | 1 << 10
    assert checks.failed_checks(v, profiles.PROFILES["7.x"]) == ["lme&&pg&&cs.l&&cs.d"]
    v["cr4"] = L1_CR4 & ~0x20
    assert checks.failed_checks(v, profiles.PROFILES["7.x"]) == ["lme&&pg&&!pae"]
    v["asid"] = 0
    v["efer"] = L1_EFER | 1 << 9
    assert checks.failed_checks(v, profiles.PROFILES["7.x"]) == [
        "lme&&pg&&!pae", "efer-reserved", "asid=0"]
