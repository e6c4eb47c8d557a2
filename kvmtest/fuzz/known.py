"""Known differences between targets: measured, explained, documented.

A differential oracle (model, against) first lets these rules account for
the fields they explain; only the rest makes a signal.  Each rule names the
fields it covers, the condition under which it applies (from the scenario
and the two observations, never from a scenario's spelling), and why, with
its entry in docs/findings.md ("kvmtest fuzz" section).  The campaign
counts how often each rule fired, so a rule never hides anything silently.

Adding a rule is adding an explanation: measure it on the kernels, find the
source lines, write the docs entry, then the rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .. import layout
from ..observation import EXCEPTION, Observation
from ..vmcb import NESTED_CTL_NP_ENABLE, POISON, SVM_EXIT_IOIO
from .spec import KIND_NSTATE, KIND_SMM, Scenario

DOC = "docs/findings.md#kvmtest-fuzz"
L = 0  # index of the observation of the target under test
R = 1  # the other one (model, or the second kernel)

Check = Callable[[Scenario, Observation, Observation], bool]


@dataclass(frozen=True)
class Known:
    name: str
    oracles: tuple[str, ...]  # "model", "against"
    fields: tuple[str, ...] | None  # None: every field of the observation
    applies: Check
    why: str

    def covers(self, oracle: str, field: str) -> bool:
        return oracle in self.oracles and (self.fields is None or field in self.fields)


def _exitintinfo_err_unwritten(s: Scenario, a: Observation, b: Observation) -> bool:
    """Same EXITINTINFO[31:0] without EV, and one side left [63:32] as poisoned."""
    x, y = a.exit_int_info, b.exit_int_info
    if x is None or y is None or (x ^ y) & 0xFFFF_FFFF or x & (1 << 11):
        return False
    return POISON >> 32 in (x >> 32, y >> 32)


# Intercepts for which the APM defines no EXITINFO1/2 (vol. 2 15.9 and
# appendix C): CPUID, HLT, SHUTDOWN, VMRUN, VMMCALL, VMLOAD, VMSAVE, STGI,
# CLGI, SKINIT, RDTSCP, ICEBP, WBINVD, RDTSC, RDPMC, PUSHF, POPF, INVD.
EXITINFO_UNDEFINED = frozenset({0x72, 0x78, 0x7F, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86,
                                0x87, 0x88, 0x89, 0x6E, 0x6F, 0x70, 0x71, 0x76})


def _exitinfo_undefined(s: Scenario, a: Observation, b: Observation) -> bool:
    return a.exit_code == b.exit_code and a.exit_code in EXITINFO_UNDEFINED


def _np_not_identity(s: Scenario, a: Observation, b: Observation) -> bool:
    """NP enabled with an nCR3 other than L1's own identity tables (which
    map every GPA to itself, as the model assumes)."""
    if s.kind == KIND_NSTATE:
        return False
    v = s.vmcb12_image()
    if s.kind == KIND_SMM:
        for k, val in s.smm:
            v[k] = val
    return bool(v["nested_ctl"] & NESTED_CTL_NP_ENABLE) and (
        v["nested_cr3"] & ~0xFFF & ((1 << 52) - 1)) != layout.PML4_GPA


def _ioio_address_size(s: Scenario, a: Observation, b: Observation) -> bool:
    x, y = a.exit_info_1, b.exit_info_1
    return (a.exit_code == b.exit_code == SVM_EXIT_IOIO and x is not None and y is not None
            and (x ^ y) & ~(0b111 << 7) == 0)


def _pf_fetch_bit(s: Scenario, a: Observation, b: Observation) -> bool:
    """#PF error codes that differ in I/D only, for a fetch from an L2 that
    has neither EFER.NXE nor CR4.SMEP."""
    if not (a.outcome == b.outcome == EXCEPTION and a.vector == b.vector == 14):
        return False
    if a.error_code is None or b.error_code is None or (a.error_code ^ b.error_code) != 0x10:
        return False
    v = s.vmcb12_image()
    return not v["efer"] & layout.EFER_NXE and not v["cr4"] & (1 << 20)


RULES: tuple[Known, ...] = (
    Known("exitintinfo-err-unwritten", ("model",), ("exit_int_info",),
          _exitintinfo_err_unwritten,
          "KVM writes EXITINTINFO's error-code half only with EV set (nested.c "
          "nested_save_pending_event_to_vmcb12); the model writes all 64 bits"),
    Known("exitinfo-undefined", ("model", "against"), ("exit_info_1", "exit_info_2"),
          _exitinfo_undefined,
          "EXITINFO1/2 are undefined for this exit code (APM vol. 2 appendix C); KVM copies "
          "what VMCB02 last held"),
    Known("model-no-nested-paging", ("model",), None, _np_not_identity,
          "the model does not walk nested page tables: with NP_ENABLE and an nCR3 other "
          "than L1's identity tables, L2's accesses differ"),
    Known("tcg-ioio-address-size", ("model",), ("exit_info_1",), _ioio_address_size,
          "QEMU TCG's IOIO intercept leaves EXITINFO1's address-size bits (9:7) clear; the "
          "model sets them as the APM (15.10.2) describes"),
    Known("model-pf-fetch-bit", ("model",), ("error_code",), _pf_fetch_bit,
          "the model sets #PF error-code I/D on a fetch without EFER.NXE or CR4.SMEP "
          "(APM vol. 2 8.4.2: I/D only with NX or SMEP enabled)"),
)


def split(oracle: str, s: Scenario, a: Observation, b: Observation, fields: list[str]
          ) -> tuple[list[str], dict[str, str]]:
    """(unexplained fields, field -> the rule that explains it)."""
    explained: dict[str, str] = {}
    rest = []
    for f in fields:
        rule = next((r for r in RULES if r.covers(oracle, f) and r.applies(s, a, b)), None)
        if rule is None:
            rest.append(f)
        else:
            explained[f] = rule.name
    return rest, explained
