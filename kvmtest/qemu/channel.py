"""The host <-> guest channel: one JSON object per line over a virtio-serial port.

Framing: each frame is ``json.dumps(obj, ensure_ascii=True)`` + ``\\n``, so a
frame never contains a raw newline or non-ASCII byte.  Every frame is an
object with a string field ``t`` (its type).

Guest -> host (everything the guest sends is hostile; the host checks it):

    {"t": "mark", "stage": "init", "uptime": 1.33}           /init stage times
    {"t": "module", "name": "kvm_amd", "status": "ok", "detail": "nested=1"}
    {"t": "dev_kvm", "present": true}
    {"t": "output", "stream": "stdout", "hex": "..."}        boot(): command output
    {"t": "exit", "rc": 0}                                   the guest command ended
    {"t": "hello", "v": 3, "facts": {...}}                   the agent is ready
    {"t": "reloaded", "stage": "load", "error": ""}          kvm, kvm_amd reloaded ("" or
                                                             why not); a hello follows
    {"t": "start", "id": "save/efer-svme0[gif1]"}            a case begins
    {"t": "result", "id": ..., "observation": {...}}         ... or "skip": reason,
                                                             ... or "error": text,
                                                             ... or "trace": base64
                                                             (kvmtest.record)
    {"t": "bye"}                                             the agent is done

Host -> guest:

    {"t": "batch", "timeout": 5.0, "cases": [<casecodec JSON>, ...]}
                                  an eligible case as {"id": ..., "record": {...}}
    {"t": "reload", "kvm_amd": {"nested": "1", "npt": "0"}, "sync": "reload-1"}
                                  kvm_amd's parameters; SYNC goes to the kernel log
    {"t": "bye"}

The host side (``FrameReader``) enforces a maximum line length and a total
byte budget per boot (``ProtocolError`` when exceeded: the caller kills
QEMU), decodes strictly (UTF-8/ASCII only, no NaN or Infinity, no duplicate
keys, a top-level object with a known ``t``) and checks the fields of each
frame type (``check_frame``).  Nested payloads (facts, observations) are
checked by their consumers with kvmtest.casecodec's strict mode.
"""

from __future__ import annotations

import json
from typing import Any

MAX_LINE = 256 * 1024  # one guest frame; an observation is ~1 KB
MAX_TOTAL = 64 * 1024 * 1024  # all guest frames of one boot
PORT_NAME = "org.kvmtest.0"  # the virtio-serial port's name (/sys/class/virtio-ports/*/name)
PROTOCOL_VERSION = 3


class ProtocolError(Exception):
    """The guest broke the protocol (the message says how).  ``frames``: the
    good frames that came before the break in the same read, to be handled
    first (so that a fault names the case the guest had started)."""

    def __init__(self, message: str, frames: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.frames = frames or []


def encode(frame: dict[str, Any]) -> bytes:
    return json.dumps(frame, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


_DECODER = json.JSONDecoder(parse_constant=_no_constant, object_pairs_hook=_unique_keys)

# frame type -> {field: (types, required)}; every other field is an error.
_NUM = (int, float)
FRAMES: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "mark": {"stage": ((str,), True), "uptime": (_NUM, True)},
    "module": {"name": ((str,), True), "status": ((str,), True), "detail": ((str,), False)},
    "dev_kvm": {"present": ((bool,), True)},
    "output": {"stream": ((str,), True), "hex": ((str,), True)},
    "exit": {"rc": ((int,), True)},
    "fatal": {"message": ((str,), True)},
    "hello": {"v": ((int,), True), "facts": ((dict,), True)},
    "start": {"id": ((str,), True)},
    "result": {"id": ((str,), True), "observation": ((dict,), False), "skip": ((str,), False),
               "error": ((str,), False), "seconds": (_NUM, False),
               "trace": ((str,), False)},
    "reloaded": {"stage": ((str,), True), "error": ((str,), True)},
    "bye": {},
}
MAX_STRING = 192 * 1024  # any string field (/init's output frames: 64 KiB as hex)


def decode(line: bytes) -> dict[str, Any]:
    """One guest frame from LINE (without its newline); ProtocolError if invalid."""
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("a frame with non-ASCII bytes") from None
    try:
        frame = _DECODER.decode(text)
    except (ValueError, RecursionError) as e:
        why = _short(str(e))
        raise ProtocolError(f"a frame that is not JSON ({why}): {_short(text)}") from None
    check_frame(frame)
    return frame


def check_frame(frame: Any) -> None:
    if not isinstance(frame, dict) or not isinstance(frame.get("t"), str):
        raise ProtocolError(f"a frame that is not an object with a type: {_short(repr(frame))}")
    kind = frame["t"]
    spec = FRAMES.get(kind)
    if spec is None:
        raise ProtocolError(f"a frame of unknown type {_short(kind)!r}")
    for key, value in frame.items():
        if key == "t":
            continue
        if key not in spec:
            raise ProtocolError(f"a {kind!r} frame with unknown field {_short(key)!r}")
        types_, _ = spec[key]
        if type(value) not in types_:  # exact: True is not an int here
            raise ProtocolError(f"a {kind!r} frame whose {key!r} is {type(value).__name__}")
        if isinstance(value, str) and len(value) > MAX_STRING:
            raise ProtocolError(f"a {kind!r} frame whose {key!r} has {len(value)} characters")
    missing = [key for key, (_, required) in spec.items() if required and key not in frame]
    if missing:
        raise ProtocolError(f"a {kind!r} frame without {', '.join(missing)}")


def _short(text: str, limit: int = 80) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit] + "..."


class FrameReader:
    """Splits the guest's byte stream into checked frames, within the caps."""

    def __init__(self, max_line: int = MAX_LINE, max_total: int = MAX_TOTAL) -> None:
        self.max_line = max_line
        self.max_total = max_total
        self.total = 0
        self._partial = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """The complete frames in DATA (plus what was buffered before)."""
        self.total += len(data)
        if self.total > self.max_total:
            raise ProtocolError(f"more than {self.max_total} bytes on the channel")
        frames: list[dict[str, Any]] = []
        start = 0
        try:
            while True:
                end = data.find(b"\n", start)
                if end < 0:
                    break
                if len(self._partial) + end - start > self.max_line:
                    raise ProtocolError(f"a frame longer than {self.max_line} bytes")
                line = bytes(self._partial) + data[start:end]
                self._partial.clear()
                start = end + 1
                if line:
                    frames.append(decode(line))
            if len(self._partial) + len(data) - start > self.max_line:
                raise ProtocolError(f"a frame longer than {self.max_line} bytes")
        except ProtocolError as e:
            e.frames = frames
            raise
        self._partial += data[start:]
        return frames
