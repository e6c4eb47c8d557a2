"""The guest-physical layout shared by every backend.

Every backend (real KVM, KVM inside QEMU, the Unicorn model) loads the same
payload bytes at the same guest-physical addresses, so an observation such as
"exception at RIP X" means the same thing everywhere.  L1 runs in 64-bit long
mode on an identity map of the first 1 GiB (2 MiB pages).
"""

from __future__ import annotations

import functools

PAGE_SIZE = 0x1000

# One memory slot at GPA 0.  Everything else is unbacked: a GPA in
# [MEM_SIZE, 4 GiB) is a legal physical address that no memslot backs.
MEM_SIZE = 0x40_0000  # 4 MiB

GDT_GPA = 0x1000
IDT_GPA = 0x2000
TSS_GPA = 0x3000
PML4_GPA = 0x4000
PDPT_GPA = 0x5000
PD_GPA = 0x6000  # 512 x 2 MiB pages: identity map of [0, 1 GiB)
UCALL_GPA = 0x7000  # struct ucall, written by the guest (see ucall.py)
PARAMS_GPA = 0x7800  # struct params, written by the host (see params.py)
HSAVE_GPA = 0x8000  # MSR_VM_HSAVE_PA target
VMCB12_GPA = 0x9000
L2_IDT_GPA = 0xA000  # 256 gates for L2's own IDT (event-injection cases)
L2_PAGING_GPA = 0xB000  # 4 pages for L2's own page tables (PAE / legacy cases)
MSRPM_GPA = 0x10000  # 8 KiB, 4 KiB aligned
IOPM_GPA = 0x14000  # 12 KiB, 4 KiB aligned
L1_STACK_TOP = 0x20000  # stack grows down into [0x18000, 0x20000)
L2_STACK_TOP = 0x28000  # stack grows down into [0x20000, 0x28000)
SMRAM_GPA = 0x30000  # default SMBASE (0x30000): handler at +0x8000, state at +0xFE00
CODE_GPA = 0x10_0000  # payload image (.text/.data of one payload) at 1 MiB
CODE_MAX = 0x10_0000  # payloads are well under 1 MiB

# A legal (below MAXPHYADDR, inside the identity map) but unbacked address.
UNBACKED_GPA = 0x3000_0000

# Selectors in the GDT built by machine.py (null, code64, data, tss(16 bytes)).
SEL_CODE64 = 0x08
SEL_DATA = 0x10
SEL_TSS = 0x18

# Initial L1 control registers: long mode with paging.
CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_NW = 1 << 29
CR0_CD = 1 << 30
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11
EFER_SVME = 1 << 12

L1_CR0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
L1_CR3 = PML4_GPA
L1_CR4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
L1_EFER = EFER_LME | EFER_LMA
L1_RFLAGS = 0x2

# Page-table entry bits.
PTE_P = 1 << 0
PTE_RW = 1 << 1
# U/S set so the same tables can serve as nested page tables: NPT walks
# are user accesses.
PTE_US = 1 << 2
PTE_PS = 1 << 7

IDT_VECTORS = 32  # exceptions only; the stubs report anything else as spurious


def page_tables() -> dict[int, bytes]:
    """PML4/PDPT/PD identity-mapping [0, 1 GiB) with 2 MiB pages."""
    return dict(_page_tables())


@functools.cache  # constant, and built for every case: costly in a TCG guest
def _page_tables() -> dict[int, bytes]:
    pml4 = (PDPT_GPA | PTE_P | PTE_RW | PTE_US).to_bytes(8, "little").ljust(PAGE_SIZE, b"\0")
    pdpt = (PD_GPA | PTE_P | PTE_RW | PTE_US).to_bytes(8, "little").ljust(PAGE_SIZE, b"\0")
    pd = b"".join(
        ((i << 21) | PTE_P | PTE_RW | PTE_US | PTE_PS).to_bytes(8, "little") for i in range(512)
    )
    return {PML4_GPA: pml4, PDPT_GPA: pdpt, PD_GPA: pd}
