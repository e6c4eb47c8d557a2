"""What the two known legacy bugs look like in a fuzz finding, stated from
the architecture and the observations, never from the catalogue: the tests
use these to recognise a finding, the campaign never sees them."""

from __future__ import annotations

from kvmtest.fuzz.findings import Finding
from kvmtest.fuzz.oracles import arch_failures
from kvmtest.fuzz.spec import KIND_VMRUN, parse
from kvmtest.model.cpuid import MAXPHYADDR

ERR = 0xFFFF_FFFF_FFFF_FFFF


def is_gif_left_set(f: Finding) -> bool:
    """A VMCB12 failing a consistency check, VMRUN with GIF=1: VMEXIT_INVALID
    on both kernels, GIF still set on the kernel under test only."""
    s = parse(f.spec)
    k, a = f.observations.get("kernel", {}), f.observations.get("against", {})
    return (s.kind == KIND_VMRUN and s.gif == "gif1" and not s.l1
            and bool(arch_failures(s.vmcb12_image()))
            and k.get("exit_code") == ERR and k.get("gif") is True
            and a.get("exit_code") == ERR and a.get("gif") is False)


def is_ncr3_accepted(f: Finding) -> bool:
    """NP enabled with an nCR3 beyond MAXPHYADDR: the kernel under test runs
    L2 (a #VMEXIT other than VMEXIT_INVALID), the other one refuses it."""
    s = parse(f.spec)
    v = s.vmcb12_image()
    k, a = f.observations.get("kernel", {}), f.observations.get("against", {})
    return (s.kind == KIND_VMRUN and not s.l1
            and bool(v["nested_ctl"] & 1) and v["nested_cr3"] >= 1 << MAXPHYADDR
            and arch_failures(v) == ["ncr3-illegal"]
            and k.get("exit_code") not in (None, ERR, ERR & 0xFFFF_FFFF)
            and a.get("exit_code") == ERR)
