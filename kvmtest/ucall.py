"""The guest->host channel: port-I/O ucalls (KVM selftests' ucall idea).

The guest fills ``struct ucall`` at ``UCALL_GPA`` and executes
``out UCALL_PORT, eax`` with eax = the command.  Every backend turns that OUT
into the same ``IoExit``, so one host loop decodes ucalls for all of them.

struct ucall (u64 fields):  +0x00 cmd, +0x08 args[0] ... +0x38 args[6]
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass

from . import layout

UCALL_PORT = 0x1000
UCALL_NARGS = 7
CSTRING_LIMIT = 256  # bytes of a GUEST_ASSERT string read
_ARGS = struct.Struct(f"<{UCALL_NARGS}Q")  # struct ucall's args[], after cmd


class Ucall(enum.IntEnum):
    SYNC = 1  # args[0] = stage tag; L1's report is in the result block
    ASSERT = 2  # args: line, GPA of message, GPA of file, value a, value b
    DONE = 3
    EXCEPTION = 4  # args: vector, error code, RIP, CS, RSP, RFLAGS
    PING = 5  # no-op round trip (benchmarks)


@dataclass(frozen=True)
class UcallExit:
    """A ucall: the guest's command and arguments (struct ucall)."""
    cmd: int
    args: tuple[int, ...]

    def describe(self) -> str:
        try:
            name = Ucall(self.cmd).name
        except ValueError:
            name = f"ucall#{self.cmd}"
        return f"{name}({', '.join(hex(a) for a in self.args)})"


@dataclass(frozen=True)
class GuestException:
    """An exception taken by L1 and reported by its IDT stub."""

    vector: int
    error_code: int
    rip: int

    @classmethod
    def from_ucall(cls, u: UcallExit) -> GuestException:
        return cls(vector=u.args[0], error_code=u.args[1], rip=u.args[2])


@dataclass(frozen=True)
class GuestAssert:
    """A failed GUEST_ASSERT: where, the message and the two values."""
    line: int
    message: str
    file: str
    a: int
    b: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message} (a={self.a:#x}, b={self.b:#x})"


def decode(read: Callable[[int, int], bytes], cmd: int) -> UcallExit:
    """Decode the ucall in guest memory; ``read(gpa, n)`` reads guest memory."""
    return UcallExit(cmd, _ARGS.unpack(read(layout.UCALL_GPA + 8, _ARGS.size)))


def read_cstring(read: Callable[[int, int], bytes], gpa: int,
                 limit: int = CSTRING_LIMIT) -> str:
    if not 0 < gpa < layout.MEM_SIZE:
        return f"<bad string pointer {gpa:#x}>"
    raw = read(gpa, min(limit, layout.MEM_SIZE - gpa))
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


def guest_assert(read: Callable[[int, int], bytes], u: UcallExit) -> GuestAssert:
    line, msg, file, a, b = u.args[:5]
    return GuestAssert(line, read_cstring(read, msg), read_cstring(read, file), a, b)
