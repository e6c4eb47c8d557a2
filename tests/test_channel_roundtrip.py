"""The guest->host channel end to end, on real /dev/kvm and on the model.

The host writes full 64-bit values into the params block; the echo payload
(guest_payloads/echo.S) sends them back through the result block, an
EXCEPTION ucall and an ASSERT ucall, and the host loop decodes them.  The
expected values are computed here, not by the code under test, so a decoder
that truncates a field or drops an argument fails even though it would agree
with its own encoder.
"""

from __future__ import annotations

import pytest

from kvmtest import params
from kvmtest.backends.model import ModelBackend
from kvmtest.case import INSN, NEED_NO_SVM, Case, Expect
from kvmtest.observation import EXCEPTION, GUEST_ASSERT, SYNC
from kvmtest.runner import run_case

A = 0xFEDC_BA98_7654_3210
B = 0x8000_0000_0000_0001
C = 0xFFFF_FFFF_0000_0002
D = 0x1234_5678_9ABC_DEF0
N = 0xC0FF_EE00_DEAD_BEEF
MASK = (1 << 64) - 1


def rol(v: int, n: int) -> int:
    n %= 64
    return ((v << n) | (v >> (64 - n))) & MASK


def echo(mode: int, **values: int) -> Case:
    p = {"insn": mode, "msr_value": A, "vmrun_rax": B, "hsave_pa": C, "msr_index": D,
         "count": N, **values}
    return Case(id=f"echo/{mode}", family="test", scenario=INSN, payload="echo",
                expect=Expect("no_fault"), source="tests", params=p,
                needs=frozenset({NEED_NO_SVM}))


@pytest.fixture(params=["kvm", "model"])
def backend(request):
    if request.param == "kvm":
        return request.getfixturevalue("real_kvm")["backend"]
    b = ModelBackend("7.x")
    request.addfinalizer(b.close)
    return b


def test_result_block_full_64_bit(backend):
    obs = run_case(backend, echo(0))
    assert obs.outcome == SYNC, obs.describe()
    want = {name: rol(A, 5 * i) for i, name in enumerate(params.RESULT)}
    assert obs.l1 == want


def test_exception_ucall_arguments(backend):
    obs = run_case(backend, echo(1))
    assert obs.outcome == EXCEPTION, obs.describe()
    assert (obs.vector, obs.error_code, obs.rip) == (B, C, D)


def test_assert_ucall_values(backend):
    obs = run_case(backend, echo(2))
    assert obs.outcome == GUEST_ASSERT, obs.describe()
    assert f"a={A:#x}, b={B:#x}" in obs.detail and f":{N}:" in obs.detail


def test_real_gp_error_code_on_kvm(real_kvm):
    """A real #GP on real KVM: the selector error code (nonzero) and the RIP of
    the faulting instruction cross the channel intact."""
    obs = run_case(real_kvm["backend"], echo(3, msr_index=0x1238))
    assert obs.outcome == EXCEPTION, obs.describe()
    assert (obs.vector, obs.error_code, obs.rip_symbol) == (13, 0x1238, "echo_gp_insn")
