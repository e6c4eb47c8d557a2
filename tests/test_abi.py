"""ABI tables checked against their sources of truth, without /dev/kvm.

The model reads and writes VMCBs through kvmtest.vmcb's table, so a wrong
offset there stays self-consistent on the model; only a real kernel would
notice.  These tables are written out here independently -- the VMCB from the
AMD APM vol. 2 appendix B (tables B-1 and B-2), the KVM constants from the
system's <linux/kvm.h> through the cffi build -- so the fast tier notices too.
"""

from __future__ import annotations

import itertools

import pytest

from kvmtest import exits, observation, ucall, vmcb
from kvmtest.kvm import lib

# APM vol. 2, table B-1 (control area): field -> (offset, size in bytes).
APM_CONTROL = {
    "intercept_cr": (0x000, 4), "intercept_dr": (0x004, 4),
    "intercept_exceptions": (0x008, 4), "intercept_misc1": (0x00C, 4),
    "intercept_misc2": (0x010, 4), "intercept_misc3": (0x014, 4),
    "pause_filter_thresh": (0x03C, 2), "pause_filter_count": (0x03E, 2),
    "iopm_base_pa": (0x040, 8), "msrpm_base_pa": (0x048, 8), "tsc_offset": (0x050, 8),
    "asid": (0x058, 4), "tlb_ctl": (0x05C, 1), "int_ctl": (0x060, 4),
    "int_vector": (0x064, 4), "int_state": (0x068, 4), "exit_code": (0x070, 8),
    "exit_info_1": (0x078, 8), "exit_info_2": (0x080, 8), "exit_int_info": (0x088, 8),
    "nested_ctl": (0x090, 8), "avic_vapic_bar": (0x098, 8), "ghcb_gpa": (0x0A0, 8),
    "event_inj": (0x0A8, 8), "nested_cr3": (0x0B0, 8), "virt_ext": (0x0B8, 8),
    "clean": (0x0C0, 4), "next_rip": (0x0C8, 8), "insn_len": (0x0D0, 1),
}
# APM vol. 2, table B-2 (state save area, offsets from the VMCB start = 0x400 + x).
APM_SAVE = {
    "cpl": (0x4CB, 1), "efer": (0x4D0, 8), "cr4": (0x548, 8), "cr3": (0x550, 8),
    "cr0": (0x558, 8), "dr7": (0x560, 8), "dr6": (0x568, 8), "rflags": (0x570, 8),
    "rip": (0x578, 8), "rsp": (0x5D8, 8), "rax": (0x5F8, 8), "star": (0x600, 8),
    "lstar": (0x608, 8), "cstar": (0x610, 8), "sfmask": (0x618, 8),
    "kernel_gs_base": (0x620, 8), "sysenter_cs": (0x628, 8), "sysenter_esp": (0x630, 8),
    "sysenter_eip": (0x638, 8), "cr2": (0x640, 8), "g_pat": (0x668, 8), "dbgctl": (0x670, 8),
}
# Segment registers: 16 bytes each from 0x400, in this order; selector (2),
# attrib (2), limit (4), base (8).
APM_SEGMENTS = ("es", "cs", "ss", "ds", "fs", "gs", "gdtr", "ldtr", "idtr", "tr")


@pytest.mark.parametrize("name", sorted({**APM_CONTROL, **APM_SAVE}))
def test_vmcb_field_matches_apm(name):
    want = {**APM_CONTROL, **APM_SAVE}[name]
    f = vmcb.FIELDS[name]
    assert (f.offset, f.size) == want


@pytest.mark.parametrize("index", range(len(APM_SEGMENTS)))
def test_vmcb_segment_matches_apm(index):
    seg, base = APM_SEGMENTS[index], 0x400 + 0x10 * index
    for part, offset, size in (("selector", 0, 2), ("attrib", 2, 2), ("limit", 4, 4),
                               ("base", 8, 8)):
        f = vmcb.FIELDS[f"{seg}.{part}"]
        assert (f.offset, f.size) == (base + offset, size), f"{seg}.{part}"


def test_no_vmcb_field_outside_the_apm_tables():
    named = set(APM_CONTROL) | set(APM_SAVE) | {
        f"{s}.{p}" for s in APM_SEGMENTS for p in ("selector", "attrib", "limit", "base")}
    assert set(vmcb.FIELDS) <= named


def test_vmcb_fields_do_not_overlap():
    spans = sorted((f.offset, f.offset + f.size, f.name) for f in vmcb.FIELDS.values())
    for (_, a1, an), (b0, _, bn) in itertools.pairwise(spans):
        assert a1 <= b0, f"{an} overlaps {bn}"


# APM vol. 2: intercept vectors (B-1), EVENTINJ (15.20), exit codes (appendix C).
APM_CONSTANTS = {
    "INTERCEPT_INTR": 1 << 0, "INTERCEPT_NMI": 1 << 1, "INTERCEPT_SMI": 1 << 2,
    "INTERCEPT_CPUID": 1 << 18, "INTERCEPT_HLT": 1 << 24, "INTERCEPT_IOIO_PROT": 1 << 27,
    "INTERCEPT_MSR_PROT": 1 << 28, "INTERCEPT_SHUTDOWN": 1 << 31,
    "INTERCEPT_VMRUN": 1 << 0, "INTERCEPT_VMMCALL": 1 << 1, "INTERCEPT_VMLOAD": 1 << 2,
    "INTERCEPT_VMSAVE": 1 << 3, "INTERCEPT_STGI": 1 << 4, "INTERCEPT_CLGI": 1 << 5,
    "NESTED_CTL_NP_ENABLE": 1,
    "TLB_CONTROL_DO_NOTHING": 0, "TLB_CONTROL_FLUSH_ALL_ASID": 1,
    "TLB_CONTROL_FLUSH_ASID": 3, "TLB_CONTROL_FLUSH_ASID_LOCAL": 7,
    "EVTINJ_TYPE_INTR": 0, "EVTINJ_TYPE_NMI": 2 << 8, "EVTINJ_TYPE_EXEPT": 3 << 8,
    "EVTINJ_TYPE_SOFT": 4 << 8, "EVTINJ_VALID_ERR": 1 << 11, "EVTINJ_VALID": 1 << 31,
    "SVM_EXIT_EXCP_BASE": 0x40, "SVM_EXIT_INTR": 0x60, "SVM_EXIT_CPUID": 0x72,
    "SVM_EXIT_HLT": 0x78, "SVM_EXIT_IOIO": 0x7B, "SVM_EXIT_MSR": 0x7C,
    "SVM_EXIT_SHUTDOWN": 0x7F, "SVM_EXIT_VMRUN": 0x80, "SVM_EXIT_VMMCALL": 0x81,
    "SVM_EXIT_NPF": 0x400, "SVM_EXIT_ERR": (1 << 64) - 1,
    "ATTR_CS_L": 1 << 9, "ATTR_CS_DB": 1 << 10,
}


@pytest.mark.parametrize("name", sorted(APM_CONSTANTS))
def test_svm_constant_matches_apm(name):
    assert getattr(vmcb, name) == APM_CONSTANTS[name]


# Values the project keeps in Python, against the system's <linux/kvm.h>.
@pytest.mark.parametrize(("ours", "header"), [
    (observation.KVM_STATE_NESTED_GUEST_MODE, "KVM_STATE_NESTED_GUEST_MODE"),
    (observation.KVM_STATE_NESTED_RUN_PENDING, "KVM_STATE_NESTED_RUN_PENDING"),
    (observation.KVM_STATE_NESTED_GIF_SET, "KVM_STATE_NESTED_GIF_SET"),
    (exits.KVM_EXIT_IO_IN, "KVM_EXIT_IO_IN"),
    (exits.KVM_EXIT_IO_OUT, "KVM_EXIT_IO_OUT"),
])
def test_kvm_constant_matches_linux_header(ours, header):
    assert ours == getattr(lib, header)


def test_kvm_header_values_are_the_uapi_ones():
    """The cffi build reads the system header; these uapi values never change
    (arch/x86/include/uapi/asm/kvm.h, include/uapi/linux/kvm.h)."""
    assert (lib.KVM_STATE_NESTED_GUEST_MODE, lib.KVM_STATE_NESTED_RUN_PENDING,
            lib.KVM_STATE_NESTED_GIF_SET) == (0x1, 0x2, 0x100)
    assert (lib.KVM_EXIT_IO, lib.KVM_EXIT_HLT, lib.KVM_EXIT_SHUTDOWN,
            lib.KVM_EXIT_FAIL_ENTRY, lib.KVM_EXIT_INTERNAL_ERROR) == (2, 5, 8, 9, 17)
    assert lib.KVM_STATE_NESTED_FORMAT_SVM == 1


def test_ucall_numbers_are_stable():
    """The payloads get these through a generated header; the numbers are the
    protocol between the guest and any host build, so they stay fixed."""
    assert {u.name: int(u) for u in ucall.Ucall} == {
        "SYNC": 1, "ASSERT": 2, "DONE": 3, "EXCEPTION": 4, "PING": 5}
    assert (ucall.UCALL_PORT, ucall.UCALL_NARGS) == (0x1000, 7)
