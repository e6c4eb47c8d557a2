"""`kvmtest matrix` on real kernels under QEMU: 2 Debian kernels x 2
configurations with a small -k selection (4 boots), plus a kernel that
does not exist, whose error cell must not stop the others."""

import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kvmtest.matrix import _slug

pytestmark = pytest.mark.qemu

LEGACY = "debian:linux-image-6.1.0-47-amd64-unsigned"  # 6.1.170
FIXED = "debian:linux-image-6.1.0-56-amd64-unsigned"  # 6.1.192
K = "save/efer-svme0 or control/asid0"


def test_two_kernels_two_configs(tmp_path, qemu_available):
    """Two kernels x two configurations, and a third "kernel" that fails to
    boot (a file that is no bzImage): its cells are error cells, the rest run."""
    out = tmp_path / "m.json"
    (tmp_path / "no-bzImage").write_bytes(b"\0" * 4096)
    p = subprocess.run(
        [sys.executable, "-m", "kvmtest", "matrix", "--kernel", LEGACY, "--kernel", FIXED,
         "--kernel", str(tmp_path / "no-bzImage"), "--config", "default",
         "--config", "npt=0", "-k", K, "--json", str(out), "--html", str(tmp_path / "m.html"),
         "--junit", str(tmp_path / "m.xml"), "--artifacts", str(tmp_path / "art")],
        capture_output=True, text=True, timeout=1800)
    assert out.exists(), p.stderr[-3000:]
    result = json.loads(out.read_text())
    assert p.returncode == 1, p.stderr[-3000:]  # legacy keeps the GIF bug
    cells = {c["key"]: c for c in result["cells"]}
    assert len(cells) == 6
    for spec, profile, version in ((LEGACY, "legacy", "6.1.170"), (FIXED, "fixed", "6.1.192")):
        for config in ("default", "npt=0"):
            cell = cells[f"{spec} [{config}]"]
            assert cell["status"] == ("fail" if profile == "legacy" else "pass"), cell
            assert profile in cell["fingerprint"].split(" or ")
            assert cell["package"]["upstream"] == version
            assert cell["package"]["name"] == spec.removeprefix("debian:")
            assert cell["config"]["kvm_amd"] == ({"npt": "0"} if config == "npt=0" else {})
            ids = {r["id"] for r in cell["results"]}
            assert ids == {c["id"] for c in result["cases"]} and ids
            gif1 = [r for r in cell["results"] if r["id"] == "save/efer-svme0[gif1]"]
            assert gif1[0]["verdict"] == ("fail" if profile == "legacy" else "pass")
            # the configuration reached the guest: kvm_amd's effective parameters
            guest = json.loads((tmp_path / "art" / _slug(cell["key"]) / "qemu" /
                                "result.json").read_text())
            assert guest["facts"]["kvm_amd"]["npt"] == ("N" if config == "npt=0" else "Y")
    broken = [c for c in result["cells"] if c["status"] == "error"]
    assert len(broken) == 2 and all("not an x86 bzImage" in c["error"] for c in broken)
    assert "no-bzImage" in (tmp_path / "m.html").read_text()
    suites = ET.parse(tmp_path / "m.xml").getroot().findall("testsuite")
    assert len(suites) == 6


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline[:200]}")
    return found


def test_interrupt_ends_every_cell(tmp_path, qemu_available):
    """^C while cells boot: the matrix exits 130 and no `kvmtest run` or
    QEMU of its cells is left behind."""
    art = tmp_path / "art"
    p = subprocess.Popen(
        [sys.executable, "-m", "kvmtest", "matrix", "--kernel", FIXED, "--config", "default",
         "--config", "npt=0", "-k", K, "--artifacts", str(art), "-j", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list(art.glob("*/qemu/console.log")) and time.monotonic() < deadline:
            assert p.poll() is None, p.stderr.read()
            time.sleep(0.2)
        assert _processes_mentioning(str(art)), "no cell was running"
        time.sleep(1)
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=60) == 130
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert "interrupted" in p.stderr.read()
    assert _processes_mentioning(str(art)) == []
    # killed, not waited for: no guest got as far as writing its results
    assert not list(art.glob("*/qemu/result.json"))
