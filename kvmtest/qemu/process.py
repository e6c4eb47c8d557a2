"""One running QEMU, watched: its console and channel, caps, faults.

QEMU gets three descriptors from us and opens no host path by name: the
console (a socket pair behind -serial), the channel (a socket pair behind a
virtio-serial port) and the kernel and initrd (/proc/self/fd/N: an open
file, a memfd).  As root, QEMU runs as ``nobody:nogroup`` with no
supplementary groups, ``PR_SET_NO_NEW_PRIVS``, a clean environment, its own
session and ``PR_SET_PDEATHSIG`` = SIGKILL (and -sandbox on: see
kvmtest.qemu.machine.qemu_argv).  Everything the host keeps is written by
the host, never through a link: ``console.log`` and ``qemu.log`` (capped).

`QemuProcess` watches QEMU while the caller waits for frames: QEMU's exit
(pidfd), a stopped process (``/proc/PID/stat`` state T for STOPPED_GRACE s),
silence (no console or channel byte for the caller's limit), the deadline,
the caps (console bytes, channel line and total).  Each ends in a
`GuestFault` naming the phase, the case in flight, QEMU's status and the
console tail; QEMU is then killed and reaped (wait4: status and CPU time).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import grp
import os
import pwd
import re
import selectors
import signal
import socket
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmtest.qemu import channel
from kvmtest.qemu.errors import GuestFault, QemuError
from kvmtest.qemu.initramfs import FATAL

QEMU_USER, QEMU_GROUP = "nobody", "nogroup"
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
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
# The agent's marker in the kernel log at a shared boot's reload: the console
# lines before it belong to the configuration that ended (kvmtest.agent).
SYNC_RE = re.compile(r"kvmtest-sync (reload-\d+)")
MAX_OOPSES = 200

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
# host-side capture of guest output


def open_output(path: Path) -> int:
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
        self.fd = open_output(path) if path is not None else None
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
        self.syncs: dict[str, int] = {}  # marker -> len(oopses) when it came
        self._since_sync = 0  # MAX_OOPSES counts from the last marker: per configuration

    def feed(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()[-4096:]
        for raw in lines:
            line = printable(raw[:4096].rstrip(b"\r"))
            if self.panic is None and (m := PANIC_RE.search(line)):
                self.panic = m.group(0).strip()
            if self.fatal is None and (m := FATAL_RE.search(line)):
                self.fatal = m.group(1).strip()
            if len(self.oopses) - self._since_sync < MAX_OOPSES and (
                    m := OOPS_RE.search(line)):
                self.oopses.append(m.group(0).strip())
            if len(self.syncs) < MAX_OOPSES and (m := SYNC_RE.search(line)) and (
                    m.group(1) not in self.syncs):
                self.syncs[m.group(1)] = self._since_sync = len(self.oopses)


# --------------------------------------------------------------------------
# the process


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


class QemuProcess:
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
        # Frames in arrival order; a ProtocolError takes the place of the
        # broken line, so the frames before it are handled first.
        self.frames: collections.deque[dict | channel.ProtocolError] = collections.deque()
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

    def __enter__(self) -> QemuProcess:
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
        elif not self.frames or not isinstance(self.frames[-1], channel.ProtocolError):
            try:
                self.frames.extend(self.reader.feed(data))
            except channel.ProtocolError as e:
                self.frames.extend(e.frames)
                self.frames.append(e)  # raised by next_frame in its turn; nothing after it
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
        frame = self.frames.popleft()
        if isinstance(frame, channel.ProtocolError):
            raise self.fault(f"the guest broke the protocol: {printable(str(frame), 300)}")
        return frame

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
            # No console byte at all: QEMU refused its command line or a file.
            what = ("QEMU failed to start" if self.first_output_s is None
                    else f"QEMU {exit_status(rc)}") + (f": {last[-1]}" if last else "")
        return GuestFault(what, phase=self.phase, case=self.case,
                          qemu_status=exit_status(rc), console_tail=self.console.tail_text(),
                          elapsed=self.elapsed)


