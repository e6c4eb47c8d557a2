"""KVM_GET/SET_NESTED_STATE payload as a Python object."""

from __future__ import annotations

from dataclasses import dataclass

from ._ffi import ffi, lib

HEADER_SIZE = lib.KVMTEST_NESTED_DATA_OFFSET  # flags/format/size + 120-byte hdr union
HDR_OFFSET = lib.KVMTEST_NESTED_HDR_OFFSET
HDR_SIZE = HEADER_SIZE - HDR_OFFSET

FORMAT_VMX = lib.KVM_STATE_NESTED_FORMAT_VMX
FORMAT_SVM = lib.KVM_STATE_NESTED_FORMAT_SVM
GUEST_MODE = lib.KVM_STATE_NESTED_GUEST_MODE
RUN_PENDING = lib.KVM_STATE_NESTED_RUN_PENDING
GIF_SET = lib.KVM_STATE_NESTED_GIF_SET
SVM_VMCB_SIZE = lib.KVM_STATE_NESTED_SVM_VMCB_SIZE


@dataclass
class NestedState:
    """``struct kvm_nested_state``: header fields, the 120-byte ``hdr`` union, then data.

    For the SVM format, ``hdr`` starts with ``vmcb_pa`` (L1's VMCB12 GPA) and
    ``data`` is the saved VMCB12 (KVM_STATE_NESTED_SVM_VMCB_SIZE bytes).
    """

    flags: int
    format: int
    size: int
    hdr: bytes = bytes(HDR_SIZE)
    data: bytes = b""

    @property
    def vmcb12_gpa(self) -> int:
        """hdr.svm.vmcb_pa (SVM format only)."""
        if self.format != FORMAT_SVM:
            raise ValueError(f"nested state format {self.format} is not SVM")
        return int.from_bytes(self.hdr[:8], "little")

    @property
    def gif_set(self) -> bool:
        return bool(self.flags & GIF_SET)

    @property
    def guest_mode(self) -> bool:
        return bool(self.flags & GUEST_MODE)

    @property
    def run_pending(self) -> bool:
        return bool(self.flags & RUN_PENDING)

    @classmethod
    def svm(cls, flags: int, vmcb12_gpa: int, vmcb12: bytes = b"") -> NestedState:
        hdr = vmcb12_gpa.to_bytes(8, "little").ljust(HDR_SIZE, b"\0")
        return cls(flags, FORMAT_SVM, HEADER_SIZE + len(vmcb12), hdr, vmcb12)

    def pack(self):
        """A ``struct kvm_nested_state *`` cdata (size = max(self.size, header+data))."""
        total = max(self.size, HEADER_SIZE + len(self.data))
        buf = ffi.new("char[]", total)
        c = ffi.cast("struct kvm_nested_state *", buf)
        c.flags, c.format, c.size = self.flags, self.format, self.size
        ffi.memmove(buf + HDR_OFFSET, self.hdr[:HDR_SIZE], min(len(self.hdr), HDR_SIZE))
        ffi.memmove(buf + HEADER_SIZE, self.data, len(self.data))
        return buf

    @classmethod
    def unpack(cls, buf) -> NestedState:
        c = ffi.cast("struct kvm_nested_state *", buf)
        raw = ffi.buffer(buf)
        size = min(c.size, len(raw))
        return cls(c.flags, c.format, c.size, raw[HDR_OFFSET:HEADER_SIZE], raw[HEADER_SIZE:size])
