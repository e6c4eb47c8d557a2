"""SMM on the model: KVM_SMI, SMM entry and RSM, as KVM emulates them.

Sources (Linux 6.1, Debian linux-source-6.1 6.1.192; 6.12 moved the same code
to arch/x86/kvm/smm.c without changing what it does):
- x86.c ``enter_smm()``: the state of the current level (L2's in guest mode)
  goes to the state-save area (``enter_smm_save_state_64``: AMD layout, at
  SMBASE + 0xFE00), then ``kvm_x86_enter_smm`` (svm.py ``enter_smm``: the
  synthetic #VMEXIT), then the SMM state: RFLAGS=2, RIP=0x8000, CR0 without
  PE/EM/TS/PG, CR4=0, IDT limit 0, DR7=0x400, CS.selector = SMBASE >> 4 with
  CS.base = SMBASE, DS/ES/FS/GS/SS selector 0 base 0, all 4 GiB limit,
  16-bit, EFER=0.
- x86.c ``inject_pending_event()`` / svm.c ``svm_smi_blocked()``: an SMI waits
  while GIF=0 or in SMM; in guest mode with L1 intercepting SMI,
  ``svm_check_nested_events()`` does #VMEXIT(SMI) instead (it stays pending).
- emulate.c ``em_rsm()``: back to "real mode" (CR0.PE/PG, CR4.PCIDE/PAE and
  EFER cleared), ``leave_smm`` (svm.py ``leave_smm``: re-enter L2 from VMCB12)
  *before* ``rsm_load_state_64()`` loads the state-save area -- through
  ``emulator_set_cr()``, whose ``mk_cr_64()`` keeps the current CR0[63:32]
  (VMCB12's, once L2 is re-entered).  Any failure is ``emulate_shutdown``:
  a triple fault, which in guest mode is nested_svm_triple_fault()
  (#VMEXIT(SHUTDOWN) if L1 intercepts it).

Unicorn has no SMM (``RSM`` is #UD outside QEMU's HF_SMM, which Unicorn never
sets): SMM is the real-mode state written here (KVM's selectors, bases and
4 GiB limits, 16-bit), RSM is caught as an invalid opcode and emulated here,
as KVM emulates it.  Deliberate differences, none observable by the payloads:
- CS's hidden type in SMM is code (0xB) where KVM writes 3; real mode never
  consults it;
- RSM returns to the Unicorn context the SMI interrupted and applies the
  SMRAM values on top (Unicorn cannot write segment hidden state in long
  mode); an SMM handler that changes SMRAM's segments, CR0/CR4/EFER mode
  bits or LDTR is refused as not modelled (EmulationError) -- GPRs, RIP,
  RFLAGS, CR3, GDTR/IDTR, TR and SMBASE changes are applied;
- L1's segment state is kept by the model across SMM (the saved Unicorn
  context of VMRUN);
- L1's state at HSAVE + 0x400 is what KVM saves there: the *hardware*
  CR0/CR4/EFER of vmcb01 (hwstate.py, per kvm_amd's npt), which the #VMEXIT
  after RSM loads into L1 (svm.py _load_vmcb01: the state-leak family of
  docs/findings.md); a handler that edits L1's registers there is honoured,
  one that edits its segment state is refused as not modelled;
- the nested_run_pending WARN of 6.1 (a kernel-log message) is not
  reproduced.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from unicorn import UcError
from unicorn import x86_const as x86

from .. import l1, layout
from ..exits import Exit
from ..payloads import Payload
from . import cpuid

if TYPE_CHECKING:
    from .machine import ModelMachine

INITIAL_SMBASE = layout.SMRAM_GPA  # KVM's reset value, 0x30000
SAVE_AREA = 0xFE00  # the state-save area: SMBASE + 0xFE00, 512 bytes
SAVE_SIZE = 0x200
REVISION_64 = 0x0002_0064  # enter_smm_save_state_64: "revision id"

SVM_EXIT_SMI = 0x62
SVM_EXIT_SW = 0xF000_0000  # svm_enter_smm: nested_svm_simple_vmexit(svm, SVM_EXIT_SW)

DR6_VOLATILE = 0x0001_E80F
DR6_FIXED_1 = 0xFFFF_0FF0
DR7_FIXED_1 = 0x400
CR0_EM = 1 << 2
CR0_TS = 1 << 3
CR4_PCIDE = 1 << 17
RFLAGS_FIXED = 0x2
M32 = 0xFFFF_FFFF

# KVM's register numbering (VCPU_REGS_*), the order of the 16 GPRs in SMRAM.
GPRS = (x86.UC_X86_REG_RAX, x86.UC_X86_REG_RCX, x86.UC_X86_REG_RDX, x86.UC_X86_REG_RBX,
        x86.UC_X86_REG_RSP, x86.UC_X86_REG_RBP, x86.UC_X86_REG_RSI, x86.UC_X86_REG_RDI,
        x86.UC_X86_REG_R8, x86.UC_X86_REG_R9, x86.UC_X86_REG_R10, x86.UC_X86_REG_R11,
        x86.UC_X86_REG_R12, x86.UC_X86_REG_R13, x86.UC_X86_REG_R14, x86.UC_X86_REG_R15)
# VCPU_SREG_ES..GS: the order of the segment records at 0x7E00 + 16 * n.
SREGS = ("es", "cs", "ss", "ds", "fs", "gs")
SREG_UC = {"es": x86.UC_X86_REG_ES, "cs": x86.UC_X86_REG_CS, "ss": x86.UC_X86_REG_SS,
           "ds": x86.UC_X86_REG_DS, "fs": x86.UC_X86_REG_FS, "gs": x86.UC_X86_REG_GS}

# Offsets in KVM's put_smstate/GET_SMSTATE numbering (SMBASE + 0x8000 + off).
OFF_RIP = 0x7F78
OFF_RFLAGS = 0x7F70
OFF_DR6 = 0x7F68
OFF_DR7 = 0x7F60
OFF_CR0 = 0x7F58
OFF_CR3 = 0x7F50
OFF_CR4 = 0x7F48
OFF_SMBASE = 0x7F00
OFF_REVISION = 0x7EFC
OFF_SVM_GUEST = 0x7ED8  # FED8h: "SVM Guest" (svm_enter_smm)
OFF_SVM_VMCB12 = 0x7EE0  # FEE0h: "SVM Guest VMCB Physical Address"
OFF_EFER = 0x7ED0
OFF_TR = 0x7E90
OFF_IDTR = 0x7E84
OFF_LDTR = 0x7E70
OFF_GDTR = 0x7E64
OFF_SEGS = 0x7E00


def handler_msr_sites(payload: Payload) -> list[int]:
    """Where the SMM handler's RDMSR/WRMSR bytes sit once kvmtest.smm copied
    it to SMBASE + 0x8000 (CS.base + IP: the linear address it runs at), so
    the model can hook them as it hooks the payload's own."""
    from ..smm import HANDLER_GPA

    if "smm_handler" not in payload.symbols:
        return []
    start, end = payload.sym("smm_handler"), payload.sym("smm_handler_end")
    code = payload.image[start - layout.CODE_GPA:end - layout.CODE_GPA]
    return [HANDLER_GPA + i for i in range(len(code) - 1)
            if code[i:i + 2] in (b"\x0f\x30", b"\x0f\x32")]


class NotModelled(Exception):
    """SMM state the model cannot represent faithfully: the run stops with an
    EmulationError instead of producing an observation KVM might not give."""


class SmramState:
    """The 512-byte state-save area, addressed as KVM's smstate offsets."""

    def __init__(self, data: bytes | bytearray | None = None) -> None:
        self.data = bytearray(data if data is not None else SAVE_SIZE)

    @staticmethod
    def _at(off: int) -> int:
        return off - 0x7E00

    def get(self, fmt: str, off: int) -> int:
        return struct.unpack_from(fmt, self.data, self._at(off))[0]

    def put(self, fmt: str, off: int, value: int) -> None:
        size = struct.calcsize(fmt)
        struct.pack_into(fmt, self.data, self._at(off), value & ((1 << (8 * size)) - 1))

    def u64(self, off: int) -> int:
        return self.get("<Q", off)

    def u32(self, off: int) -> int:
        return self.get("<I", off)

    def u16(self, off: int) -> int:
        return self.get("<H", off)


def flags_from_attrib(attrib: int) -> int:
    """VMCB attrib -> the u16 SMRAM flags (enter_smm_get_segment_flags() >> 8)."""
    return (attrib & 0xFF) | ((attrib >> 8) & 0xF) << 12


def attrib_from_flags(flags: int) -> int:
    """SMRAM u16 flags -> VMCB attrib (rsm_set_desc_flags(flags << 8))."""
    return (flags & 0xFF) | ((flags >> 12) & 0xF) << 8


def uc_flags_from_attrib(attrib: int) -> int:
    """VMCB attrib -> Unicorn/QEMU descriptor flags (bits 8..23 of the high dword)."""
    return flags_from_attrib(attrib) << 8


@dataclass
class SmmState:
    """The vCPU's SMM bits: HF_SMM, arch.smbase, arch.smi_pending; plus the
    model's own record of the interrupted state (its Unicorn context and
    the segment hidden state written to SMRAM), which RSM returns to."""

    smbase: int = INITIAL_SMBASE
    active: bool = False
    pending: bool = False
    interrupted: object | None = None
    segments: dict[str, tuple[int, int, int, int]] | None = None


# ---- SMI -------------------------------------------------------------------------


def smi_window(m: ModelMachine) -> Exit | None:
    """A pending SMI at an instruction boundary (inject_pending_event())."""
    svm = m.svm
    if not svm.gif or m.smm.active:  # svm_smi_blocked(): stays pending
        return None
    if svm.guest_mode and svm.intercepts_smi():
        # svm_check_nested_events(): nested_svm_simple_vmexit(SVM_EXIT_SMI);
        # smi_pending stays set, L1 takes it once its GIF is set again.
        from .svm import VmExit

        svm.vmexit(VmExit(SVM_EXIT_SMI))
        return None
    m.smm.pending = False
    enter_smm(m)
    return None


def _segments(m: ModelMachine) -> dict[str, tuple[int, int, int, int]]:
    """(selector, VMCB attrib, limit, base) of ES..GS as KVM's kvm_get_segment
    reads them.  Unicorn exposes selectors only: the hidden state is the
    model's (VMCB12's for L2's ES/CS/SS/DS, L1's setup otherwise), checked
    against the live selectors."""
    st = l1.initial_state(m.payload)
    segs = {}
    for name in SREGS:
        seg = getattr(st, name)
        segs[name] = (seg.selector, seg.vmcb_attrib, seg.limit, seg.base)
    if m.svm.guest_mode:
        static = m.svm.l2_static
        for name in ("es", "cs", "ss", "ds"):
            segs[name] = tuple(static[f"{name}.{part}"]  # type: ignore[assignment]
                               for part in ("selector", "attrib", "limit", "base"))
    for name, (sel, *_rest) in segs.items():
        live = m.reg(SREG_UC[name])
        if live != sel:
            raise NotModelled(f"{name.upper()} selector {live:#x} is not the one whose "
                              f"hidden state the model knows ({sel:#x})")
    return segs


def save_state_64(m: ModelMachine, s: SmramState) -> None:
    """enter_smm_save_state_64(): the current level's state into SMRAM."""
    uc = m.uc
    for i, reg in enumerate(GPRS):
        s.put("<Q", 0x7FF8 - 8 * i, uc.reg_read(reg))
    s.put("<Q", OFF_RIP, m.rip)
    s.put("<I", OFF_RFLAGS, uc.reg_read(x86.UC_X86_REG_RFLAGS))
    if m.svm.guest_mode:
        dr6, dr7 = m.svm.l2_static["dr6"], m.svm.l2_static["dr7"]
    else:
        dr6 = (uc.reg_read(x86.UC_X86_REG_DR6) & DR6_VOLATILE) | DR6_FIXED_1
        dr7 = uc.reg_read(x86.UC_X86_REG_DR7) | DR7_FIXED_1
    s.put("<Q", OFF_DR6, dr6)
    s.put("<Q", OFF_DR7, dr7)
    s.put("<Q", OFF_CR0, m.cr0)
    s.put("<Q", OFF_CR3, m.cr3)
    s.put("<Q", OFF_CR4, m.cr4)
    s.put("<I", OFF_SMBASE, m.smm.smbase)
    s.put("<I", OFF_REVISION, REVISION_64)
    # vcpu->arch.efer: the current level's, EFER.SVME included.
    s.put("<Q", OFF_EFER, m.hw_efer | (layout.EFER_SVME if m.svm.svme else 0))
    for off, reg in ((OFF_TR, x86.UC_X86_REG_TR), (OFF_LDTR, x86.UC_X86_REG_LDTR)):
        sel, base, limit, flags = uc.reg_read(reg)
        s.put("<H", off, sel)
        s.put("<H", off + 2, flags >> 8)
        s.put("<I", off + 4, limit)
        s.put("<Q", off + 8, base)
    for off, reg in ((OFF_IDTR, x86.UC_X86_REG_IDTR), (OFF_GDTR, x86.UC_X86_REG_GDTR)):
        _, base, limit, _ = uc.reg_read(reg)
        s.put("<I", off, limit)
        s.put("<Q", off + 4, base)
    segs = _segments(m)
    m.smm.segments = segs
    for n, (sel, attrib, limit, base) in enumerate(segs.values()):
        off = OFF_SEGS + 16 * n
        s.put("<H", off, sel)
        s.put("<H", off + 2, flags_from_attrib(attrib))
        s.put("<I", off + 4, limit)
        s.put("<Q", off + 8, base)


def enter_smm(m: ModelMachine) -> None:
    """x86.c enter_smm()."""
    s = SmramState()
    m.smm.interrupted = m.uc.context_save()
    save_state_64(m, s)
    if m.svm.guest_mode:
        m.svm.enter_smm(s)  # svm_enter_smm(): the synthetic #VMEXIT to L1
    m.smm.active = True  # kvm_smm_changed(vcpu, true)
    m.write_phys(m.smm.smbase + SAVE_AREA, bytes(s.data))
    _load_smm_state(m)
    # static_call(kvm_x86_set_efer)(vcpu, 0): svm_set_efer() clearing SVME
    # runs svm_leave_nested() (L1 is not in guest mode any more) and, on
    # 6.x, svm_set_gif(svm, true); the nested state is kept in SMM.
    if m.svm.svme:
        m.svm.svme = False
        m.svm.svme_cleared(in_guest_mode=False)


# The model-private GDT for SMM entry (in the scratch page): KVM's hidden
# state for CS (base SMBASE) and for DS/ES/FS/GS/SS (base 0): 4 GiB limit,
# G=1, D/B=0 (16-bit).  CS must be a code type for the far JMP (KVM: type 3);
# in real mode the type is never consulted.
SMM_SEL_DATA = 0x10
SMM_SEL_CODE = 0x18
ATTR_SMM_DATA = 0x3 | 1 << 4 | 1 << 7 | 1 << 11
ATTR_SMM_CODE = 0xB | 1 << 4 | 1 << 7 | 1 << 11


def _load_smm_state(m: ModelMachine) -> None:
    """The SMM register state of enter_smm().  Unicorn 2.1.4 (UC_MODE_64)
    cannot write segment hidden state, so Unicorn loads it itself: a
    model-private stub in the scratch page (no memslot: never guest memory)
    loads the segments from the scratch GDT in 32-bit protected mode without
    paging and far-jumps to the 16-bit CS; clearing CR0.PE keeps those
    caches ("unreal mode", as KVM's 4 GiB limits are), and the selectors
    are then set to KVM's (0 and SMBASE >> 4), which Unicorn writes without
    reloading the cache."""
    from .machine import SCRATCH_GDT, _descriptor

    uc = m.uc
    smbase = m.smm.smbase
    if smbase & 0xF or smbase >> 20:
        # KVM: CS.selector = (SMBASE >> 4) & 0xFFFF, CS.base = SMBASE; the
        # model locates real-mode code as selector << 4 (pc_linear).
        raise NotModelled(f"SMBASE {smbase:#x} is not selector << 4")
    cr0 = m.cr0 & ~(layout.CR0_PE | CR0_EM | CR0_TS | layout.CR0_PG)
    rax = uc.reg_read(x86.UC_X86_REG_RAX)
    gdtr = uc.reg_read(x86.UC_X86_REG_GDTR)
    table = (bytes(16) + _descriptor(ATTR_SMM_DATA, 0, M32).to_bytes(8, "little")
             + _descriptor(ATTR_SMM_CODE, smbase, M32).to_bytes(8, "little"))
    stub = (bytes.fromhex("66b8") + SMM_SEL_DATA.to_bytes(2, "little")
            + bytes.fromhex("8ed8" "8ec0" "8ee0" "8ee8" "8ed0" "ea")
            + (0x8000).to_bytes(4, "little") + SMM_SEL_CODE.to_bytes(2, "little"))
    try:
        # Out of long mode into protected mode without paging (EFER.LMA is
        # cleared with CR0.PG), CR4 = 0, EFER = 0.
        uc.reg_write(x86.UC_X86_REG_CR0, (cr0 | layout.CR0_PE) & ~layout.CR0_PG)
        uc.reg_write(x86.UC_X86_REG_CR4, 0)
        m.set_hw_efer(0)
        uc.mem_write(SCRATCH_GDT, table)
        uc.reg_write(x86.UC_X86_REG_GDTR, (0, SCRATCH_GDT, len(table) - 1, 0))
        m.run_scratch_stub(stub, 7)
        if m.rip != 0x8000:
            raise NotModelled(f"the SMM entry stub stopped at {m.rip:#x}")
        uc.reg_write(x86.UC_X86_REG_CR0, cr0)
        uc.reg_write(x86.UC_X86_REG_CS, smbase >> 4)
        for name in ("ds", "es", "fs", "gs", "ss"):
            uc.reg_write(SREG_UC[name], 0)
        uc.reg_write(x86.UC_X86_REG_GDTR, gdtr)  # enter_smm() leaves GDTR alone
        uc.reg_write(x86.UC_X86_REG_RAX, rax)
        uc.reg_write(x86.UC_X86_REG_IDTR, (0, 0, 0, 0))
        uc.reg_write(x86.UC_X86_REG_DR7, DR7_FIXED_1)
        uc.reg_write(x86.UC_X86_REG_RFLAGS, RFLAGS_FIXED)
        uc.reg_write(x86.UC_X86_REG_RIP, 0x8000)
    except UcError as e:
        raise NotModelled(f"Unicorn refused the SMM state: {e}") from None
    m._flush_tlb()


# ---- RSM -------------------------------------------------------------------------


class _LoadFailed(Exception):
    """rsm_load_state_64() returned X86EMUL_UNHANDLEABLE (-> emulate_shutdown)."""


def rsm(m: ModelMachine) -> Exit | None:
    """emulate.c em_rsm(); RSM outside SMM never gets here (#UD)."""
    svm = m.svm
    raw = m.read_phys(m.smm.smbase + SAVE_AREA, SAVE_SIZE)
    if raw is None:
        raise NotModelled("SMRAM state-save area not backed by memory")
    s = SmramState(raw)
    m.smm.active = False  # exiting_smm(): kvm_smm_changed(vcpu, false)
    # "Get back to real mode": CR0.PE/PG, CR4.PCIDE/PAE cleared, EFER = 0.
    # The model's CPU state is rebuilt below; only EFER.SVME has side effects.
    cur_cr0 = m.cr0 & ~(layout.CR0_PE | layout.CR0_PG)
    cur_cr4 = m.cr4 & ~(CR4_PCIDE | layout.CR4_PAE)
    cur_efer = 0
    if svm.svme:
        svm.svme = False
        svm.svme_cleared(in_guest_mode=False)  # svm_set_efer(): SVME 1 -> 0
    if svm.leave_smm(s):  # ctxt->ops->leave_smm() != 0: emulate_shutdown
        return m.triple_fault()
    if svm.guest_mode:
        # enter_svm_guest_mode() loaded VMCB12's save area into the vCPU.
        v12 = svm.vmcb12_cached_save()
        cur_cr0, cur_cr4, cur_efer = v12["cr0"], v12["cr4"], v12["efer"]
        state = svm.l2_state_as_loaded()
    else:
        state = {"cr2": m.uc.reg_read(x86.UC_X86_REG_CR2)}
    try:
        _rsm_load_state_64(m, s, state, cur_cr0, cur_cr4, cur_efer)
    except _LoadFailed as e:
        return _load_failed(m, s, state, str(e))
    return _enter_loaded_state(m, s, state)


def _check_cr0(cr0: int, efer: int, cur_cr0: int, cur_cr4: int) -> str | None:
    """kvm_set_cr0()'s checks on mk_cr_64(current, new)."""
    if cr0 >> 32:
        return f"CR0 {cr0:#x}: bits 63:32 set"
    if cr0 & layout.CR0_NW and not cr0 & layout.CR0_CD:
        return "CR0.NW without CR0.CD"
    if cr0 & layout.CR0_PG and not cr0 & layout.CR0_PE:
        return "CR0.PG without CR0.PE"
    # Entering long mode: PAE is required, and CS.L must be 0 -- it is:
    # em_rsm() loaded a 32-bit CS before clearing EFER.LMA.
    if (efer & layout.EFER_LME and not cur_cr0 & layout.CR0_PG and cr0 & layout.CR0_PG
            and not cur_cr4 & layout.CR4_PAE):
        return "CR0.PG with EFER.LME and CR4.PAE clear"
    return None


def _rsm_load_state_64(m: ModelMachine, s: SmramState, state: dict[str, int],
                       cur_cr0: int, cur_cr4: int, cur_efer: int) -> None:
    """rsm_load_state_64() + rsm_enter_protected_mode(), as checks on the
    values KVM's set_cr/set_msr/set_dr would refuse; fills `state` with
    what was loaded, in KVM's order, up to the step that fails."""
    uc = m.uc
    gprs = [s.u64(0x7FF8 - 8 * i) for i in range(16)]
    for reg, value in zip(GPRS, gprs, strict=True):
        uc.reg_write(reg, value)
    state["rax"], state["rsp"] = gprs[0], gprs[4]
    state["rip"] = s.u64(OFF_RIP)
    state["rflags"] = s.u32(OFF_RFLAGS) | RFLAGS_FIXED
    dr6, dr7 = s.u64(OFF_DR6), s.u64(OFF_DR7)
    if dr6 >> 32:
        raise _LoadFailed("DR6[63:32] set")
    state["dr6"] = (dr6 & DR6_VOLATILE) | DR6_FIXED_1
    if dr7 >> 32:
        raise _LoadFailed("DR7[63:32] set")
    state["dr7"] = dr7 | DR7_FIXED_1
    cr0, cr3, cr4 = s.u64(OFF_CR0), s.u64(OFF_CR3), s.u64(OFF_CR4)
    m.smm.smbase = s.u32(OFF_SMBASE)  # ctxt->ops->set_smbase()
    efer = s.u64(OFF_EFER) & ~layout.EFER_LMA
    # kvm_set_efer(): reserved bits, LME toggled under paging; LMA is kept.
    if efer & cpuid.efer_reserved(m.svm.svm_in_cpuid):
        raise _LoadFailed(f"EFER {efer:#x} has reserved bits")
    if cur_cr0 & layout.CR0_PG and (cur_efer ^ efer) & layout.EFER_LME:
        raise _LoadFailed("EFER.LME changed with paging on")
    state["efer"] = efer | (cur_efer & layout.EFER_LMA)
    state["idtr.limit"], state["idtr.base"] = s.u32(OFF_IDTR), s.u64(OFF_IDTR + 4)
    state["gdtr.limit"], state["gdtr.base"] = s.u32(OFF_GDTR), s.u64(OFF_GDTR + 4)
    # rsm_enter_protected_mode(): CR3, CR4 without PCIDE, CR0, CR4.
    long_mode = bool(state["efer"] & layout.EFER_LMA)
    if long_mode and not cpuid.legal_gpa(cr3 & ~0xFFF):
        raise _LoadFailed(f"CR3 {cr3:#x} beyond MAXPHYADDR")
    state["cr3"] = cr3
    new_cr4 = (cur_cr4 & ~M32) | (cr4 & ~CR4_PCIDE & M32)  # mk_cr_64()
    if new_cr4 & cpuid.CR4_RESERVED:
        raise _LoadFailed(f"CR4 {new_cr4:#x} has reserved bits")
    if long_mode and not new_cr4 & layout.CR4_PAE:
        raise _LoadFailed("CR4.PAE clear in long mode")
    state["cr4"] = new_cr4
    new_cr0 = (cur_cr0 & ~M32) | ((cr0 & M32) | layout.CR0_ET)
    if problem := _check_cr0(new_cr0, state["efer"], cur_cr0, new_cr4):
        raise _LoadFailed(problem)
    state["cr0"] = new_cr0
    if cr4 & CR4_PCIDE:
        raise NotModelled("CR4.PCIDE in SMRAM")
    if (new_cr0 & layout.CR0_PG and state["efer"] & layout.EFER_LME
            and not state["efer"] & layout.EFER_LMA):
        state["efer"] |= layout.EFER_LMA  # paging on with LME: long mode
    for n, name in enumerate(SREGS):
        off = OFF_SEGS + 16 * n
        state[f"{name}.selector"] = s.u16(off)
        state[f"{name}.attrib"] = attrib_from_flags(s.u16(off + 2))
        state[f"{name}.limit"] = s.u32(off + 4)
        state[f"{name}.base"] = s.u32(off + 8) | s.u32(off + 12) << 32
    for name, off in (("tr", OFF_TR), ("ldtr", OFF_LDTR)):
        state[f"{name}.selector"] = s.u16(off)
        state[f"{name}.attrib"] = attrib_from_flags(s.u16(off + 2))
        state[f"{name}.limit"] = s.u32(off + 4)
        state[f"{name}.base"] = s.u32(off + 8) | s.u32(off + 12) << 32


def _load_failed(m: ModelMachine, s: SmramState, state: dict[str, int],
                 why: str) -> Exit | None:
    """emulate_shutdown after rsm_load_state_64() failed part-way."""
    svm = m.svm
    svm.last_failure = ("rsm", [why])
    if not svm.guest_mode:
        return m.triple_fault()
    if svm.profile.rsm_checks_vmcb12:
        # Kernels with the RSM re-check may also force L1 out of guest mode
        # before the shutdown (smm.c emulator_leave_smm); which kernels do is
        # not established here, and no catalogue case gets here.
        raise NotModelled("RSM failing after re-entering L2 on this profile")
    # 6.1: the triple fault is taken in guest mode with nested_run_pending
    # set: nested_svm_triple_fault() (and a WARN the model cannot show).
    return svm.rsm_triple_fault(state)


def _enter_loaded_state(m: ModelMachine, s: SmramState, state: dict[str, int]) -> Exit | None:
    """Put the state RSM loaded into Unicorn.  Segment hidden state cannot be
    written through Unicorn in long mode, so RSM goes back to the Unicorn
    context the SMI interrupted and applies SMRAM's values on top; SMRAM
    changes that would need a mode or segment change are not modelled."""
    uc = m.uc
    smm = m.smm
    if smm.interrupted is None or smm.segments is None:
        raise NotModelled("RSM without a state the model saw interrupted")
    for name in SREGS:
        got = tuple(state[f"{name}.{p}"] for p in ("selector", "attrib", "limit", "base"))
        if got != smm.segments[name]:
            raise NotModelled(f"RSM with {name.upper()} changed in SMRAM")
    if state["dr7"] & 0xFF:
        raise NotModelled("RSM to a state with DR7 breakpoints enabled")
    if state["ldtr.selector"] & ~3:
        raise NotModelled("RSM to a state with a non-null LDTR")
    uc.context_restore(smm.interrupted)
    svm = m.svm
    hw_efer = state["efer"] & ~layout.EFER_SVME
    mode = (m.cr0 & ~layout.CR0_ET, m.cr4, m.hw_efer)
    if (state["cr0"] & ~layout.CR0_ET, state["cr4"], hw_efer) != mode:
        raise NotModelled("RSM with CR0/CR4/EFER changed in SMRAM")
    for i, reg in enumerate(GPRS):
        uc.reg_write(reg, s.u64(0x7FF8 - 8 * i))
    uc.reg_write(x86.UC_X86_REG_RIP, state["rip"])
    uc.reg_write(x86.UC_X86_REG_RFLAGS, state["rflags"])
    uc.reg_write(x86.UC_X86_REG_CR3, state["cr3"])
    uc.reg_write(x86.UC_X86_REG_CR2, state["cr2"])
    uc.reg_write(x86.UC_X86_REG_GDTR, (0, state["gdtr.base"], state["gdtr.limit"], 0))
    uc.reg_write(x86.UC_X86_REG_IDTR, (0, state["idtr.base"], state["idtr.limit"], 0))
    uc.reg_write(x86.UC_X86_REG_TR, (state["tr.selector"], state["tr.base"], state["tr.limit"],
                                     uc_flags_from_attrib(state["tr.attrib"])))
    m._flush_tlb()
    smm.interrupted = smm.segments = None
    new_svme = bool(state["efer"] & layout.EFER_SVME)
    if svm.guest_mode:
        return svm.rsm_entered_l2(state)
    if svm.svme and not new_svme:
        svm.svme_cleared(in_guest_mode=False)
    svm.svme = new_svme
    return None
