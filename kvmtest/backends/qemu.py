"""The qemu backend: boot a chosen kernel, run the cases on its KVM, judge here.

One boot runs the whole selection through a kvmtest.qemu.session.QemuSession
(with share_boot, several configurations that differ only in kvm_amd
parameters: finish_config() reloads kvm and kvm_amd for the next one):
the guest agent (kvmtest.agent) uses the kvm backend against the guest
kernel's /dev/kvm and streams observations back over the channel; they are
judged on the host.  The guest sees nothing of the host's filesystem.
Console, QEMU log, the session transcript and result.json (facts and
results as decoded here) stay in the artifacts directory (--artifacts DIR,
or a temporary one kept with --keep or after a failure).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..case import CONFIG_NEEDS, Case
from ..casecodec import to_json
from ..cases import DEFAULT_MAXPHYADDR, by_id
from ..config import Config
from ..kmod import KmodError, check_vermagic
from ..observation import Observation
from ..qemu.cache import NoSpaceError
from ..qemu.errors import GuestFault, QemuError
from ..qemu.kernels import resolve_kernel
from ..qemu.machine import kvm_error
from ..qemu.process import open_output
from ..qemu.session import CaseError, QemuSession, UnloadError
from . import BackendError, KernelError

HEADLINE = re.compile(r"WARNING:|BUG:|Oops|kernel BUG|general protection fault")
NEED_ORDER = ("no_svm", "svm", "nested_state", "smm")


class QemuBackend:
    name = "qemu"

    def __init__(self, kernel: str, modules: str | None = None, kvm_modules: str | None = None,
                 cpu: str | None = None, kvm_amd_params: dict[str, str] | None = None,
                 artifacts: str | None = None, profile: str | None = None,
                 keep: bool = False, guest_env: dict[str, str] | None = None,
                 share_boot: bool = False, records: bool | None = None) -> None:
        try:
            self.kernel = resolve_kernel(kernel, modules=modules)
        except QemuError as e:
            raise BackendError(str(e)) from None
        if kvm_modules:
            try:  # a vermagic mismatch is reported before booting anything
                check_vermagic(Path(kvm_modules), self.kernel.release)
            except KmodError as e:
                raise BackendError(str(e)) from None
        self.profile = profile
        self.config = Config.from_options(cpu, kvm_amd_params)
        self.guest_env = guest_env  # e.g. the bench's KVMTEST_PARK_VCPUS=0
        self.records = records  # None: KVMTEST_RECORD decides (QemuSession)
        self.cpu = cpu
        self.kvm_modules = kvm_modules
        self.artifacts = Path(artifacts) if artifacts else None
        self.keep = keep
        self.kernel_desc = self.kernel.describe()  # names the concrete package
        self.guest_facts: dict = {}
        self.unattributed_warnings: list[str] = []
        self.timings: dict = {}
        self.replayed = 0
        self.outdir: Path | None = None
        self.run_as = ""
        # share_boot: the guest stays up after a batch; finish_config() ends
        # a configuration (kvm, kvm_amd reloaded for the next, or power-off).
        self.share_boot = share_boot
        self._session: QemuSession | None = None
        self._console_mark = 0  # console WARN/BUG lines before this configuration
        self._reload_error: str | None = None  # the next batch's configuration did not load
        self._cases_seen: set[str] = set()  # kernel-log lines the last batch's cases saw
        # Where result.json goes (kept artifacts): the session's directory, or
        # on a shared boot each configuration's own (kvmtest.cellgroup).
        self.results_dir: Path | None = None

    def capabilities(self) -> dict[str, str | None]:
        # Known only once the guest said hello (facts, kvm_amd's effective
        # parameters): run_batch decides per case.
        return {"svm": None, "no_svm": None, "nested_state": None, "smm": None,
                **dict.fromkeys(CONFIG_NEEDS)}

    def describe(self) -> dict[str, str]:
        return {"backend": self.name, "kernel": self.guest_facts.get("kernel", self.kernel.release),
                "detail": self.kernel_desc}

    def run_batch(self, cases: Sequence[Case], timeout: float) -> dict[str, Observation | str]:
        """Observations by case id; a str value is a skip reason."""
        if self._reload_error is not None:
            error, self._reload_error = self._reload_error, None
            raise KernelError(error)
        session = self._session
        if session is None:
            session = QemuSession(self.kernel, config=self.config, kvm_modules=self.kvm_modules,
                                  artifacts=self.artifacts, keep=self.keep,
                                  guest_env=self.guest_env, records=self.records)
        self._session = None  # back only when the guest is still up for the next config
        with self._faults(session):
            if not session.started:
                session.start()
                self._console_mark = 0
            self._record(session)
            out = self._run(session, cases, timeout)
            self._write_results(session, out)
            if self.share_boot:
                self._session = session
            else:
                session.close()  # power-off: a panic or WARN at teardown still counts
        self._record(session)
        self._cases_seen = {w for o in out.values() if isinstance(o, Observation)
                            for w in o.kernel_warnings or []}
        if not self.share_boot:
            self.unattributed_warnings = self._unattributed(session)
        return out

    @property
    def live(self) -> bool:
        """share_boot: a guest is up, and the next batch runs on it."""
        return self._session is not None

    def finish_config(self, kvm_amd_params: dict[str, str] | None) -> list[str]:
        """share_boot: end this configuration; load kvm and kvm_amd again,
        kvm_amd with KVM_AMD_PARAMS, for the next one (None: this was the
        last, power off).  Returns the WARN/BUG lines of this configuration
        that no case saw (its VMs are destroyed and its modules unloaded
        here).  KernelError if the guest breaks before the agent's
        kernel-log marker, or the modules cannot be unloaded: this
        configuration's teardown.  Anything after the marker is the next
        configuration's: its batch fails (a broken guest: it boots afresh)."""
        session, self._session = self._session, None
        if kvm_amd_params is not None:
            self.config = Config.from_options(self.cpu, kvm_amd_params)
        if session is None:  # the batch failed and took the guest along: boot afresh
            return []
        if kvm_amd_params is None:
            with self._faults(session):
                session.close()
            self._record(session)
            return self._unattributed(session)
        with self._faults(session):  # this configuration's: a KernelError here
            try:
                session.reload(kvm_amd_params)
            except (UnloadError, NoSpaceError):
                raise
            except GuestFault as e:
                session.abort()  # drains the console: which side of the marker?
                if session.marker() is None:  # while this configuration was torn down
                    raise
                self._reload_error = f"loading kvm/kvm_amd again on the shared boot broke it: {e}"
            except QemuError as e:  # did not load: the next batch says so
                self._reload_error = str(e)
                self._session = session
            else:
                self._session = session
        self._record(session)
        end = session.marker()
        outside = self._unattributed(session, end)
        self._console_mark = end if end is not None else session.console_mark()
        return outside

    @contextlib.contextmanager
    def _faults(self, session: QemuSession) -> Iterator[None]:
        """A broken guest or QEMU as KernelError (a full disk: BackendError);
        the session is torn down then."""
        try:
            yield
        except BaseException as e:
            self._session = None
            session.abort()
            self._record(session)
            if isinstance(e, NoSpaceError):  # this machine's problem, not the kernel's
                raise BackendError(str(e)) from None
            if isinstance(e, QemuError):  # GuestFault included
                raise KernelError(str(e)) from None
            raise

    def _unattributed(self, session: QemuSession, end: int | None = None) -> list[str]:
        """WARN/BUG/oops on the console from this configuration's start to END
        (a console mark) that no case's kernel-log window saw (VM teardown,
        the agent's own start or exit): they still fail the run."""
        return [w for w in session.console_warnings(since=self._console_mark, until=end)
                if HEADLINE.match(w) and w not in self._cases_seen]

    def _write_results(self, session: QemuSession, out: dict[str, Observation | str]) -> None:
        """result.json in a kept artifacts directory: the facts and every case's
        checked observation or skip, as the host decoded them."""
        if session.outdir is None or session.facts is None or not (self.artifacts or self.keep):
            return
        results = {cid: {"observation": to_json(o)} if isinstance(o, Observation) else {"skip": o}
                   for cid, o in out.items()}
        data = json.dumps({"facts": dataclasses.asdict(session.facts), "results": results})
        where = self.results_dir or session.outdir
        where.mkdir(parents=True, exist_ok=True)
        fd = open_output(where / "result.json")
        try:
            os.write(fd, data.encode())
        finally:
            os.close(fd)

    def _record(self, session: QemuSession) -> None:
        self.outdir = session.outdir
        self.run_as = session.run_as
        self.timings = {**session.timings, **session.guest_timings()}
        self.replayed = session.replayed  # kvmtest.record: cases run in C, replayed here
        if session.facts is not None:
            self.guest_facts = {"kernel": session.facts.kernel}

    def _run(self, session: QemuSession, cases: Sequence[Case],
             timeout: float) -> dict[str, Observation | str]:
        facts = session.facts
        assert facts is not None
        where = f"(artifacts: {session.outdir})"
        modules = kvm_error(session.modules, session.dev_kvm, session.kernel)
        if modules:
            session.failed = True
            raise KernelError(f"kvm modules did not load ({modules}) {where}\n"
                              f"{session.console_tail()}")
        if facts.error or not facts.svm or not facts.nested_state:
            session.failed = True  # keep the artifacts
            # Testing nested SVM is this backend's point: no skip-and-pass.
            raise KernelError(
                f"the guest kernel's KVM has no nested SVM ({facts.error or ''}SVM in supported "
                f"CPUID: {facts.svm}, KVM_CAP_NESTED_STATE: {facts.nested_state}, kvm_amd "
                f"parameters: {facts.kvm_amd}) {where}\n{session.console_tail()}")
        caps = facts.capabilities()
        out: dict[str, Observation | str] = {}
        runnable = []
        for case in _for_maxphyaddr(cases, facts.maxphyaddr):
            order = sorted(case.needs, key=lambda n: (_need_order(n), n))
            reasons = (caps.get(n, f"the guest cannot provide {n!r}") for n in order)
            reason = next((r for r in reasons if r), None)
            if reason:
                out[case.id] = reason
            else:
                runnable.append(case)
        for case_id, result in session.run(runnable, timeout):
            if isinstance(result, CaseError):
                session.failed = True
                raise KernelError(f"the guest agent failed on case {case_id}: {result.message} "
                                  f"{where}")
            out[case_id] = result
        return out

    def close(self) -> None:
        if self._session is not None:  # share_boot, and finish_config(None) never came
            session, self._session = self._session, None
            session.abort()


def _need_order(need: str) -> int:
    return NEED_ORDER.index(need) if need in NEED_ORDER else len(NEED_ORDER)


def _for_maxphyaddr(cases: Sequence[Case], maxphyaddr: int) -> list[Case]:
    """The catalogue's cases rebuilt for the guest's MAXPHYADDR (the CLI built
    them for the default); any other case (generated) is sent as it is."""
    if maxphyaddr == DEFAULT_MAXPHYADDR:
        return list(cases)
    default, guest = by_id(DEFAULT_MAXPHYADDR), by_id(maxphyaddr)
    return [guest[c.id] if default.get(c.id) == c and c.id in guest else c for c in cases]
