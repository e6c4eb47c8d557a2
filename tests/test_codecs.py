"""The host's two byte-level codecs: the params/result blocks (params.py)
and the VMCB image (vmcb.py).  Expected bytes are written out here, little
endian as the guest reads them, so an encoder and decoder that agree with
each other but not with the guest fail."""

from __future__ import annotations

import pytest

from kvmtest import params
from kvmtest.vmcb import VMCB_SIZE, Vmcb

FIELDS = ("a", "b", "c")


def test_pack_is_u64_little_endian_in_field_order():
    raw = params.pack(FIELDS, {"c": 0x0102_0304_0506_0708, "a": 1})
    assert raw == (b"\x01" + b"\0" * 7) + b"\0" * 8 + bytes.fromhex("0807060504030201")


def test_pack_wraps_to_64_bits():
    """A negative value is the guest's two's complement (e.g. -1 = all ones)."""
    assert params.pack(("a",), {"a": -1}) == b"\xff" * 8
    assert params.pack(("a",), {"a": 1 << 64 | 5}) == b"\x05" + b"\0" * 7


def test_pack_refuses_unknown_fields():
    with pytest.raises(KeyError, match=r"unknown fields: \['x', 'y'\]"):
        params.pack(FIELDS, {"y": 1, "a": 2, "x": 3})


def test_unpack():
    raw = bytes.fromhex("ffffffffffffffff" "0100000000000080" "0000000000000000")
    assert params.unpack(FIELDS, raw) == {"a": 2**64 - 1, "b": 1 << 63 | 1, "c": 0}
    assert params.unpack(params.RESULT, params.pack(params.RESULT, {"rax": 7}))["rax"] == 7


def test_vmcb_image_is_4k_and_zeroed():
    v = Vmcb()
    assert v.to_bytes() == bytes(VMCB_SIZE) and isinstance(v.to_bytes(), bytes)
    with pytest.raises(ValueError, match="VMCB must be 4096 bytes, got 4095"):
        Vmcb(bytes(VMCB_SIZE - 1))


def test_vmcb_fields_are_little_endian_at_their_offset_and_width():
    v = Vmcb()
    v["asid"] = 0x1122_3344  # 4 bytes at 0x58
    v["tlb_ctl"] = 0x1FF  # 1 byte at 0x5C: wider values are cut to the field
    v["exit_code"] = -1  # 8 bytes at 0x70
    raw = v.to_bytes()
    assert raw[0x58:0x5D] == bytes.fromhex("44332211ff")
    assert raw[0x70:0x78] == b"\xff" * 8
    assert (v["asid"], v["tlb_ctl"], v["exit_code"]) == (0x1122_3344, 0xFF, 2**64 - 1)
    w = Vmcb(raw)
    w["cs.selector"] = 0x1_0008  # 2 bytes at 0x410
    assert w.to_bytes()[0x410:0x412] == b"\x08\x00" and w["asid"] == 0x1122_3344
