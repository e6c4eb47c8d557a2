"""Host actions a case asks for when L1 (or L2, or an SMM handler) stops.

A case maps a SYNC stage tag to a tuple of action strings (Case.on_sync);
the host loop (runner.drive) carries them out in order and resumes the vCPU.
Actions are plain text so cases stay data (and fuzzers can generate them):

    irq VECTOR          KVM_INTERRUPT: an external interrupt
    nmi                 KVM_NMI
    nmi_masked          KVM_SET_VCPU_EVENTS: NMIs blocked (as inside an NMI handler)
    smi                 install the payload's SMI handler at SMBASE + 0x8000, KVM_SMI
    delete_memory GPA   delete the extra memslot at GPA (Case.extra_memory)
    nested_roundtrip    KVM_GET_NESTED_STATE, then KVM_SET_NESTED_STATE of the same
                        state; the flags and vmcb_pa read back must not change
    nested_gif1         KVM_SET_NESTED_STATE with exactly GIF_SET (no guest mode),
                        as a VMM restoring a vCPU outside guest mode does
    efer_svme 0|1       KVM_SET_SREGS: EFER.SVME cleared or set by the host
    step                run one guest instruction (KVM_SET_GUEST_DEBUG single-step):
                        KVM handles its pending requests on that entry

Stage params.STAGE_BEFORE_L1 (0) runs its actions before L1's first
instruction.

Each returns "" when it worked, else a one-line reason (the kernel's errno);
runner.drive ends the case there with outcome ACTION_FAILED.
"""

from __future__ import annotations

import errno
import os

from . import layout
from .backends.base import Machine
from .nested_request import FORMAT_SVM, GIF_SET, HEADER_SIZE, NestedBlob
from .payloads import Payload, PayloadError

SMBASE = layout.SMRAM_GPA  # KVM's reset value
SMI_HANDLER_GPA = SMBASE + 0x8000
VERBS = ("irq", "nmi", "nmi_masked", "smi", "delete_memory", "nested_roundtrip",
         "nested_gif1", "efer_svme", "step")


class ActionError(ValueError):
    """A malformed action string (a catalogue bug, not a kernel answer)."""


def parse(action: str) -> tuple[str, int | None]:
    verb, _, arg = action.partition(" ")
    if verb not in VERBS:
        raise ActionError(f"unknown host action {action!r} (known: {', '.join(VERBS)})")
    needs_arg = verb in ("irq", "delete_memory", "efer_svme")
    if needs_arg != bool(arg):
        raise ActionError(f"host action {action!r}: {verb} takes "
                          f"{'one integer' if needs_arg else 'no'} argument")
    try:
        return verb, int(arg, 0) if arg else None
    except ValueError:
        raise ActionError(f"host action {action!r}: {arg!r} is not an integer") from None


def install_smi_handler(m: Machine, payload: Payload) -> None:
    """Copy smi_handler..smi_handler_end to SMBASE + 0x8000 (where the SMI
    enters, in real mode with CS.base = SMBASE)."""
    start, end = payload.sym("smi_handler"), payload.sym("smi_handler_end")
    m.write(SMI_HANDLER_GPA, payload.image[start - layout.CODE_GPA:end - layout.CODE_GPA])


def _err(what: str, e: int) -> str:
    return f"{what}: errno {e} ({errno.errorcode.get(e, '?')}: {os.strerror(e)})"


def perform(m: Machine, payload: Payload, action: str) -> str:
    verb, arg = parse(action)
    if verb == "irq":
        e = m.interrupt(arg)  # type: ignore[arg-type]
        return _err("KVM_INTERRUPT", e) if e else ""
    if verb == "nmi":
        e = m.nmi()
        return _err("KVM_NMI", e) if e else ""
    if verb == "nmi_masked":
        e = m.set_nmi_masked(True)
        return _err("KVM_SET_VCPU_EVENTS", e) if e else ""
    if verb == "smi":
        try:
            install_smi_handler(m, payload)
        except PayloadError as e:
            raise ActionError(str(e)) from None
        m.smi()
        return ""
    if verb == "delete_memory":
        e = m.delete_memory(arg)  # type: ignore[arg-type]
        return _err("KVM_SET_USER_MEMORY_REGION (delete)", e) if e else ""
    if verb == "nested_gif1":
        e = m.set_nested(NestedBlob(GIF_SET, FORMAT_SVM, HEADER_SIZE, 0, b""))
        return _err("KVM_SET_NESTED_STATE (GIF_SET)", e) if e else ""
    if verb == "efer_svme":
        e = m.set_efer_svme(bool(arg))
        return _err("KVM_SET_SREGS (EFER.SVME)", e) if e else ""
    if verb == "step":
        return m.step()
    return nested_roundtrip(m)


def nested_roundtrip(m: Machine) -> str:
    before = m.get_nested()
    if before is None:
        return "KVM_GET_NESTED_STATE failed"
    e = m.set_nested(before)
    if e:
        return _err(f"KVM_SET_NESTED_STATE of its own state (flags {before.flags:#x})", e)
    after = m.get_nested()
    if after is None:
        return "KVM_GET_NESTED_STATE failed after the round trip"
    if (after.flags, after.vmcb_pa) != (before.flags, before.vmcb_pa):
        return (f"round trip changed the state: flags {before.flags:#x} -> {after.flags:#x}, "
                f"vmcb_pa {before.vmcb_pa:#x} -> {after.vmcb_pa:#x}")
    return ""
