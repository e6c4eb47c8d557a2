"""Host->guest case parameters and guest->host result block.

Both are arrays of u64 at fixed GPAs.  The payloads get the offsets from a
header generated from this module (payload_build.py), so there is one source
of truth for the layout.
"""

from __future__ import annotations

import struct

from . import layout

# struct params at PARAMS_GPA, written by the host before the run.
PARAMS = (
    "flags",  # PF_* below
    "vmrun_rax",  # RAX operand of VMRUN (the VMCB12 GPA, possibly illegal)
    "hsave_pa",  # value written to MSR_VM_HSAVE_PA
    "insn",  # svm_insn payload: which instruction to execute (INSN_*)
    "count",  # ping payload: number of round trips
    "msr_index",  # svm_insn payload, INSN_WRMSR: MSR and value
    "msr_value",
    # smm payload: L1 flips these bits of its CR0/CR4/EFER before VMRUN (an
    # L1 state that differs from what KVM holds in the hardware VMCB).
    "l1_cr0_xor",
    "l1_cr4_xor",
    "l1_efer_xor",
    "mode",  # perm/events/smm_vmrun payloads: which variant (PERM_*, EV_*)
)

PF_SET_SVME = 1 << 0  # set EFER.SVME before the test
PF_SET_HSAVE = 1 << 1  # write MSR_VM_HSAVE_PA
PF_CLGI = 1 << 2  # CLGI before VMRUN (gif0 mode)
PF_STGI = 1 << 3  # STGI before VMRUN (explicit gif1 mode)
PF_L2_IDT = 1 << 5  # vmrun payload: build L2's IDT at L2_IDT_GPA (every vector -> l2_evt_stubs)

# struct result at RESULT_GPA, written by L1 after VMRUN returns.
RESULT = (
    "stage",  # STAGE_* reached
    "rsp",
    "cr0",
    "cr3",
    "cr4",
    "efer",
    "rflags",
    "rax",
    "pre_rsp",  # the same registers just before VMRUN
    "pre_cr0",
    "pre_cr3",
    "pre_cr4",
    "pre_efer",
    "pre_rflags",  # RFLAGS and RAX (the VMRUN operand) as VMRUN saw them
    "pre_rax",
    # An event L2 took through its own IDT (PF_L2_IDT): the vector, RSP at
    # the handler's entry (tells whether the CPU pushed an error code) and
    # the word at that RSP (the error code if there is one).
    "l2_event_vector",
    "l2_event_rsp",
    "l2_event_word",
)

RESULT_BYTES = 8 * len(RESULT)  # for payloads that walk the whole block

STAGE_BEFORE_VMRUN = 1
STAGE_AFTER_VMRUN = 2

RESULT_GPA = layout.PARAMS_GPA + 0x400
RESULT_POISON = 0x5A5A_5A5A_5A5A_5A5A

# The event log (kvmtest/eventlog.py): u64 count, then (kind, value) pairs,
# appended by L1's markers and its interrupt/NMI/#DB/SMI handlers in order.
LOG_GPA = layout.PARAMS_GPA + 0x600
LOG_MAX = 15
LOG_MARK = 1  # value: the marker's address
LOG_INTR = 2  # value: the interrupted RIP
LOG_NMI = 3
LOG_SMI = 4
LOG_DB = 5
LOG_DR6 = 6  # value: DR6 & LOG_DR6_MASK when the #DB was taken
LOG_DR6_MASK = 0xE00F  # BD, BS, BT, B0..B3
# Host actions on a SYNC (kvmtest/actions.py): the stage tags payloads use.
STAGE_BEFORE_L1 = 0  # not a SYNC: the host's actions before L1's first instruction
STAGE_HOST_ACTION = 0x4841  # "HA": L1 asks the host for the case's action(s)
STAGE_L2_PAUSE = 0x4C32  # "L2": L2 stops for the host, then VMMCALLs
STAGE_SMM = 0x534D4D  # an SMM handler stops for the host before RSM
INTR_VECTOR = 0x30  # the external interrupt KVM_INTERRUPT queues
# perm payload (guest_payloads/perm.S): where the instruction runs.
PERM_CPL0 = 0  # 64-bit, CPL 0, after the payload's own GDT is loaded
PERM_CPL3 = 1  # 64-bit, CPL 3
PERM_COMPAT = 2  # compatibility mode (32-bit code), paging on
PERM_NO_PAGING = 3  # 32-bit protected mode, CR0.PG = 0
PERM_REAL = 4  # real mode (CR0.PE = 0)
PERM_SMM = 5  # smm_vmrun payload: in SMM, long mode set up by the handler
# events payload (guest_payloads/events.S) mode bits.
EV_TF = 1 << 0  # single-step the VMRUN (RFLAGS.TF set just before it)
EV_IRET = 1 << 1  # IRET to self after the VMRUN (ends NMI blocking)
EV_NO_SVM = 1 << 2  # no CLGI/VMRUN/STGI: a guest without SVM (tests only)

# svm_insn payload: instruction selector.
INSNS = ("vmrun", "vmmcall", "vmload", "vmsave", "stgi", "clgi", "skinit", "invlpga", "wrmsr")


def pack(struct_fields: tuple[str, ...], values: dict[str, int]) -> bytes:
    unknown = set(values) - set(struct_fields)
    if unknown:
        raise KeyError(f"unknown fields: {sorted(unknown)}")
    return b"".join(
        (values.get(f, 0) & (2**64 - 1)).to_bytes(8, "little") for f in struct_fields
    )


def unpack(struct_fields: tuple[str, ...], raw: bytes) -> dict[str, int]:
    values = struct.unpack_from(f"<{len(struct_fields)}Q", raw)
    return {f: values[i] for i, f in enumerate(struct_fields)}
