"""Work around one Unicorn 2.1.4 behaviour that breaks software delivery.

QEMU's ``check_exception()`` escalates a second contributory fault or #PF to
#DF and a fault during #DF to a triple fault, using ``env->old_exception``,
which ``do_interrupt`` resets to -1 once an exception has been delivered.
Unicorn never delivers exceptions (hooks catch them), so old_exception stays
set: after a #PF that Unicorn raised internally (e.g. probing a page while
translating) the next two exceptions -- including the #UD of an SVM
instruction -- turn into a "triple fault" that silently halts emulation
without calling UC_HOOK_INSN_INVALID.  The model delivers exceptions itself,
so before each emu_start it resets old_exception to -1, as a CPU does after
a successful delivery.

The field's offset in the saved context is found once per process by
raising a #DE in a scratch instance (old_exception goes from -1 to 0).
"""

from __future__ import annotations

import ctypes
import functools
import struct

from unicorn import UC_ARCH_X86, UC_HOOK_INTR, UC_MODE_64, Uc
from unicorn import x86_const as x86


@functools.cache
def old_exception_offset() -> int:
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.ctl_set_cpu_model(x86.UC_CPU_X86_HASWELL)
    uc.mem_map(0, 0x2000)
    uc.mem_write(0, bytes.fromhex("31c9f7f1f4"))  # xor ecx,ecx; div ecx; hlt
    uc.hook_add(UC_HOOK_INTR, lambda uc, n, _u: uc.emu_stop())
    before = bytes(uc.context_save())
    uc.emu_start(0, 0xFFFF_FFFF_FFFF_FFFF)
    after = bytes(uc.context_save())
    hits = [off for off in range(0, len(before) - 3, 4)
            if struct.unpack_from("<i", before, off)[0] == -1
            and struct.unpack_from("<i", after, off)[0] == 0]
    if len(hits) != 1:
        raise RuntimeError(f"cannot locate env->old_exception in the Unicorn context: {hits}")
    return hits[0]


class OldExceptionReset:
    """Resets env->old_exception to -1 (cost: one context update, ~10 us)."""

    def __init__(self, uc: Uc) -> None:
        self._uc = uc
        self._ctx = uc.context_save()
        ptr = ctypes.cast(self._ctx.context, ctypes.c_void_p).value
        assert ptr is not None
        self._field = ctypes.c_int.from_address(ptr + old_exception_offset())

    def __call__(self) -> None:
        self._uc.context_update(self._ctx)
        if self._field.value != -1:
            self._field.value = -1
            self._uc.context_restore(self._ctx)
