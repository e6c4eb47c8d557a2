"""L1's event log: the order in which markers and events happened in the guest.

Payloads that test *when* an event reaches L1 (GIF, single-step) append to a
log in guest memory (params.LOG_GPA): a u64 count, then (kind, value) pairs.
Markers record their own address, interrupt/NMI/SMI/#DB handlers the RIP they
interrupted, so the log reads as "mark@after_vmrun, intr@after_stgi, ...".
The host poisons the count; L1 zeroes it first thing, so a log L1 never
started reads as None, not as "nothing happened".
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

from . import params
from .payloads import Payload

KINDS = {params.LOG_MARK: "mark", params.LOG_INTR: "intr", params.LOG_NMI: "nmi",
         params.LOG_SMI: "smi", params.LOG_DB: "db", params.LOG_DR6: "dr6"}
SIZE = 8 + 16 * params.LOG_MAX


def poison() -> bytes:
    """The log as the host leaves it before the run: count poisoned."""
    return params.RESULT_POISON.to_bytes(8, "little") + bytes(SIZE - 8)


def read(read_mem: Callable[[int, int], bytes]) -> list[int] | None:
    """The raw entries [kind, value, kind, value, ...]; None if L1 never
    initialised the log.  The guest's count is untrusted: it is clamped."""
    raw = read_mem(params.LOG_GPA, SIZE)
    count = int.from_bytes(raw[:8], "little")
    if count == params.RESULT_POISON:
        return None
    count = min(count, params.LOG_MAX)
    return [int.from_bytes(raw[8 + 8 * i:16 + 8 * i], "little") for i in range(2 * count)]


def render(entries: list[int] | None, payload: Payload) -> tuple[str, ...] | None:
    """The log as strings: 'mark@after_vmrun', 'intr@after_stgi+0x1', 'dr6=0x4000'."""
    if entries is None:
        return None
    from .runner import symbolize  # runner imports this module

    out = []
    for kind, value in zip(entries[::2], entries[1::2], strict=True):
        name = KINDS.get(kind, f"kind{kind}")
        if kind == params.LOG_DR6:
            out.append(f"dr6={value:#x}")
        else:
            out.append(f"{name}@{symbolize(payload, value) or hex(value)}")
    return tuple(out)


def matches(seen: tuple[str, ...], want: tuple[str, ...]) -> bool:
    """Entry by entry; an expected entry may use shell wildcards ('dr6=*')."""
    return len(seen) == len(want) and all(
        fnmatch.fnmatchcase(s, w) for s, w in zip(seen, want, strict=True))
