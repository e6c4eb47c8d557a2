"""Guest page-table walks the model needs outside Unicorn's own MMU.

Unicorn translates the guest's own accesses; the model walks tables itself
only where the CPU or KVM does so in microcode/software: pushing an
exception frame, reading an IDT gate, and loading PAE PDPTRs at VMRUN
(load_pdptrs() in KVM).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .. import layout
from . import cpuid

ReadPhys = Callable[[int, int], bytes | None]  # None: not backed by memory

_ADDR_MASK = ((1 << cpuid.MAXPHYADDR) - 1) & ~0xFFF
PTE_P = 1
PTE_RW = 2
PTE_US = 4
PTE_PS = 1 << 7


@dataclass(frozen=True)
class Fault:
    """A #PF the walk would raise: error code bits P, W, U, I (APM 8.4.2)."""

    address: int
    error_code: int


def _entry(read: ReadPhys, gpa: int) -> int | None:
    raw = read(gpa, 8)
    return None if raw is None else int.from_bytes(raw, "little")


def translate(read: ReadPhys, cr0: int, cr3: int, cr4: int, efer: int, linear: int,
              write: bool = False, user: bool = False, fetch: bool = False) -> int | Fault:
    """Linear -> guest-physical under the given control registers."""
    if not cr0 & layout.CR0_PG:
        return linear & 0xFFFF_FFFF
    ec = (PTE_RW if write else 0) | (PTE_US if user else 0) | (0x10 if fetch else 0)
    if efer & layout.EFER_LMA:
        levels = [(cr3 & _ADDR_MASK, 39), (None, 30), (None, 21), (None, 12)]
    elif cr4 & layout.CR4_PAE:
        pdpte = _entry(read, (cr3 & ~0x1F & 0xFFFF_FFFF) + 8 * ((linear >> 30) & 3))
        if pdpte is None or not pdpte & PTE_P:
            return Fault(linear, ec)
        levels = [(pdpte & _ADDR_MASK, 21), (None, 12)]
    else:
        return _translate32(read, cr3, linear, ec)
    table = levels[0][0]
    assert table is not None
    for _, shift in levels:
        pte = _entry(read, table + 8 * ((linear >> shift) & 0x1FF))
        if pte is None or not pte & PTE_P:
            return Fault(linear, ec)
        last = shift == 12 or (pte & PTE_PS and shift in (21, 30))
        if last:
            size = 1 << shift
            return (pte & _ADDR_MASK & ~(size - 1)) | (linear & (size - 1))
        table = pte & _ADDR_MASK
    raise AssertionError("unreachable")


def _translate32(read: ReadPhys, cr3: int, linear: int, ec: int) -> int | Fault:
    pde_raw = read((cr3 & 0xFFFFF000) + 4 * ((linear >> 22) & 0x3FF), 4)
    if pde_raw is None or not pde_raw[0] & PTE_P:
        return Fault(linear, ec)
    pde = int.from_bytes(pde_raw, "little")
    if pde & PTE_PS:
        return (pde & 0xFFC00000) | (linear & 0x3FFFFF)
    pte_raw = read((pde & 0xFFFFF000) + 4 * ((linear >> 12) & 0x3FF), 4)
    if pte_raw is None or not pte_raw[0] & PTE_P:
        return Fault(linear, ec)
    return (int.from_bytes(pte_raw, "little") & 0xFFFFF000) | (linear & 0xFFF)


# PAE PDPTE bits that must be zero when P=1 (APM 5.3.2 / KVM
# pdptr_rsvd_bits): 2:1, 8:5 and 63:MAXPHYADDR.
PDPTE_RESERVED = 0b110 | 0b1_1110_0000 | (((1 << 64) - 1) & ~((1 << cpuid.MAXPHYADDR) - 1))


def load_pdptrs(read: ReadPhys, cr3: int) -> bool:
    """KVM load_pdptrs(): the four PDPTEs at CR3[31:5] must be readable and
    have no reserved bit set where present."""
    base = cr3 & 0xFFFF_FFE0
    raw = read(base, 32)
    if raw is None:
        return False
    for i in range(4):
        e = int.from_bytes(raw[8 * i : 8 * i + 8], "little")
        if e & PTE_P and e & PDPTE_RESERVED:
            return False
    return True
