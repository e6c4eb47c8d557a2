"""Boot a kernel under QEMU, unprivileged, and talk to it over one channel.

The guest sees only its initramfs (kvmtest.qemu.initramfs): busybox, the
kvm modules, a trimmed Python runtime and the kvmtest package.  Nothing of
the host's filesystem is shared.  QEMU gets three descriptors from us and
opens no host path by name:

    console   -serial chardev, a socket pair: the kernel log, read here
    channel   a virtio-serial port, a socket pair: line-framed JSON both ways
    kernel, initrd   -kernel/-initrd /proc/self/fd/N (an open file, a memfd)

QEMU runs as ``nobody:nogroup`` with no supplementary groups (when started
as root), ``PR_SET_NO_NEW_PRIVS``, a clean environment, its own session,
``PR_SET_PDEATHSIG`` = SIGKILL and ``-sandbox on`` (seccomp: no spawning,
no privilege elevation).  Everything the host keeps is written by the host:
``console.log`` and ``qemu.log`` (capped), the channel transcript is never
written raw.  Whatever the guest sends is hostile: see kvmtest.qemu.channel.

`Machine` watches QEMU while waiting for frames: QEMU's exit (pidfd), a
stopped process (``/proc/PID/stat`` state T for STOPPED_GRACE s), silence
(no console or channel byte for the phase's limit), the overall deadline,
the caps.  Each ends in a `GuestFault` naming the phase, the case in
flight, QEMU's status and the console tail; QEMU is then killed and reaped.

`boot()` runs one command in the guest (tests, probes); the agent's session
protocol is kvmtest.qemu.session.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import pwd
import re
import selectors
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmtest.qemu import channel
from kvmtest.qemu.errors import GuestFault, QemuError
from kvmtest.qemu.initramfs import FATAL, BootConfig, has_module, write_initrd
from kvmtest.qemu.kernels import Kernel, pvh_image, resolve_kernel
from kvmtest.qemu.runtime import GUEST_LIBDIR, GUEST_PREFIX, GUEST_PYTHON, build_runtime

QEMU = "qemu-system-x86_64"
DEFAULT_TCG_CPU = "EPYC"
DEFAULT_TIMEOUT = 180.0
DEFAULT_KVM_AMD_PARAMS = {"nested": "1"}  # merged under the caller's kvm_amd_params
QEMU_USER, QEMU_GROUP = "nobody", "nogroup"
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
CONSOLE_FILE_CAP = 8 * 1024 * 1024  # bytes of console.log kept on disk
CONSOLE_MAX = 32 * 1024 * 1024  # more than this on the console: QEMU is killed
STDERR_CAP = 256 * 1024  # QEMU's own stderr kept in qemu.log
TAIL_BYTES = 16 * 1024  # console kept in memory for the error messages
TAIL_LINES = 30
STOPPED_GRACE = 2.0  # s in state T (SIGSTOP, debugger) before QEMU counts as stopped
POLL = 0.25  # s between process-state checks while waiting
PANIC_RE = re.compile(r"Kernel panic - not syncing.*")
# Lines that mean the kernel is unhealthy even if the command succeeded.
OOPS_RE = re.compile(
    r"(?:BUG: |Oops: |WARNING: CPU: |kernel BUG at |general protection fault"
    r"|Unable to handle kernel|RIP: ).*"
)
FATAL_RE = re.compile(re.escape(FATAL) + r" (.*)")
MAX_OOPSES = 200
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
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
# text from the guest


_UNSAFE = re.compile(r"[^\x20-\x7e\n\t]")


def printable(text: str | bytes, limit: int = 4000) -> str:
    """TEXT made safe for a terminal and a log line: printable ASCII only."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    text = _UNSAFE.sub("?", text)
    return text if len(text) <= limit else text[:limit] + "...[truncated]"


def exit_status(returncode: int | None) -> str | None:
    """QEMU's exit status in words: 'exited with status 1', 'was killed by SIGKILL'."""
    if returncode is None:
        return None
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with status {returncode}"


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
# who runs QEMU


@dataclass(frozen=True)
class RunAs:
    """The identity QEMU runs as (None fields: unchanged)."""

    user: str
    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] = ()
    note: str = ""


def qemu_identity(accel: str) -> RunAs:
    """nobody:nogroup without supplementary groups when we are root.

    With -enable-kvm QEMU must open /dev/kvm: its group is kept when it
    grants read-write; if only root may open it, QEMU stays root (noted).
    """
    if os.geteuid() != 0:
        return RunAs(pwd.getpwuid(os.geteuid()).pw_name, note="not root: QEMU runs as the caller")
    try:
        user = pwd.getpwnam(QEMU_USER)
        import grp

        gid = grp.getgrnam(QEMU_GROUP).gr_gid
    except KeyError:
        return RunAs("root", note=f"no user {QEMU_USER}/{QEMU_GROUP}: QEMU runs as root")
    groups: tuple[int, ...] = ()
    if accel == "kvm":
        st = os.stat("/dev/kvm")
        if st.st_mode & 0o006 == 0o006:
            pass
        elif st.st_mode & 0o060 == 0o060 and st.st_gid != 0:
            groups = (st.st_gid,)
        else:
            return RunAs("root", note="/dev/kvm is root-only: QEMU runs as root")
    return RunAs(QEMU_USER, user.pw_uid, gid, groups)


def _die_with_parent(parent: int) -> None:
    """In the child, after the uid change, before exec: die with the parent,
    and never gain privileges again (setuid binaries, file capabilities)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before PDEATHSIG was armed
        os._exit(127)


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


# --------------------------------------------------------------------------
# host-side capture of guest output


def _open_output(path: Path) -> int:
    """A file the host writes: never through a symlink, never a FIFO/device."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise QemuError(f"{path} is not a regular file")
    return fd


class Capture:
    """A byte stream kept as a capped file plus an in-memory tail."""

    def __init__(self, path: Path | None, file_cap: int) -> None:
        self.fd = _open_output(path) if path is not None else None
        self.file_cap = file_cap
        self.total = 0
        self.tail: collections.deque[bytes] = collections.deque()
        self._tail_size = 0

    def write(self, data: bytes) -> None:
        if self.fd is not None and self.total < self.file_cap:
            os.write(self.fd, data[: self.file_cap - self.total])
        self.total += len(data)
        self.tail.append(data)
        self._tail_size += len(data)
        while self._tail_size - len(self.tail[0]) >= TAIL_BYTES:
            self._tail_size -= len(self.tail.popleft())

    def tail_text(self, lines: int = TAIL_LINES) -> str:
        raw = b"".join(self.tail)[-TAIL_BYTES:].replace(b"\r\n", b"\n")
        text = printable(raw, limit=TAIL_BYTES)
        return "\n".join(line[:300] for line in text.splitlines()[-lines:])

    def close(self) -> None:
        if self.fd is not None:
            if self.total > self.file_cap:
                os.write(self.fd, f"\n[kvmtest: {self.total - self.file_cap} more bytes "
                                  "not kept]\n".encode())
            os.close(self.fd)
            self.fd = None


class ConsoleScanner:
    """Panic, oops and /init failure lines of the console, as they arrive."""

    def __init__(self) -> None:
        self._partial = b""
        self.panic: str | None = None
        self.fatal: str | None = None
        self.oopses: list[str] = []

    def feed(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()[-4096:]
        for raw in lines:
            line = printable(raw[:4096].rstrip(b"\r"))
            if self.panic is None and (m := PANIC_RE.search(line)):
                self.panic = m.group(0).strip()
            if self.fatal is None and (m := FATAL_RE.search(line)):
                self.fatal = m.group(1).strip()
            if len(self.oopses) < MAX_OOPSES and (m := OOPS_RE.search(line)):
                self.oopses.append(m.group(0).strip())


# --------------------------------------------------------------------------
# the machine


def _proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2 :][:1].decode() or None


@dataclass
class Limits:
    """Caps and watchdog settings of one boot."""

    max_line: int = channel.MAX_LINE
    max_total: int = channel.MAX_TOTAL
    console_max: int = CONSOLE_MAX
    stopped_grace: float = STOPPED_GRACE


class Machine:
    """One running QEMU: frames in and out, console captured, watched.

    ``phase`` and ``case`` are set by the caller as it goes; they name where
    a fault happened.  Always used as a context manager: QEMU is killed and
    reaped on every exit path.  It owns INITRD_FD (closed once QEMU has it).
    """

    def __init__(
        self,
        argv_for: Any,
        *,
        outdir: Path,
        kernel_image: Path,
        initrd_fd: int,
        run_as: RunAs,
        limits: Limits | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self.run_as = run_as
        self.phase = "boot"
        self.case: str | None = None
        self.outdir = outdir
        self.console = Capture(outdir / "console.log", CONSOLE_FILE_CAP)
        self.stderr = Capture(outdir / "qemu.log", STDERR_CAP)
        self.scanner = ConsoleScanner()
        self.reader = channel.FrameReader(self.limits.max_line, self.limits.max_total)
        self.frames: collections.deque[dict] = collections.deque()
        self._out = bytearray()
        self._console_host, console_qemu = socket.socketpair()
        self._channel_host, channel_qemu = socket.socketpair()
        kernel_fd = os.open(kernel_image, os.O_RDONLY)
        self._qemu_fds = [console_qemu.detach(), channel_qemu.detach(), kernel_fd, initrd_fd]
        self.argv = argv_for(kernel_fd=kernel_fd, initrd_fd=initrd_fd,
                             console_fd=self._qemu_fds[0], channel_fd=self._qemu_fds[1])
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.first_output_s: float | None = None
        self.last_progress = 0.0
        self.returncode: int | None = None
        self.cpu_s: float | None = None  # QEMU's user + system CPU time, once reaped
        self.ended: float | None = None
        self.killed_by_us = False
        self._stopped_since: float | None = None
        self._sel = selectors.DefaultSelector()
        self._pidfd = -1
        self._stderr_r = -1

    # -- lifecycle

    def __enter__(self) -> Machine:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        stderr_r, stderr_w = os.pipe2(os.O_CLOEXEC)
        self._stderr_r = stderr_r
        parent = os.getpid()
        identity: dict[str, Any] = {}
        if self.run_as.uid is not None:
            identity = {"user": self.run_as.uid, "group": self.run_as.gid,
                        "extra_groups": list(self.run_as.groups)}
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=stderr_w,
                stderr=stderr_w,
                pass_fds=self._qemu_fds,
                cwd="/",
                env={"PATH": "/usr/bin:/bin", "LANG": "C"},
                start_new_session=True,  # own group: killpg reaches all of it
                preexec_fn=lambda: _die_with_parent(parent),
                **identity,
            )
        except OSError as e:
            raise QemuError(f"cannot start {self.argv[0]}: {e.strerror}") from None
        finally:
            os.close(stderr_w)
            for fd in self._qemu_fds:
                os.close(fd)
            self._qemu_fds = []
        self.started = self.last_progress = time.monotonic()
        self._pidfd = os.pidfd_open(self.proc.pid)
        for sock in (self._console_host, self._channel_host):
            sock.setblocking(False)
        os.set_blocking(self._stderr_r, False)
        self._sel.register(self._console_host, selectors.EVENT_READ, "console")
        self._sel.register(self._channel_host, selectors.EVENT_READ, "channel")
        self._sel.register(self._stderr_r, selectors.EVENT_READ, "stderr")
        self._sel.register(self._pidfd, selectors.EVENT_READ, "exit")

    def kill(self) -> None:
        """SIGKILL QEMU's process group and reap it (idempotent)."""
        if self.proc is None:
            return
        if not self.exited():
            self.killed_by_us = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self._reap(block=True)

    def _reap(self, block: bool) -> None:
        """wait4() QEMU: its status and the CPU time it used (rusage)."""
        assert self.proc is not None
        try:
            pid, status, usage = os.wait4(self.proc.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        self.ended = time.monotonic()
        self.returncode = self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.cpu_s = round(usage.ru_utime + usage.ru_stime, 3)

    def close(self) -> None:
        self.kill()
        with contextlib.suppress(Exception):
            self._drain_all()
        self._sel.close()
        for closable in (self._console_host, self._channel_host):
            closable.close()
        for fd in (self._pidfd, self._stderr_r, *self._qemu_fds):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._pidfd = self._stderr_r = -1
        self._qemu_fds = []
        self.console.close()
        self.stderr.close()

    # -- I/O

    def send(self, frame: dict[str, Any]) -> None:
        """Queue FRAME for the guest; it goes out while we wait for frames."""
        self._out += channel.encode(frame)
        self._flush()

    def _flush(self) -> None:
        while self._out:
            try:
                sent = self._channel_host.send(self._out)
            except BlockingIOError:
                break
            except OSError:  # QEMU gone: the exit path reports it
                self._out.clear()
                break
            del self._out[:sent]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self._out else 0)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.modify(self._channel_host, events, "channel")

    def _read(self, what: str) -> bool:
        """Read what is available on WHAT; False at EOF."""
        try:
            if what == "stderr":
                data = os.read(self._stderr_r, 65536)
            else:
                sock = self._console_host if what == "console" else self._channel_host
                data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            data = b""
        if not data:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(self._stderr_r if what == "stderr" else
                                     self._console_host if what == "console" else
                                     self._channel_host)
            return False
        now = time.monotonic()
        if what == "stderr":
            self.stderr.write(data)
            return True
        if self.first_output_s is None:
            self.first_output_s = round(now - self.started, 3)
        self.last_progress = now
        if what == "console":
            self.console.write(data)
            self.scanner.feed(data)
            if self.console.total > self.limits.console_max:
                raise self.fault(f"the guest wrote more than {self.limits.console_max} bytes "
                                 "to the console")
        else:
            try:
                self.frames.extend(self.reader.feed(data))
            except channel.ProtocolError as e:
                raise self.fault(f"the guest broke the protocol: {printable(str(e), 300)}") \
                    from None
        return True

    def _drain_all(self) -> None:
        """After QEMU exited: everything still buffered in the sockets."""
        for what in ("console", "channel", "stderr"):
            for _ in range(10000):
                try:
                    more = self._read(what)
                except GuestFault:
                    break
                if not more:
                    break
                if what != "stderr" and not self._pending(what):
                    break

    def _pending(self, what: str) -> bool:
        sock = self._console_host if what == "console" else self._channel_host
        try:
            return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except (BlockingIOError, OSError):
            return False

    # -- waiting

    @property
    def elapsed(self) -> float:
        """Seconds since QEMU started, until it was reaped."""
        return (self.ended or time.monotonic()) - self.started

    def exited(self) -> bool:
        if self.proc is not None and self.returncode is None:
            self._reap(block=False)
        return self.returncode is not None

    def next_frame(self, *, deadline: float, silence: float) -> dict[str, Any]:
        """The next frame from the guest, or a GuestFault.

        DEADLINE: monotonic time by which a frame must come; SILENCE: the
        longest the guest may go without any console or channel byte.
        """
        while not self.frames:
            self.wait(min(POLL, max(0.0, deadline - time.monotonic())))
            if self.frames:
                break
            if self.exited():
                self._drain_all()
                if self.frames:
                    break
                raise self.exit_fault()
            now = time.monotonic()
            self._check_stopped(now)
            if now - self.last_progress > silence:
                raise self.fault(f"no output from the guest for {now - self.last_progress:.0f} s"
                                 f" ({self._state_words()}; QEMU killed)")
            if now >= deadline:
                raise self.fault(f"timed out after {self.elapsed:.0f} s ({self._state_words()};"
                                 " QEMU killed)")
        return self.frames.popleft()

    def wait(self, timeout: float) -> None:
        """One round of I/O: read what arrives within TIMEOUT, send what is queued."""
        for key, events in self._sel.select(timeout):
            if key.data == "exit":
                with contextlib.suppress(KeyError, ValueError):
                    self._sel.unregister(self._pidfd)
                continue
            if events & selectors.EVENT_WRITE:
                self._flush()
            if events & selectors.EVENT_READ:
                self._read(key.data)

    def wait_exit(self, timeout: float) -> int | None:
        """QEMU's return code once it exits within TIMEOUT (I/O keeps flowing)."""
        deadline = time.monotonic() + timeout
        while not self.exited():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.wait(min(POLL, remaining))
        self._drain_all()
        return self.returncode

    def _check_stopped(self, now: float) -> None:
        assert self.proc is not None
        state = _proc_state(self.proc.pid)
        if state not in ("T", "t"):
            self._stopped_since = None
            return
        if self._stopped_since is None:
            self._stopped_since = now
        elif now - self._stopped_since >= self.limits.stopped_grace:
            raise self.fault(f"QEMU is stopped (process state {state}: SIGSTOP or a debugger) "
                             f"for {now - self._stopped_since:.0f} s; QEMU killed")

    def _state_words(self) -> str:
        state = _proc_state(self.proc.pid) if self.proc else None
        return {"R": "QEMU running", "S": "QEMU sleeping", "D": "QEMU in disk sleep",
                "T": "QEMU stopped", "t": "QEMU traced", "Z": "QEMU a zombie"}.get(
                    state or "", f"QEMU state {state}")

    # -- faults

    def fault(self, what: str) -> GuestFault:
        """A GuestFault for WHAT now; QEMU is killed first (it may be the culprit)."""
        still_running = not self.exited()
        self.kill()
        status = "killed by kvmtest" if still_running else exit_status(self.returncode)
        return GuestFault(what, phase=self.phase, case=self.case, qemu_status=status,
                          console_tail=self.console.tail_text(), elapsed=self.elapsed)

    def exit_fault(self) -> GuestFault:
        """QEMU exited while a frame was expected: say why, best evidence first."""
        rc = self.returncode
        if self.scanner.panic:
            what = f"kernel panic: {self.scanner.panic}"
        elif self.scanner.fatal:
            what = f"guest init failed: {self.scanner.fatal}"
        elif rc is not None and rc < 0:
            what = f"QEMU {exit_status(rc)}"
        elif rc == 0:
            what = "the guest powered off"
        else:
            last = self.stderr.tail_text(3).strip().splitlines()
            what = f"QEMU {exit_status(rc)}" + (f": {last[-1]}" if last else "")
        return GuestFault(what, phase=self.phase, case=self.case,
                          qemu_status=exit_status(rc), console_tail=self.console.tail_text(),
                          elapsed=self.elapsed)


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
    with Machine(argv, outdir=outdir, kernel_image=image, initrd_fd=initrd, run_as=run_as,
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
    "Limits",
    "Machine",
    "ModuleLoad",
    "boot",
    "choose_accel",
    "find_qemu",
    "printable",
]
