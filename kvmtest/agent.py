"""The guest side of the qemu backend: run cases on the guest kernel's KVM.

Runs inside the guest booted by kvmtest.qemu (``python3 -S -I -m
kvmtest.agent``, from the initramfs's runtime) and talks to the host over
the virtio-serial port /init opened as fd $KVMTEST_CHANNEL_FD, with the
frames of kvmtest.qemu.channel:

1. ``hello`` with the facts: kernel release, kvm module, kvm_amd's
   effective parameters, MAXPHYADDR, SVM, KVM_CAP_NESTED_STATE,
   KVM_CAP_X86_SMM (or ``error`` when /dev/kvm is unusable);
2. for each ``batch`` (whole cases, kvmtest.casecodec JSON, or compiled
   ones for the C loop, kvmtest.record; plus the per-case timeout):
   ``start`` and one ``result`` per case, in order: the Observation (of a
   whole case), the trace (of a compiled one: the host replays drive()
   over it), a skip reason, or the error the case raised;
3. on ``reload`` (kvm_amd parameters): the VMs are destroyed, kvm_amd and
   kvm are unloaded, the host's marker goes to the kernel log, and both are
   loaded again from the boot's module plan (kvm_amd with those
   parameters); ``reloaded`` says which stage failed, if one did, and a new
   ``hello`` follows when all worked: the matrix runs the configurations
   that differ only in kvm_amd parameters on one boot (kvmtest.matrix);
4. on ``bye``: the VMs are destroyed, ``bye`` is answered, the agent exits
   and /init powers the guest off.

The observations are judged on the host.  The host is trusted here: its
frames are decoded without the strict checks the host applies to ours.
"""

from __future__ import annotations

import json
import os
import sys
import time
import zlib

from . import record
from .backends.kvm import KvmBackend, kvm_module
from .case import NEED_SVM, Case
from .casecodec import from_json, to_json
from .kvm import KvmUnavailable
from .kvm_amd import module_params
from .payloads import Payload, load_payload
from .runner import run_case
from .smm import drive_smm  # noqa: F401  (run_case imports it lazily; load it now)

PROTOCOL_VERSION = 3  # kvmtest.qemu.channel.PROTOCOL_VERSION
KVM_LIST = "/lib/kvmtest/kvm.list"  # /init's module plan: name status file [params...]
KVM_DIR = "/lib/kvmtest/kvm"
BUSYBOX = "/bin/busybox"
RELOADED = ("kvm", "kvm_amd")  # a reload's modules, in load order
OUTPUT_CAP = 2000  # bytes of a failed rmmod/insmod's output reported


def uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def process_start() -> float:
    """This process's start, in seconds of uptime (/proc/self/stat starttime)."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")


class Channel:
    """Line-framed JSON on a file descriptor (blocking)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = bytearray()

    def send(self, *frames: dict) -> None:
        """FRAMES in one write (each virtio-serial write costs a guest exit)."""
        data = b"".join(json.dumps(f, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"
                        for f in frames)
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def recv(self) -> dict | None:
        """The next frame, or None when the host hung up."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return json.loads(line)
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return None
            self._buffer += chunk


def facts(backend: KvmBackend | None, error: str | None = None) -> dict:
    out: dict = {"kernel": os.uname().release, "kvm_module": kvm_module() or "",
                 "kvm_amd": module_params()}
    if backend is not None:
        out.update(maxphyaddr=backend.maxphyaddr, svm=backend.svm,
                   nested_state=int(backend.nested_cap), smm=int(backend.smm_cap),
                   pcid=backend.has_pcid())
    if error is not None:
        out["error"] = error
    return out


def skip_reason(caps: dict[str, str | None], needs) -> str | None:
    """A need the guest's KVM lacks (the host filters first, from the facts)."""
    for need in sorted(needs):
        reason = caps.get(need, f"the guest cannot provide {need!r}")
        if reason:
            return reason
    return None


def describe_error(e: BaseException) -> str:
    """'Type: message at file:line <- file:line' without the traceback module."""
    where = []
    tb = e.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        where.append(f"{code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}")
        tb = tb.tb_next
    chain = " <- ".join(reversed(where[-4:]))
    return f"{type(e).__name__}: {e}" + (f" at {chain}" if chain else "")


def run_batch(ch: Channel, backend: KvmBackend, frame: dict) -> None:
    """Each case's result goes out with the next case's start: one write per
    case, and the host always knows the case in flight."""
    timeout = float(frame["timeout"])
    caps = backend.capabilities()
    result: dict | None = None
    for data in frame["cases"]:
        case_id = data.get("id", "?")
        start = {"t": "start", "id": case_id}
        if result:
            ch.send(result, start)
        else:
            ch.send(start)
        started = time.monotonic()
        try:
            rec = data.get("record")
            if rec is not None:  # kvmtest.record: run in C, replayed on the host
                reason = skip_reason(caps, rec["needs"])
                if reason:
                    result = {"t": "result", "id": case_id, "skip": reason}
                    continue
                trace = backend.record(
                    payload(rec["payload"], rec["image"]), NEED_SVM in rec["needs"],
                    rec["cpuid"], record.Compiled.from_json(rec), timeout)
                result = {"t": "result", "id": case_id, "trace": record.b64(trace),
                          "seconds": round(time.monotonic() - started, 4)}
                continue
            case = from_json(Case, data, strict=False)
            reason = skip_reason(caps, case.needs)
            if reason:
                result = {"t": "result", "id": case_id, "skip": reason}
                continue
            obs = run_case(backend, case, timeout)
        except Exception as e:  # reported per case: the host decides what it means
            result = {"t": "result", "id": case_id, "error": describe_error(e)}
            continue
        result = {"t": "result", "id": case_id, "observation": to_json(obs),
                  "seconds": round(time.monotonic() - started, 4)}
    if result:
        ch.send(result)


_PAYLOADS: dict[tuple[str, int], Payload] = {}


def payload(name: str, image_crc32: int) -> Payload:
    """The payload a recorded case names, checked against the host's: the
    host compiled the case's memory with its own build (kvmtest.record).
    CRC-32 catches a stale build (the host is trusted); hashlib's import
    alone costs 46 ms under TCG."""
    p = _PAYLOADS.get((name, image_crc32))
    if p is None:
        p = load_payload(name)
        if zlib.crc32(p.image) != image_crc32:
            raise ValueError(f"payload {name!r} differs from the host's build")
        _PAYLOADS[(name, image_crc32)] = p
    return p


def busybox(*argv: str) -> str:
    """Run a busybox applet; '' on success, else its output or exit status."""
    r, w = os.pipe()
    try:
        pid = os.posix_spawn(BUSYBOX, ["busybox", *argv], {"PATH": "/bin"},
                             file_actions=[(os.POSIX_SPAWN_DUP2, w, 1),
                                           (os.POSIX_SPAWN_DUP2, w, 2)])
    finally:
        os.close(w)
    out = b""
    try:
        while chunk := os.read(r, 4096):
            out = (out + chunk)[:OUTPUT_CAP]
    finally:
        os.close(r)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if status == 0:
        return ""
    return out.decode("ascii", "replace").strip() or f"exit status {status}"


def _module_plan() -> dict[str, tuple[str, list[str]]]:
    """The boot's loaded kvm modules: name -> (file, its parameters)."""
    with open(KVM_LIST) as f:
        return {name: (file, rest) for name, status, file, *rest in (line.split() for line in f)
                if status == "load"}


def unload_kvm() -> str:
    """kvm_amd and kvm unloaded (those this boot loaded and that are still
    loaded: not after a load that failed); '' or what went wrong.  /dev/kvm
    must be closed: an open VM or /dev/kvm holds kvm_amd, so "in use" here
    means the configuration that ended leaked a reference."""
    plan = _module_plan()
    if "kvm_amd" not in plan:
        return "kvm_amd is not a module this boot loaded"
    with open("/proc/modules") as f:
        loaded = {line.split()[0] for line in f}
    for name in reversed(RELOADED):
        if name in plan and name in loaded:
            error = busybox("rmmod", name)
            if error:
                return f"rmmod {name}: {error}"
    return ""


def load_kvm(params: dict[str, str]) -> str:
    """kvm and kvm_amd loaded again from the boot's files: kvm_amd with
    PARAMS (the host checked their characters), kvm with its own.  Both, so
    that the next configuration starts from fresh module state (WARN_ON_ONCE
    flags included), as after a boot.  '' or what went wrong."""
    plan = _module_plan()
    for name in RELOADED:
        if name in plan:  # else built in
            file, own = plan[name]
            args = [f"{k}={v}" for k, v in params.items()] if name == "kvm_amd" else own
            error = busybox("insmod", f"{KVM_DIR}/{file}", *args)
            if error:
                return f"insmod {name}: {error}"
    return ""


def kernel_log_marker(sync: str) -> None:
    """SYNC in the kernel log, hence on the console: where the host stops
    counting console WARNs for the configuration that ended (the console
    runs behind the channel).  Level 4: printed at the default loglevel."""
    with open("/dev/kmsg", "w") as kmsg:
        kmsg.write(f"<4>kvmtest-sync {sync}\n")


def open_backend() -> tuple[KvmBackend | None, str | None]:
    try:
        # Whole cases run on drive()'s Python loop here; the host sends
        # eligible ones compiled for KvmBackend.record (KVMTEST_RECORD).
        return KvmBackend(records=False), None
    except KvmUnavailable as e:
        return None, str(e)


def serve(ch: Channel) -> int:
    ch.send({"t": "mark", "stage": "python", "uptime": process_start()})
    ch.send({"t": "mark", "stage": "agent", "uptime": uptime()})
    backend, error = open_backend()
    ch.send({"t": "hello", "v": PROTOCOL_VERSION, "facts": facts(backend, error)})
    try:
        while True:
            frame = ch.recv()
            if frame is None:
                return 3  # the host hung up without bye
            if frame["t"] == "batch" and backend is not None:
                run_batch(ch, backend, frame)
            elif frame["t"] == "reload":
                if backend is not None:
                    backend.close()  # VM teardown: its kernel log lands before the reload
                    backend = None
                # Unloading still belongs to the configuration that ended:
                # the marker comes after it, and before the next one's load.
                problem = unload_kvm()
                if problem:
                    ch.send({"t": "reloaded", "stage": "unload", "error": problem})
                    continue
                kernel_log_marker(frame["sync"])
                problem = load_kvm(frame["kvm_amd"])
                ch.send({"t": "reloaded", "stage": "load", "error": problem})
                if not problem:
                    backend, error = open_backend()
                    ch.send({"t": "hello", "v": PROTOCOL_VERSION,
                             "facts": facts(backend, error)})
            elif frame["t"] == "bye":
                break
            else:
                raise ValueError(f"unexpected host frame {frame['t']!r}")
    finally:
        if backend is not None:
            backend.close()  # VM teardown: its kernel log lands before our bye
    ch.send({"t": "bye"})
    return 0


def main(argv: list[str] | None = None) -> int:
    fd = os.environ.get("KVMTEST_CHANNEL_FD")
    if fd is None or argv:
        print("kvmtest agent: runs inside the qemu backend's guest (KVMTEST_CHANNEL_FD unset)",
              file=sys.stderr)
        return 2
    return serve(Channel(int(fd)))


if __name__ == "__main__":
    sys.exit(main())
