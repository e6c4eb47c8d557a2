"""The host loop shared by every backend: case in, Observation out."""

from __future__ import annotations

import errno
import re

from . import actions, eventlog, kmsg, layout, nested_request, params, record, ucall, vmcb, vmcb12
from .backends.base import Backend, Machine
from .case import INSN, NEED_SVM, SCRIPT, SET_NESTED_STATE, SMM, VMRUN, Case
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
    ACTION_FAILED,
    EINVAL,
    EMULATION_ERROR,
    EXCEPTION,
    FAIL_ENTRY,
    GUEST_ASSERT,
    INTERNAL_ERROR,
    SHUTDOWN,
    SYNC,
    TIMEOUT,
    UNEXPECTED_EXIT,
    Observation,
)
from .payloads import Payload, load_payload
from .vmcb import SAVE_AREA

DEFAULT_TIMEOUT = 5.0
MAX_EXITS = 64  # a case needs a handful; more means the guest is looping


def symbolize(payload: Payload, addr: int) -> str | None:
    """'name' or 'name+0x3' for the closest symbol at or below addr."""
    best = max(((a, n) for n, a in payload.symbols.items() if a <= addr), default=None)
    if best is None or addr - best[0] > 0x1000:
        return None
    return best[1] if addr == best[0] else f"{best[1]}+{addr - best[0]:#x}"


class PrepareError(RuntimeError):
    """The backend refused the case's extra memory (a harness problem)."""


def prepare_memory(m: Machine, case: Case, payload: Payload) -> None:
    for gpa, size in case.extra_memory.items():
        e = m.add_memory(gpa, size)
        if e:
            raise PrepareError(f"extra memslot at {gpa:#x}+{size:#x}: errno {e}")
    m.write(layout.PARAMS_GPA, params.pack(params.PARAMS, case.guest_params()))
    m.write(params.RESULT_GPA, params.RESULT_POISON.to_bytes(8, "little") * len(params.RESULT))
    m.write(params.LOG_GPA, eventlog.poison())
    if NEED_SVM in case.needs:
        m.write(case.vmcb12_gpa, vmcb12.prepare(payload, case.l2_entry, case.vmcb).to_bytes())
    for gpa, data in case.memory.items():
        m.write(gpa, data)


# What the contract checks of VMCB12 after the run: all in its control area
# (APM vol. 2, appendix B, table B-1), so only that is read (a recorded case
# sends it from the guest: kvmtest.record).
VMCB12_FIELDS = ("exit_code", "exit_info_1", "exit_info_2", "exit_int_info", "event_inj",
                 "int_ctl", "tlb_ctl")


def _read_vmcb12(m: Machine, obs: Observation, gpa: int = layout.VMCB12_GPA) -> None:
    control = m.read(gpa, SAVE_AREA)
    for name in VMCB12_FIELDS:
        setattr(obs, name, vmcb.field(control, name))


def _on_sync(m: Machine, case: Case, obs: Observation) -> None:
    obs.outcome = SYNC
    raw = m.read(params.RESULT_GPA, 8 * len(params.RESULT))
    obs.l1 = params.unpack(params.RESULT, raw)
    nested = m.nested_state()
    if nested is not None:
        obs.gif, obs.guest_mode = nested.gif, nested.guest_mode


def _host_actions(m: Machine, case: Case, payload: Payload, stage: int,
                  obs: Observation) -> bool:
    """Carry out the case's actions for this stage; False if one was refused
    (obs then says which and why)."""
    for action in case.on_sync[stage]:
        problem = actions.perform(m, payload, action)
        obs.actions.append(f"{action}: {problem or 'ok'}")
        if problem:
            obs.outcome, obs.detail = ACTION_FAILED, f"{action}: {problem}"
            return False
    return True


def drive(m: Machine, case: Case, payload: Payload, timeout: float) -> Observation:
    """Run L1 until DONE, an exception report, or something that ends the case."""
    obs = Observation(outcome=UNEXPECTED_EXIT)
    if params.STAGE_BEFORE_L1 in case.on_sync and not _host_actions(
            m, case, payload, params.STAGE_BEFORE_L1, obs):
        return obs
    for _ in range(MAX_EXITS):
        ex = m.run(timeout)
        if isinstance(ex, InterruptedExit):  # a stray signal, not the guest: go on
            continue
        obs.exits.append(type(ex).__name__)
        if isinstance(ex, IoExit) and ex.port == ucall.UCALL_PORT:
            u = ucall.decode(m.read, ex.value)
            if u.cmd == ucall.Ucall.SYNC and u.args[0] in case.on_sync:
                if not _host_actions(m, case, payload, u.args[0], obs):
                    break
                continue
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
        _read_vmcb12(m, obs, case.vmcb12_gpa)
    if case.scenario == SCRIPT:
        obs.log = eventlog.read(m.read)
        if obs.outcome != SYNC:  # where the vCPU was left (e.g. still in L2)
            nested = m.nested_state()
            if nested is not None:
                obs.gif, obs.guest_mode = nested.gif, nested.guest_mode
    return obs


def set_nested_state(m: Machine, case: Case, payload: Payload, timeout: float) -> Observation:
    """KVM_SET_NESTED_STATE (by default in guest mode: control area from the
    case's VMCB12, save area = L1's state; KVM validates both), after the host
    set up what Case.nested asks for (nested_request.HostPrep).  A refused
    state must leave L1 runnable: the vmrun payload on the default VMCB12 must
    then VMRUN and see L2's VMMCALL."""
    v = vmcb12.prepare(payload, case.l2_entry, case.vmcb)
    prep, blob = nested_request.from_case(case.nested, v.to_bytes())
    err, step = m.prepare_nested(prep)
    if not err:
        err, step = m.set_nested(blob), "KVM_SET_NESTED_STATE"
    outcome = ACCEPTED if err == 0 else EINVAL if err == errno.EINVAL else UNEXPECTED_EXIT
    obs = Observation(outcome=outcome, detail=f"{step}: errno {err}" if err else "accepted")
    nested = m.nested_state()
    if nested is not None:
        obs.gif, obs.guest_mode = nested.gif, nested.guest_mode
    if prep.smm:
        m.leave_smm()  # L1 runs (or not) outside SMM, as before the request
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


def replay_case(case: Case, payload: Payload, trace: bytes, timeout: float,
                bad: re.Pattern[str] = kmsg.BAD) -> Observation:
    """The host's half of a recorded case (kvmtest.record): drive() replayed
    over the guest's trace, the kernel log's BAD lines from it too."""
    steps, warnings = record.parse(trace, timeout, bad)
    obs = record.replay(case, payload, steps, timeout)
    obs.kernel_log_checked = warnings is not None
    obs.kernel_warnings = warnings
    return obs


def run_case(backend: Backend, case: Case, timeout: float = DEFAULT_TIMEOUT) -> Observation:
    payload = load_payload(case.payload)
    svm = NEED_SVM in case.needs
    if getattr(backend, "records", False) and record.eligible(case):
        compiled = record.compile_case(case, payload)
        trace = backend.record(payload, svm, case.cpuid, compiled, timeout)
        return replay_case(case, payload, trace, timeout, backend.kmsg_bad)
    # Only a case that changes the guest CPUID passes cpuid= (other backends
    # need not know the keyword).
    extra = {"cpuid": case.cpuid} if case.cpuid else {}
    with backend.kernel_log() as warnings, backend.machine(payload, svm=svm, **extra) as m:
        try:
            prepare_memory(m, case, payload)
            problem = None
        except PrepareError as e:  # the backend could not set the case up
            problem = str(e)
        if problem is not None:
            obs = Observation(outcome=EMULATION_ERROR, detail=problem)
        elif case.scenario == SET_NESTED_STATE:
            obs = set_nested_state(m, case, payload, timeout)
        elif case.scenario in (VMRUN, INSN, SCRIPT):
            obs = drive(m, case, payload, timeout)
        elif case.scenario == SMM:
            from .smm import drive_smm  # smm.py builds on drive(): import here

            obs = drive_smm(m, case, payload, timeout)
        else:
            raise ValueError(f"{case.id}: unknown scenario {case.scenario!r}")
    obs.kernel_log_checked = warnings is not None
    obs.kernel_warnings = warnings
    return obs
