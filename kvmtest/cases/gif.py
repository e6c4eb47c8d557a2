"""GIF with teeth, and single-step across VMRUN (payload events.S).

An interrupt, NMI or SMI the host queues before a VMRUN that fails must be
held while GIF=0 and delivered right after L1's STGI (APM vol. 2 15.17,
table 15-10: INTR, NMI and external SMI are "held pending until GIF==1").
L1 logs markers around the VMRUN and its handlers log where the event hit
(kvmtest.eventlog), so the judge sees the order, not just the final GIF.

[gif0] cases run VMRUN after CLGI; [gif1] cases after STGI, with the event
blocked by something else until after the VMRUN (RFLAGS.IF for an
interrupt, NMI blocking for an NMI), so a kernel that leaves GIF set after a
failed VMRUN (f85a6ce06e4a missing) delivers it early: there the GIF bug
has teeth.  An SMI has no such second gate: [gif0] only.

Single-step: "EFLAGS.TF causes a #DB trap after the VMRUN completes on the
host side (i.e., after the #VMEXIT from the guest)" (APM vol. 2 15.5.1,
"VMRUN and TF/RF Bits in EFLAGS"); a failed VMRUN completes with its
#VMEXIT(INVALID), and GIF does not hold trace traps (table 15-10).

The failing VMRUN has ASID 0 (checked in software by every kernel); each
case's negative control runs the same steps with ASID 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

from .. import params
from ..case import GIF0, GIF1, NEED_SMM, NEED_SVM, SCRIPT, Case, Expect
from ..vmcb import SVM_EXIT_ERR, SVM_EXIT_VMMCALL
from ._build import GIF_BUG

GIF_TABLE = "APM vol. 2 15.17 table 15-10 (GIF=0 holds INTR, NMI, SMI pending until GIF=1)"
TF_APM = "APM vol. 2 15.5.1 'VMRUN and TF/RF Bits in EFLAGS'; table 15-10 (TF traps not held)"
DEFECT = {"asid": 0}
FIX = {"asid": 1}

# (name, host actions, payload mode, GIF modes it runs in)
EVENTS = (
    ("intr", (f"irq {params.INTR_VECTOR}",), 0, (GIF0, GIF1)),
    ("nmi", ("nmi",), 0, (GIF0,)),
    # [gif1]: NMI blocking (as in an NMI handler) holds the NMI until L1's IRET.
    ("nmi", ("nmi_masked", "nmi"), params.EV_IRET, (GIF1,)),
    ("smi", ("smi",), 0, (GIF0,)),
)


def _log(*entries: str) -> tuple[str, ...]:
    return entries


def held_log(event: str, iret: bool) -> tuple[str, ...]:
    """The contract: nothing before STGI, the event right after it."""
    iret_mark = ("mark@after_iret",) if iret else ()
    return _log("mark@before_vmrun", "mark@after_vmrun", *iret_mark, "mark@after_sti",
                f"{event}@after_stgi", "mark@after_stgi")


def early_log(event: str, iret: bool) -> tuple[str, ...]:
    """GIF left set after the failed VMRUN: the event arrives as soon as its
    other gate opens (after the IRET, or after STI and its shadow)."""
    if iret:
        return _log("mark@before_vmrun", "mark@after_vmrun", f"{event}@after_iret",
                    "mark@after_iret", "mark@after_sti", "mark@after_stgi")
    return _log("mark@before_vmrun", "mark@after_vmrun", f"{event}@after_sti",
                "mark@after_sti", "mark@after_stgi")


def control_log(event: str, iret: bool, gif: str) -> tuple[str, ...]:
    """VMRUN succeeds: L2 runs with GIF=1 (APM 15.5.1: VMRUN sets GIF) and
    L1 intercepts neither NMI nor SMI, so with CLGI alone holding them the
    event reaches L2 before its VMMCALL; an interrupt stays blocked by L2's
    RFLAGS.IF=0, an NMI by NMI blocking.  After the #VMEXIT (GIF=0) as above."""
    if event in ("nmi", "smi") and gif == GIF0:
        return _log("mark@before_vmrun", f"{event}@l2_vmmcall", "mark@after_vmrun",
                    "mark@after_sti", "mark@after_stgi")
    return held_log(event, iret)


# Measured on 6.1.170, 6.1.192, 6.12.95 and 6.12.117 (not on 7.3.4): right
# after a successful VMRUN, svm_interrupt_allowed() returns -EBUSY for
# nested_run_pending before it looks at GIF or RFLAGS.IF, the interrupt-window
# exit counts -EBUSY as allowed (x86.c kvm_vcpu_ready_for_interrupt_injection),
# so the host injects the interrupt into L2 although L2 runs with IF=0; L2's
# IDT ends at vector 31: #GP at L2's first instruction.
IRQ_WINDOW_BUG = Expect(
    "exception", vector=13, at="l2_vmmcall",
    known_bug="KVM_EXIT_IRQ_WINDOW_OPEN right after VMRUN while L2 has RFLAGS.IF=0 "
    "(svm_interrupt_allowed returns -EBUSY for nested_run_pending before checking the "
    "vCPU; fixed in 7.x by checking svm_interrupt_blocked first)")


def _control_profiles(event: str) -> dict[str, Expect]:
    if event != "intr":
        return {}
    return {"legacy": IRQ_WINDOW_BUG, "fixed": IRQ_WINDOW_BUG}


def cases() -> Iterator[Case]:
    for event, actions, mode, gifs in EVENTS:
        iret = bool(mode & params.EV_IRET)
        needs = frozenset({NEED_SVM, NEED_SMM} if event == "smi" else {NEED_SVM})
        for gif in gifs:
            bad = f"gif/{event}-held[{gif}]"
            held = Expect("log", exit_code=SVM_EXIT_ERR, log=held_log(event, iret))
            profiles = {}
            if gif == GIF1:
                legacy = replace(held, log=early_log(event, iret), known_bug=GIF_BUG)
                profiles = {"legacy": legacy, "fixed": held, "7.x": held}
            common = dict(scenario=SCRIPT, payload="events", gif_mode=gif,
                          params={"mode": mode}, on_sync={params.STAGE_HOST_ACTION: actions},
                          needs=needs)
            yield Case(id=bad, family="gif", expect=held, profiles=profiles, vmcb=DEFECT,
                       source=f"{GIF_TABLE}; KVM nested.c nested_svm_vmrun (GIF on the "
                       "failed-VMRUN path), x86.c inject_pending_event", **common)
            control = Expect("log", exit_code=SVM_EXIT_VMMCALL,
                             log=control_log(event, iret, gif))
            profiles = _control_profiles(event)
            if profiles:
                profiles["7.x"] = control
            yield Case(id=f"negative/gif-{event}-held[{gif}]", family="negative",
                       expect=control, profiles=profiles,
                       source=f"negative control of {bad}", vmcb=FIX, control_of=bad,
                       **common)


def _trap(dr6: str, at: str = "after_vmrun") -> tuple[str, ...]:
    return _log("mark@before_vmrun", f"db@{at}", f"dr6={dr6}", "mark@after_vmrun",
                "mark@after_sti", "mark@after_stgi")


# Linux 7.x completes a VMRUN that fails its checks with
# svm_skip_emulated_instruction(), which ignores RFLAGS.TF (the FIXME in
# nested_svm_vmrun): no #DB after the #VMEXIT; the CPU traps one
# instruction later instead.  Measured on Debian 7.3.4.
TF_IGNORED = Expect("log", exit_code=SVM_EXIT_ERR, log=_trap("0x4000", "after_vmrun+0x1"),
                    known_bug="no single-step #DB after a VMRUN that fails its consistency "
                    "checks (nested_svm_vmrun: svm_skip_emulated_instruction ignores TF)")
# Every kernel measured (6.1.170 .. 7.3.4): nested_svm_vmexit() queues the
# single-step #DB without a DR6 payload, so L1 sees DR6.BS clear.
DR6_BS_LOST = Expect("log", exit_code=SVM_EXIT_VMMCALL, log=_trap("0x0"),
                     known_bug="the single-step #DB after a #VMEXIT has DR6.BS clear "
                     "(nested_svm_vmexit: kvm_queue_exception(DB_VECTOR) without payload)")


def singlestep_cases() -> Iterator[Case]:
    """The control checks that the trap comes after the #VMEXIT whatever DR6
    says; singlestep/vmrun-ok checks DR6.BS on that trap."""
    trap = _trap("0x4000")  # DR6.BS: a single-step trap
    for gif in (GIF1, GIF0):
        bad = f"singlestep/vmrun-invalid[{gif}]"
        common = dict(scenario=SCRIPT, payload="events", gif_mode=gif,
                      params={"mode": params.EV_TF}, on_sync={params.STAGE_HOST_ACTION: ()},
                      needs=frozenset({NEED_SVM}))
        want = Expect("log", exit_code=SVM_EXIT_ERR, log=trap)
        yield Case(id=bad, family="singlestep", vmcb=DEFECT, expect=want,
                   profiles={"legacy": want, "fixed": want, "7.x": TF_IGNORED},
                   source=f"{TF_APM}; KVM x86.c kvm_skip_emulated_instruction, nested.c "
                   "nested_svm_vmrun", **common)
        yield Case(id=f"negative/singlestep-vmrun-invalid[{gif}]", family="negative",
                   vmcb=FIX, expect=Expect("log", exit_code=SVM_EXIT_VMMCALL, log=_trap("*")),
                   source=f"negative control of {bad}: {TF_APM}; KVM nested.c "
                   "nested_svm_vmexit (#DB queued when L1 single-steps VMRUN)",
                   control_of=bad, **common)
    yield Case(id="singlestep/vmrun-ok[gif1]", family="singlestep", vmcb=FIX,
               expect=Expect("log", exit_code=SVM_EXIT_VMMCALL, log=trap),
               profiles={"legacy": DR6_BS_LOST, "fixed": DR6_BS_LOST, "7.x": DR6_BS_LOST},
               source=f"{TF_APM}: DR6.BS on the trap after a successful VMRUN; KVM nested.c "
               "nested_svm_vmexit (kvm_queue_exception(DB_VECTOR) when vmcb01 has TF)",
               scenario=SCRIPT, payload="events", gif_mode=GIF1,
               params={"mode": params.EV_TF}, on_sync={params.STAGE_HOST_ACTION: ()},
               needs=frozenset({NEED_SVM}))
