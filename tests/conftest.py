import pytest


@pytest.fixture(scope="session")
def real_kvm():
    """Facts about this host's /dev/kvm; skips when it cannot be opened."""
    from kvmtest.backends.kvm import KvmBackend
    from kvmtest.kvm import KvmUnavailable

    try:
        b = KvmBackend()
    except KvmUnavailable as e:
        pytest.skip(f"no usable /dev/kvm: {e}")
    facts = {"svm": b.svm, "nested_state": bool(b.nested_cap), "maxphyaddr": b.maxphyaddr,
             "backend": b}
    yield facts
    b.close()


@pytest.fixture(params=["kvm", "model"])
def kvm_or_model(request):
    """This host's /dev/kvm, then the model (7.x): payloads without SVM run
    on both, and their observations must agree."""
    if request.param == "kvm":
        return request.getfixturevalue("real_kvm")["backend"]
    from kvmtest.backends.model import ModelBackend

    b = ModelBackend("7.x")
    request.addfinalizer(b.close)
    return b


@pytest.fixture(scope="session")
def qemu_available():
    import shutil

    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("no qemu-system-x86_64: apt-get install qemu-system-x86 "
                    "(scripts/install.sh does it as root)")


@pytest.fixture
def run_qemu_cli(qemu_available):
    """`kvmtest run --backend qemu ARGS --json`: (exit code, report)."""
    import json
    import subprocess
    import sys

    def run(tmp_path, *args: str) -> tuple[int, dict]:
        out = tmp_path / "report.json"
        p = subprocess.run([sys.executable, "-m", "kvmtest", "run", "--backend", "qemu", *args,
                            "--json", str(out), "--artifacts", str(tmp_path / "artifacts")],
                           capture_output=True, text=True, timeout=1200)
        assert out.exists(), p.stderr[-3000:]
        return p.returncode, json.loads(out.read_text())

    return run
