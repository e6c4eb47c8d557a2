"""One booted kernel running batches of cases: the host side of the agent protocol.

API (for ``kvmtest run --backend qemu``, matrix and fuzz drivers)::

    from kvmtest.qemu.session import QemuSession
    with QemuSession("debian:linux-image-6.1.0-56-amd64-unsigned",
                     config=Config.parse("npt=0"), artifacts=None) as s:
        s.facts                  # Facts: kernel, kvm_module, kvm_amd, maxphyaddr,
                                 #        svm, nested_state, smm (+ error)
        s.facts.capabilities()   # need -> None | skip reason, like KvmBackend's
        cases = s.catalogue()    # the catalogue built for the guest's MAXPHYADDR
        for case_id, result in s.run(cases, timeout=5.0):
            ...                  # result: Observation | str (skip) | CaseError
        s.run(more_cases)        # any number of batches in one boot
        s.close()                # bye, power-off, console scanned (optional:
                                 # __exit__ does it; faults here are raised too)
        s.console_warnings()     # WARN/BUG/oops lines seen on the console

* ``QemuSession(kernel, *, config, kvm_modules, modules, artifacts, keep,
  accel, machine, append, boot_timeout, command, files, limits, case_silence,
  guest_env, records)``:
  ``kernel`` is a Kernel or a spec (kvmtest.qemu.kernels.resolve_kernel);
  ``config`` a kvmtest.config.Config (CPU model, kvm_amd parameters;
  nested=1 is always set); ``kvm_modules`` a directory of rebuilt
  kvm.ko/kvm-amd.ko.  ``command``/``files`` replace the guest agent (tests).
* Entering boots the kernel and waits for the agent's hello (phases
  ``boot`` -> ``modules`` -> ``agent``).  Cases are sent whole
  (kvmtest.casecodec), so generated cases run unchanged; or, those without
  host actions, compiled for the agent's C loop, their trace replayed here
  (kvmtest.record; ``records=False`` or KVMTEST_RECORD=0 turns it off).
* Every failure of the guest is a ``GuestFault`` (kvmtest.qemu.errors):
  the phase, the case in flight (``fault.case``: keep it, reboot, go on),
  QEMU's exit status and the console tail.  QEMU is always killed and
  reaped; after a fault the session is over (open a new one).
* ``artifacts``: the directory for console.log, qemu.log and session.jsonl
  (each guest frame after validation, re-encoded by the host).  Without
  it a temporary directory is used and removed on success unless
  ``keep``; after a fault it is kept and named in the fault.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmtest import record
from kvmtest.case import Case
from kvmtest.casecodec import CodecError, from_json, to_json
from kvmtest.config import Config
from kvmtest.kvm_amd import config_capabilities, cpu_capabilities
from kvmtest.observation import Observation
from kvmtest.payloads import Payload, load_payload
from kvmtest.qemu import channel
from kvmtest.qemu.errors import GuestFault, QemuError
from kvmtest.qemu.initramfs import BootConfig, check_param
from kvmtest.qemu.kernels import Kernel, resolve_kernel
from kvmtest.qemu.machine import (
    DEFAULT_KVM_AMD_PARAMS,
    GUEST_ENV,
    MACHINES,
    ModuleLoad,
    choose_accel,
    choose_machine,
    initrd_memfd,
    kernel_image,
    kvm_error,
    module_from_frame,
    qemu_argv,
)
from kvmtest.qemu.process import (
    POLL,
    Limits,
    QemuProcess,
    exit_status,
    open_output,
    printable,
    qemu_identity,
)
from kvmtest.qemu.runtime import GUEST_AGENT

AGENT = GUEST_AGENT
BOOT_BUDGET = 120.0  # s from QEMU start to the agent's hello (TCG, loaded host)
SILENCE = {"boot": 30.0, "modules": 30.0, "agent": 60.0}  # s without any output
CASE_SILENCE = 30.0  # s over the case timeout without a frame, per case
PER_CASE_BUDGET = 2.0  # s per case on top of the batch's timeout
SHUTDOWN_BUDGET = 15.0  # s for bye + power-off
RELOAD_BUDGET = 60.0  # s for VM teardown, rmmod + insmod kvm and kvm_amd, the new hello
TRANSCRIPT_CAP = 16 * 1024 * 1024


@dataclass(frozen=True)
class Facts:
    """What the agent found in the guest (checked strictly on arrival)."""

    kernel: str
    kvm_module: str
    kvm_amd: dict[str, str]
    maxphyaddr: int = 0
    svm: bool = False
    nested_state: int = 0
    smm: int = 0
    pcid: bool = False  # PCID in KVM's supported CPUID
    error: str | None = None  # /dev/kvm unusable

    def capabilities(self) -> dict[str, str | None]:
        """need -> None when the guest's KVM provides it, else why not."""
        return {
            "no_svm": None,
            "svm": None if self.svm else "the guest kernel's KVM has no SVM",
            "nested_state": None if self.nested_state else (
                "the guest kernel's KVM lacks KVM_CAP_NESTED_STATE (kvm_amd nested=1, "
                "Linux 5.10+)"),
            "smm": None if self.smm else "the guest kernel's KVM lacks KVM_CAP_X86_SMM",
            **config_capabilities(self.kvm_amd),
            **cpu_capabilities(self.pcid),
        }


@dataclass(frozen=True)
class CaseError:
    """The agent's run_case raised (a harness bug or a broken KVM ioctl)."""

    message: str


Result = Observation | str | CaseError


def _clean(text: str, limit: int) -> str:
    # Most strings are plain printable ASCII already: no regex pass for them.
    if len(text) <= limit and text.isascii() and text.isprintable():
        return text
    return printable(text, limit)


def _clean_strings(value: Any) -> Any:
    if type(value) is int or value is None:
        return value
    if isinstance(value, str):
        return _clean(value, 4000)
    if isinstance(value, list):
        return [_clean_strings(v) for v in value]
    if isinstance(value, dict):
        return {_clean(k, 200) if isinstance(k, str) else k: _clean_strings(v)
                for k, v in value.items()}
    return value


_OBSERVATION_FIELDS = tuple(f.name for f in dataclasses.fields(Observation))


def decode_observation(data: dict[str, Any]) -> Observation:
    """A guest's observation, strictly typed, strings made printable."""
    obs = from_json(Observation, data, strict=True)
    for name in _OBSERVATION_FIELDS:
        setattr(obs, name, _clean_strings(getattr(obs, name)))
    return obs


def decode_facts(data: dict[str, Any]) -> Facts:
    facts = from_json(Facts, data, strict=True)
    return Facts(**{f.name: _clean_strings(getattr(facts, f.name))
                    for f in dataclasses.fields(Facts)})


@functools.cache
def _payload(name: str) -> Payload:
    """The host's build of a payload (the agent checks its own against it)."""
    return load_payload(name)


class UnloadError(QemuError):
    """kvm/kvm_amd could not be unloaded at a reload: the configuration that
    ended still holds them."""


class QemuSession:
    """See the module docstring."""

    def __init__(
        self,
        kernel: Kernel | str,
        *,
        config: Config | None = None,
        kvm_modules: Path | str | None = None,
        modules: Path | str | None = None,
        artifacts: Path | str | None = None,
        keep: bool = False,
        accel: str = "auto",
        machine: str = "auto",
        append: str = "",
        memory: str = "1G",
        boot_timeout: float = BOOT_BUDGET,
        command: Sequence[str] | None = None,
        files: Mapping[str, bytes] | None = None,
        limits: Limits | None = None,
        case_silence: float = CASE_SILENCE,
        guest_env: Mapping[str, str] | None = None,
        records: bool | None = None,
    ) -> None:
        self.kernel = kernel if isinstance(kernel, Kernel) else resolve_kernel(kernel,
                                                                              modules=modules)
        self.config = config or Config()
        self.guest_env = {**GUEST_ENV, **(guest_env or {})}  # the agent's environment
        self.kvm_modules = Path(kvm_modules) if kvm_modules else None
        self.accel, self.cpu = choose_accel(accel, self.config.cpu)
        self.machine_type = machine
        self.append = append
        self.memory = memory
        self.boot_timeout = boot_timeout
        self.command = list(command or AGENT)
        self.files = dict(files or {})
        self.limits = limits
        self.case_silence = case_silence
        self.keep = keep
        self.artifacts = Path(artifacts) if artifacts else None
        self.outdir: Path | None = None
        self.facts: Facts | None = None
        self.modules: list[ModuleLoad] = []
        self.dev_kvm: bool | None = None
        self.marks: dict[str, float] = {}  # guest uptime at each /init and agent stage
        self.host_marks: dict[str, float] = {}  # host clock (since QEMU started) on arrival
        self.output: dict[str, bytes] = {"stdout": b"", "stderr": b""}
        self.timings: dict[str, float | None] = {}
        self.failed = False
        self.closed = False
        self.run_as = ""
        self._vm: QemuProcess | None = None
        self._paths: dict[str, Path | None] = {}
        self._transcript: int | None = None
        self._transcript_size = 0
        self._host_start = 0.0
        self._reloads = 0
        self._sync: str | None = None  # the last reload's kernel-log marker
        # records=False or KVMTEST_RECORD=0: every case whole, on the agent's
        # Python drive() (kvmtest.record; what the recorded path is compared with).
        self.records = os.environ.get("KVMTEST_RECORD") != "0" if records is None else records
        self.replayed = 0  # cases whose trace was replayed here, over the session

    # -- lifecycle

    def __enter__(self) -> QemuSession:
        try:
            self.start()
        except BaseException:
            self.failed = True
            self._teardown()
            raise
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is not None:
            self.failed = True
            self._teardown()
            return
        self.close()

    def _prepare_outdir(self) -> Path:
        if self.artifacts is not None:
            self.artifacts.mkdir(parents=True, exist_ok=True)
            return self.artifacts.resolve()
        return Path(tempfile.mkdtemp(prefix="kvmtest-qemu-"))

    def start(self) -> None:
        """Boot and wait for the agent's hello (GuestFault on any failure)."""
        self._host_start = time.monotonic()
        image = kernel_image(self.kernel, pvh=True)
        machine, machine_append = choose_machine(self.machine_type, self.accel, image,
                                                 self.kernel)
        boot_config = BootConfig(
            kvm_amd_params={**DEFAULT_KVM_AMD_PARAMS, **self.config.kvm_amd_params},
            kvm_params={},
            command=self.command,
            env=self.guest_env,
            kvm_modules_dir=self.kvm_modules,
            transport=MACHINES[machine],
            files=self.files,
        )
        initrd, plan = initrd_memfd(self.kernel, boot_config)
        self._paths = {planned.name: planned.path for planned in plan}
        self.outdir = self._prepare_outdir()
        self._transcript = open_output(self.outdir / "session.jsonl")
        run_as = qemu_identity(self.accel)
        self.run_as = run_as.user + (f" ({run_as.note})" if run_as.note else "")
        append = f"{machine_append} {self.append}".strip()

        def argv(**fds: int) -> list[str]:
            return qemu_argv(**fds, accel=self.accel, cpu=self.cpu, memory=self.memory,
                             smp=1, append=append, machine=machine)

        self._vm = QemuProcess(argv, outdir=self.outdir, kernel_image=image, initrd_fd=initrd,
                           run_as=run_as, limits=self.limits)
        self._vm.start()
        self.timings["host_prep_s"] = round(self._vm.started - self._host_start, 3)
        deadline = self._vm.started + self.boot_timeout
        self._hello(deadline)
        self._phase("idle")
        self.timings["hello_s"] = round(self._vm.elapsed, 3)
        self.timings["first_output_s"] = self._vm.first_output_s

    def _hello(self, deadline: float, silence: float | None = None) -> None:
        hello = self._expect({"hello"}, deadline, silence)
        if hello["v"] != channel.PROTOCOL_VERSION:
            raise self._fault(f"the guest agent speaks protocol {hello['v']}, "
                              f"the host {channel.PROTOCOL_VERSION}")
        try:
            self.facts = decode_facts(hello["facts"])
        except CodecError as e:
            why = printable(str(e), 300)
            raise self._fault(f"the guest agent sent malformed facts: {why}") from None

    def reload(self, kvm_amd_params: Mapping[str, str]) -> None:
        """Another configuration without a boot: the agent destroys its VMs,
        unloads kvm_amd and kvm, marks the kernel log, loads them again,
        kvm_amd with KVM_AMD_PARAMS (over DEFAULT_KVM_AMD_PARAMS), then says
        hello with the new facts.  UnloadError if they could not be unloaded
        (the configuration that ended holds them); QemuError if they did not
        load (the session can try another reload); GuestFault if the guest
        broke (marker() tells on which side of the marker)."""
        vm = self._vm
        if vm is None or vm.phase != "idle" or self.failed:
            raise QemuError("the session is not ready for a reload (not started, busy or "
                            "failed)")
        params = {**DEFAULT_KVM_AMD_PARAMS, **kvm_amd_params}
        for name, value in params.items():
            check_param(f"{name}={value}")
        t0 = time.monotonic()
        self._phase("reload")
        self.facts = None  # until the new hello
        self.config = Config(cpu=self.config.cpu, kvm_amd=tuple(sorted(kvm_amd_params.items())))
        self._reloads += 1
        self._sync = f"reload-{self._reloads}"
        vm.send({"t": "reload", "kvm_amd": params, "sync": self._sync})
        frame = self._expect({"reloaded"}, t0 + RELOAD_BUDGET, RELOAD_BUDGET)
        error = printable(frame["error"], 500)
        if frame["stage"] == "unload":
            self._phase("idle")
            raise UnloadError(f"kvm/kvm_amd could not be unloaded after this configuration "
                              f"(a VM or vCPU reference left behind?): {error or '?'}")
        if frame["stage"] != "load":
            raise self._fault(f"the guest broke the protocol: a reload stage "
                              f"{printable(frame['stage'], 40)!r}")
        self._await_sync(self._sync, t0 + RELOAD_BUDGET)
        if error:
            self._phase("idle")
            raise QemuError(f"kvm/kvm_amd did not load again with kvm_amd "
                            f"{' '.join(f'{k}={v}' for k, v in params.items())}: {error}")
        self._hello(t0 + RELOAD_BUDGET, RELOAD_BUDGET)
        self._phase("idle")
        self.timings["reload_s"] = round(time.monotonic() - t0, 3)

    def marker(self) -> int | None:
        """console_mark() at the last reload's kernel-log marker, once the
        console showed it: the console WARNs before it belong to the
        configuration that ended, those after it to the next."""
        if self._vm is None or self._sync is None:
            return None
        return self._vm.scanner.syncs.get(self._sync)

    def _await_sync(self, sync: str, deadline: float) -> int:
        """console_mark() at the agent's kernel-log marker SYNC: the console
        runs behind the channel, and a WARN printed while the last
        configuration's VMs were destroyed or its modules unloaded must be
        counted for it."""
        vm = self._vm
        assert vm is not None
        while sync not in vm.scanner.syncs:
            if vm.exited():
                vm.wait_exit(0.0)  # drains the console
                if sync in vm.scanner.syncs:
                    break
                raise self._fault(f"the guest powered off during the reload "
                                  f"({exit_status(vm.returncode)})")
            if time.monotonic() >= deadline:
                raise self._fault(f"the console never showed the reload's marker {sync!r}")
            vm.wait(min(POLL, max(0.0, deadline - time.monotonic())))
        return vm.scanner.syncs[sync]

    @property
    def started(self) -> bool:
        return self._vm is not None

    @property
    def qemu_pid(self) -> int | None:
        """QEMU's process id once started (reaped when the session ends)."""
        return self._vm.proc.pid if self._vm is not None and self._vm.proc else None

    def _phase(self, phase: str, case: str | None = None) -> None:
        assert self._vm is not None
        self._vm.phase, self._vm.case = phase, case

    def _fault(self, what: str) -> GuestFault:
        assert self._vm is not None
        self.failed = True
        fault = self._vm.fault(what)
        fault.artifacts = str(self.outdir)
        return fault

    def _record(self, frame: dict[str, Any]) -> None:
        if self._transcript is None or self._transcript_size > TRANSCRIPT_CAP:
            return
        data = channel.encode(frame)
        self._transcript_size += len(data)
        os.write(self._transcript, data)

    def _expect(self, kinds: set[str], deadline: float, silence: float | None = None
                ) -> dict[str, Any]:
        """The next frame of a kind in KINDS; boot-time frames are absorbed on the way."""
        vm = self._vm
        assert vm is not None
        while True:
            try:
                frame = vm.next_frame(deadline=deadline,
                                      silence=silence or SILENCE.get(vm.phase, 60.0))
            except GuestFault as fault:
                self.failed = True
                fault.artifacts = str(self.outdir)
                self._explain(fault)
                raise
            self._record(frame)
            kind = frame["t"]
            if kind in kinds:
                return frame
            try:
                self._absorb(frame)
            except channel.ProtocolError as e:
                why = printable(str(e), 300)
                raise self._fault(f"the guest broke the protocol: {why}") from None

    def _absorb(self, frame: dict[str, Any]) -> None:
        """Frames /init sends around the agent's: marks, modules, output, exit."""
        assert self._vm is not None
        kind, phase = frame["t"], self._vm.phase
        if kind == "mark" and len(self.marks) < 32:
            stage = printable(frame["stage"], 40)
            self.marks[stage] = float(frame["uptime"])
            self.host_marks[stage] = round(self._vm.elapsed, 3)
            if phase in ("boot", "modules"):
                self._phase({"channel": "modules", "modules": "agent"}.get(stage, phase))
        elif kind == "module" and phase == "modules":
            self.modules.append(module_from_frame(frame, self._paths))
        elif kind == "dev_kvm" and phase == "modules":
            self.dev_kvm = frame["present"]
        elif kind == "output" and frame["stream"] in self.output:
            try:
                self.output[frame["stream"]] += bytes.fromhex(frame["hex"])
            except ValueError:
                raise channel.ProtocolError("an output frame that is not hex") from None
        elif kind == "fatal":
            raise self._fault(f"guest init failed: {printable(frame['message'], 300)}")
        elif kind == "exit":
            who = "the guest agent"
            stderr = printable(self.output["stderr"].decode("ascii", "replace").strip(), 2000)
            stderr = stderr.splitlines()[-1] if stderr else ""
            before = "before its hello" if self.facts is None else "early"
            what = f"{who} exited {before} with status {frame['rc']}"
            if self.facts is None and phase == "agent":
                error = kvm_error(self.modules, self.dev_kvm, self.kernel)
                if error:
                    what += f" (kvm modules: {error})"
            raise self._fault(what + (f": {stderr}" if stderr else ""))
        else:
            raise channel.ProtocolError(f"a {kind!r} frame during {phase}")

    def _explain(self, fault: GuestFault) -> None:
        """Add what the module report says when the guest died before hello."""
        if self.facts is None and self.modules:
            error = kvm_error(self.modules, self.dev_kvm, self.kernel)
            if error and "kvm modules" not in fault.what:
                fault.what += f" (kvm modules: {error})"

    # -- cases

    def catalogue(self) -> tuple[Case, ...]:
        """The case catalogue built for the guest's MAXPHYADDR."""
        from kvmtest.cases import catalogue

        if self.facts is None or not self.facts.maxphyaddr:
            raise QemuError("the guest reported no MAXPHYADDR (no usable /dev/kvm)")
        return catalogue(self.facts.maxphyaddr)

    def run(self, cases: Sequence[Case], timeout: float = 5.0) -> Iterator[tuple[str, Result]]:
        """Run CASES in the guest; yield (case id, result) as results stream in.

        Consume the iterator fully: the session is unusable after a batch
        was abandoned or a GuestFault was raised.
        """
        vm = self._vm
        if vm is None or self.facts is None or vm.phase != "idle":
            raise QemuError("the session is not ready for a batch (not started, busy or failed)")
        if self.facts.error:
            raise QemuError(f"the guest has no usable /dev/kvm: {self.facts.error}")
        if not cases:
            return
        ids = [c.id for c in cases]
        if len(set(ids)) != len(ids):
            raise QemuError("a batch with duplicate case ids")
        by_id = {c.id: c for c in cases}
        entries = [self._entry(c) for c in cases]
        compiled = {e["id"] for e in entries if "record" in e}
        vm.send({"t": "batch", "timeout": timeout, "cases": entries})
        started = time.monotonic()
        deadline = started + timeout + PER_CASE_BUDGET * len(cases) + 30.0
        silence = timeout + self.case_silence
        done = False
        self._phase("cases", None)
        try:
            for case_id in ids:
                self._phase("cases", None)
                frame = self._expect({"start", "result"}, deadline, silence)
                if frame["t"] != "start" or frame["id"] != case_id:
                    raise self._fault(f"the guest broke the protocol: expected the start of "
                                      f"{case_id}, got {self._describe(frame)}")
                self._phase("cases", case_id)
                frame = self._expect({"start", "result"}, deadline, silence)
                if frame["t"] != "result" or frame["id"] != case_id:
                    raise self._fault(f"the guest broke the protocol: expected the result of "
                                      f"{case_id}, got {self._describe(frame)}")
                yield case_id, self._result(frame, by_id[case_id], timeout,
                                            case_id in compiled)
            done = True
        finally:
            self.timings["cases_s"] = round(time.monotonic() - started, 3)
            if done:
                self._phase("idle")
            else:
                self.failed = True

    def _describe(self, frame: dict[str, Any]) -> str:
        ident = frame.get("id")
        return f"a {frame['t']!r} frame" + (f" for {printable(ident, 80)!r}" if ident else "")

    def _entry(self, case: Case) -> dict[str, Any]:
        """CASE for the batch frame: compiled for the agent's C loop
        (kvmtest.record) when it is eligible, else whole."""
        if self.records and record.eligible(case):
            payload = _payload(case.payload)
            try:
                compiled = record.compile_case(case, payload)
            except ValueError:  # memory outside the memslot: the guest's drive() says so
                return to_json(case)
            return {"id": case.id, "record": {
                **compiled.to_json(), "payload": payload.name,
                "image": zlib.crc32(payload.image),
                "needs": sorted(case.needs), "cpuid": dict(case.cpuid)}}
        return to_json(case)

    def _result(self, frame: dict[str, Any], case: Case, timeout: float,
                compiled: bool) -> Result:
        """COMPILED: the case was sent compiled, so its result is a trace (or
        a skip or an error), never an observation; else the other way."""
        outcomes = [k for k in ("observation", "skip", "error", "trace") if k in frame]
        if len(outcomes) != 1:
            raise self._fault("the guest broke the protocol: a result with "
                              f"{' and '.join(outcomes) or 'no outcome'}")
        wrong = "observation" if compiled else "trace"
        if wrong in frame:
            raise self._fault(f"the guest broke the protocol: {'an' if compiled else 'a'} "
                              f"{wrong} for {case.id}, which was sent "
                              f"{'compiled' if compiled else 'whole'}")
        if "skip" in frame:
            return "guest: " + printable(frame["skip"], 500)
        if "error" in frame:
            return CaseError(printable(frame["error"], 2000))
        if "trace" in frame:
            return self._replay(frame, case, timeout)
        try:
            return decode_observation(frame["observation"])
        except CodecError as e:
            raise self._fault(f"the guest sent a malformed observation: {printable(str(e), 300)}"
                              ) from None

    def _replay(self, frame: dict[str, Any], case: Case, timeout: float) -> Result:
        """A recorded case: its trace checked, then drive() replayed over it
        here (kvmtest.record); the Observation goes through the same strict
        decoding as one the agent built."""
        try:
            steps, warnings = record.parse(record.unpack_trace(frame["trace"]), timeout)
        except record.ReplayError as e:
            raise self._fault(f"the guest sent a malformed trace for {case.id}: "
                              f"{printable(str(e), 300)}") from None
        self.replayed += 1
        try:
            obs = record.replay(case, _payload(case.payload), steps, timeout)
        except record.ReplayError as e:  # well-formed, but not the run drive() asks for
            raise self._fault(f"the guest's trace for {case.id} does not answer drive(): "
                              f"{printable(str(e), 300)}") from None
        except Exception as e:  # as the agent reports an error in its drive()
            return CaseError(printable(f"{type(e).__name__}: {e} (replaying its trace on "
                                       "the host)", 2000))
        obs.kernel_log_checked = warnings is not None
        obs.kernel_warnings = warnings
        # Built here from checked records; its strings (an ASSERT's message,
        # kernel-log lines) still come from the guest: made printable.
        for name in _OBSERVATION_FIELDS:
            setattr(obs, name, _clean_strings(getattr(obs, name)))
        return obs

    # -- the end

    def close(self) -> None:
        """Say bye, let the guest power off, scan the console; GuestFault if it
        crashes on the way (e.g. a WARN or panic at VM teardown is still seen)."""
        if self.closed:
            return
        vm = self._vm
        try:
            if vm is not None and not self.failed and vm.phase == "idle":
                self._phase("shutdown")
                t0 = time.monotonic()
                vm.send({"t": "bye"})
                self._expect({"bye"}, t0 + SHUTDOWN_BUDGET, SHUTDOWN_BUDGET)
                # /init: exit frame, then power-off; QEMU exits by itself.
                try:
                    self._expect({"exit"}, t0 + SHUTDOWN_BUDGET, SHUTDOWN_BUDGET)
                except GuestFault as fault:
                    if vm.returncode != 0:
                        raise
                    del fault  # powered off right after the agent's bye: fine
                vm.wait_exit(max(0.0, t0 + SHUTDOWN_BUDGET - time.monotonic()))
                self.timings["shutdown_s"] = round(time.monotonic() - t0, 3)
                if vm.returncode is None:
                    raise self._fault("the guest did not power off after bye")
                if vm.scanner.panic:
                    raise self._fault(f"kernel panic: {vm.scanner.panic}")
        finally:
            self._teardown()

    def abort(self) -> None:
        """End the session after a failure: QEMU stopped, artifacts kept."""
        self.failed = True
        self._teardown()

    def _teardown(self) -> None:
        if self.closed:
            return
        self.closed = True
        vm = self._vm
        if vm is not None:
            vm.close()
            self.timings["wall_s"] = round(vm.elapsed, 3)
            self.timings["qemu_cpu_s"] = vm.cpu_s
            self.timings.update({f"mark_{k}": v for k, v in self.marks.items()})
        if self._transcript is not None:
            os.close(self._transcript)
            self._transcript = None
        if (self.outdir is not None and self.artifacts is None and not self.keep
                and not self.failed):
            shutil.rmtree(self.outdir, ignore_errors=True)
            self.outdir = None

    def console_warnings(self, since: int = 0, until: int | None = None) -> list[str]:
        """WARN/BUG/oops lines the console showed (the whole boot, or between
        two console marks)."""
        if self._vm is None:
            return []
        return sorted(set(self._vm.scanner.oopses[since:until]))

    def console_mark(self) -> int:
        """Where console_warnings(since=...) starts: after every line so far."""
        return len(self._vm.scanner.oopses) if self._vm is not None else 0

    def console_tail(self, lines: int = 30) -> str:
        return self._vm.console.tail_text(lines) if self._vm else ""

    def guest_timings(self) -> dict[str, float | None]:
        """Guest-side stage durations from the marks (uptime, seconds)."""
        m = self.marks

        def span(a: str, b: str) -> float | None:
            return round(m[b] - m[a], 3) if a in m and b in m else None

        return {"kernel_s": m.get("init"), "channel_s": span("init", "channel"),
                "modules_s": span("channel", "modules"), "python_s": span("python", "agent"),
                "python_start_s": span("modules", "python")}


__all__ = ["AGENT", "CaseError", "Facts", "QemuSession", "Result", "UnloadError"]
