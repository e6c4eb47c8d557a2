"""L2 execution modes a scenario can ask for, as VMCB12 save-area changes.

The default VMCB12 (kvmtest.vmcb12) runs L2 as a copy of L1: 64-bit long
mode on L1's page tables.  Each other mode changes the save area the way the
APM describes that mode (vol. 2 ch. 14 and 15.5: VMRUN loads CS/SS/DS/ES
hidden state, CR0/CR3/CR4/EFER from the VMCB, whatever the selectors say),
and runs one of the payload's existing L2 entries (guest_payloads/common.S:
``l2_vmmcall32`` and the others assemble to the same bytes in 16-, 32- and
64-bit code: VMMCALL, HLT, UD2, OUT, RDMSR).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .. import layout
from ..payloads import Payload

CR0_REAL = layout.CR0_ET | layout.CR0_NE  # PE=0: real mode
CR4_PSE = 1 << 4

# VMCB attribute encodings (APM table B-2 note): type | S<<4 | DPL<<5 | P<<7
# | AVL<<8 | L<<9 | D/B<<10 | G<<11.
ATTR_CODE32 = 0xB | 1 << 4 | 1 << 7 | 1 << 10 | 1 << 11
ATTR_CODE16 = 0xB | 1 << 4 | 1 << 7
ATTR_DATA16 = 0x3 | 1 << 4 | 1 << 7

# L2's own page tables, in the 4 pages the layout reserves for them.
PAE_PDPT = layout.L2_PAGING_GPA
PAE_PD = layout.L2_PAGING_GPA + 0x1000
PD32 = layout.L2_PAGING_GPA + 0x2000

# Entries whose bytes mean the same in 16/32-bit code (common.S).
ENTRIES_ANY_WIDTH = ("l2_vmmcall32", "l2_hlt", "l2_ud", "l2_ioio", "l2_rdmsr")
ENTRIES_64 = ("l2_vmmcall", "l2_hlt", "l2_ud", "l2_ioio", "l2_rdmsr")


def _pae_tables() -> dict[int, bytes]:
    """Legacy PAE: a PDPT (4 entries) and one PD of 2 MiB pages mapping
    [0, 1 GiB) one to one (APM vol. 2 5.3)."""
    pdpte = (PAE_PD | layout.PTE_P).to_bytes(8, "little")
    pd = b"".join(((i << 21) | layout.PTE_P | layout.PTE_RW | layout.PTE_PS).to_bytes(8, "little")
                  for i in range(512))
    return {PAE_PDPT: pdpte + bytes(24), PAE_PD: pd}


def _pd32_tables() -> dict[int, bytes]:
    """Non-PAE 32-bit paging with CR4.PSE: one page directory of 4 MiB pages
    mapping [0, 1 GiB) one to one (APM vol. 2 5.2)."""
    pd = b"".join(((i << 22) | layout.PTE_P | layout.PTE_RW | layout.PTE_PS).to_bytes(4, "little")
                  for i in range(256))
    return {PD32: pd.ljust(layout.PAGE_SIZE, b"\0")}


def _no_tables() -> dict[int, bytes]:
    return {}


def _flat32() -> dict[str, int]:
    return {"efer": layout.EFER_SVME, "cs.attrib": ATTR_CODE32}


def _long(payload: Payload, entry: str) -> dict[str, int]:
    return {}


def _compat(payload: Payload, entry: str) -> dict[str, int]:
    # Long mode, CS.L=0 CS.D=1: compatibility mode (APM vol. 2 4.8.1).
    return {"cs.attrib": ATTR_CODE32}


def _pae(payload: Payload, entry: str) -> dict[str, int]:
    return {**_flat32(), "cr0": layout.L1_CR0, "cr4": layout.CR4_PAE, "cr3": PAE_PDPT}


def _paging32(payload: Payload, entry: str) -> dict[str, int]:
    return {**_flat32(), "cr0": layout.L1_CR0, "cr4": CR4_PSE, "cr3": PD32}


def _prot32(payload: Payload, entry: str) -> dict[str, int]:
    return {**_flat32(), "cr0": layout.CR0_PE | layout.CR0_ET | layout.CR0_NE, "cr4": 0}


def _real(payload: Payload, entry: str) -> dict[str, int]:
    # Real mode with CS's hidden base at the entry's 64 KiB window: VMRUN
    # loads the base from the VMCB, not from selector << 4 ("real-mode-like":
    # the payload lives above 1 MiB).
    addr = payload.sym(entry)
    out = {"efer": layout.EFER_SVME, "cr0": CR0_REAL, "cr4": 0,
           "cs.attrib": ATTR_CODE16, "cs.base": addr & ~0xFFFF, "cs.limit": 0xFFFF,
           "cs.selector": (addr >> 4) & 0xF000, "rip": addr & 0xFFFF}
    for seg in ("ss", "ds", "es"):
        out |= {f"{seg}.attrib": ATTR_DATA16, f"{seg}.limit": 0xFFFF, f"{seg}.base": 0,
                f"{seg}.selector": 0}
    return out


@dataclass(frozen=True)
class L2Mode:
    name: str
    entries: tuple[str, ...]  # the first one is the default
    changes: Callable[[Payload, str], dict[str, int]]
    memory: Callable[[], dict[int, bytes]]
    why: str


MODES: dict[str, L2Mode] = {m.name: m for m in (
    L2Mode("long", ENTRIES_64, _long, _no_tables, "64-bit, L1's page tables (the default)"),
    L2Mode("compat", ENTRIES_ANY_WIDTH, _compat, _no_tables, "long mode, 32-bit CS"),
    L2Mode("pae", ENTRIES_ANY_WIDTH, _pae, _pae_tables, "legacy PAE paging (PDPTRs)"),
    L2Mode("paging32", ENTRIES_ANY_WIDTH, _paging32, _pd32_tables, "32-bit paging, PSE"),
    L2Mode("prot32", ENTRIES_ANY_WIDTH, _prot32, _no_tables, "protected mode, paging off"),
    L2Mode("real", ENTRIES_ANY_WIDTH, _real, _no_tables, "real mode, CS base from VMCB12"),
)}
DEFAULT_MODE = "long"
