"""The host loop shared by every backend: case in, Observation out."""

from __future__ import annotations

import errno

from . import layout, params, ucall, vmcb12
from .backends.base import Backend, Machine
from .case import INSN, NEED_SVM, SET_NESTED_STATE, SMM, VMRUN, Case
from .exits import (
    EmulationError,
    FailEntryExit,
    InternalErrorExit,
    InterruptedExit,
    IoExit,
    ShutdownExit,
    TimedOut,
)
from .observation import (
    ACCEPTED,
    EINVAL,
    EMULATION_ERROR,
    EXCEPTION,
    FAIL_ENTRY,
    GUEST_ASSERT,
    INTERNAL_ERROR,
    KVM_STATE_NESTED_GUEST_MODE,
    SHUTDOWN,
    SYNC,
    TIMEOUT,
    UNEXPECTED_EXIT,
    Observation,
)
from .payloads import Payload, load_payload
from .vmcb import VMCB_SIZE, Vmcb

DEFAULT_TIMEOUT = 5.0
MAX_EXITS = 64  # a case needs a handful; more means the guest is looping


def symbolize(payload: Payload, addr: int) -> str | None:
    """'name' or 'name+0x3' for the closest symbol at or below addr."""
    best = max(((a, n) for n, a in payload.symbols.items() if a <= addr), default=None)
    if best is None or addr - best[0] > 0x1000:
        return None
    return best[1] if addr == best[0] else f"{best[1]}+{addr - best[0]:#x}"


def prepare_memory(m: Machine, case: Case, payload: Payload) -> None:
    m.write(layout.PARAMS_GPA, params.pack(params.PARAMS, case.guest_params()))
    m.write(params.RESULT_GPA, params.RESULT_POISON.to_bytes(8, "little") * len(params.RESULT))
    if NEED_SVM in case.needs:
        m.write(layout.VMCB12_GPA, vmcb12.prepare(payload, case.l2_entry, case.vmcb).to_bytes())
    for gpa, data in case.memory.items():
        m.write(gpa, data)


def _read_vmcb12(m: Machine, obs: Observation) -> None:
    v = Vmcb(m.read(layout.VMCB12_GPA, VMCB_SIZE))
    obs.exit_code = v["exit_code"]
    obs.exit_info_1 = v["exit_info_1"]
    obs.exit_info_2 = v["exit_info_2"]
    obs.exit_int_info = v["exit_int_info"]
    obs.event_inj = v["event_inj"]
    obs.int_ctl = v["int_ctl"]
    obs.tlb_ctl = v["tlb_ctl"]


def _on_sync(m: Machine, case: Case, obs: Observation) -> None:
    obs.outcome = SYNC
    raw = m.read(params.RESULT_GPA, 8 * len(params.RESULT))
    obs.l1 = params.unpack(params.RESULT, raw)
    nested = m.nested_state()
    if nested is not None:
        obs.gif, obs.guest_mode = nested.gif, nested.guest_mode


def drive(m: Machine, case: Case, payload: Payload, timeout: float) -> Observation:
    """Run L1 until DONE, an exception report, or something that ends the case."""
    obs = Observation(outcome=UNEXPECTED_EXIT)
    for _ in range(MAX_EXITS):
        ex = m.run(timeout)
        if isinstance(ex, InterruptedExit):  # a stray signal, not the guest: go on
            continue
        obs.exits.append(type(ex).__name__)
        if isinstance(ex, IoExit) and ex.port == ucall.UCALL_PORT:
            u = ucall.decode(m.read, ex.value)
            if u.cmd == ucall.Ucall.SYNC:
                _on_sync(m, case, obs)
                continue
            if u.cmd == ucall.Ucall.PING:
                continue
            if u.cmd == ucall.Ucall.DONE:
                if obs.outcome == UNEXPECTED_EXIT:
                    obs.outcome, obs.detail = UNEXPECTED_EXIT, "DONE without a report"
                break
            if u.cmd == ucall.Ucall.EXCEPTION:
                e = ucall.GuestException.from_ucall(u)
                obs.outcome = EXCEPTION
                obs.vector, obs.error_code, obs.rip = e.vector, e.error_code, e.rip
                obs.rip_symbol = symbolize(payload, e.rip)
                break
            if u.cmd == ucall.Ucall.ASSERT:
                obs.outcome, obs.detail = GUEST_ASSERT, str(ucall.guest_assert(m.read, u))
                break
            obs.detail = f"unknown ucall {u.describe()}"
            break
        if isinstance(ex, TimedOut):
            obs.outcome, obs.detail = TIMEOUT, f"no report within {ex.seconds:g} s"
        elif isinstance(ex, ShutdownExit):
            obs.outcome, obs.detail = SHUTDOWN, "L1 triple fault (KVM_EXIT_SHUTDOWN)"
        elif isinstance(ex, InternalErrorExit):
            obs.outcome, obs.exit_data = INTERNAL_ERROR, [ex.suberror, *ex.data]
            obs.detail = f"KVM_EXIT_INTERNAL_ERROR suberror {ex.suberror} data {list(ex.data)}"
        elif isinstance(ex, FailEntryExit):
            obs.outcome, obs.exit_data = FAIL_ENTRY, [ex.reason]
            obs.detail = f"KVM_EXIT_FAIL_ENTRY reason {ex.reason:#x} (cpu {ex.cpu})"
        elif isinstance(ex, EmulationError):
            obs.outcome = EMULATION_ERROR
            obs.detail = f"{ex.message} at RIP {ex.rip:#x} ({symbolize(payload, ex.rip)})"
        else:
            obs.outcome, obs.detail = UNEXPECTED_EXIT, repr(ex)
        break
    else:
        obs.outcome, obs.detail = TIMEOUT, f"more than {MAX_EXITS} exits"
    if NEED_SVM in case.needs:  # prepare_memory wrote (and poisoned) a VMCB12
        _read_vmcb12(m, obs)
    return obs


def set_nested_state(m: Machine, case: Case, payload: Payload, timeout: float) -> Observation:
    """KVM_SET_NESTED_STATE in guest mode: control area from the case's
    VMCB12, save area = L1's state (KVM validates both).  A refused state must
    leave L1 runnable: the vmrun payload on the default VMCB12 must then VMRUN
    and see L2's VMMCALL."""
    v = vmcb12.prepare(payload, case.l2_entry, case.vmcb)
    err = m.set_nested_state(KVM_STATE_NESTED_GUEST_MODE, layout.VMCB12_GPA, v.to_bytes())
    outcome = ACCEPTED if err == 0 else EINVAL if err == errno.EINVAL else UNEXPECTED_EXIT
    obs = Observation(outcome=outcome, detail=f"errno {err}")
    nested = m.nested_state()
    if nested is not None:
        obs.gif, obs.guest_mode = nested.gif, nested.guest_mode
    if err:
        # L1 afterwards: what the judge sees is this run's VMRUN and #VMEXIT.
        m.write(layout.VMCB12_GPA, vmcb12.prepare(payload, case.l2_entry, {}).to_bytes())
        after = drive(m, case, payload, timeout)
        obs.exits, obs.l1, obs.exit_code = after.exits, after.l1, after.exit_code
        obs.gif, obs.guest_mode = after.gif, after.guest_mode
        obs.after_outcome = after.outcome
        if after.outcome != SYNC:
            obs.detail += f"; L1 afterwards: {after.outcome} {after.detail}".rstrip()
    return obs


def run_case(backend: Backend, case: Case, timeout: float = DEFAULT_TIMEOUT) -> Observation:
    payload = load_payload(case.payload)
    svm = NEED_SVM in case.needs
    # Only a case that changes the guest CPUID passes cpuid= (other backends
    # need not know the keyword).
    extra = {"cpuid": case.cpuid} if case.cpuid else {}
    with backend.kernel_log() as warnings, backend.machine(payload, svm=svm, **extra) as m:
        prepare_memory(m, case, payload)
        if case.scenario == SET_NESTED_STATE:
            obs = set_nested_state(m, case, payload, timeout)
        elif case.scenario in (VMRUN, INSN):
            obs = drive(m, case, payload, timeout)
        elif case.scenario == SMM:
            from .smm import drive_smm  # smm.py builds on drive(): import here

            obs = drive_smm(m, case, payload, timeout)
        else:
            raise ValueError(f"{case.id}: unknown scenario {case.scenario!r}")
    obs.kernel_log_checked = warnings is not None
    obs.kernel_warnings = warnings
    return obs
