"""Late VMRUN failures: after the consistency checks, while KVM loads L2's
CR3 (PDPTRs) or merges the MSR permission map.  KVM takes the full #VMEXIT
path here on every kernel, so GIF is cleared even where the early path
forgot to."""

from __future__ import annotations

from .. import layout
from ..vmcb import INTERCEPT_MSR_PROT, INTERCEPT_SHUTDOWN
from ._build import Row

# L2 in legacy (32-bit) PAE paging: LME=0 so the PDPTRs are loaded from CR3.
PAE_PDPT = layout.L2_PAGING_GPA
PAE_PD = layout.L2_PAGING_GPA + 0x1000
ATTR_CODE32 = 0xB | 1 << 4 | 1 << 7 | 1 << 10 | 1 << 11
PAE_L2 = {
    "efer": layout.EFER_SVME,
    "cr0": layout.L1_CR0,
    "cr4": layout.CR4_PAE,
    "cs.attrib": ATTR_CODE32,
}


# L2 in 32-bit (non-PAE) paging: a page directory of 4 MiB pages (CR4.PSE).
PD32 = layout.L2_PAGING_GPA + 0x2000
CR4_PSE = 1 << 4
LEGACY32_L2 = {
    "efer": layout.EFER_SVME,
    "cr0": layout.L1_CR0,
    "cr4": CR4_PSE,
    "cs.attrib": ATTR_CODE32,
}
PTE_PS_4M = layout.PTE_PS


def legacy32_tables() -> dict[int, bytes]:
    """One page directory of 1024 4 MiB pages: identity map of 4 GiB."""
    pd = b"".join(((i << 22) | layout.PTE_P | layout.PTE_RW | PTE_PS_4M).to_bytes(4, "little")
                  for i in range(1024))
    return {PD32: pd}


def pae_tables() -> dict[int, bytes]:
    """PDPT (4 entries) + one PD of 2 MiB pages: identity map of [0, 1 GiB)."""
    pdpte = (PAE_PD | layout.PTE_P).to_bytes(8, "little")
    pd = b"".join(
        ((i << 21) | layout.PTE_P | layout.PTE_RW | layout.PTE_PS).to_bytes(8, "little")
        for i in range(512)
    )
    return {PAE_PDPT: pdpte + bytes(24), PAE_PD: pd}


LOAD_CR3 = "KVM nested.c nested_svm_load_cr3: kvm_vcpu_is_illegal_gpa(cr3) / !kvm_vcpu_is_legal_cr3"


def rows(maxphyaddr: int) -> list[Row]:
    top = 1 << maxphyaddr
    return [
        # Outside long mode __nested_vmcb_check_save does not look at CR3;
        # nested_svm_load_cr3 does, after VMCB02 is set up: a late failure.
        # APM vol. 2 15.5.1: "any MBZ bit of CR3 is set"; in legacy mode
        # CR3 is a 32-bit physical address (bits 63:32 MBZ).
        Row("legacy32-cr3-above-maxphyaddr", {**LEGACY32_L2, "cr3": PD32 | top},
            {**LEGACY32_L2, "cr3": PD32},
            f"APM vol. 2 15.5.1 (CR3 MBZ) with 32-bit paging in L2; {LOAD_CR3}",
            l2_entry="l2_vmmcall32", memory=legacy32_tables()),
        Row("pae-cr3-above-maxphyaddr", {**PAE_L2, "cr3": PAE_PDPT | top},
            {**PAE_L2, "cr3": PAE_PDPT},
            f"APM vol. 2 15.5.1 (CR3 MBZ) with legacy PAE paging in L2; {LOAD_CR3}",
            l2_entry="l2_vmmcall32", memory=pae_tables()),
        Row("pae-pdptrs-unbacked", {**PAE_L2, "cr3": layout.UNBACKED_GPA},
            {**PAE_L2, "cr3": PAE_PDPT},
            "APM vol. 2 15.5 (PDPTRs loaded on VMRUN with legacy PAE); "
            "KVM nested.c nested_svm_load_cr3 -> load_pdptrs",
            l2_entry="l2_vmmcall32", memory=pae_tables()),
        Row("msrpm-unbacked",
            {"intercept_misc1": INTERCEPT_SHUTDOWN | INTERCEPT_MSR_PROT,
             "msrpm_base_pa": layout.UNBACKED_GPA},
            {"intercept_misc1": INTERCEPT_SHUTDOWN | INTERCEPT_MSR_PROT,
             "msrpm_base_pa": layout.MSRPM_GPA},
            "KVM nested.c nested_svm_vmrun_msrpm (MSRPM merge reads L1's bitmap)"),
    ]
