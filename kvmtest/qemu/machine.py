"""Boot a kernel under QEMU, run one host command inside it, reap QEMU.

The guest sees the host's ``/`` read-only over virtio-9p and chroots into it,
so the command runs with the host's paths and the host's Python (no guest
root filesystem to build).  The output directory is shared read-write at the
same path; /init writes the control files there:

    OUTDIR/console.log        serial console (kernel log + KVMTEST-MARK lines)
    OUTDIR/ctl/run.sh         the command, written by the host
    OUTDIR/ctl/modules.txt    kvm module load report (one line per module)
    OUTDIR/ctl/stdout|stderr  the command's output
    OUTDIR/ctl/rc             the command's exit status
    OUTDIR/ctl/dmesg.txt      the full kernel log after the command
    OUTDIR/ctl/qemu.log       QEMU's own stdout/stderr
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType

from kvmtest.qemu.errors import QemuError
from kvmtest.qemu.initramfs import (
    FATAL,
    HOSTROOT_TAG,
    MARKER,
    OUT_TAG,
    BootConfig,
    build_initrd,
    has_module,
)
from kvmtest.qemu.kernels import Kernel, pvh_image, resolve_kernel

QEMU = "qemu-system-x86_64"
DEFAULT_TCG_CPU = "EPYC"
DEFAULT_TIMEOUT = 180.0
DEFAULT_KVM_AMD_PARAMS = {"nested": "1"}  # merged under the caller's kvm_amd_params
PANIC_RE = re.compile(r"Kernel panic - not syncing.*")
# Lines that mean the kernel is unhealthy even if the command succeeded.
OOPS_RE = re.compile(
    r"(?:BUG: |Oops: |WARNING: CPU: |kernel BUG at |general protection fault"
    r"|Unable to handle kernel|RIP: ).*"
)
MARK_RE = re.compile(re.escape(MARKER) + r" (\S+) ([\d.]+)")
FATAL_RE = re.compile(re.escape(FATAL) + r" (.*)")
PR_SET_PDEATHSIG = 1
CTL_FILES = ("rc", "modules.txt", "stdout", "stderr", "dmesg.txt", "qemu.log")


@dataclass(frozen=True)
class ModuleLoad:
    """One line of the guest's module report."""

    name: str
    status: str  # ok | error | missing | builtin
    detail: str = ""  # insmod parameters, or the error text and dmesg tail
    path: Path | None = None  # the host file that was loaded (override or kernel's)


@dataclass
class GuestResult:
    """What one boot produced.  returncode is None when the command never finished."""

    kernel: Kernel
    command: list[str]
    outdir: Path
    returncode: int | None
    timed_out: bool
    panicked: bool
    wall_s: float
    accel: str
    cpu: str
    image: Path | None = None  # what QEMU booted (bzImage or PVH vmlinux)
    machine: str = ""
    modules: list[ModuleLoad] = field(default_factory=list)
    dev_kvm: bool | None = None
    marks: dict[str, float] = field(default_factory=dict)  # guest uptime per stage
    oopses: list[str] = field(default_factory=list)
    fatal: str | None = None  # /init gave up (9p mount failed, ...)
    panic_message: str | None = None
    stdout: str = ""
    stderr: str = ""
    qemu_returncode: int | None = None
    first_output_s: float | None = None  # host time from QEMU start to first console byte

    @property
    def console_log(self) -> Path:
        return self.outdir / "console.log"

    @property
    def ok(self) -> bool:
        """The command ran to completion and the kernel stayed healthy."""
        return self.returncode is not None and not self.panicked and not self.oopses

    @property
    def kvm_ready(self) -> bool:
        return bool(self.dev_kvm) and all(m.status in ("ok", "builtin") for m in self.modules)

    def kvm_error(self) -> str | None:
        """One-line reason why the guest has no usable nested-SVM /dev/kvm, or None."""
        for module in self.modules:
            if module.status == "missing":
                return f"{module.name} is missing from {self.kernel.modules_dir}"
            if module.status == "error":
                return f"insmod {module.name} failed: {module.detail}"
        if self.dev_kvm is None:
            return "the guest never reported its kvm modules (see the console log)"
        if not self.dev_kvm:
            return "no /dev/kvm in the guest after loading the kvm modules"
        return None

    def _span(self, start: str, end: str) -> float | None:
        if start in self.marks and end in self.marks:
            return round(self.marks[end] - self.marks[start], 3)
        return None

    @property
    def boot_s(self) -> float | None:
        """Kernel start to /init (guest uptime)."""
        return self.marks.get("init")

    @property
    def mount_s(self) -> float | None:
        return self._span("init", "9p")

    @property
    def modload_s(self) -> float | None:
        return self._span("9p", "modules")

    @property
    def command_s(self) -> float | None:
        return self._span("cmd-start", "cmd-end")

    @property
    def overhead_s(self) -> float | None:
        """Wall time outside the kernel's uptime: QEMU start, firmware, power-off."""
        end = self.marks.get("poweroff")
        return round(self.wall_s - end, 3) if end is not None else None

    def timings(self) -> dict[str, float | None]:
        return {
            "first_output_s": self.first_output_s,
            "boot_s": self.boot_s,
            "mount_s": self.mount_s,
            "modload_s": self.modload_s,
            "command_s": self.command_s,
            "overhead_s": self.overhead_s,
            "wall_s": round(self.wall_s, 3),
        }

    def console_tail(self, lines: int = 40) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def failure(self) -> str | None:
        """One-line reason why there is no trustworthy result, or None."""
        if self.timed_out:
            return f"guest timed out after {self.wall_s:.0f} s (QEMU killed)"
        if self.panicked:
            return f"kernel panic: {self.panic_message or '?'}"
        if self.fatal:
            return f"guest init failed: {self.fatal}"
        if self.returncode is None:
            return f"no result from the guest (QEMU exit status {self.qemu_returncode})"
        if self.oopses:
            return f"kernel oops/warning: {self.oopses[0]}"
        return None


# --------------------------------------------------------------------------
# host capabilities


def find_qemu() -> str:
    path = shutil.which(QEMU)
    if path is None:
        raise QemuError(f"{QEMU} not found: apt-get install qemu-system-x86")
    return path


def host_has_nested_svm() -> bool:
    """True when `-enable-kvm -cpu host` gives the guest SVM.

    Needs an AMD CPU with the svm flag, a usable /dev/kvm, and kvm_amd with
    nested enabled (otherwise the guest CPU would lack SVM).  A PVM or Intel
    /dev/kvm does not qualify even on an AMD CPU model.
    """
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        nested = Path("/sys/module/kvm_amd/parameters/nested").read_text().strip()
    except OSError:
        return False
    flags = re.search(r"^flags\s*:(.*)$", cpuinfo, re.M)
    return (
        "AuthenticAMD" in cpuinfo
        and flags is not None
        and " svm" in flags.group(1)
        and nested in ("1", "Y")
        and os.access("/dev/kvm", os.R_OK | os.W_OK)
    )


def choose_accel(accel: str, cpu: str | None) -> tuple[str, str]:
    """(accel, cpu) for ACCEL in auto|tcg|kvm."""
    if accel == "auto":
        accel = "kvm" if host_has_nested_svm() else "tcg"
    if accel not in ("tcg", "kvm"):
        raise QemuError(f"unknown accelerator {accel!r} (auto, tcg or kvm)")
    return accel, cpu or ("host" if accel == "kvm" else DEFAULT_TCG_CPU)


# --------------------------------------------------------------------------
# command line


MACHINES = {"pc": "pci", "q35": "pci", "microvm": "mmio"}  # -> virtio transport


def host_tsc_khz() -> int | None:
    """The host TSC frequency in kHz, if the host says it is constant.

    Under TCG the guest's TSC is the host's, so this is the guest's TSC rate.
    """
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.M)
    if mhz is None or " constant_tsc" not in cpuinfo:
        return None
    return round(float(mhz.group(1)) * 1000)


def choose_machine(machine: str, accel: str, image: Path, kernel: Kernel) -> tuple[str, str]:
    """(machine type, extra kernel arguments) for MACHINE in auto|pc|q35|microvm.

    microvm skips PCI enumeration and ACPI interrupt routing (~2 s less per
    boot under TCG) but needs a PVH vmlinux and virtio_mmio.  It has no HPET
    or PM timer, so under TCG the kernel cannot calibrate the TSC and hangs
    unless told the frequency: tsc_early_khz = the host's (TCG's TSC is the
    host's).  auto picks microvm when all of that is available, else pc.
    """
    if machine not in ("auto", *MACHINES):
        raise QemuError(f"unsupported machine type {machine!r} (auto, {', '.join(MACHINES)})")
    tsc = host_tsc_khz() if accel == "tcg" else None
    microvm_ok = (
        image != kernel.image
        and has_module(kernel, "virtio_mmio")
        and (accel == "kvm" or tsc is not None)
    )
    if machine == "auto":
        machine = "microvm" if microvm_ok else "pc"
    if machine == "microvm" and accel == "tcg":
        if tsc is None:
            raise QemuError("-machine microvm under TCG needs a constant host TSC; use pc")
        return machine, f"tsc_early_khz={tsc}"
    return machine, ""


def qemu_argv(
    image: Path,
    initrd: Path,
    outdir: Path,
    *,
    accel: str,
    cpu: str,
    memory: str,
    smp: int,
    append: str,
    machine: str = "pc",
) -> list[str]:
    """The full QEMU command line for one boot (IMAGE: bzImage or PVH vmlinux)."""
    cmdline = f"console=ttyS0 panic=-1 {append}".strip()
    virtio_9p = "virtio-9p-device" if MACHINES[machine] == "mmio" else "virtio-9p-pci"
    out = _qemu_opt(str(outdir))
    # multidevs=remap: the host's / spans several filesystems; avoids inode clashes.
    hostroot = "path=/,security_model=none,readonly=on,multidevs=remap"
    options = [
        ("-accel", accel), ("-cpu", cpu), ("-m", memory), ("-smp", str(smp)),
        ("-machine", machine), ("-display", "none"), ("-monitor", "none"),
        ("-serial", f"file:{out}/console.log"),
        ("-kernel", str(image)), ("-initrd", str(initrd)), ("-append", cmdline),
        ("-fsdev", f"local,id={HOSTROOT_TAG},{hostroot}"),
        ("-device", f"{virtio_9p},fsdev={HOSTROOT_TAG},mount_tag={HOSTROOT_TAG}"),
        ("-fsdev", f"local,id={OUT_TAG},path={out},security_model=none,multidevs=remap"),
        ("-device", f"{virtio_9p},fsdev={OUT_TAG},mount_tag={OUT_TAG}"),
    ]  # fmt: skip
    # -no-reboot: panic=-1 reboots at once, and -no-reboot turns that into an exit.
    flags = ["-nodefaults", "-no-user-config", "-no-reboot"]
    return [find_qemu(), *flags, *(item for pair in options for item in pair)]


def _qemu_opt(value: str) -> str:
    """Escape VALUE for a QEMU option list (a comma is written as two)."""
    return value.replace(",", ",,")


def _guest_env(outdir: Path, env: Mapping[str, str] | None) -> dict[str, str]:
    base = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "TMPDIR": "/dev/shm",  # the shared / is read-only; /dev/shm is a guest tmpfs
        "PYTHONDONTWRITEBYTECODE": "1",
        "KVMTEST_GUEST": "1",
        "KVMTEST_OUT": str(outdir),
    }
    # Same paths in the guest, so the host's import path is valid there too.
    if "PYTHONPATH" in os.environ:
        base["PYTHONPATH"] = os.environ["PYTHONPATH"]
    base.update(env or {})
    return base


def write_run_script(ctl: Path, command: Sequence[str], env: Mapping[str, str], cwd: Path) -> None:
    """ctl/run.sh: run COMMAND with a clean ENV in CWD, output to ctl/stdout|stderr."""
    assignments = " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())
    script = (
        "#!/bin/sh\n"
        f"exec >{shlex.quote(str(ctl / 'stdout'))} 2>{shlex.quote(str(ctl / 'stderr'))}\n"
        f"cd {shlex.quote(str(cwd))} || exit 125\n"
        f"exec /usr/bin/env -i {assignments} {shlex.join(command)}\n"
    )
    (ctl / "run.sh").write_text(script)


# --------------------------------------------------------------------------
# process handling


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL QEMU if the spawning process dies.

    Its own session protects QEMU from terminal signals, so without this a
    SIGKILLed pytest worker would leave an orphan QEMU running.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class QemuProcess:
    """QEMU in its own process group; always killed and reaped on exit."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.argv = argv
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.first_output_s: float | None = None

    def __enter__(self) -> QemuProcess:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own group: killpg reaches everything it spawns
                preexec_fn=_die_with_parent,
            )
        return self

    def wait(self, timeout: float, console: Path | None = None) -> int | None:
        """QEMU's exit status, or None if it was still running after TIMEOUT.

        While waiting, notes when CONSOLE first gets output (first_output_s):
        the host-side cost of QEMU start-up, firmware and early kernel.
        """
        assert self.proc is not None
        start = time.monotonic()
        deadline = start + timeout
        while console is not None and self.first_output_s is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                return self.proc.wait(timeout=0.05)
            if console.exists() and console.stat().st_size > 0:
                self.first_output_s = round(time.monotonic() - start, 3)
            if time.monotonic() >= deadline:
                return None
        try:
            return self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()


# --------------------------------------------------------------------------
# boot


def boot(
    kernel: Kernel | str,
    command: Sequence[str],
    *,
    outdir: Path | str,
    cpu: str | None = None,
    accel: str = "auto",
    kvm_amd_params: Mapping[str, str] | None = None,
    kvm_params: Mapping[str, str] | None = None,
    kvm_modules_dir: Path | str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    memory: str = "1G",
    smp: int = 1,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
    append: str = "",
    pvh: bool = True,
    root_cache: str = "loose",
    machine: str = "auto",
) -> GuestResult:
    """Boot KERNEL, load kvm + kvm_amd, run COMMAND in the guest, return the result.

    Raises QemuError for harness problems (no QEMU, bad kernel, vermagic
    mismatch, QEMU refusing to start); guest problems (panic, hang, module
    failures, command failure) are reported in the GuestResult.
    PVH=True boots a host-decompressed vmlinux when the kernel supports it
    (saves ~5 s under TCG); PVH=False always boots the bzImage.  ROOT_CACHE
    is the 9p cache mode of the read-only host root ("loose" caches pages and
    dentries in the guest; "none" re-asks the host every time).
    """
    if not isinstance(kernel, Kernel):
        kernel = resolve_kernel(kernel)
    accel, cpu = choose_accel(accel, cpu)
    image = (pvh_image(kernel) if pvh else None) or kernel.image
    machine, machine_append = choose_machine(machine, accel, image, kernel)
    outdir = Path(outdir).resolve()
    ctl = outdir / "ctl"
    ctl.mkdir(parents=True, exist_ok=True)
    # Results of an earlier boot into the same outdir must not be mistaken for ours.
    (outdir / "console.log").unlink(missing_ok=True)
    for name in CTL_FILES:
        (ctl / name).unlink(missing_ok=True)
    config = BootConfig(
        outdir=outdir,
        kvm_amd_params={**DEFAULT_KVM_AMD_PARAMS, **(kvm_amd_params or {})},
        kvm_params=dict(kvm_params or {}),
        kvm_modules_dir=Path(kvm_modules_dir) if kvm_modules_dir else None,
        root_cache=root_cache,
        transport=MACHINES[machine],
    )
    initrd = ctl / "initrd.img"
    plan = build_initrd(kernel, config, initrd)
    write_run_script(ctl, list(command), _guest_env(outdir, env), Path(cwd or os.getcwd()))
    argv = qemu_argv(
        image,
        initrd,
        outdir,
        accel=accel,
        cpu=cpu,
        memory=memory,
        smp=smp,
        append=f"{machine_append} {append}".strip(),
        machine=machine,
    )
    start = time.monotonic()
    with QemuProcess(argv, ctl / "qemu.log") as qemu:
        status = qemu.wait(timeout, outdir / "console.log")
        qemu.kill()
    wall = time.monotonic() - start
    result = GuestResult(
        kernel=kernel,
        command=list(command),
        outdir=outdir,
        returncode=None,
        timed_out=status is None,
        panicked=False,
        wall_s=wall,
        accel=accel,
        cpu=cpu,
        image=image,
        machine=machine,
        qemu_returncode=status,
        first_output_s=qemu.first_output_s,
    )
    _collect(result, ctl)
    paths = {planned.name: planned.path for planned in plan}
    result.modules = [replace(m, path=paths.get(m.name)) for m in result.modules]
    _check_qemu_started(result, ctl)
    return result


def _check_qemu_started(result: GuestResult, ctl: Path) -> None:
    # An empty console with a QEMU error means a bad command line, not a bad
    # kernel: that is the harness's problem, raise it.
    if result.qemu_returncode not in (0, None) and not result.console_tail(1):
        log = (ctl / "qemu.log").read_text(errors="replace").strip().splitlines()
        raise QemuError(f"QEMU failed to start: {log[-1] if log else 'no output'}")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _collect(result: GuestResult, ctl: Path) -> None:
    """Fill RESULT from the console log and the control files."""
    console = _read(result.console_log)
    result.marks = {name: float(value) for name, value in MARK_RE.findall(console)}
    fatal = FATAL_RE.search(console)
    result.fatal = fatal.group(1).strip() if fatal else None
    panic = PANIC_RE.search(console)
    result.panicked = panic is not None
    result.panic_message = panic.group(0).strip() if panic else None
    kernel_log = console + "\n" + _read(ctl / "dmesg.txt")
    result.oopses = sorted({m.group(0).strip() for m in OOPS_RE.finditer(kernel_log)})
    result.modules, result.dev_kvm = parse_module_report(_read(ctl / "modules.txt"))
    rc = _read(ctl / "rc").strip()
    result.returncode = int(rc) if rc.lstrip("-").isdigit() else None
    result.stdout = _read(ctl / "stdout")
    result.stderr = _read(ctl / "stderr")


def parse_module_report(text: str) -> tuple[list[ModuleLoad], bool | None]:
    """Parse ctl/modules.txt into module entries and whether /dev/kvm appeared."""
    modules: list[ModuleLoad] = []
    dev_kvm: bool | None = None
    for line in text.splitlines():
        if line.startswith("/dev/kvm "):
            dev_kvm = line.endswith("present")
            continue
        name, _, rest = line.partition(" ")
        status, _, detail = rest.partition(" ")
        if name:
            modules.append(ModuleLoad(name, status, detail.strip()))
    return modules, dev_kvm
