"""pytest plugin (entry point pytest11): the case catalogue as tests.

Any test that takes the ``kvm_case`` fixture is parametrized over the
catalogue, with ids such as ``save/cr0-cd0-nw1[gif1]``.  Cases the chosen
backend cannot run are skipped at collection with the backend's reason.
"""

from __future__ import annotations

import pytest

from .backends import NAMES, BackendError, make
from .cases import catalogue
from .judge import PROFILES

BACKEND_KEY = pytest.StashKey[tuple]()
MARKERS = {
    "bench": "benchmarks: figures, not pass/fail timing (run with -m bench)",
    "qemu": "boots real kernels under QEMU (slow; needs qemu-system-x86)",
    "kvm": "needs this host's /dev/kvm",
    "model": "runs on the Unicorn reference model",
    "catalogue": "a case of the failed-VMRUN catalogue",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("kvmtest")
    g.addoption("--kvm-backend", choices=[n for n in NAMES if n != "qemu"], default="auto",
                help="backend for catalogue cases (default: auto); for a kernel under "
                "QEMU, one boot runs a whole selection: use `kvmtest run --backend qemu`")
    g.addoption("--kvm-profile", choices=PROFILES, default=None,
                help="kernel behaviour expected / emulated by the model")


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def backend_for(config: pytest.Config):
    """(backend, note, error): one backend per process (xdist worker)."""
    if BACKEND_KEY not in config.stash:
        name = config.getoption("--kvm-backend")
        try:
            backend, note = make(name, config.getoption("--kvm-profile"))
            config.stash[BACKEND_KEY] = (backend, note, None)
        except BackendError as e:
            config.stash[BACKEND_KEY] = (None, "", str(e))
    return config.stash[BACKEND_KEY]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "kvm_case" not in metafunc.fixturenames:
        return
    from .session import skip_reason

    backend, _, error = backend_for(metafunc.config)
    maxphy = getattr(backend, "maxphyaddr", None)
    cases = catalogue(maxphy) if maxphy else catalogue()
    params = []
    for case in cases:
        reason = error or skip_reason(backend, case)
        marks = [pytest.mark.catalogue]
        if reason:
            marks.append(pytest.mark.skip(reason=reason))
        params.append(pytest.param(case, id=case.id, marks=marks))
    metafunc.parametrize("kvm_case", params)


@pytest.fixture(scope="session")
def kvm_backend(request: pytest.FixtureRequest):
    backend, _, error = backend_for(request.config)
    if error:
        pytest.skip(error)
    yield backend


@pytest.fixture(scope="session")
def kvm_profile(request: pytest.FixtureRequest) -> str | None:
    return request.config.getoption("--kvm-profile")


def pytest_report_header(config: pytest.Config) -> str | None:
    if BACKEND_KEY in config.stash:
        _, note, error = config.stash[BACKEND_KEY]
        return f"kvmtest: {error or note}"
    return None
