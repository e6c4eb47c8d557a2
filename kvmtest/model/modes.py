"""Exception delivery outside 64-bit CPL 0, for machine.ModelMachine._deliver.

Unicorn reports exceptions by vector and never uses the guest's IDT, so the
model delivers them itself (APM vol. 2 8.9 "Long-Mode Interrupt Control
Transfers", 8.7 for legacy protected mode, 8.x real mode):

- 64-bit, from CPL 3 to a CPL-0 handler: the stack comes from TSS.RSP0 and
  SS:RSP is pushed.  Unicorn cannot lower CPL by a register write, so a
  model-private call gate does the switch (to_cpl0);
- legacy protected mode (paging off): 8-byte gates, a 32-bit frame
  (EFLAGS, CS, EIP, error code), no privilege change;
- real mode: the IVT entry (offset, segment) at IDTR.base + 4 * vector,
  a 16-bit frame (FLAGS, CS, IP), IF and TF cleared.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from unicorn import UcError
from unicorn import x86_const as x86

if TYPE_CHECKING:
    from .machine import ModelMachine

# Present, DPL 0, 64-bit code (type 0xB, S, L, G): the VMCB attrib layout.
CODE64_ATTRIB = 0xB | 1 << 4 | 1 << 7 | 1 << 9 | 1 << 11
# RFLAGS bits (APM vol. 2 3.1.6), for machine.py, svm.py and events.py too.
RFLAGS_IF = 1 << 9
RFLAGS_TF = 1 << 8
RFLAGS_NT = 1 << 14
RFLAGS_RF = 1 << 16
RFLAGS_VM = 1 << 17
RFLAGS_AC = 1 << 18


def to_cpl0(m: ModelMachine, cs: int) -> str | None:
    """Switch Unicorn from CPL 3 to CPL 0 with CS = cs: a far CALL through a
    model-private 64-bit call gate (DPL 3, target cs) in a scratch GDT does
    the privilege change natively (stack from TSS.RSP0, SS = NULL); the
    guest's GDTR is put back afterwards.  Unicorn's SYSCALL cannot serve:
    it only calls hooks."""
    from .machine import SCRATCH_GDT, SCRATCH_SIZE, _descriptor

    uc = m.uc
    index = (cs >> 3) + 1  # the gate, right after the code segment
    stub = SCRATCH_GDT + SCRATCH_SIZE - 0x100
    target, pointer = stub + 0x20, stub + 0x10
    gate = ((target & 0xFFFF) | cs << 16 | (0xC | 3 << 5 | 1 << 7) << 40
            | ((target >> 16) & 0xFFFF) << 48)
    table = bytearray(8 * (index + 2))
    struct.pack_into("<Q", table, cs & ~7, _descriptor(CODE64_ATTRIB, 0, 0xFFFF_FFFF))
    struct.pack_into("<QQ", table, 8 * index, gate, target >> 32)
    # REX.W CALL FAR [RIP + 9] -> the m16:64 pointer at stub + 0x10.
    code = bytes.fromhex("48ff1d09000000")
    gdtr, event = uc.reg_read(x86.UC_X86_REG_GDTR), m._event
    m._loading_l2 = True
    try:
        uc.mem_write(SCRATCH_GDT, bytes(table))
        uc.reg_write(x86.UC_X86_REG_GDTR, (0, SCRATCH_GDT, len(table) - 1, 0))
        uc.mem_write(stub, code)
        uc.mem_write(pointer, struct.pack("<QH", 0, 8 * index | 3))
        uc.mem_write(target, b"\x90")
        uc.emu_start(stub, target)
    except UcError as e:
        return f"Unicorn refused the CPL switch: {e}"
    finally:
        m._loading_l2 = False
        m._event = event
        uc.reg_write(x86.UC_X86_REG_GDTR, gdtr)
        uc.mem_write(stub, bytes(0x21))
    if uc.reg_read(x86.UC_X86_REG_RIP) != target or uc.reg_read(x86.UC_X86_REG_CS) != cs:
        return "the CPL switch through the call gate did not complete"
    return None


def tss_rsp0(m: ModelMachine) -> int | None:
    _, base, limit, _ = m.uc.reg_read(x86.UC_X86_REG_TR)
    if limit < 11:
        return None
    raw = m.read_virt(base + 4, 8)
    return None if raw is None else struct.unpack("<Q", raw)[0]


def deliver_legacy32(m: ModelMachine, vector: int, error_code: int | None) -> str | None:
    """Protected mode, 32-bit gates, same privilege level."""
    uc = m.uc
    _, idt_base, idt_limit, _ = uc.reg_read(x86.UC_X86_REG_IDTR)
    if 8 * vector + 7 > idt_limit:
        return "vector beyond the IDT limit"
    raw = m.read_virt(idt_base + 8 * vector, 8)
    if raw is None:
        return "IDT not readable"
    lo, hi = struct.unpack("<II", raw)
    gate_type, present = (hi >> 8) & 0xF, (hi >> 15) & 1
    if not present or gate_type not in (0xE, 0xF):
        return "IDT gate not present or not a 32-bit interrupt/trap gate"
    selector, offset = lo >> 16, (lo & 0xFFFF) | (hi & 0xFFFF0000)
    if (selector & 3) != (uc.reg_read(x86.UC_X86_REG_CS) & 3):
        return "privilege change in legacy mode (not modelled)"
    eflags = uc.reg_read(x86.UC_X86_REG_RFLAGS) & 0xFFFF_FFFF
    esp = uc.reg_read(x86.UC_X86_REG_RSP) & 0xFFFF_FFFF
    frame = [eflags, uc.reg_read(x86.UC_X86_REG_CS), m.rip & 0xFFFF_FFFF]
    if error_code is not None:
        frame.append(error_code)
    esp -= 4 * len(frame)
    if m._write_virt(esp, b"".join(struct.pack("<I", x & 0xFFFF_FFFF)
                                   for x in reversed(frame))) is not None:
        return "stack not writable"
    eflags &= ~(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM)
    if gate_type == 0xE:
        eflags &= ~RFLAGS_IF
    try:
        if selector != uc.reg_read(x86.UC_X86_REG_CS):
            uc.reg_write(x86.UC_X86_REG_CS, selector)
    except UcError:
        return "IDT gate selector not loadable"
    uc.reg_write(x86.UC_X86_REG_RSP, esp)
    uc.reg_write(x86.UC_X86_REG_RFLAGS, eflags)
    uc.reg_write(x86.UC_X86_REG_RIP, offset)
    return None


def deliver_real(m: ModelMachine, vector: int) -> str | None:
    """Real mode: through the IVT."""
    uc = m.uc
    _, ivt_base, ivt_limit, _ = uc.reg_read(x86.UC_X86_REG_IDTR)
    if 4 * vector + 3 > ivt_limit:
        return "vector beyond the real-mode IDT limit"
    raw = m.read_phys(ivt_base + 4 * vector, 4)
    if raw is None:
        return "IVT not readable"
    offset, segment = struct.unpack("<HH", raw)
    ss = uc.reg_read(x86.UC_X86_REG_SS)
    sp = uc.reg_read(x86.UC_X86_REG_RSP) & 0xFFFF
    flags = uc.reg_read(x86.UC_X86_REG_RFLAGS)
    frame = struct.pack("<HHH", m.rip & 0xFFFF, uc.reg_read(x86.UC_X86_REG_CS), flags & 0xFFFF)
    sp = (sp - 6) & 0xFFFF
    if not m.write_phys((ss << 4) + sp, frame):
        return "stack not writable"
    uc.reg_write(x86.UC_X86_REG_RSP, sp)
    uc.reg_write(x86.UC_X86_REG_RFLAGS, flags & ~(RFLAGS_IF | RFLAGS_TF | RFLAGS_AC))
    uc.reg_write(x86.UC_X86_REG_CS, segment)
    uc.reg_write(x86.UC_X86_REG_RIP, offset)
    return None
