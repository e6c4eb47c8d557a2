"""A finding on disk: one JSON file per distinct behaviour, minimised.

Fields:
    id            "F003-contract"  (order of discovery, first oracle)
    spec          the minimised scenario, one line (replay with
                  ``kvmtest run --scenario SPEC``)
    first_spec    the scenario the campaign first saw it in
    signals       [{oracle, signature, details}]: every oracle that fires on
                  the minimised scenario
    observations  target label -> Observation (JSON) on the minimised scenario
    differing     oracle -> the fields that differ
    console       kernel-log lines (WARN/BUG) and, for a crash, the console tail
    count         scenarios of the campaign that showed this behaviour
    examples      a few of their specs
    shrink        {"changes_before", "changes_after", "steps", "candidates"}
    reproduced    "N/M": the minimised scenario re-run M times
    explained     null, or why this is known (a profile difference, a
                  docs/findings.md entry)
    campaign      {"kernel", "against", "profile", "seed", "config"}
    replay        the command line that replays it on the kernel under test
    history       target -> the specs that ran before a WARN or crash in the
                  same boot (replay them first)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..outputs import write_text


class FindingError(ValueError):
    """A finding file that cannot be read."""


@dataclass
class Finding:
    id: str
    spec: str
    first_spec: str
    signals: list[dict[str, Any]]
    observations: dict[str, dict[str, Any]]
    differing: dict[str, list[str]] = field(default_factory=dict)
    console: list[str] = field(default_factory=list)
    count: int = 1
    examples: list[str] = field(default_factory=list)
    shrink: dict[str, int] = field(default_factory=dict)
    reproduced: str = ""
    explained: str | None = None
    campaign: dict[str, Any] = field(default_factory=dict)
    replay: str = ""
    # A WARN or crash: the scenarios that ran before it in the same boot.
    history: dict[str, list[str]] = field(default_factory=dict)

    @property
    def signatures(self) -> list[str]:
        return [f"{s['oracle']}: {s['signature']}" for s in self.signals]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, directory: Path) -> Path:
        path = directory / f"{self.id}.json"
        write_text(str(path), json.dumps(self.to_json(), indent=1) + "\n")
        return path

    @classmethod
    def read(cls, path: str | Path) -> Finding:
        try:
            data = json.loads(Path(path).read_text())
            return cls(**data)
        except OSError as e:
            raise FindingError(f"cannot read finding {path}: {e.strerror}") from None
        except (ValueError, TypeError) as e:
            raise FindingError(f"{path} is not a kvmtest fuzz finding: {e}") from None
