"""The qemu backend: boot a chosen kernel, run the cases on its KVM, judge here.

One boot runs the whole selection: the guest (kvmtest.agent) uses the kvm
backend against the guest kernel's /dev/kvm, writes observations to the
shared directory, and powers off.  Console, kernel log and results stay in
the artifacts directory.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..case import CONFIG_NEEDS, Case
from ..kmod import KmodError, check_vermagic
from ..observation import Observation
from ..payloads import PREBUILT_ENV, load_payload
from ..qemu.cache import NoSpaceError
from ..qemu.errors import QemuError
from ..qemu.kernels import resolve_kernel
from ..qemu.machine import boot
from . import BackendError, KernelError

HEADLINE = re.compile(r"WARNING:|BUG:|Oops|kernel BUG|general protection fault")
BOOT_BUDGET = 120.0  # boot + module load under TCG, with a wide margin
PER_CASE_BUDGET = 2.0


def agent_env(cases: Sequence[Case]) -> dict[str, str]:
    """The guest runs the host's Python with -S: site processing (.pth files,
    the editable-install finder) costs seconds under TCG.  So the guest gets
    the few import roots it needs, and payloads built here beforehand."""
    import _cffi_backend

    import kvmtest

    for name in {c.payload for c in cases}:
        load_payload(name)  # (re)build on the host: the guest's / is read-only
    roots = [Path(kvmtest.__file__).parent.parent, Path(_cffi_backend.__file__).parent]
    return {"PYTHONPATH": ":".join(str(r) for r in roots), PREBUILT_ENV: "1"}


class QemuBackend:
    name = "qemu"

    def __init__(self, kernel: str, modules: str | None = None, kvm_modules: str | None = None,
                 cpu: str | None = None, kvm_amd_params: dict[str, str] | None = None,
                 artifacts: str | None = None, profile: str | None = None) -> None:
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
        self.cpu = cpu
        self.kvm_modules = kvm_modules
        self.kvm_amd_params = {"nested": "1", **(kvm_amd_params or {})}
        self.artifacts = Path(artifacts) if artifacts else None
        self.kernel_desc = self.kernel.describe()  # names the concrete package
        self.guest_facts: dict = {}
        self.unattributed_warnings: list[str] = []
        self.timings: dict = {}
        self.outdir: Path | None = None

    def capabilities(self) -> dict[str, str | None]:
        # Known only inside the guest: the agent reports skips per case
        # (configuration needs too: kvm_amd's effective parameters there).
        return {"svm": None, "no_svm": None, "nested_state": None, "smm": None,
                **dict.fromkeys(CONFIG_NEEDS)}

    def describe(self) -> dict[str, str]:
        return {"backend": self.name, "kernel": self.guest_facts.get("kernel", self.kernel.release),
                "detail": self.kernel_desc}

    def _outdir(self) -> Path:
        if self.artifacts:
            self.artifacts.mkdir(parents=True, exist_ok=True)
            return self.artifacts.resolve()
        return Path(tempfile.mkdtemp(prefix="kvmtest-qemu-"))

    def run_batch(self, cases: Sequence[Case], timeout: float) -> dict[str, Observation | str]:
        """Observations by case id; a str value is the guest's skip reason."""
        out = self.outdir = self._outdir()
        request, result = out / "request.json", out / "result.json"
        result.unlink(missing_ok=True)
        request.write_text(json.dumps({"cases": [c.id for c in cases], "timeout": timeout}))
        try:
            g = boot(self.kernel, [sys.executable, "-S", "-m", "kvmtest", "agent", str(request),
                                   str(result)], env=agent_env(cases),
                     outdir=out, cpu=self.cpu, kvm_amd_params=self.kvm_amd_params,
                     kvm_modules_dir=self.kvm_modules,
                     timeout=BOOT_BUDGET + PER_CASE_BUDGET * len(cases) + timeout)
        except NoSpaceError as e:  # a full disk is this machine's problem, not the kernel's
            raise BackendError(str(e)) from None
        except QemuError as e:
            raise KernelError(str(e)) from None
        self.timings = g.timings()
        where = f"(console: {g.console_log})"
        if g.panicked:
            raise KernelError(f"kernel panicked: {g.panic_message} {where}\n{g.console_tail()}")
        if g.fatal:
            raise KernelError(f"guest init failed: {g.fatal} {where}\n{g.console_tail()}")
        bad = [m for m in g.modules if m.status not in ("ok", "builtin")]
        if bad or not g.dev_kvm:
            what = "; ".join(f"{m.name}: {m.status} {m.detail}".strip() for m in bad)
            raise KernelError(f"kvm modules did not load ({what or 'no /dev/kvm'}) {where}")
        if g.timed_out:
            raise KernelError(f"no result within the timeout {where}\n{g.console_tail()}")
        if not result.exists():
            raise KernelError(f"the guest agent wrote no result (rc {g.returncode}): "
                              f"{g.stderr.strip()[-500:]} {where}")
        data = json.loads(result.read_text())
        self.guest_facts = facts = data.get("facts", {})
        if "error" in data:
            raise KernelError(f"guest: {data['error']} {where}")
        if not facts.get("svm") or not facts.get("nested_state"):
            # Testing nested SVM is this backend's point: no skip-and-pass.
            raise KernelError(
                f"the guest kernel's KVM has no nested SVM (SVM in supported CPUID: "
                f"{facts.get('svm')}, KVM_CAP_NESTED_STATE: {facts.get('nested_state')}, "
                f"kvm_amd parameters: {facts.get('kvm_amd')}) {where}")
        observations: dict[str, Observation | str] = {}
        for case_id, r in data["results"].items():
            if "observation" in r:
                observations[case_id] = Observation(**r["observation"])
            elif "skip" in r:
                observations[case_id] = r["skip"]
        seen = {w for o in observations.values() if isinstance(o, Observation)
                for w in o.kernel_warnings or []}
        # WARN/BUG/oops on the console that no case's kernel-log window saw
        # (VM teardown, the agent's own start or exit) still fail the run.
        self.unattributed_warnings = [w for w in g.oopses
                                      if HEADLINE.match(w) and w not in seen]
        return observations

    def close(self) -> None:
        pass
