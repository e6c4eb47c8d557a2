"""kvmtest.parity: every observed field is compared, one by one."""

from kvmtest import parity
from kvmtest.observation import SYNC, Observation


def _obs(**kw) -> Observation:
    base = dict(outcome=SYNC, exit_code=0x81, exit_info_1=0, exit_info_2=0, exit_int_info=0,
                event_inj=0, gif=False, guest_mode=False,
                l1={"stage": 2, "rsp": 0x1000, "cr4": 0x620})
    return Observation(**{**base, **kw})


def test_identical_observations_do_not_differ():
    assert parity.diff(_obs(), _obs()) == []


def test_each_field_alone_is_reported():
    changes = {"exit_code": 0xFFFFFFFF, "exit_info_1": 1, "exit_info_2": 2,
               "exit_int_info": 0xDEADBEEF00000000, "event_inj": 0x80000306, "gif": True,
               "guest_mode": True, "vector": 13, "error_code": 0, "rip": 0x4000,
               "outcome": "exception", "after_outcome": SYNC, "smm_handler_runs": 1,
               "exit_data": [1, 0, 0x80, 0, 0, 0, 0]}
    for name, value in changes.items():
        d = parity.diff(_obs(), _obs(**{name: value}))
        assert [x.field for x in d] == [name], name


def test_l1_registers_compared_one_by_one():
    d = parity.diff(_obs(), _obs(l1={"stage": 2, "rsp": 0x1000, "cr4": 0x660}))
    assert [(x.field, x.left, x.right) for x in d] == [("l1.cr4", 0x620, 0x660)]
    assert "0x620 != 0x660" in d[0].describe()


def test_documented_differences_are_explained():
    d = parity.diff(_obs(), _obs(exit_int_info=0xDEADBEEF00000000, gif=True))
    left = parity.unexplained(d, {"exit_int_info": "KVM writes it as a u32"})
    assert [x.field for x in left] == ["gif"]
