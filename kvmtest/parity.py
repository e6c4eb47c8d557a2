"""Field-by-field comparison of two observations of the same case.

Verdicts hide differences: a model that writes the wrong EVENTINJ still
"agrees" with a kernel whenever both pass.  Comparing what was observed, field
by field, is what the model-vs-kernel tests, kernel-vs-kernel comparisons and
the fuzzer's oracles use.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .observation import Observation

# What a backend observes about the kernel's behaviour.  Not compared: the
# free-text detail, the symbol name (derived from rip), the host loop's exit
# list (backend-specific exit types) and the kernel-log bookkeeping (judged
# separately).
FIELDS = ("outcome", "vector", "error_code", "rip", "exit_code", "exit_info_1",
          "exit_info_2", "exit_int_info", "event_inj", "int_ctl", "tlb_ctl", "gif",
          "guest_mode", "after_outcome", "smm_handler_runs", "exit_data")


@dataclass(frozen=True)
class Difference:
    field: str  # an entry of FIELDS, or "l1.<register>"
    left: Any
    right: Any

    def describe(self) -> str:
        return f"{self.field}: {_show(self.left)} != {_show(self.right)}"


def _show(value: Any) -> str:
    return hex(value) if isinstance(value, int) and not isinstance(value, bool) else repr(value)


def _flat(obs: Observation) -> dict[str, Any]:
    out = {f: getattr(obs, f) for f in FIELDS}
    for reg, value in (obs.l1 or {}).items():
        out[f"l1.{reg}"] = value
    return out


def diff(left: Observation, right: Observation,
         ignore: Iterable[str] = ()) -> list[Difference]:
    """Every field where the two observations differ (l1 registers one by one)."""
    a, b = _flat(left), _flat(right)
    skip = set(ignore)
    return [Difference(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys())
            if k not in skip and a.get(k) != b.get(k)]


def unexplained(differences: Iterable[Difference],
                explained: Mapping[str, str]) -> list[Difference]:
    """The differences no documented entry (field -> reason) accounts for."""
    return [d for d in differences if d.field not in explained]
