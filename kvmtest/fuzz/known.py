"""Known differences between targets: measured, explained, documented.

A differential oracle (model, against) first lets these rules account for
the fields they explain; only the rest makes a signal.  Each rule names the
fields it covers, the condition under which it applies (from the scenario
and the two observations, never from a scenario's spelling), and why, with
its entry in docs/findings.md ("kvmtest fuzz" section).  The campaign
counts how often each rule fired, so a rule never hides anything silently.

Adding a rule is adding an explanation: measure it on the kernels, find the
source lines, write the docs entry, then the rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .. import layout
from ..observation import EXCEPTION, UNEXPECTED_EXIT, Observation
from ..vmcb import NESTED_CTL_NP_ENABLE, POISON, SVM_EXIT_IOIO
from .spec import KIND_NSTATE, KIND_SMM, KIND_VMRUN, Scenario

DOC = "docs/findings.md#kvmtest-fuzz"
L = 0  # index of the observation of the target under test
R = 1  # the other one (model, or the second kernel)

Check = Callable[[Scenario, Observation, Observation], bool]


@dataclass(frozen=True)
class Known:
    name: str
    oracles: tuple[str, ...]  # "model", "against"
    fields: tuple[str, ...] | None  # None: every field of the observation
    applies: Check
    why: str

    def covers(self, oracle: str, field: str) -> bool:
        return oracle in self.oracles and (self.fields is None or field in self.fields)


def _exitintinfo_err_unwritten(s: Scenario, a: Observation, b: Observation) -> bool:
    """Same EXITINTINFO[31:0] without EV, and one side left [63:32] as poisoned."""
    x, y = a.exit_int_info, b.exit_int_info
    if x is None or y is None or (x ^ y) & 0xFFFF_FFFF or x & (1 << 11):
        return False
    return POISON >> 32 in (x >> 32, y >> 32)


# Intercepts for which the APM defines no EXITINFO1/2 (vol. 2 15.9 and
# appendix C): CPUID, HLT, SHUTDOWN, VMRUN, VMMCALL, VMLOAD, VMSAVE, STGI,
# CLGI, SKINIT, RDTSCP, ICEBP, WBINVD, RDTSC, RDPMC, PUSHF, POPF, INVD.
EXITINFO_UNDEFINED = frozenset({0x72, 0x78, 0x7F, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86,
                                0x87, 0x88, 0x89, 0x6E, 0x6F, 0x70, 0x71, 0x76})


def _exitinfo_undefined(s: Scenario, a: Observation, b: Observation) -> bool:
    return a.exit_code == b.exit_code and a.exit_code in EXITINFO_UNDEFINED


IDENTITY_MAP = 1 << 30  # L1's tables map [0, 1 GiB) one to one (kvmtest.layout)


def _np_not_identity(s: Scenario, a: Observation, b: Observation) -> bool:
    """NP enabled with an nCR3 other than L1's own identity tables, or with
    L2 reaching GPAs those tables do not map (its CR3, RIP or RSP at 1 GiB
    or above): the model assumes every GPA maps to itself."""
    if s.kind == KIND_NSTATE:
        return False
    v = s.vmcb12_image()
    if s.kind == KIND_SMM:
        for k, val in s.smm:
            v[k] = val
    if not v["nested_ctl"] & NESTED_CTL_NP_ENABLE:
        return False
    foreign = (v["nested_cr3"] & ~0xFFF & ((1 << 52) - 1)) != layout.PML4_GPA
    return foreign or any(v[f] >= IDENTITY_MAP for f in ("cr3", "rip", "rsp"))


def _int_ctl_cpu_owned(s: Scenario, a: Observation, b: Observation) -> bool:
    """INT_CTL differing only in V_TPR (3:0), V_IRQ (8), V_GIF (9): the CPU
    writes those (APM vol. 2 15.21) and KVM copies them back from VMCB02
    (nested_sync_control_from_vmcb02); the model keeps L1's."""
    x, y = a.int_ctl, b.int_ctl
    return x is not None and y is not None and (x ^ y) & ~(0xF | 1 << 8 | 1 << 9) == 0


def _smap_in_l2(s: Scenario, a: Observation, b: Observation) -> bool:
    """CR4.SMAP in L2, whose pages are all user pages (kvmtest.layout: U/S
    set so the tables serve as nested tables too): an exception's delivery
    writes the stack as an implicit supervisor access, which SMAP forbids
    (the kernel: #DF, shutdown); the model's delivery does not check SMAP."""
    return bool(_vmcb_at_run(s)["cr4"] & (1 << 21))


def _rflags_vm_long(s: Scenario, a: Observation, b: Observation) -> bool:
    """RFLAGS.VM=1 for a long-mode L2: QEMU TCG runs L2 in virtual-8086 mode
    (it shuts down), the model ignores VM there."""
    v = _vmcb_at_run(s)
    return bool(v["rflags"] & (1 << 17)) and bool(v["efer"] & layout.EFER_LME)


def _efer_lma_inconsistent(s: Scenario, a: Observation, b: Observation) -> bool:
    """EFER.LMA other than LME && CR0.PG: KVM does not check it (6.1 nested.c
    __nested_vmcb_check_save: "EFER.LMA is not checked by SVM against CR0.PG
    && EFER.LME") and the CPU runs L2 with it; the model derives LMA."""
    v = _vmcb_at_run(s)
    lma = bool(v["efer"] & layout.EFER_LMA)
    return lma != bool(v["efer"] & layout.EFER_LME and v["cr0"] & layout.CR0_PG)


def _ioio_address_size(s: Scenario, a: Observation, b: Observation) -> bool:
    x, y = a.exit_info_1, b.exit_info_1
    return (a.exit_code == b.exit_code == SVM_EXIT_IOIO and x is not None and y is not None
            and (x ^ y) & ~(0b111 << 7) == 0)


def _pf_fetch_bit(s: Scenario, a: Observation, b: Observation) -> bool:
    """#PF error codes that differ in I/D only, for a fetch from an L2 that
    has neither EFER.NXE nor CR4.SMEP."""
    if not (a.outcome == b.outcome == EXCEPTION and a.vector == b.vector == 14):
        return False
    if a.error_code is None or b.error_code is None or (a.error_code ^ b.error_code) != 0x10:
        return False
    v = s.vmcb12_image()
    return not v["efer"] & layout.EFER_NXE and not v["cr4"] & (1 << 20)


def _vmcb_at_run(s: Scenario):
    """The VMCB12 as the kernel last read it: at VMRUN, or after the SMM
    handler's writes (RSM re-reads it)."""
    v = s.vmcb12_image()
    for k, val in s.smm:
        v[k] = val
    return v


def _efer_bits_model_allows(s: Scenario, a: Observation, b: Observation) -> bool:
    """EFER.LMSLE (13) or FFXSR (14) in VMCB12: the model's guest CPU
    (model/cpuid.py EFER_VALID_SVM) allows both; on QEMU TCG's EPYC the guest
    CPUID has no FFXSR (KVM rejects it) and TCG's VMRUN rejects LMSLE."""
    return bool(_vmcb_at_run(s)["efer"] & (0b11 << 13))


def _event(s: Scenario) -> int:
    return _vmcb_at_run(s)["event_inj"]


# Exception vectors that push an error code (APM vol. 2 8.2), and the
# vectors that are defined exceptions at all (the others, 9, 15, 20, 22-27
# and 31, are reserved; 2 is NMI).
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
EXCEPTION_VECTORS = frozenset({0, 1, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 16, 17, 18, 19,
                               21, 28, 29, 30})


def _event_not_plain(s: Scenario, a: Observation, b: Observation) -> bool:
    """A valid EVENTINJ other than a plain exception (TYPE 3, a defined
    exception vector, EV exactly when the vector has an error code, error
    code below 2^31): an NMI with a vector other than 2, an INTR/soft INT
    (L2's IDT has 32 gates), reserved types or vectors, EV where no error
    code exists."""
    ev = _event(s)
    if not ev & (1 << 31):
        return False
    kind, vector, has_err = (ev >> 8) & 7, ev & 0xFF, bool(ev & (1 << 11))
    plain = (kind == 3 and vector in EXCEPTION_VECTORS
             and has_err == (vector in ERROR_CODE_VECTORS) and ev >> 63 == 0)
    return not plain


def _eventinj_written_back(s: Scenario, a: Observation, b: Observation) -> bool:
    """After L2 ran, KVM copies VMCB02's EVENTINJ back into VMCB12
    (nested_sync_control_from_vmcb02): its low half 0 once the event was
    taken or dropped, the error-code half as it was."""
    x, y = a.event_inj, b.event_inj
    return (a.exit_code == b.exit_code and a.exit_code not in (None, 2**64 - 1, 0xFFFF_FFFF)
            and x is not None and y is not None and x >> 32 == y >> 32
            and 0 in (x & 0xFFFF_FFFF, y & 0xFFFF_FFFF))


def _shared_selector(s: Scenario, a: Observation, b: Observation) -> bool:
    """Two of L2's CS/SS/DS/ES with one selector but different hidden state,
    a null CS selector, or an LDT selector: the model loads hidden state
    through a GDT and
    cannot hold that (on VMRUN it says so; after an SMI in L2 it answers
    wrongly)."""
    v = s.vmcb12_image()
    if not v["cs.selector"] & ~7:
        return True
    if any(v[f"{seg}.selector"] & 4 for seg in ("cs", "ss", "ds", "es")):
        return True  # an LDT selector: the model has no LDT
    seen: dict[int, tuple[int, int, int]] = {}
    for seg in ("cs", "ss", "ds", "es"):
        sel = v[f"{seg}.selector"] & ~7
        hidden = (v[f"{seg}.attrib"], v[f"{seg}.limit"], v[f"{seg}.base"])
        if sel and seen.setdefault(sel, hidden) != hidden:
            return True
    return False


def _shutdown_event(s: Scenario, a: Observation, b: Observation) -> bool:
    """#VMEXIT(SHUTDOWN) during an event's delivery: KVM reports the event in
    EXITINTINFO (nested_save_pending_event_to_vmcb12) and its error code in
    EVENTINJ's upper half (event_inj_err from VMCB02)."""
    return a.exit_code == b.exit_code == 0x7F or a.outcome == b.outcome == "shutdown"


def _rsm_save_area(s: Scenario, a: Observation, b: Observation) -> bool:
    """The SMM handler changed VMCB12's CR0/CR3/CR4/EFER: svm_leave_smm()
    loads L2's state from VMCB12 (enter_svm_guest_mode, from_vmrun=false)
    before the RSM emulation loads SMRAM's (rsm_load_state_64); the model
    restores L2 from SMRAM alone."""
    return s.kind == KIND_SMM and any(k in ("cr0", "cr3", "cr4", "efer") for k, _ in s.smm)


# L2 modes whose IDT gates are 8 bytes: L2 shares L1's 64-bit IDT (16-byte gates).
LEGACY_IDT_MODES = ("prot32", "paging32", "pae", "real")


def _legacy_idt_delivery(s: Scenario, a: Observation, b: Observation) -> bool:
    """L2 outside long mode takes an exception L1 does not intercept: the CPU
    reads L1's 64-bit IDT as 8-byte gates (vector 6 lands in the upper half
    of gate 3: not a gate, #GP, then #DF through half of gate 4, a valid
    32-bit interrupt gate into L1's 64-bit code).  Where that chain ends is
    the CPU's (measured on 6.1.192: KVM_EXIT_HLT); the model's legacy-mode
    delivery does not follow it."""
    if s.kind != KIND_VMRUN or s.mode not in LEGACY_IDT_MODES:
        return False
    return {a.outcome, b.outcome} & {EXCEPTION, UNEXPECTED_EXIT} != set()


def _noncanonical_rip(s: Scenario, a: Observation, b: Observation) -> bool:
    """L2's RIP (long mode) is not canonical: the CPU's first fetch raises
    #GP(0) at that RIP (APM vol. 2 4.8.1, 8.2); Unicorn does not check RIP for
    canonical form and the model ends elsewhere (#PF, then #DF)."""
    if s.mode != "long" or s.kind != KIND_VMRUN:
        return False
    rip = s.vmcb12_image()["rip"]
    return not (rip < 1 << 47 or rip >= 0xFFFF_8000_0000_0000)


RULES: tuple[Known, ...] = (
    Known("exitintinfo-err-unwritten", ("model",), ("exit_int_info",),
          _exitintinfo_err_unwritten,
          "KVM writes EXITINTINFO's error-code half only with EV set (nested.c "
          "nested_save_pending_event_to_vmcb12); the model writes all 64 bits"),
    Known("exitinfo-undefined", ("model", "against"), ("exit_info_1", "exit_info_2"),
          _exitinfo_undefined,
          "EXITINFO1/2 are undefined for this exit code (APM vol. 2 appendix C); KVM copies "
          "what VMCB02 last held"),
    Known("model-no-nested-paging", ("model",), None, _np_not_identity,
          "the model does not walk nested page tables: with NP_ENABLE and an nCR3 other "
          "than L1's identity tables, L2's accesses differ"),
    Known("tcg-ioio-address-size", ("model",), ("exit_info_1",), _ioio_address_size,
          "QEMU TCG's IOIO intercept leaves EXITINFO1's address-size bits (9:7) clear; the "
          "model sets them as the APM (15.10.2) describes"),
    Known("model-pf-fetch-bit", ("model",), ("error_code",), _pf_fetch_bit,
          "the model sets #PF error-code I/D on a fetch without EFER.NXE or CR4.SMEP "
          "(APM vol. 2 8.4.2: I/D only with NX or SMEP enabled)"),
    Known("model-efer-bits", ("model",), None, _efer_bits_model_allows,
          "EFER.FFXSR/LMSLE: the model's guest CPU allows both; under QEMU TCG KVM rejects "
          "FFXSR (no FFXSR in the guest CPUID) and the CPU's VMRUN rejects LMSLE"),
    Known("eventinj-delivery", ("model",), None, _event_not_plain,
          "an EVENTINJ that is not a plain exception: the CPU (QEMU TCG) delivers it, the "
          "model approximates delivery (NMI vector, INTR/soft INT, error codes)"),
    Known("eventinj-write-back", ("model",), ("event_inj",), _eventinj_written_back,
          "after L2 ran KVM writes VMCB02's EVENTINJ back (nested.c "
          "nested_sync_control_from_vmcb02); the model writes VMCB12's original"),
    Known("shutdown-event", ("model",), ("exit_int_info", "event_inj", "int_ctl"),
          _shutdown_event,
          "#VMEXIT(SHUTDOWN) while an event was delivered: KVM reports it in EXITINTINFO and "
          "EVENTINJ's upper half and leaves INT_CTL as L1 wrote it; the model writes 0 "
          "there and a stray INT_CTL"),
    Known("model-shared-selector", ("model",), None, _shared_selector,
          "L2 segments sharing a selector with different hidden state, or a null CS: the "
          "model cannot hold them (model/machine.py load_guest_state)"),
    Known("int-ctl-cpu-owned", ("model",), ("int_ctl",), _int_ctl_cpu_owned,
          "INT_CTL's V_TPR/V_IRQ/V_GIF are the CPU's to write (APM 15.21); KVM copies them "
          "back from VMCB02 (nested_sync_control_from_vmcb02), the model keeps L1's"),
    Known("model-smap-delivery", ("model",), None, _smap_in_l2,
          "CR4.SMAP in L2 (all pages user pages): exception delivery's implicit stack writes "
          "fault on a kernel (APM vol. 2 5.6.4), the model's delivery does not check SMAP"),
    Known("rflags-vm-long-mode", ("model",), None, _rflags_vm_long,
          "RFLAGS.VM in a long-mode L2: QEMU TCG enters virtual-8086 mode, the model "
          "ignores the bit"),
    Known("efer-lma-unchecked", ("model",), None, _efer_lma_inconsistent,
          "EFER.LMA other than LME && CR0.PG: KVM passes it to the CPU unchecked (nested.c "
          "__nested_vmcb_check_save); docs/findings.md, kvmtest fuzz 5"),
    Known("model-legacy-idt", ("model",), None, _legacy_idt_delivery,
          "an exception in L2 outside long mode goes through L1's 64-bit IDT read as 8-byte "
          "gates (#GP, #DF, into L1's code): the CPU follows that chain, the model does not"),
    Known("model-noncanonical-rip", ("model",), None, _noncanonical_rip,
          "a non-canonical RIP in a long-mode L2: the CPU's fetch raises #GP(0) there "
          "(APM vol. 2 4.8.1); Unicorn does not check RIP and the model ends in #DF"),
    Known("model-rsm-save-area", ("model",), None, _rsm_save_area,
          "SMM handler changed VMCB12's CR0/CR3/CR4/EFER: KVM loads them into L2 before the "
          "SMRAM state (svm_leave_smm, then rsm_load_state_64); the model does not"),
)


def split(oracle: str, s: Scenario, a: Observation, b: Observation, fields: list[str]
          ) -> tuple[list[str], dict[str, str]]:
    """(unexplained fields, field -> the rule that explains it)."""
    explained: dict[str, str] = {}
    rest = []
    for f in fields:
        rule = next((r for r in RULES if r.covers(oracle, f) and r.applies(s, a, b)), None)
        if rule is None:
            rest.append(f)
        else:
            explained[f] = rule.name
    return rest, explained
