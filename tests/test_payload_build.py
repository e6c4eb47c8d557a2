"""Payload assembly: real toolchain, real missing tools."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from kvmtest import layout
from kvmtest.payloads import load_payload

ROOT = Path(__file__).resolve().parent.parent


def test_payloads_have_the_shared_entry_and_stubs():
    for name in ("vmrun", "svm_insn", "spin", "ping"):
        p = load_payload(name)
        assert p.entry == layout.CODE_GPA
        assert p.sym("exc_stubs") % 16 == 0
        assert p.sym("l2_vmmcall") > p.entry
        assert len(p.image) < layout.CODE_MAX


def test_missing_assembler_names_tool_and_package(tmp_path):
    """PATH holds gcc but no binutils: the build says what to install."""
    (tmp_path / "bin").mkdir()
    os.symlink(shutil.which("gcc"), tmp_path / "bin" / "gcc")
    code = ("import sys; sys.path.insert(0, 'kvmtest'); import payload_build as b; "
            "from pathlib import Path; "
            f"b.build_all(Path('guest_payloads'), Path('kvmtest'), Path({str(tmp_path)!r}))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={"PATH": str(tmp_path / "bin")})
    assert p.returncode != 0
    assert "'ld' not found" in p.stderr and "apt-get install binutils" in p.stderr


def test_missing_compiler_for_the_binding_names_the_package(tmp_path):
    """The cffi builder with no gcc on PATH: one line, tool and package."""
    p = subprocess.run([sys.executable, "-c",
                        "import runpy; runpy.run_path('csrc/build_kvm.py', run_name='probe')"],
                       cwd=ROOT, capture_output=True, text=True, env={"PATH": str(tmp_path)})
    assert p.returncode != 0
    assert "'gcc' not found" in p.stderr and "apt-get install gcc" in p.stderr
    assert "Traceback" not in p.stderr
