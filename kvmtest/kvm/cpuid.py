"""CPUID entries as KVM_GET_SUPPORTED_CPUID / KVM_SET_CPUID2 see them."""

from __future__ import annotations

from dataclasses import dataclass

from ._ffi import ffi, lib

# KVM's header spells it "SIGNIFCANT"; the meaning is "index is significant".
FLAG_SIGNIFICANT_INDEX = lib.KVM_CPUID_FLAG_SIGNIFCANT_INDEX


@dataclass
class CpuidEntry:
    """One ``struct kvm_cpuid_entry2`` (mutable: edit a copy of the supported set)."""

    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0


def find(entries: list[CpuidEntry], function: int, index: int = 0) -> CpuidEntry | None:
    for e in entries:
        if e.function == function and (e.index == index or not e.flags & FLAG_SIGNIFICANT_INDEX):
            return e
    return None


def pack_cpuid2(entries: list[CpuidEntry]):
    """A ``struct kvm_cpuid2 *`` cdata holding ``entries``."""
    c = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
    for i, e in enumerate(entries):
        ce = c.entries[i]
        ce.function, ce.index, ce.flags = e.function, e.index, e.flags
        ce.eax, ce.ebx, ce.ecx, ce.edx = e.eax, e.ebx, e.ecx, e.edx
    return c


def unpack_cpuid2(c) -> list[CpuidEntry]:
    return [
        CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
        for e in (c.entries[i] for i in range(c.nent))
    ]
