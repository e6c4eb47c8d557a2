"""The SMM scenario: SMI while L2 runs, the SMM handler writes state, RSM.

KVM enters SMM from guest mode by a synthetic #VMEXIT of L2 that L1 never
sees (svm_enter_smm): the state-save area records "SVM guest" (SMBASE +
0xFED8) and the VMCB12 GPA (+0xFEE0), and L1's state goes to HSAVE + 0x400.
RSM re-enters L2 from the VMCB12 in guest memory (svm_leave_smm) after
restoring L1's state from HSAVE + 0x400 -- all of which the SMM handler
could have changed (write_target below names what it may write).
Since be5fa8737d42 "KVM: SVM: check validity of VMCB controls when returning
from SMM" KVM runs the VMRUN consistency checks there and refuses the RSM
(triple fault: KVM_EXIT_SHUTDOWN); before, it entered L2 with whatever the
handler left.

The host side: the payload's L2 (l2_smi, guest_payloads/smm.S) reports
SYNC(STAGE_L2_SMI) from guest mode; the host queues KVM_SMI and resumes.
The handler (smm_handler .. smm_handler_end) is copied to SMBASE + 0x8000
with the case's patch list (stores and WRMSRs); then the ordinary host loop (runner.drive) takes
L1's report after the #VMEXIT, or the shutdown.
"""

from __future__ import annotations

from collections.abc import Mapping

from . import layout, ucall
from .backends.base import Machine
from .case import Case
from .exits import IoExit, TimedOut
from .observation import SHUTDOWN, SYNC, TIMEOUT, UNEXPECTED_EXIT, Observation
from .payloads import Payload, PayloadError
from .runner import drive
from .vmcb import FIELDS, SAVE_AREA

STAGE_L2_SMI = 0x534D  # guest_payloads/smm.S: L2 asks for the SMI
SMBASE = layout.SMRAM_GPA  # the reset value; the handler never moves it
HANDLER_GPA = SMBASE + 0x8000
# KVM's SMRAM state-save map for a 64-bit vCPU (AMD layout).
SMRAM_SVM_GUEST = SMBASE + 0xFED8  # non-zero: the SMI arrived in guest mode
SMRAM_SVM_VMCB12 = SMBASE + 0xFEE0
PATCH_SIZE = 16  # { u32 gpa; u32 nbytes; u8 bytes[8] }
PATCH_SLOTS = 8  # the last one stays zero: the end marker
PATCH_MSR = 1 << 31  # nbytes flag: a WRMSR (gpa = MSR index), not a store
MAX_EXITS = 8  # before the SMI: the L2 report, nothing else

# What an SMM handler may write, by name (Case.smm_vmcb):
#   "<field>"         a VMCB12 field (kvmtest.vmcb.FIELDS)
#   "hsave.<field>"   L1's state as svm_enter_smm() saved it: a save-area
#                     field of the VMCB-shaped copy at HSAVE + 0x400
#   "smram.<name>"    a state-save-area field svm_leave_smm() reads
#   "msr.<name>"      an MSR the handler writes with WRMSR
SMRAM_FIELDS = {"efer": (SMBASE + 0xFED0, 8), "svm_guest": (SMRAM_SVM_GUEST, 8),
                "svm_vmcb12": (SMRAM_SVM_VMCB12, 8)}
MSRS = {"vm_hsave_pa": 0xC001_0117}


def write_target(name: str) -> tuple[int, int, bool]:
    """(GPA or MSR index, size in bytes, is an MSR) for a handler write."""
    where, dot, field = name.partition(".")
    if dot and where == "hsave":
        f = FIELDS.get(field)
        if f is None or f.offset < SAVE_AREA:
            raise ValueError(f"hsave.{field}: not a VMCB save-area field")
        return layout.HSAVE_GPA + f.offset, f.size, False
    if dot and where == "smram":
        if field not in SMRAM_FIELDS:
            raise ValueError(f"smram.{field}: not one of {sorted(SMRAM_FIELDS)}")
        return (*SMRAM_FIELDS[field], False)
    if dot and where == "msr":
        if field not in MSRS:
            raise ValueError(f"msr.{field}: not one of {sorted(MSRS)}")
        return MSRS[field], 8, True
    if name not in FIELDS:
        raise ValueError(f"{name}: not a VMCB12 field")
    f = FIELDS[name]
    return layout.VMCB12_GPA + f.offset, f.size, False


def patch_table(fields: Mapping[str, int]) -> bytes:
    """The handler's patch list, in the order given."""
    if len(fields) >= PATCH_SLOTS:
        raise ValueError(f"at most {PATCH_SLOTS - 1} SMM patches, not {len(fields)}")
    out = b""
    for name, value in fields.items():
        where, size, msr = write_target(name)
        flags = size | (PATCH_MSR if msr else 0)
        out += (where.to_bytes(4, "little") + flags.to_bytes(4, "little")
                + (value & (2 ** (8 * size) - 1)).to_bytes(8, "little"))
    return out.ljust(PATCH_SIZE * PATCH_SLOTS, b"\0")


def install_handler(m: Machine, payload: Payload, fields: Mapping[str, int]) -> None:
    """Copy the payload's SMM handler to SMBASE + 0x8000 with its patch list."""
    start, end = payload.sym("smm_handler"), payload.sym("smm_handler_end")
    code = payload.image[start - layout.CODE_GPA:end - layout.CODE_GPA]
    m.write(HANDLER_GPA, code)
    m.write(HANDLER_GPA + payload.sym("smm_patches") - start, patch_table(fields))


def handler_runs(m: Machine, payload: Payload) -> int:
    off = payload.sym("smm_count") - payload.sym("smm_handler")
    return int.from_bytes(m.read(HANDLER_GPA + off, 4), "little")


def _smram_note(m: Machine, payload: Payload) -> str:
    guest = int.from_bytes(m.read(SMRAM_SVM_GUEST, 8), "little")
    vmcb12 = int.from_bytes(m.read(SMRAM_SVM_VMCB12, 8), "little")
    return (f"SMM handler ran {handler_runs(m, payload)}x; SMRAM: svm_guest={guest} "
            f"vmcb12={vmcb12:#x}")


def drive_smm(m: Machine, case: Case, payload: Payload, timeout: float) -> Observation:
    """Run L1 into L2, inject the SMI L2 asks for, then the ordinary host loop."""
    try:
        install_handler(m, payload, case.smm_vmcb)
    except (PayloadError, ValueError) as e:
        return Observation(outcome=UNEXPECTED_EXIT, detail=f"{case.id}: {e}")
    exits: list[str] = []
    for _ in range(MAX_EXITS):
        ex = m.run(timeout)
        exits.append(type(ex).__name__)
        u = (ucall.decode(m.read, ex.value)
             if isinstance(ex, IoExit) and ex.port == ucall.UCALL_PORT else None)
        if u is not None and u.cmd == ucall.Ucall.PING:
            continue
        if u is not None and u.cmd == ucall.Ucall.SYNC and u.args[0] == STAGE_L2_SMI:
            break
        if isinstance(ex, TimedOut):
            return Observation(outcome=TIMEOUT, exits=exits,
                               detail=f"no SMI request within {ex.seconds:g} s")
        # L2 never asked for the SMI: the VMRUN failed, L1 faulted, ...  Not
        # SHUTDOWN even for a triple fault: that outcome is RSM's answer.
        what = u.describe() if u is not None else repr(ex)
        return Observation(outcome=UNEXPECTED_EXIT, exits=exits,
                           detail=f"L2 never asked for the SMI: {what}")
    else:
        return Observation(outcome=TIMEOUT, exits=exits,
                           detail=f"no SMI request within {MAX_EXITS} exits")
    nested = m.nested_state()
    in_l2 = "?" if nested is None else int(nested.guest_mode)
    m.smi()
    obs = drive(m, case, payload, timeout)  # reads VMCB12 as well
    obs.exits = [*exits, "SMI", *obs.exits]
    obs.smm_handler_runs = handler_runs(m, payload)
    where = f"SMI in guest mode={in_l2}; {_smram_note(m, payload)}"
    if obs.outcome == SHUTDOWN:
        obs.detail = f"RSM refused (KVM_EXIT_SHUTDOWN); {where}"
    elif obs.outcome == SYNC:
        obs.detail = f"RSM re-entered L2, L2 exited {obs.exit_code:#x}; {where}"
    else:
        obs.detail = f"{obs.detail}; {where}".lstrip("; ")
    return obs

