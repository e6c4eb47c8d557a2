"""Boot a kernel under QEMU, isolated from the host, and run a command in it.

The guest sees only its initramfs (kvmtest.qemu.initramfs): busybox, the
kvm modules, a trimmed Python runtime (kvmtest.qemu.runtime) and the
kvmtest package.  Nothing of the host's filesystem is shared: no 9p, no
block device.  It talks to the host over one virtio-serial port (line-framed
JSON, kvmtest.qemu.channel) and the serial console; QEMU runs unprivileged
and watched (kvmtest.qemu.process).

This module chooses the accelerator, CPU and machine type, builds the QEMU
command line and the initrd, and offers `boot()`: one command in the guest,
its output and exit status back (tests, probes).  The agent's session
protocol is kvmtest.qemu.session.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmtest.qemu import channel
from kvmtest.qemu.errors import GuestFault, QemuError
from kvmtest.qemu.initramfs import BootConfig, has_module, write_initrd
from kvmtest.qemu.kernels import Kernel, pvh_image, resolve_kernel
from kvmtest.qemu.process import (
    STDERR_CAP,
    Limits,
    QemuProcess,
    exit_status,
    printable,
    qemu_identity,
)
from kvmtest.qemu.runtime import GUEST_LIBDIR, GUEST_PREFIX, GUEST_PYTHON, build_runtime

QEMU = "qemu-system-x86_64"
DEFAULT_TCG_CPU = "EPYC"
DEFAULT_TIMEOUT = 180.0
DEFAULT_KVM_AMD_PARAMS = {"nested": "1"}  # merged under the caller's kvm_amd_params
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
MACHINES = {"pc": "pci", "q35": "pci", "microvm": "mmio"}  # -> virtio transport
# panic=-1 + -no-reboot: a panic ends QEMU at once.  cryptomgr.notests skips
# the crypto self-tests (0.3 s of boot under TCG; KVM does not use them).
KERNEL_ARGS = "console=ttyS0 panic=-1 cryptomgr.notests"
# The guest command's environment (nothing from the host's).
GUEST_ENV = {
    "PATH": f"/bin:{GUEST_PREFIX}/bin",
    "LD_LIBRARY_PATH": GUEST_LIBDIR,
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "KVMTEST_GUEST": "1",
    "KVMTEST_CHANNEL_FD": "3",
    "KVMTEST_PAYLOADS_PREBUILT": "1",
}


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
        # tsc=reliable: TCG's TSC is the host's constant TSC; without it the
        # clocksource watchdog (no HPET/PM timer) drops to jiffies.
        return machine, f"tsc_early_khz={tsc} tsc=reliable"
    return machine, ""


# --------------------------------------------------------------------------
# command line


def qemu_argv(
    *,
    kernel_fd: int,
    initrd_fd: int,
    console_fd: int,
    channel_fd: int,
    accel: str,
    cpu: str,
    memory: str,
    smp: int,
    append: str,
    machine: str = "pc",
    sandbox: bool = True,
) -> list[str]:
    """The full QEMU command line for one boot (descriptors inherited by QEMU)."""
    cmdline = f"{KERNEL_ARGS} {append}".strip()
    mmio = MACHINES[machine] == "mmio"
    serial_bus = "virtio-serial-device" if mmio else "virtio-serial-pci"
    options = [
        ("-accel", accel), ("-cpu", cpu), ("-m", memory), ("-smp", str(smp)),
        ("-machine", machine), ("-display", "none"),
        ("-chardev", f"socket,id=console,fd={console_fd}"), ("-serial", "chardev:console"),
        ("-chardev", f"socket,id=channel,fd={channel_fd}"),
        ("-device", f"{serial_bus},id=vser"),
        ("-device", f"virtserialport,bus=vser.0,chardev=channel,name={channel.PORT_NAME}"),
        ("-kernel", f"/proc/self/fd/{kernel_fd}"), ("-initrd", f"/proc/self/fd/{initrd_fd}"),
        ("-append", cmdline),
    ]  # fmt: skip
    if sandbox:
        options.append(("-sandbox", SANDBOX))
    # -no-reboot: panic=-1 reboots at once, and -no-reboot turns that into an exit.
    flags = ["-nodefaults", "-no-user-config", "-no-reboot"]
    return [find_qemu(), *flags, *(item for pair in options for item in pair)]


def kernel_image(kernel: Kernel, pvh: bool) -> Path:
    """What QEMU boots: the host-decompressed PVH vmlinux if possible."""
    return (pvh_image(kernel) if pvh else None) or kernel.image


def initrd_memfd(kernel: Kernel, config: BootConfig, *, runtime: bool = True) -> tuple[int, list]:
    """(memfd holding the whole initrd, kvm module plan)."""
    archive = build_runtime().archive if runtime else None
    fd = os.memfd_create("kvmtest-initrd", os.MFD_CLOEXEC)
    try:
        with os.fdopen(os.dup(fd), "wb") as out:
            plan = write_initrd(out, kernel, config, runtime=archive)
    except BaseException:
        os.close(fd)
        raise
    os.lseek(fd, 0, os.SEEK_SET)
    return fd, plan


# --------------------------------------------------------------------------
# boot(): one command in the guest


@dataclass(frozen=True)
class ModuleLoad:
    """One module line of the guest's report."""

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
    fatal: str | None = None  # /init gave up (no channel, ...)
    panic_message: str | None = None
    stdout: str = ""
    stderr: str = ""
    qemu_returncode: int | None = None
    first_output_s: float | None = None  # host time from QEMU start to first console byte
    fault: GuestFault | None = None
    run_as: str = ""
    tail: str = ""
    qemu_cpu_s: float | None = None  # QEMU's CPU time: the boot's cost on an idle host

    @property
    def ok(self) -> bool:
        """The command ran to completion and the kernel stayed healthy."""
        return self.returncode is not None and not self.panicked and not self.oopses

    @property
    def kvm_ready(self) -> bool:
        return bool(self.dev_kvm) and all(m.status in ("ok", "builtin") for m in self.modules)

    def kvm_error(self) -> str | None:
        """One-line reason why the guest has no usable nested-SVM /dev/kvm, or None."""
        return kvm_error(self.modules, self.dev_kvm, self.kernel)

    def _span(self, start: str, end: str) -> float | None:
        if start in self.marks and end in self.marks:
            return round(self.marks[end] - self.marks[start], 3)
        return None

    @property
    def boot_s(self) -> float | None:
        """Kernel start to /init (guest uptime)."""
        return self.marks.get("init")

    @property
    def channel_s(self) -> float | None:
        return self._span("init", "channel")

    @property
    def modload_s(self) -> float | None:
        return self._span("channel", "modules")

    @property
    def command_s(self) -> float | None:
        return self._span("modules", "command-end")

    def timings(self) -> dict[str, float | None]:
        return {
            "first_output_s": self.first_output_s,
            "boot_s": self.boot_s,
            "channel_s": self.channel_s,
            "modload_s": self.modload_s,
            "command_s": self.command_s,
            "wall_s": round(self.wall_s, 3),
            "qemu_cpu_s": self.qemu_cpu_s,
        }

    def console_tail(self, lines: int = 40) -> str:
        return "\n".join(self.tail.splitlines()[-lines:])

    def failure(self) -> str | None:
        """One-line reason why there is no trustworthy result, or None."""
        if self.fault is not None:
            return self.fault.summary
        if self.panicked:
            return f"kernel panic: {self.panic_message or '?'}"
        if self.fatal:
            return f"guest init failed: {self.fatal}"
        if self.returncode is None:
            return f"no result from the guest (QEMU {exit_status(self.qemu_returncode)})"
        if self.oopses:
            return f"kernel oops/warning: {self.oopses[0]}"
        return None


def kvm_error(modules: list[ModuleLoad], dev_kvm: bool | None, kernel: Kernel) -> str | None:
    """Why the guest has no usable /dev/kvm, from the module report, or None."""
    for module in modules:
        if module.status == "missing":
            return f"{module.name} is missing from {kernel.modules_dir}"
        if module.status == "error":
            return f"insmod {module.name} failed: {module.detail}"
    if dev_kvm is None:
        return "the guest never reported its kvm modules (see the console log)"
    if not dev_kvm:
        return "no /dev/kvm in the guest after loading the kvm modules"
    return None


MODULE_STATUSES = ("ok", "error", "missing", "builtin")


def module_from_frame(frame: dict[str, Any], paths: Mapping[str, Path | None]) -> ModuleLoad:
    """A module frame as a ModuleLoad; only names the host planned are accepted."""
    name, status = frame["name"], frame["status"]
    if name not in paths or status not in MODULE_STATUSES:
        raise channel.ProtocolError(f"a module report for {printable(name, 40)!r} "
                                    f"({printable(status, 20)!r}) the host did not plan")
    return ModuleLoad(name, status, printable(frame.get("detail", ""), 2000), paths[name])


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
    append: str = "",
    pvh: bool = True,
    machine: str = "auto",
    files: Mapping[str, bytes] | None = None,
    limits: Limits | None = None,
) -> GuestResult:
    """Boot KERNEL, load kvm + kvm_amd, run COMMAND in the guest, return the result.

    COMMAND runs in the guest's initramfs (busybox in /bin, the runtime's
    Python as GUEST_PYTHON), in /tmp, with GUEST_ENV plus ENV; FILES are
    extra guest files (path -> bytes).  Its stdout/stderr (capped) and exit
    status come back over the channel.

    Raises QemuError for harness problems (no QEMU, bad kernel, vermagic
    mismatch, QEMU refusing to start); guest problems (panic, hang, module
    failures, command failure) are reported in the GuestResult, a fault in
    ``fault`` (TIMEOUT bounds the whole boot).
    """
    if not isinstance(kernel, Kernel):
        kernel = resolve_kernel(kernel)
    accel, cpu = choose_accel(accel, cpu)
    image = kernel_image(kernel, pvh)
    machine, machine_append = choose_machine(machine, accel, image, kernel)
    outdir = Path(outdir).resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    config = BootConfig(
        kvm_amd_params={**DEFAULT_KVM_AMD_PARAMS, **(kvm_amd_params or {})},
        kvm_params=dict(kvm_params or {}),
        command=list(command),
        env={**GUEST_ENV, **(env or {})},
        kvm_modules_dir=Path(kvm_modules_dir) if kvm_modules_dir else None,
        transport=MACHINES[machine],
        files=dict(files or {}),
    )
    initrd, plan = initrd_memfd(kernel, config)
    paths = {planned.name: planned.path for planned in plan}
    run_as = qemu_identity(accel)

    def argv(**fds: int) -> list[str]:
        return qemu_argv(**fds, accel=accel, cpu=cpu, memory=memory, smp=smp,
                         append=f"{machine_append} {append}".strip(), machine=machine)

    result = GuestResult(kernel=kernel, command=list(command), outdir=outdir, returncode=None,
                         timed_out=False, panicked=False, wall_s=0.0, accel=accel, cpu=cpu,
                         image=image, machine=machine, run_as=run_as.user)
    output: dict[str, bytes] = {"stdout": b"", "stderr": b""}
    with QemuProcess(argv, outdir=outdir, kernel_image=image, initrd_fd=initrd, run_as=run_as,
                 limits=limits) as vm:
        deadline = vm.started + timeout
        try:
            while True:
                frame = vm.next_frame(deadline=deadline, silence=timeout)
                kind = frame["t"]
                if kind == "mark":
                    result.marks[printable(frame["stage"], 40)] = float(frame["uptime"])
                    vm.phase = {"channel": "modules", "modules": "command"}.get(
                        frame["stage"], vm.phase)
                elif kind == "module":
                    result.modules.append(module_from_frame(frame, paths))
                elif kind == "dev_kvm":
                    result.dev_kvm = frame["present"]
                elif kind == "output" and frame["stream"] in output:
                    output[frame["stream"]] += _unhex(frame["hex"])
                elif kind == "exit":
                    result.returncode = frame["rc"]
                    vm.phase = "shutdown"
                    vm.wait_exit(10.0)
                    break
                elif kind == "fatal":
                    result.fatal = printable(frame["message"], 2000)
                else:  # the agent's frames: the command is not ours to follow
                    continue
        except channel.ProtocolError as e:
            result.fault = vm.fault(f"the guest broke the protocol: {printable(str(e), 300)}")
        except GuestFault as e:
            result.fault = e
        vm.kill()
        result.timed_out = result.fault is not None and "timed out" in result.fault.what
        result.qemu_returncode = vm.returncode
        result.wall_s = vm.elapsed
        result.first_output_s = vm.first_output_s
        vm.close()
        result.qemu_cpu_s = vm.cpu_s
        result.tail = vm.console.tail_text(60)
        result.panicked = vm.scanner.panic is not None
        result.panic_message = vm.scanner.panic
        result.fatal = result.fatal or vm.scanner.fatal
        result.oopses = sorted(set(vm.scanner.oopses))
    result.stdout = output["stdout"].decode("utf-8", "replace")
    result.stderr = output["stderr"].decode("utf-8", "replace")
    _check_qemu_started(result, outdir)
    return result


def _unhex(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise channel.ProtocolError("an output frame that is not hex") from None


def _check_qemu_started(result: GuestResult, outdir: Path) -> None:
    # No console byte and a QEMU error exit: a bad command line or a missing
    # file, not a bad kernel.  That is the harness's problem: raise it.
    if result.first_output_s is None and result.qemu_returncode not in (0, None) \
            and result.qemu_returncode > 0:
        log = _read_capped(outdir / "qemu.log", STDERR_CAP).strip().splitlines()
        raise QemuError(f"QEMU failed to start: {log[-1] if log else 'no output'}")


def _read_capped(path: Path, cap: int) -> str:
    """Up to CAP bytes of a host-written file, never through a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return ""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        return os.read(fd, cap).decode("utf-8", "replace")
    finally:
        os.close(fd)


__all__ = [
    "GUEST_ENV",
    "GUEST_PYTHON",
    "GuestResult",
    "ModuleLoad",
    "boot",
    "choose_accel",
    "find_qemu",
]
