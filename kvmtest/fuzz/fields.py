"""What the generator may change, and to what: field definitions as data.

Every entry comes from the VMCB layout (kvmtest.vmcb: offsets and widths,
APM vol. 2 appendix B), the architectural bit definitions of the register a
field holds (APM vol. 2: CR0 3.1.1, CR3 3.1.2, CR4 3.1.3, EFER 3.1.7, DR6/DR7
13.1.1, RFLAGS 3.1.6, segment attributes table B-2, EVENTINJ 15.20, INT_CTL
15.21, intercept vectors appendix B), and the check boundaries of the vCPU
(MAXPHYADDR, the 48-bit canonical limit, the size of the MSR/IO permission
maps).  Nothing here comes from kvmtest/cases: the generator knows which bits
are *defined* and which are *reserved*, not which combinations the catalogue
tests.

A Mutator is (group, field, strategy); ``values`` turns a strategy into a
value for a given base value.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from .. import layout
from ..vmcb import FIELDS

M64 = (1 << 64) - 1


def bits(*positions: int | range) -> int:
    out = 0
    for p in positions:
        for b in p if isinstance(p, range) else (p,):
            out |= 1 << b
    return out


# ---- architectural bit definitions (APM vol. 2) ------------------------------

# CR0 (3.1.1): PE MP EM TS ET NE, WP 16, AM 18, NW 29, CD 30, PG 31.  Bits
# 63:32 are MBZ; the others in 31:0 are reserved.
CR0_DEFINED = bits(range(0, 6), 16, 18, 29, 30, 31)
CR0_MBZ = M64 & ~0xFFFF_FFFF
CR0_RESERVED = 0xFFFF_FFFF & ~CR0_DEFINED
# CR4 (3.1.3): VME PVI TSD DE PSE PAE MCE PGE PCE OSFXSR OSXMMEXCPT UMIP LA57
# (0..12), FSGSBASE 16, PCIDE 17, OSXSAVE 18, SMEP 20, SMAP 21, PKE 22, CET 23.
# Whether a defined bit may be set depends on the CPU's features; the rest
# are reserved (MBZ).
CR4_DEFINED = bits(range(0, 13), 16, 17, 18, 20, 21, 22, 23)
CR4_MBZ = M64 & ~CR4_DEFINED
# EFER (3.1.7): SCE 0, LME 8, LMA 10, NXE 11, SVME 12, LMSLE 13, FFXSR 14,
# TCE 15, MCOMMIT 17, INTWB 18, AUTOIBRS 21; the rest MBZ.
EFER_DEFINED = bits(0, 8, 10, 11, 12, 13, 14, 15, 17, 18, 21)
EFER_MBZ = M64 & ~EFER_DEFINED
# DR6/DR7 (13.1.1): bits 63:32 MBZ.  DR7 bits 0..9, 13, 16..31 defined.
DR_MBZ = M64 & ~0xFFFF_FFFF
DR6_DEFINED = bits(range(0, 4), 13, 14, 15)
DR7_DEFINED = bits(range(0, 10), 13, range(16, 32))
# RFLAGS (3.1.6): CF 0, (1 reads as one), PF 2, AF 4, ZF 6, SF 7, TF 8, IF 9,
# DF 10, OF 11, IOPL 13:12, NT 14, RF 16, VM 17, AC 18, VIF 19, VIP 20, ID 21.
RFLAGS_DEFINED = bits(0, 2, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14, range(16, 22))
RFLAGS_RESERVED = M64 & ~RFLAGS_DEFINED & ~0x2
# Segment attributes (table B-2 note): type 3:0, S 4, DPL 6:5, P 7, AVL 8,
# L 9, D/B 10, G 11; bits 15:12 of the 16-bit field are reserved.
ATTR_DEFINED = 0xFFF
ATTR_RESERVED = 0xF000
# EVENTINJ (15.20): VECTOR 7:0, TYPE 10:8, EV 11, reserved 30:12, V 31,
# ERRORCODE 63:32.
EVTINJ_DEFINED = bits(range(0, 12), 31) | (0xFFFF_FFFF << 32)
EVTINJ_RESERVED = bits(range(12, 31))
# INT_CTL (15.21 and appendix B): V_TPR 3:0, V_IRQ 8, V_GIF 9, V_NMI 11,
# V_NMI_MASK 12, V_INTR_PRIO 19:16, V_IGN_TPR 20, V_INTR_MASKING 24,
# V_GIF_ENABLE 25, V_NMI_ENABLE 26, x2AVIC 30, AVIC 31.
INT_CTL_DEFINED = bits(range(0, 4), 8, 9, 11, 12, range(16, 21), 24, 25, 26, 30, 31)
INT_CTL_RESERVED = 0xFFFF_FFFF & ~INT_CTL_DEFINED
# NESTED_CTL (appendix B): NP_ENABLE 0, SEV 1, SEV-ES 2, GMET 3, SSS 4,
# VTE 5, ... the rest reserved.
NESTED_CTL_DEFINED = bits(range(0, 6))
# VIRT_EXT (LBR_VIRTUALIZATION_ENABLE): LBR 0, VMSAVE/VMLOAD virtualization 1.
VIRT_EXT_DEFINED = bits(0, 1)
# INTERRUPT_SHADOW (offset 0x68): shadow 0, GUEST_INTERRUPT_MASK 1.
INT_STATE_DEFINED = bits(0, 1)

# Intercept vectors (appendix B table B-1): every bit of these words is an
# intercept of its own (CR/DR reads+writes, exception vectors, words 3-5).
INTERCEPT_WORDS = ("intercept_cr", "intercept_dr", "intercept_exceptions",
                   "intercept_misc1", "intercept_misc2", "intercept_misc3")

# Canonical limit of 48-bit virtual addresses (APM vol. 2 5.3.1).
CANONICAL = (0x0000_7FFF_FFFF_F000, 0x0000_8000_0000_0000, 0xFFFF_7FFF_FFFF_F000,
             0xFFFF_8000_0000_0000, 0x0000_0001_0000_0000)

MSRPM_SIZE = 0x2000  # APM 15.11: two 4 KiB pages ... plus KVM's 8 KiB
IOPM_SIZE = 0x3000  # APM 15.10.1: 12 KiB


@dataclass(frozen=True)
class Bounds:
    """The vCPU's limits that put a value on either side of a check."""

    maxphyaddr: int

    @property
    def top(self) -> int:
        return 1 << self.maxphyaddr  # the first illegal GPA

    def addresses(self, size: int) -> tuple[int, ...]:
        """GPAs around the legal/illegal edge for an object of `size` bytes:
        last legal start, the first start whose end is illegal, the edge
        itself, the edge's high bits, page-unaligned, legal but unbacked."""
        top = self.top
        return (0, top - size, top - size + 0x1000, top - 0x1000, top - 1, top,
                top + 0x1000, 1 << 51, 1 << 52, 1 << 63, M64 & ~0xFFF,
                layout.UNBACKED_GPA, layout.MEM_SIZE - size, layout.MEM_SIZE,
                0x800, 0x1)

    def cr3_values(self) -> tuple[int, ...]:
        top = self.top
        return (top >> 1, top, top | layout.L1_CR3, 1 << 51, 1 << 52, 1 << 63,
                layout.L1_CR3 | 0x8, layout.L1_CR3 | 0x10, layout.L1_CR3 | 0x7,
                layout.L1_CR3 | 0xFE0, layout.UNBACKED_GPA)

    def ncr3_values(self) -> tuple[int, ...]:
        # nCR3 is a GPA of L1 holding a page-table root.  The model does not
        # walk nested page tables (kvmtest.model.svm), so a legal backed nCR3
        # other than L1's own identity tables would only show that: keep to
        # the tables, unbacked-legal and illegal values.
        top = self.top
        return (layout.PML4_GPA, layout.PML4_GPA | 0x18, top - 0x1000, top, top | layout.PML4_GPA,
                1 << 51, 1 << 52, 1 << 63, layout.UNBACKED_GPA)


Strategy = Callable[[random.Random, int, Bounds], int]


def _flip(mask: int) -> Strategy:
    """Toggle one bit of mask."""
    positions = [b for b in range(64) if mask >> b & 1]

    def pick(rng: random.Random, base: int, b: Bounds) -> int:
        return base ^ (1 << rng.choice(positions))
    return pick


def _set_reserved(mask: int) -> Strategy:
    """Set one reserved bit, or sometimes all of them."""
    positions = [b for b in range(64) if mask >> b & 1]

    def pick(rng: random.Random, base: int, b: Bounds) -> int:
        if rng.random() < 0.1:
            return base | mask
        return base | 1 << rng.choice(positions)
    return pick


def _choose(values: Callable[[Bounds], tuple[int, ...]]) -> Strategy:
    def pick(rng: random.Random, base: int, b: Bounds) -> int:
        return rng.choice(values(b))
    return pick


def _random(width: int) -> Strategy:
    def pick(rng: random.Random, base: int, b: Bounds) -> int:
        return rng.choice((0, (1 << width) - 1, rng.getrandbits(width), 1, base + 1))
    return pick


def _maxphy_bit() -> Strategy:
    """Set the bit at MAXPHYADDR, or the one just below (legal), or 51/52/63."""
    def pick(rng: random.Random, base: int, b: Bounds) -> int:
        return base | 1 << rng.choice((b.maxphyaddr - 1, b.maxphyaddr, 51, 52, 63))
    return pick


def _event_inj() -> Strategy:
    """A random event: vector, type (0..7), EV, V and error code by field."""
    def pick(rng: random.Random, base: int, b: Bounds) -> int:
        vector = rng.choice((0, 1, 2, 3, 6, 8, 13, 14, 17, 31, 32, 0x80, 0xFF, rng.randrange(256)))
        kind = rng.randrange(8)
        ev = rng.random() < 0.5
        err = rng.choice((0, 1, 0xFFFF_FFFF))
        value = vector | kind << 8 | int(ev) << 11 | err << 32
        if rng.random() < 0.9:
            value |= 1 << 31
        if rng.random() < 0.1:
            value |= 1 << rng.randrange(12, 31)
        return value
    return pick


def _pat() -> Strategy:
    """G_PAT: eight 3-bit memory types per byte; 2, 3 and >= 8 are reserved
    (APM vol. 2 7.8.1)."""
    def pick(rng: random.Random, base: int, b: Bounds) -> int:
        byte = rng.randrange(8)
        value = rng.choice((2, 3, 8, 0xFF, 0, 1, 4, 5, 6, 7))
        return (base & ~(0xFF << 8 * byte)) | value << 8 * byte
    return pick


# Fields that only mean something when another field enables them (APM
# vol. 2): nCR3 and G_PAT with NP_ENABLE (15.25.3, 15.25.8), the IOPM with
# IOIO_PROT (15.10.1), the MSRPM with MSR_PROT (15.11), the AVIC backing
# page with AVIC enabled (15.29).  field -> [(enabling field, bits, probability)].
ENABLED_BY: dict[str, tuple[tuple[str, int, float], ...]] = {
    "nested_cr3": (("nested_ctl", 1 << 0, 0.8),),
    "g_pat": (("nested_ctl", 1 << 0, 0.5),),
    "iopm_base_pa": (("intercept_misc1", 1 << 27, 0.5),),
    "msrpm_base_pa": (("intercept_misc1", 1 << 28, 0.5),),
    "avic_vapic_bar": (("int_ctl", 1 << 31, 0.3),),
}


@dataclass(frozen=True)
class Mutator:
    group: str  # "vmcb", "smm" (VMCB12 fields) or "l1"
    field: str
    strategy: str
    pick: Strategy

    @property
    def enabled_by(self) -> tuple[tuple[str, int, float], ...]:
        return ENABLED_BY.get(self.field, ()) if self.group != "l1" else ()

    @property
    def key(self) -> str:
        return f"{self.group}:{self.field}:{self.strategy}"


def _vmcb_mutators() -> list[tuple[str, str, Strategy]]:
    """(field, strategy name, strategy) for every VMCB12 field the generator
    changes."""
    out: list[tuple[str, str, Strategy]] = []

    def add(field: str, name: str, s: Strategy) -> None:
        out.append((field, name, s))

    for word in INTERCEPT_WORDS:
        add(word, "flip", _flip(0xFFFF_FFFF))
    add("pause_filter_count", "random", _random(16))
    add("pause_filter_thresh", "random", _random(16))
    add("iopm_base_pa", "bounds", _choose(lambda b: b.addresses(IOPM_SIZE)))
    add("msrpm_base_pa", "bounds", _choose(lambda b: b.addresses(MSRPM_SIZE)))
    add("tsc_offset", "random", _random(64))
    add("asid", "random", _random(32))
    add("tlb_ctl", "random", _random(8))
    add("int_ctl", "flip", _flip(INT_CTL_DEFINED))
    add("int_ctl", "reserved", _set_reserved(INT_CTL_RESERVED))
    add("int_vector", "random", _random(8))
    add("int_state", "flip", _flip(INT_STATE_DEFINED))
    add("nested_ctl", "flip", _flip(NESTED_CTL_DEFINED))
    add("nested_ctl", "reserved", _set_reserved(M64 & ~NESTED_CTL_DEFINED))
    add("nested_cr3", "bounds", _choose(Bounds.ncr3_values))
    add("avic_vapic_bar", "bounds", _choose(lambda b: b.addresses(0x1000)))
    add("ghcb_gpa", "bounds", _choose(lambda b: b.addresses(0x1000)))
    add("event_inj", "event", _event_inj())
    add("event_inj", "reserved", _set_reserved(EVTINJ_RESERVED))
    add("virt_ext", "flip", _flip(VIRT_EXT_DEFINED))
    add("clean", "random", _random(32))
    add("next_rip", "canonical", _choose(lambda b: CANONICAL))
    add("insn_len", "random", _random(4))
    # Save area.
    for seg in ("es", "cs", "ss", "ds", "fs", "gs", "ldtr", "tr"):
        # CS.L stays: clearing it runs L2's 64-bit code as 16/32-bit code.
        add(f"{seg}.attrib", "flip", _flip(ATTR_DEFINED & ~(1 << 9) if seg == "cs"
                                           else ATTR_DEFINED))
        add(f"{seg}.attrib", "reserved", _set_reserved(ATTR_RESERVED))
        add(f"{seg}.selector", "random", _random(16))
        add(f"{seg}.limit", "random", _random(32))
        add(f"{seg}.base", "canonical", _choose(lambda b: CANONICAL))
    # GDTR/IDTR stay L1's: L2 takes its exceptions through L1's IDT stubs
    # (that is how they are reported), and the model delivers them itself
    # without reading a moved table.
    add("cpl", "random", _choose(lambda b: (0, 1, 2, 3, 0xFF)))
    add("efer", "flip", _flip(EFER_DEFINED))
    add("efer", "reserved", _set_reserved(EFER_MBZ))
    add("cr0", "flip", _flip(CR0_DEFINED))
    add("cr0", "reserved", _set_reserved(CR0_RESERVED))
    add("cr0", "mbz", _set_reserved(CR0_MBZ))
    add("cr3", "bounds", _choose(Bounds.cr3_values))
    add("cr3", "maxphyaddr", _maxphy_bit())
    add("cr4", "flip", _flip(CR4_DEFINED))
    add("cr4", "reserved", _set_reserved(CR4_MBZ))
    add("dr6", "flip", _flip(DR6_DEFINED))
    add("dr6", "mbz", _set_reserved(DR_MBZ))
    add("dr7", "flip", _flip(DR7_DEFINED))
    add("dr7", "mbz", _set_reserved(DR_MBZ))
    add("rflags", "flip", _flip(RFLAGS_DEFINED))
    add("rflags", "reserved", _set_reserved(RFLAGS_RESERVED))
    add("rip", "canonical", _choose(lambda b: CANONICAL))
    add("rsp", "canonical", _choose(lambda b: CANONICAL))
    add("rax", "random", _random(64))
    add("cr2", "random", _random(64))
    add("g_pat", "pat", _pat())
    add("dbgctl", "flip", _flip(bits(range(0, 6))))
    for field, _, _ in out:
        assert field in FIELDS, field
    return out


def _l1_mutators() -> list[tuple[str, str, Strategy]]:
    """L1's own state (spec.L1_KNOBS): SVM enabled or not, the host save
    area, VMRUN's operand."""
    def vmcb_gpas(b: Bounds) -> tuple[int, ...]:
        # Around the operand's checks (APM VMRUN: 4 KiB aligned, below
        # MAXPHYADDR) and KVM's (the page must map): plus backed pages
        # holding something else (L1's own page tables, the host save area).
        return (layout.VMCB12_GPA + 0x10, layout.VMCB12_GPA + 0x800, b.top, b.top - 0x1000,
                1 << 63, layout.UNBACKED_GPA, layout.MEM_SIZE, layout.HSAVE_GPA, 0)

    return [
        ("svme", "off", lambda rng, base, b: 0),
        ("hsave", "off", lambda rng, base, b: 0),
        ("hsave_pa", "bounds", _choose(lambda b: (
            layout.HSAVE_GPA + 0x10, b.top, b.top - 0x1000, layout.UNBACKED_GPA,
            layout.VMCB12_GPA, 0))),
        ("rax", "bounds", _choose(vmcb_gpas)),
        # smm payload: L1 flips bits of its own control registers (ones an L1
        # may hold either way; KVM keeps some of them fixed in the hardware
        # VMCB01: svm.c svm_set_cr0/svm_set_cr4/svm_set_efer).
        ("cr0_xor", "flip", _choose(lambda b: (
            layout.CR0_CD | layout.CR0_NW, layout.CR0_CD, layout.CR0_WP, 1 << 18, 1 << 3,
            1 << 1))),
        ("cr4_xor", "flip", lambda rng, base, b: base ^ rng.choice((
            1 << 6, 1 << 7, 1 << 8, 1 << 2, 1 << 3, 1 << 0, 1 << 1, 1 << 16))),
        ("efer_xor", "flip", _choose(lambda b: (layout.EFER_NXE, layout.EFER_SCE))),
    ]


VMCB_MUTATORS: tuple[Mutator, ...] = tuple(
    Mutator("vmcb", f, name, s) for f, name, s in _vmcb_mutators())
L1_MUTATORS: tuple[Mutator, ...] = tuple(
    Mutator("l1", f, name, s) for f, name, s in _l1_mutators())
# What an SMM handler can write into VMCB12 before RSM: the same fields.
SMM_MUTATORS: tuple[Mutator, ...] = tuple(
    Mutator("smm", m.field, m.strategy, m.pick) for m in VMCB_MUTATORS)
