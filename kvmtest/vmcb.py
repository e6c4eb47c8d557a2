"""VMCB layout (AMD APM vol. 2, appendix B, tables B-1 and B-2) and helpers.

Offsets are from the start of the 4 KiB VMCB; the save area starts at 0x400.
Field names follow KVM's ``struct vmcb_control_area`` / ``vmcb_save_area``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

VMCB_SIZE = 0x1000
SAVE_AREA = 0x400


@dataclass(frozen=True)
class Field:
    """A VMCB field: name, byte offset and size (APM vol. 2, appendix B)."""
    name: str
    offset: int
    size: int  # bytes: 1, 2, 4 or 8


def _fields(*rows: tuple[str, int, int]) -> dict[str, Field]:
    return {name: Field(name, off, size) for name, off, size in rows}


# Control area (table B-1).
CONTROL = _fields(
    ("intercept_cr", 0x000, 4),  # [15:0] reads, [31:16] writes
    ("intercept_dr", 0x004, 4),
    ("intercept_exceptions", 0x008, 4),
    ("intercept_misc1", 0x00C, 4),  # INTERCEPT_WORD3: INTR ... SHUTDOWN
    ("intercept_misc2", 0x010, 4),  # INTERCEPT_WORD4: VMRUN, VMMCALL, ...
    ("intercept_misc3", 0x014, 4),  # INTERCEPT_WORD5
    ("pause_filter_thresh", 0x03C, 2),
    ("pause_filter_count", 0x03E, 2),
    ("iopm_base_pa", 0x040, 8),
    ("msrpm_base_pa", 0x048, 8),
    ("tsc_offset", 0x050, 8),
    ("asid", 0x058, 4),
    ("tlb_ctl", 0x05C, 1),
    ("int_ctl", 0x060, 4),
    ("int_vector", 0x064, 4),
    ("int_state", 0x068, 4),
    ("exit_code", 0x070, 8),
    ("exit_info_1", 0x078, 8),
    ("exit_info_2", 0x080, 8),
    ("exit_int_info", 0x088, 8),
    ("nested_ctl", 0x090, 8),  # bit 0: NP_ENABLE
    ("avic_vapic_bar", 0x098, 8),
    ("ghcb_gpa", 0x0A0, 8),
    ("event_inj", 0x0A8, 8),
    ("nested_cr3", 0x0B0, 8),
    ("virt_ext", 0x0B8, 8),  # bit 0: LBR virtualization, bit 1: VMSAVE/VMLOAD virt
    ("clean", 0x0C0, 4),
    ("next_rip", 0x0C8, 8),
    ("insn_len", 0x0D0, 1),
)

# Save area (table B-2).  Segments are 16 bytes: selector, attrib, limit, base.
SEGMENTS = ("es", "cs", "ss", "ds", "fs", "gs", "gdtr", "ldtr", "idtr", "tr")
_SEG_ROWS = []
for _i, _seg in enumerate(SEGMENTS):
    _base = SAVE_AREA + 0x10 * _i
    _SEG_ROWS += [
        (f"{_seg}.selector", _base, 2),
        (f"{_seg}.attrib", _base + 2, 2),
        (f"{_seg}.limit", _base + 4, 4),
        (f"{_seg}.base", _base + 8, 8),
    ]
SAVE = _fields(
    *_SEG_ROWS,
    ("cpl", 0x4CB, 1),
    ("efer", 0x4D0, 8),
    ("cr4", 0x548, 8),
    ("cr3", 0x550, 8),
    ("cr0", 0x558, 8),
    ("dr7", 0x560, 8),
    ("dr6", 0x568, 8),
    ("rflags", 0x570, 8),
    ("rip", 0x578, 8),
    ("rsp", 0x5D8, 8),
    ("rax", 0x5F8, 8),
    ("star", 0x600, 8),
    ("lstar", 0x608, 8),
    ("cstar", 0x610, 8),
    ("sfmask", 0x618, 8),
    ("kernel_gs_base", 0x620, 8),
    ("sysenter_cs", 0x628, 8),
    ("sysenter_esp", 0x630, 8),
    ("sysenter_eip", 0x638, 8),
    ("cr2", 0x640, 8),
    ("g_pat", 0x668, 8),
    ("dbgctl", 0x670, 8),
)

FIELDS: dict[str, Field] = {**CONTROL, **SAVE}

# INTERCEPT_WORD3 (intercept_misc1) bits.
INTERCEPT_INTR = 1 << 0
INTERCEPT_NMI = 1 << 1
INTERCEPT_SMI = 1 << 2
INTERCEPT_CPUID = 1 << 18
INTERCEPT_HLT = 1 << 24
INTERCEPT_IOIO_PROT = 1 << 27
INTERCEPT_MSR_PROT = 1 << 28
INTERCEPT_SHUTDOWN = 1 << 31
# INTERCEPT_WORD4 (intercept_misc2) bits.
INTERCEPT_VMRUN = 1 << 0
INTERCEPT_VMMCALL = 1 << 1
INTERCEPT_VMLOAD = 1 << 2
INTERCEPT_VMSAVE = 1 << 3
INTERCEPT_STGI = 1 << 4
INTERCEPT_CLGI = 1 << 5

NESTED_CTL_NP_ENABLE = 1 << 0

# TLB_CONTROL encodings (APM 15.16.1).
TLB_CONTROL_DO_NOTHING = 0
TLB_CONTROL_FLUSH_ALL_ASID = 1
TLB_CONTROL_FLUSH_ASID = 3
TLB_CONTROL_FLUSH_ASID_LOCAL = 7

# EVENTINJ (APM 15.20).
EVTINJ_VEC_MASK = 0xFF
EVTINJ_TYPE_SHIFT = 8
EVTINJ_TYPE_INTR = 0 << 8
EVTINJ_TYPE_NMI = 2 << 8
EVTINJ_TYPE_EXEPT = 3 << 8
EVTINJ_TYPE_SOFT = 4 << 8
EVTINJ_VALID_ERR = 1 << 11
EVTINJ_VALID = 1 << 31

# Exit codes (APM appendix C).
SVM_EXIT_EXCP_BASE = 0x40
SVM_EXIT_INTR = 0x60
SVM_EXIT_NMI = 0x61
SVM_EXIT_CPUID = 0x72
SVM_EXIT_HLT = 0x78
SVM_EXIT_IOIO = 0x7B
SVM_EXIT_MSR = 0x7C
SVM_EXIT_SHUTDOWN = 0x7F
SVM_EXIT_VMRUN = 0x80
SVM_EXIT_VMMCALL = 0x81
SVM_EXIT_NPF = 0x400
SVM_EXIT_ERR = 0xFFFF_FFFF_FFFF_FFFF  # VMEXIT_INVALID

# Written into the exit fields before a run so a missing write is seen.
POISON = 0xDEAD_BEEF_0BAD_F00D

# Segment attributes in VMCB format: type | S<<4 | DPL<<5 | P<<7 | AVL<<8 |
# L<<9 | D/B<<10 | G<<11.
ATTR_CODE64 = 0xB | 1 << 4 | 1 << 7 | 1 << 9 | 1 << 11
ATTR_DATA = 0x3 | 1 << 4 | 1 << 7 | 1 << 10 | 1 << 11
ATTR_TSS64 = 0xB | 1 << 7
ATTR_CS_L = 1 << 9
ATTR_CS_DB = 1 << 10

_PACK = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}


def field(data: bytes, name: str) -> int:
    """Field NAME from the start of a VMCB image DATA (which may stop early,
    e.g. at SAVE_AREA: the control area alone)."""
    f = FIELDS[name]
    if f.offset + f.size > len(data):
        raise ValueError(f"{name} lies beyond the {len(data)} bytes read")
    return struct.unpack_from(_PACK[f.size], data, f.offset)[0]


class Vmcb:
    """A VMCB as a mutable 4 KiB byte image, accessed by field name."""

    def __init__(self, data: bytes | bytearray | None = None) -> None:
        self.data = bytearray(data if data is not None else VMCB_SIZE)
        if len(self.data) != VMCB_SIZE:
            raise ValueError(f"VMCB must be {VMCB_SIZE} bytes, got {len(self.data)}")

    def __getitem__(self, name: str) -> int:
        f = FIELDS[name]
        return struct.unpack_from(_PACK[f.size], self.data, f.offset)[0]

    def __setitem__(self, name: str, value: int) -> None:
        f = FIELDS[name]
        struct.pack_into(_PACK[f.size], self.data, f.offset, value & ((1 << (8 * f.size)) - 1))

    def to_bytes(self) -> bytes:
        return bytes(self.data)
