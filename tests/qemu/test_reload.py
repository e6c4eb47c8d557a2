"""A shared boot (kvm and kvm_amd reloaded in a running guest, as `kvmtest
matrix` does for configurations that differ only in kvm_amd parameters)
observes what a boot of that configuration observes.

On 7.3.4: the whole catalogue with npt=0, once on a guest booted with npt=0,
once on a guest booted in the default configuration after a batch there and
a reload to npt=0.  Every observation must agree field by field (the PID in
a WARN line apart: the agent is another process), and the reloaded guest's
facts must say npt=0 (a reload that kept the old parameters would observe
the default configuration).  Then a reload that cannot load (a bad value) is
an error the session survives.  Two boots, ~25 s under TCG.
"""

from __future__ import annotations

import functools
import os
import signal

import pytest
from observations import comparable, differences

from kvmtest.backends import KernelError
from kvmtest.backends import qemu as qemu_backend
from kvmtest.backends.qemu import QemuBackend
from kvmtest.cases import catalogue
from kvmtest.qemu import GUEST_PYTHON
from kvmtest.qemu.session import QemuSession

pytestmark = pytest.mark.qemu

KERNEL = "debian:linux-image-7.3.4+deb13-amd64@trixie-backports"
NPT0 = {"npt": "0"}


def test_reloaded_kvm_amd_observes_what_a_boot_observes(qemu_available):
    cases = list(catalogue())
    booted = QemuBackend(KERNEL, kvm_amd_params=NPT0)
    fresh = comparable(booted.run_batch(cases, 5.0))

    shared = QemuBackend(KERNEL, share_boot=True)
    try:
        # The default configuration first, with dirty vCPUs and VMs to tear down.
        warm = [c for c in cases if c.id.startswith(("save/efer-svme0", "nested_state/"))]
        shared.run_batch(warm, 5.0)
        assert shared.finish_config(NPT0) == []
        assert shared.live
        reloaded = comparable(shared.run_batch(cases, 5.0))
        facts = shared._session.facts  # the agent's new hello
        assert facts.kvm_amd["npt"] in ("N", "0")
        assert shared.config.kvm_amd_params == NPT0

        assert differences(reloaded, fresh) == {}
        # npt=0's own case ran (it is skipped with npt=1).
        assert isinstance(reloaded["control/np-enable-without-npt[gif1]"], dict)

        # A configuration that does not load fails its own batch, and the
        # guest serves the next one.
        assert shared.finish_config({"npt": "banana"}) == []
        with pytest.raises(KernelError, match=r"kvm/kvm_amd did not load again with .*npt=banana"):
            shared.run_batch(warm, 5.0)
        assert shared.finish_config({}) == []
        back = shared.run_batch(warm, 5.0)
        assert shared._session.facts.kvm_amd["npt"] in ("Y", "1")
        assert all(not isinstance(o, str) for o in back.values())
        assert shared.finish_config(None) == []  # power-off
        assert not shared.live
    finally:
        shared.close()


def test_a_guest_that_dies_between_configurations_is_booted_again(qemu_available):
    """QEMU killed after a configuration's batch: ending that configuration
    (the reload) is a KernelError, and the next configuration boots afresh
    with its own parameters."""
    warm = [c for c in catalogue() if c.id.startswith("save/efer-svme0")]
    shared = QemuBackend(KERNEL, share_boot=True)
    try:
        shared.run_batch(warm, 5.0)
        first_pid = shared._session.qemu_pid
        os.kill(first_pid, signal.SIGKILL)
        with pytest.raises(KernelError):
            shared.finish_config(NPT0)
        assert not shared.live
        out = shared.run_batch(warm, 5.0)
        assert shared._session.qemu_pid != first_pid
        assert shared._session.facts.kvm_amd["npt"] in ("N", "0")
        assert all(not isinstance(o, str) for o in out.values())
        shared.finish_config(None)
    finally:
        shared.close()


# A stand-in for the agent (real kernel, QEMU and console): it skips every
# case, and prints WARNs around the reload's marker, whose console lines come
# a second after its reloaded and hello frames.
FAKE_AGENT = r"""
import json, os, sys, time
MODE = sys.argv[1]
FD = int(os.environ["KVMTEST_CHANNEL_FD"])
def send(frame):
    os.write(FD, json.dumps(frame).encode() + b"\n")
buf = b""
def recv():
    global buf
    while b"\n" not in buf:
        chunk = os.read(FD, 65536)
        if not chunk:
            sys.exit(3)
        buf += chunk
    line, _, buf = buf.partition(b"\n")
    return json.loads(line)
def kmsg(text):
    with open("/dev/kmsg", "w") as f:
        f.write("<4>" + text + "\n")
def hello(kvm_amd):
    send({"t": "hello", "v": 3, "facts": {"kernel": os.uname().release, "kvm_module": "kvm_amd",
          "kvm_amd": kvm_amd, "maxphyaddr": 40, "svm": True, "nested_state": 4224, "smm": 1}})
hello({"nested": "1"})
while True:
    frame = recv()
    if frame["t"] == "batch":
        for case in frame["cases"]:
            send({"t": "start", "id": case["id"]})
            send({"t": "result", "id": case["id"], "skip": "fake agent"})
    elif frame["t"] == "reload" and MODE == "unload-fails":
        send({"t": "reloaded", "stage": "unload", "error": "rmmod kvm_amd: in use"})
    elif frame["t"] == "reload" and MODE == "dies-after-marker":
        kmsg("kvmtest-sync " + frame["sync"])
        sys.exit(9)
    elif frame["t"] == "reload":
        send({"t": "reloaded", "stage": "load", "error": ""})
        hello(frame["kvm_amd"])
        time.sleep(1)
        kmsg("WARNING: CPU: 0 PID: 1 at fake.c:1 teardown of the first configuration")
        kmsg("kvmtest-sync " + frame["sync"])
        kmsg("WARNING: CPU: 0 PID: 1 at fake.c:2 after the marker")
    elif frame["t"] == "bye":
        kmsg("WARNING: CPU: 0 PID: 1 at fake.c:3 power-off")
        send({"t": "bye"})
        sys.exit(0)
"""
FAKE = "/opt/fake_agent.py"
POWER_OFF = "WARNING: CPU: 0 PID: 1 at fake.c:3 power-off"


def _fake_agent(monkeypatch, mode: str) -> None:
    monkeypatch.setattr(qemu_backend, "QemuSession", functools.partial(
        QemuSession, command=[GUEST_PYTHON, "-S", "-I", FAKE, mode],
        files={FAKE: FAKE_AGENT.encode()}))


def test_console_warnings_go_to_the_configuration_they_came_in(qemu_available, monkeypatch):
    """A WARN printed before the agent's reload marker belongs to the
    configuration that ended, one after it to the next, even when the
    console shows them after the new hello: the host waits for the marker."""
    _fake_agent(monkeypatch, "warns")
    shared = QemuBackend(KERNEL, share_boot=True)
    try:
        cases = list(catalogue())[:2]
        assert all(isinstance(o, str) for o in shared.run_batch(cases, 5.0).values())
        first = shared.finish_config(NPT0)
        assert first == ["WARNING: CPU: 0 PID: 1 at fake.c:1 teardown of the first configuration"]
        shared.run_batch(cases, 5.0)
        second = shared.finish_config(None)
        assert second == ["WARNING: CPU: 0 PID: 1 at fake.c:2 after the marker",
                          "WARNING: CPU: 0 PID: 1 at fake.c:3 power-off"]
    finally:
        shared.close()


def test_a_reload_that_fails_is_the_fault_of_its_side_of_the_marker(qemu_available,
                                                                     monkeypatch):
    """Modules that cannot be unloaded are the ending configuration's fault
    (its teardown left them in use); a guest that breaks after the marker is
    the next configuration's: the ending one still passes, the next one's
    batch fails, and the one after boots afresh."""
    cases = list(catalogue())[:2]
    _fake_agent(monkeypatch, "unload-fails")
    shared = QemuBackend(KERNEL, share_boot=True)
    try:
        shared.run_batch(cases, 5.0)
        first_pid = shared._session.qemu_pid
        with pytest.raises(KernelError, match="could not be unloaded after this configuration"):
            shared.finish_config(NPT0)
        assert not shared.live
        shared.run_batch(cases, 5.0)  # the next configuration boots afresh
        assert shared._session.qemu_pid != first_pid
        assert shared.finish_config(None) == [POWER_OFF]  # the stand-in's own, at bye
    finally:
        shared.close()

    _fake_agent(monkeypatch, "dies-after-marker")
    shared = QemuBackend(KERNEL, share_boot=True)
    try:
        shared.run_batch(cases, 5.0)
        assert shared.finish_config(NPT0) == []  # the ending configuration is not to blame
        with pytest.raises(KernelError, match="loading kvm/kvm_amd again on the shared boot"):
            shared.run_batch(cases, 5.0)
        assert shared.finish_config({}) == []
        assert all(isinstance(o, str) for o in shared.run_batch(cases, 5.0).values())
        assert shared.finish_config(None) == [POWER_OFF]  # the stand-in's own, at bye
    finally:
        shared.close()
