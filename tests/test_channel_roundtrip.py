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
from kvmtest.case import INSN, NEED_NO_SVM, Case, Expect
from kvmtest.observation import EXCEPTION, GUEST_ASSERT, SYNC, UNEXPECTED_EXIT
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


@pytest.fixture
def backend(kvm_or_model):
    return kvm_or_model


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


def test_unknown_ucall_ends_the_run_and_is_named(backend):
    """A command the host does not know: the loop stops and says which, with
    its arguments in full."""
    obs = run_case(backend, echo(4, count=77))
    assert obs.outcome == UNEXPECTED_EXIT, obs.describe()
    assert obs.detail.startswith(f"unknown ucall ucall#77({A:#x}, {B:#x}, 0x0, 0x0, 0x0, ")
    assert obs.detail.count(", ") == 6  # struct ucall's seven arguments
    assert obs.exits == ["IoExit"]


def test_guest_assert_strings(backend):
    """A guest assert with a real message and file name (svm_insn's check of
    params.insn): both strings are read out of guest memory."""
    case = Case(id="t", family="test", scenario=INSN, payload="svm_insn",
                expect=Expect("no_fault"), source="tests", params={"insn": 0x63, "flags": 0},
                needs=frozenset({NEED_NO_SVM}))
    obs = run_case(backend, case)
    assert obs.outcome == GUEST_ASSERT, obs.describe()
    file, line, rest = obs.detail.split(":", 2)
    assert (file, rest) == ("svm_insn.S", " params.insn out of range (a=0x63, b=0x8)")
    assert int(line) > 0


def test_read_cstring_stays_inside_guest_memory(backend):
    """Strings are read from guest memory only, at most 256 bytes, never past
    its end; a pointer outside it is named, not followed."""
    from kvmtest import layout, ucall
    from kvmtest.payloads import load_payload

    with backend.machine(load_payload("echo"), svm=False) as m:
        end = layout.MEM_SIZE
        m.write(end - 3, b"abc")  # no NUL before the end of memory
        assert ucall.read_cstring(m.read, end - 3) == "abc"
        m.write(0x30000, b"x" * 300)
        assert ucall.read_cstring(m.read, 0x30000) == "x" * 256
        assert ucall.read_cstring(m.read, 0x30000, limit=5) == "x" * 5
        m.write(0x30000, b"hi\0there\xff")
        assert ucall.read_cstring(m.read, 0x30000) == "hi"
        m.write(0x30000, b"\xff\0")
        assert ucall.read_cstring(m.read, 0x30000) == "\ufffd"
        m.write(1, b"one\0")
        assert ucall.read_cstring(m.read, 1) == "one"
        for bad in (0, end, end + 0x1000, 1 << 63):
            assert ucall.read_cstring(m.read, bad) == f"<bad string pointer {bad:#x}>"


def test_ucall_names():
    from kvmtest import ucall

    assert ucall.UcallExit(1, (2, 0)).describe() == "SYNC(0x2, 0x0)"
    assert ucall.UcallExit(4, ()).describe() == "EXCEPTION()"
    assert ucall.UcallExit(99, (1,)).describe() == "ucall#99(0x1)"
