"""L1's initial machine: memory image and CPU state, backend-neutral.

The kvm backend turns this into KVM_SET_SREGS/REGS plus guest memory writes,
the model backend into Unicorn register and memory writes.  Both get exactly
the same bytes at the same GPAs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from . import layout
from .payloads import Payload

EXC_STUB_STRIDE = 16
# Vectors whose IDT stub expects the CPU to have pushed an error code.
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})


@dataclass(frozen=True)
class Segment:
    """Hidden + visible segment state in KVM's kvm_segment terms."""

    selector: int
    base: int = 0
    limit: int = 0xFFFFFFFF
    type: int = 0
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1
    l: int = 0  # noqa: E741 - KVM's name
    g: int = 1
    avl: int = 0
    unusable: int = 0

    @property
    def vmcb_attrib(self) -> int:
        """The 12-bit VMCB attribute encoding (APM table B-2 note)."""
        return (self.type | self.s << 4 | self.dpl << 5 | self.present << 7 | self.avl << 8
                | self.l << 9 | self.db << 10 | self.g << 11)


CODE64 = Segment(layout.SEL_CODE64, type=0xB, l=1)
DATA = Segment(layout.SEL_DATA, type=0x3, db=1)
TSS = Segment(layout.SEL_TSS, base=layout.TSS_GPA, limit=0x67, type=0xB, s=0, g=0)
LDT_NULL = Segment(0, limit=0, type=0x2, s=0, present=0, g=0, unusable=1)


@dataclass(frozen=True)
class L1State:
    """L1's registers as it starts (long mode, set by KVM_SET_SREGS/REGS)."""
    rip: int
    rsp: int = layout.L1_STACK_TOP
    rflags: int = layout.L1_RFLAGS
    cr0: int = layout.L1_CR0
    cr3: int = layout.L1_CR3
    cr4: int = layout.L1_CR4
    efer: int = layout.L1_EFER
    cs: Segment = CODE64
    ds: Segment = DATA
    es: Segment = DATA
    fs: Segment = DATA
    gs: Segment = DATA
    ss: Segment = DATA
    tr: Segment = TSS
    ldt: Segment = LDT_NULL
    gdt: tuple[int, int] = (layout.GDT_GPA, 5 * 8 - 1)  # (base, limit)
    idt: tuple[int, int] = (layout.IDT_GPA, layout.IDT_VECTORS * 16 - 1)


def _descriptor(seg: Segment) -> int:
    """An 8-byte GDT code/data descriptor for seg."""
    limit, base = seg.limit >> 12 if seg.g else seg.limit, seg.base
    return (
        (limit & 0xFFFF)
        | (base & 0xFFFFFF) << 16
        | (seg.type | seg.s << 4 | seg.dpl << 5 | seg.present << 7) << 40
        | ((limit >> 16) & 0xF) << 48
        | (seg.avl | seg.l << 1 | seg.db << 2 | seg.g << 3) << 52
        | ((base >> 24) & 0xFF) << 56
    )


@functools.cache  # constant, and loaded for every case
def gdt() -> bytes:
    tss_low = _descriptor(Segment(0, base=TSS.base, limit=TSS.limit, type=0x9, s=0, g=0))
    entries = [0, _descriptor(CODE64), _descriptor(DATA), tss_low, TSS.base >> 32]
    return b"".join(e.to_bytes(8, "little") for e in entries)


def idt(payload: Payload) -> bytes:
    """64-bit interrupt gates for the exception vectors, to exc_stubs."""
    return _idt(payload.sym("exc_stubs"))


@functools.cache  # loaded for every case
def _idt(stubs: int) -> bytes:
    out = bytearray()
    for vector in range(layout.IDT_VECTORS):
        handler = stubs + EXC_STUB_STRIDE * vector
        low = (
            (handler & 0xFFFF)
            | layout.SEL_CODE64 << 16
            | 0x8E << 40  # present, DPL 0, 64-bit interrupt gate
            | ((handler >> 16) & 0xFFFF) << 48
        )
        out += low.to_bytes(8, "little") + (handler >> 32).to_bytes(8, "little")
    return bytes(out)


def memory_image(payload: Payload) -> dict[int, bytes]:
    """Everything L1 needs in guest memory before its first instruction."""
    image = {
        layout.GDT_GPA: gdt(),
        layout.IDT_GPA: idt(payload),
        layout.TSS_GPA: bytes(0x68),
        layout.CODE_GPA: payload.image,
    }
    image.update(layout.page_tables())
    return image


def initial_state(payload: Payload) -> L1State:
    return L1State(rip=payload.entry)
