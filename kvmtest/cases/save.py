"""Save-area consistency checks (KVM: __nested_vmcb_check_save)."""

from __future__ import annotations

from .. import layout
from ..case import VMEXIT_INVALID, VMEXIT_INVALID_HW
from ..vmcb import ATTR_CS_DB
from ..vmcb12 import DR6_INIT, DR7_INIT
from ._build import APM_CC, Row, bits

KVM = "KVM nested.c __nested_vmcb_check_save"
EFER = layout.L1_EFER | layout.EFER_SVME
CR0 = layout.L1_CR0
CR4 = layout.L1_CR4
CR3 = layout.L1_CR3
CS_ATTR = 0xA9B  # the default VMCB12's 64-bit CS


def rows(maxphyaddr: int) -> list[Row]:
    out = [
        Row("efer-svme0", {"efer": EFER & ~layout.EFER_SVME}, {"efer": EFER},
            f"{APM_CC}: EFER.SVME is zero; {KVM}"),
        Row("cr0-cd0-nw1", {"cr0": CR0 | layout.CR0_NW},
            {"cr0": CR0 | layout.CR0_NW | layout.CR0_CD},
            f"{APM_CC}: CR0.CD is zero and CR0.NW is set; {KVM}"),
        Row("lme-pg-pae0", {"cr4": CR4 & ~layout.CR4_PAE}, {"cr4": CR4},
            f"{APM_CC}: EFER.LME and CR0.PG are both set and CR4.PAE is zero; {KVM}"),
        Row("lme-pg-pe0", {"cr0": CR0 & ~layout.CR0_PE}, {"cr0": CR0},
            f"{APM_CC}: EFER.LME and CR0.PG are both non-zero and CR0.PE is zero; {KVM}"),
        # KVM checks this in software since "KVM: nSVM: Add missing consistency
        # check for EFER, CR0, CR4, and CS" (Debian 6.1.176); before, the CPU did.
        Row("lme-pg-cs-l-d", {"cs.attrib": CS_ATTR | ATTR_CS_DB}, {"cs.attrib": CS_ATTR},
            f"{APM_CC}: EFER.LME, CR0.PG, CS.L and CS.D are all non-zero; {KVM}",
            profiles={"legacy": VMEXIT_INVALID_HW, "fixed": VMEXIT_INVALID,
                      "7.x": VMEXIT_INVALID}),
    ]
    out += bits("cr0-hi", "cr0", CR0, (32, 47, 63),
                f"{APM_CC}: CR0[63:32] are not zero; {KVM}")
    cr3 = f"{APM_CC}: any MBZ bit of CR3 is set (long mode, above MAXPHYADDR); {KVM}"
    out.append(Row("cr3-above-maxphyaddr", {"cr3": CR3 | 1 << maxphyaddr}, {"cr3": CR3}, cr3))
    out += bits("cr3-mbz", "cr3", CR3, (52, 63), cr3)
    out += bits("cr4-rsvd", "cr4", CR4, (15, 31, 48, 63),
                f"{APM_CC}: CR4 MBZ bit is set; KVM __kvm_is_valid_cr4")
    out += bits("dr6-hi", "dr6", DR6_INIT, (32, 63),
                f"{APM_CC}: DR6[63:32] are not zero; KVM kvm_dr6_valid")
    out += bits("dr7-hi", "dr7", DR7_INIT, (32, 63),
                f"{APM_CC}: DR7[63:32] are not zero; KVM kvm_dr7_valid")
    out += bits("efer-rsvd", "efer", EFER, (2, 9, 17, 63),
                f"{APM_CC}: any MBZ bit of EFER is set; KVM kvm_valid_efer")
    return out
