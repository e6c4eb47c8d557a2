"""The host's side of the channel: framing, caps and strict frame checks
(no QEMU needed)."""

from __future__ import annotations

import pytest

from kvmtest.qemu import channel
from kvmtest.qemu.channel import FrameReader, ProtocolError, decode, encode


def test_frames_split_across_reads_are_reassembled() -> None:
    data = encode({"t": "start", "id": "a/b[gif1]"}) + encode({"t": "bye"})
    reader = FrameReader()
    frames = []
    for i in range(len(data)):
        frames += reader.feed(data[i : i + 1])
    assert frames == [{"t": "start", "id": "a/b[gif1]"}, {"t": "bye"}]


def test_frames_before_a_broken_line_are_kept_with_the_error() -> None:
    """A start frame and garbage in one read: the error carries the start, so
    the host still knows which case the guest was in."""
    reader = FrameReader()
    with pytest.raises(ProtocolError, match="not JSON") as info:
        reader.feed(encode({"t": "start", "id": "a/b[gif1]"}) + b"{{{{ not json\n"
                    + encode({"t": "bye"}))
    assert info.value.frames == [{"t": "start", "id": "a/b[gif1]"}]


def test_encoding_is_ascii_and_one_line() -> None:
    line = encode({"t": "fatal", "message": "a\nb\u00e9\x1b[2J"})
    assert line.count(b"\n") == 1 and line.isascii()
    assert decode(line[:-1])["message"] == "a\nb\u00e9\x1b[2J"


def test_an_overlong_line_is_refused_before_it_is_buffered() -> None:
    reader = FrameReader(max_line=100)
    with pytest.raises(ProtocolError, match="longer than 100 bytes"):
        reader.feed(b"x" * 101)
    reader = FrameReader(max_line=100)
    reader.feed(b"{" + b" " * 60)
    with pytest.raises(ProtocolError, match="longer than 100 bytes"):
        reader.feed(b" " * 60 + b"}\n")


def test_the_total_is_capped() -> None:
    reader = FrameReader(max_total=1000)
    frame = encode({"t": "bye"})
    with pytest.raises(ProtocolError, match="more than 1000 bytes"):
        for _ in range(1000):
            reader.feed(frame)


@pytest.mark.parametrize(("line", "message"), [
    (b"\xff\xfe", "non-ASCII"),
    (b"{not json}", "not JSON"),
    (b'{"t":"mark","stage":"x","uptime":NaN}', "not JSON"),
    (b'{"t":"mark","stage":"x","uptime":Infinity}', "not JSON"),
    (b'{"t":"bye","t":"bye"}', "duplicate key"),
    (b"[1,2]", "not an object with a type"),
    (b'{"id":"x"}', "not an object with a type"),
    (b'{"t":"launch"}', "unknown type"),
    (b'{"t":"start"}', "without id"),
    (b'{"t":"start","id":7}', "'id' is int"),
    (b'{"t":"exit","rc":true}', "'rc' is bool"),
    (b'{"t":"start","id":"x","extra":1}', "unknown field 'extra'"),
    (b"[" * 50000 + b"]" * 50000, "not"),
])
def test_malformed_frames_are_protocol_errors(line: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode(line)


def test_every_frame_type_has_a_schema() -> None:
    assert set(channel.FRAMES) >= {"mark", "module", "dev_kvm", "output", "exit", "fatal",
                                   "hello", "start", "result", "bye"}
