"""A hostile guest: the kernel under test is untrusted input (marker `qemu`).

A real Debian kernel boots with a hostile program in place of the agent
(HOSTILE, run by the guest's Python).  It looks for the host's files, plants
symlinks, floods the channel, sends malformed and oversized frames, lies in
its facts and dies at awkward moments.  The host must leak nothing, follow
nothing, write nothing outside the artifacts directory (regular files only),
and end each attempt in a GuestFault that says what the guest did, within
the watchdog's bounds.  Nothing is mocked: QEMU, kernel and channel are real.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import time
from pathlib import Path

import pytest

from kvmtest.cases import catalogue
from kvmtest.qemu import GUEST_PYTHON, GuestFault, QemuError, boot
from kvmtest.qemu.process import Limits
from kvmtest.qemu.session import QemuSession

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                       reason="qemu-system-x86_64 not installed: apt-get install qemu-system-x86"),
]

KERNEL = "debian:linux-image-6.1.0-56-amd64-unsigned"
SCRIPT = "/opt/hostile.py"

HOSTILE = r'''
import json, os, sys, time
MODE, ARG = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""
# The canary's token travels reversed: the command file must not contain it.
TOKEN = ("kvmtest-canary " + sys.argv[3][::-1]).encode() if len(sys.argv) > 3 else b"\0"
FD = int(os.environ.get("KVMTEST_CHANNEL_FD", "3"))

def raw(data):
    view = memoryview(data)
    while view:
        view = view[os.write(FD, view):]

def send(frame):
    raw(json.dumps(frame).encode() + b"\n")

BUF = bytearray()
def recv():
    global BUF
    while b"\n" not in BUF:
        BUF += os.read(FD, 65536)
    line, _, rest = bytes(BUF).partition(b"\n")
    BUF = bytearray(rest)
    return json.loads(line)

FACTS = {"kernel": os.uname().release, "kvm_module": "kvm_amd", "kvm_amd": {"nested": "1"},
         "maxphyaddr": 40, "svm": True, "nested_state": 4224, "smm": 1}

def plant_symlinks():
    # Everything the guest can write: its own tmpfs, /run, /dev.  Names the
    # host uses for its artifacts, pointing at host secrets.
    for d in ("/tmp", "/run", "/dev", "/"):
        for name in ("console.log", "qemu.log", "session.jsonl", "ctl", "result.json"):
            for target in ("/etc/shadow", "/root/.ssh/id_rsa", ARG or "/etc/passwd"):
                try:
                    os.symlink(target, f"{d}/{name}-{abs(hash(target))}")
                    os.symlink(target, f"{d}/{name}")
                except OSError:
                    pass

def first_case():
    send({"t": "hello", "v": 3, "facts": FACTS})
    batch = recv()
    case_id = batch["cases"][0]["id"]
    send({"t": "start", "id": case_id})
    return case_id

def probe():
    # What of the host can the guest see?  Reported on stdout (boot()).
    found = {}
    for path in ("/etc/shadow", "/etc/passwd", "/root/.ssh", "/home", "/work",
                 "/proc/1/root/etc/shadow", ARG):
        try:
            with open(path, "rb") as f:
                found[path] = "read %d bytes" % len(f.read())
        except IsADirectoryError:
            found[path] = "dir: " + ",".join(sorted(os.listdir(path)))
        except FileNotFoundError:
            found[path] = "absent"
        except OSError as e:
            found[path] = "error %s" % e.errno
    found["/root"] = sorted(os.listdir("/root")) if os.path.isdir("/root") else "absent"
    token, hits = TOKEN, []
    for top in ("/bin", "/lib", "/lib64", "/opt", "/tmp", "/run", "/init", "/etc", "/root"):
        for dirpath, dirs, files in os.walk(top):
            for name in files:
                try:
                    with open(os.path.join(dirpath, name), "rb") as f:
                        if token in f.read():
                            hits.append(os.path.join(dirpath, name))
                except OSError:
                    pass
    found["token_hits"] = hits
    devices = {}
    for dev in sorted(os.listdir("/sys/bus/virtio/devices")):
        with open(f"/sys/bus/virtio/devices/{dev}/device") as f:
            devices[dev] = f.read().strip()
    found["virtio_devices"] = devices
    blocks = [b for b in os.listdir("/sys/block") if not b.startswith(("ram", "loop"))]
    found["block_devices"] = blocks
    with open("/proc/filesystems") as f:
        found["9p_fs"] = "9p" in f.read().split()
    found["uid"] = os.getuid()
    print(json.dumps(found))

plant_symlinks()
if MODE == "probe":
    probe()
    sys.exit(0)
elif MODE == "exit-early":
    print("hostile: leaving before hello", file=sys.stderr)
    sys.exit(3)
elif MODE == "bad-facts":
    send({"t": "hello", "v": 3, "facts": dict(FACTS, svm="yes", extra=1)})
    time.sleep(3600)
elif MODE == "flood-line":       # 2 GiB without a newline
    first_case()
    chunk = b"A" * (1 << 20)
    for _ in range(2048):
        raw(chunk)
elif MODE == "flood-frames":     # 2 GiB of well-formed frames
    first_case()
    line = (json.dumps({"t": "output", "stream": "stdout", "hex": "41" * 90000}) + "\n").encode()
    for _ in range((2 << 30) // len(line)):
        raw(line)
elif MODE == "not-json":
    first_case()
    raw(b"\x1b[2J{{{{ this is not json\n")
elif MODE == "oversized":
    case_id = first_case()
    obs = {"outcome": "sync", "detail": "x" * (300 << 10)}
    send({"t": "result", "id": case_id, "observation": obs})
elif MODE == "bad-observation":
    case_id = first_case()
    obs = {"outcome": "sync", "exit_code": "-1", "gif": 0}
    send({"t": "result", "id": case_id, "observation": obs})
elif MODE == "bad-trace":        # a recorded case's trace (kvmtest.record) that lies
    import binascii, struct
    case_id = first_case()
    io = struct.pack("<BBHI", 1, 1, 0x1000, 1) + b"0123456789"  # 10 bytes for 1 x 1
    trace = struct.pack("<II", 1, len(io)) + io
    text = binascii.b2a_base64(trace, newline=False).decode()
    send({"t": "result", "id": case_id, "trace": text})
elif MODE in ("trace-for-whole", "lying-trace"):  # well-formed traces, wrong
    import binascii, struct
    case_id = first_case()
    hlt = struct.pack("<II", 2, 0)  # two KVM_EXIT_HLTs: drive() stops at the first
    text = binascii.b2a_base64(hlt * 2, newline=False).decode()
    send({"t": "result", "id": case_id, "trace": text})
elif MODE == "observation-for-compiled":
    case_id = first_case()
    send({"t": "result", "id": case_id, "observation": {"outcome": "sync"}})
elif MODE == "wrong-case":
    first_case()
    send({"t": "result", "id": "not/in/the/batch", "skip": "no"})
elif MODE == "die":
    first_case()
    os._exit(5)
elif MODE == "hang":
    first_case()
    time.sleep(3600)
elif MODE == "panic":
    first_case()
    with open("/proc/sysrq-trigger", "w") as f:
        f.write("c")
elif MODE == "console-flood":
    first_case()
    with open("/dev/console", "wb", buffering=0) as f:
        while True:
            f.write(b"\x1b]0;pwned\x07 flood " * 100 + b"\n")
time.sleep(3600)
'''


def _tree(directory: Path) -> dict[str, tuple[int, int, str]]:
    """path -> (mode, size, sha256) of everything under DIRECTORY, links not followed."""
    out = {}
    for path in sorted(directory.rglob("*")):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
        out[str(path)] = (st.st_mode, st.st_size, digest)
    return out


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A host 'secret' holding a random canary the guest must never see."""
    directory = tmp_path / "victim"
    directory.mkdir()
    secret = directory / "secret"
    secret.write_text(f"kvmtest-canary {secrets.token_hex(16)}\n")
    return secret


def _reversed_token(victim: Path) -> str:
    return victim.read_text().split()[1][::-1]


def _assert_clean_artifacts(directory: Path) -> None:
    for entry in directory.iterdir():
        mode = entry.lstat().st_mode
        assert stat.S_ISREG(mode), f"{entry}: {stat.filemode(mode)}"
    assert {p.name for p in directory.iterdir()} <= {"console.log", "qemu.log", "session.jsonl"}


def test_the_guest_sees_nothing_of_the_host(tmp_path: Path, victim: Path) -> None:
    shadow = os.stat("/etc/shadow") if os.path.exists("/etc/shadow") else None
    before = _tree(victim.parent)
    out = tmp_path / "out"
    result = boot(KERNEL, [GUEST_PYTHON, "-S", "-I", SCRIPT, "probe", str(victim),
                           _reversed_token(victim)], outdir=out,
                  files={SCRIPT: HOSTILE.encode()}, timeout=120)
    assert result.returncode == 0, (result.failure(), result.stderr, result.console_tail())
    found = json.loads(result.stdout)
    for path in ("/etc/shadow", "/root/.ssh", "/home", "/work", "/proc/1/root/etc/shadow",
                 str(victim)):
        assert found[path] == "absent", (path, found[path])
    assert found["/etc/passwd"] == "absent"
    assert found["/root"] in ([], "absent")
    assert found["token_hits"] == []
    # The only virtio devices: the console's (virtio id 3), no 9p (9), no block (2).
    assert set(found["virtio_devices"].values()) == {"0x0003"}, found["virtio_devices"]
    assert found["block_devices"] == [] and not found["9p_fs"]
    assert found["uid"] == 0  # root in the guest: it still cannot reach the host
    assert _tree(victim.parent) == before
    if shadow is not None:
        assert os.stat("/etc/shadow").st_mtime_ns == shadow.st_mtime_ns
    _assert_clean_artifacts(out)


# mode -> (phase, message pattern)
ATTACKS = {
    "flood-line": ("cases", r"broke the protocol: a frame longer than 262144 bytes"),
    "flood-frames": ("cases", r"broke the protocol: more than 67108864 bytes on the channel"),
    "not-json": ("cases", r"broke the protocol: a frame with non-ASCII bytes|not JSON"),
    "oversized": ("cases", r"broke the protocol: a frame longer than 262144 bytes"),
    "bad-observation": ("cases", r"malformed observation: Observation\.exit_code: expected a "
                        r"64-bit integer, got str"),
    "bad-trace": ("cases", r"malformed trace for insn/nosvm-vmrun: IO record longer than "
                  r"size x count"),
    "trace-for-whole": ("cases", r"broke the protocol: a trace for insn/nosvm-vmrun, which "
                        r"was sent whole"),
    "observation-for-compiled": ("cases", r"broke the protocol: an observation for "
                                 r"insn/nosvm-vmrun, which was sent compiled"),
    "lying-trace": ("cases", r"the guest's trace for insn/nosvm-vmrun does not answer "
                    r"drive\(\): 1 recorded exits not replayed"),
    "wrong-case": ("cases", r"expected the result of .*, got a 'result' frame for "
                   r"'not/in/the/batch'"),
    "die": ("cases", r"the guest agent exited early with status 5"),
    "hang": ("cases", r"no output from the guest for \d+ s \(QEMU (running|sleeping)"),
    "panic": ("cases", r"kernel panic: Kernel panic - not syncing: sysrq triggered crash"),
    "console-flood": ("cases", r"the guest wrote more than 262144 bytes to the console"),
    "exit-early": ("agent", r"the guest agent exited before its hello with status 3: "
                   r"hostile: leaving before hello"),
    "bad-facts": ("agent", r"malformed facts: Facts\.svm: expected true/false, got str|"
                  r"unknown field"),
}

# Modes whose batch goes out with every case whole (records=False); in the
# others the first case, insn/nosvm-vmrun, goes out compiled (kvmtest.record).
SENT_WHOLE = {"bad-observation", "trace-for-whole"}


@pytest.mark.parametrize("mode", sorted(ATTACKS))
def test_each_attack_ends_in_a_named_fault(mode: str, tmp_path: Path, victim: Path) -> None:
    phase, pattern = ATTACKS[mode]
    before = _tree(victim.parent)
    limits = Limits(console_max=256 * 1024)
    session = QemuSession(KERNEL, command=[GUEST_PYTHON, "-S", "-I", SCRIPT, mode, str(victim)],
                          files={SCRIPT: HOSTILE.encode()}, limits=limits, case_silence=10.0,
                          records=mode not in SENT_WHOLE)
    cases = catalogue()[:3]
    t0 = time.monotonic()
    with pytest.raises(GuestFault) as info, session:
        list(session.run(cases, timeout=2.0))
    fault = info.value
    elapsed = time.monotonic() - t0
    assert fault.phase == phase, str(fault)
    if phase == "cases":
        assert fault.case == cases[0].id
    assert re.search(pattern, fault.what), str(fault)
    assert elapsed < 120, elapsed  # the watchdogs fired, not a test timeout
    # Kept after the failure, named in the message, host-written regular files only.
    assert fault.artifacts and f"(artifacts: {fault.artifacts})" in str(fault)
    _assert_clean_artifacts(Path(fault.artifacts))
    assert "\x1b" not in str(fault) and "\x07" not in str(fault)
    assert session.qemu_pid is not None and not Path(f"/proc/{session.qemu_pid}").exists()
    assert _tree(victim.parent) == before
    shutil.rmtree(fault.artifacts)


def test_a_planted_symlink_in_the_artifacts_dir_is_not_followed(tmp_path: Path,
                                                                 victim: Path) -> None:
    """Whoever could write the artifacts directory (not the guest: nothing is
    shared) still cannot make the host write through a link."""
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    (artifacts / "console.log").symlink_to(victim)
    before = victim.read_bytes()
    with pytest.raises(OSError), QemuSession(KERNEL, artifacts=artifacts):
        pass
    assert victim.read_bytes() == before


def test_a_fault_without_artifacts_keeps_the_temporary_dir(victim: Path) -> None:
    with pytest.raises(GuestFault) as info, QemuSession(KERNEL,
                                                        command=["/bin/sh", "-c", "exit 7"]):
        pass
    assert "exited before its hello with status 7" in info.value.what
    kept = Path(info.value.artifacts or "")
    assert kept.is_dir() and kept.name.startswith("kvmtest-qemu-")
    shutil.rmtree(kept)


def test_a_clean_session_leaves_no_temporary_dir() -> None:
    with QemuSession(KERNEL) as session:
        outdir = session.outdir
        assert outdir is not None and outdir.is_dir()
        results = dict(session.run(session.catalogue()[:2], timeout=5.0))
    assert len(results) == 2
    assert session.outdir is None and not outdir.exists()


def test_run_refuses_after_a_fault() -> None:
    session = QemuSession(KERNEL, command=[GUEST_PYTHON, "-S", "-I", SCRIPT, "die"],
                          files={SCRIPT: HOSTILE.encode()})
    with pytest.raises(GuestFault), session:
        list(session.run(catalogue()[:1]))
    with pytest.raises(QemuError, match="not ready"):
        list(session.run(catalogue()[:1]))
    if session.outdir:
        shutil.rmtree(session.outdir, ignore_errors=True)
