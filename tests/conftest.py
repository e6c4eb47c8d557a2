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


@pytest.fixture(scope="session")
def qemu_available():
    import shutil

    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("no qemu-system-x86_64: apt-get install qemu-system-x86 "
                    "(scripts/install.sh does it as root)")
