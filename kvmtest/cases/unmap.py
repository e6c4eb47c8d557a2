"""#VMEXIT when VMCB12 cannot be mapped any more.

L1 VMRUNs a VMCB12 that sits alone in an extra memslot; L2 stops (payload
pause.S), the host deletes that memslot, L2 VMMCALLs.  The #VMEXIT must write
VMCB12 and cannot: nested_svm_vmexit()'s kvm_vcpu_map() fails.  Linux 6.1
and 6.12 then inject #GP -- while still in guest mode, so into L2 -- and L2
goes on; Linux 7.x completes the #VMEXIT and requests a triple fault of L1
(nested_svm_vmexit_update_vmcb12 failing -> KVM_REQ_TRIPLE_FAULT).

On hardware the #VMEXIT's writes would be lost and L1 would resume after
its VMRUN.  The contract: L2 must not go on (the exit L1 intercepts is not
L2's to handle): L1 resumes out of guest mode, or the vCPU shuts down.  The
negative control runs the same steps without deleting the memslot.
"""

from __future__ import annotations

from collections.abc import Iterator

from .. import layout, params
from ..case import NEED_SVM, SCRIPT, SHUTDOWN, Case, Expect, vmexit
from ..vmcb import SVM_EXIT_VMMCALL

# Inside L1's identity map and below MAXPHYADDR, outside the main memslot
# and away from layout.UNBACKED_GPA.
VMCB12_SLOT_GPA = 0x2000_0000
SOURCE = ("KVM nested.c nested_svm_vmexit (kvm_vcpu_map of VMCB12 fails: 6.1/6.12 "
          "kvm_inject_gp in guest mode; 7.x nested_svm_vmexit_update_vmcb12 -> "
          "KVM_REQ_TRIPLE_FAULT); APM vol. 2 15.6 (#VMEXIT)")


# Measured: 6.1.170, 6.1.192, 6.12.95, 6.12.117 inject #GP into L2 at its
# VMMCALL and stay in guest mode (no WARN); 7.3.4 shuts L1 down.
GP_IN_L2 = Expect("exception", vector=13, at="l2_pause_vmmcall", error_code=0,
                  known_bug="#VMEXIT with VMCB12 unmappable: #GP injected into L2, the "
                  "#VMEXIT lost (nested_svm_vmexit: kvm_inject_gp before leave_guest_mode)")
PROFILES = {"legacy": GP_IN_L2, "fixed": GP_IN_L2, "7.x": SHUTDOWN}


def cases() -> Iterator[Case]:
    delete = {params.STAGE_HOST_ACTION: (),
              params.STAGE_L2_PAUSE: (f"delete_memory {VMCB12_SLOT_GPA:#x}",)}
    keep = {params.STAGE_HOST_ACTION: (), params.STAGE_L2_PAUSE: ()}
    common = dict(scenario=SCRIPT, payload="pause", l2_entry="l2_pause",
                  vmcb12_gpa=VMCB12_SLOT_GPA, extra_memory={VMCB12_SLOT_GPA: layout.PAGE_SIZE},
                  params={"vmrun_rax": VMCB12_SLOT_GPA}, needs=frozenset({NEED_SVM}))
    bad = "unmap/vmcb12-at-vmexit"
    yield Case(id=bad, family="unmap", expect=Expect("left_l2"), profiles=PROFILES,
               source=SOURCE,
               on_sync=delete, **common)
    yield Case(id="negative/unmap-vmcb12-at-vmexit", family="negative",
               expect=vmexit(SVM_EXIT_VMMCALL), source=f"negative control of {bad}: "
               "VMCB12 in its own memslot, kept", on_sync=keep, control_of=bad, **common)
