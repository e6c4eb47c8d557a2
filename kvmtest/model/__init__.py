"""The built-in reference model of KVM's nested SVM on Unicorn.

Public API:
- ``ModelMachine`` (machine.py): one L1 vCPU implementing backends.base.Machine
- ``NestedSvm`` (svm.py): the nSVM model (VMRUN, #VMEXIT, GIF, nested state)
- ``PROFILES``/``Profile`` (profiles.py): the kernel generations it reproduces
- ``checks`` (checks.py): the consistency checks as data
- ``MAXPHYADDR``, ``CR4_RESERVED``, ``efer_reserved`` (cpuid.py): the guest
  CPU the checks are relative to, for building "above MAXPHYADDR" and
  reserved-bit cases
"""

from __future__ import annotations

from .cpuid import CR4_RESERVED, MAXPHYADDR, efer_reserved
from .profiles import DEFAULT_PROFILE, PROFILES, Profile, get_profile

__all__ = [
    "CR4_RESERVED",
    "DEFAULT_PROFILE",
    "MAXPHYADDR",
    "PROFILES",
    "Profile",
    "efer_reserved",
    "get_profile",
]
