"""Delta debugging: the fewest changes from the default that keep a behaviour.

A Shrinker holds one scenario and one target signal (oracle, signature).
It proposes candidate scenarios a batch at a time; the caller runs them on
the same oracles and feeds back which ones still show the signal.  Batches
suit a kernel under QEMU (one round trip per step) and let the campaign
shrink every finding in lockstep.

1. Nothing at all: does the default scenario already show it?
2. ddmin (Zeller and Hildebrandt, "Simplifying and Isolating
   Failure-Inducing Input", 2002) over the scenario's components
   (Scenario.changes(): GIF mode, L2 mode, L2 entry, each L1 knob and each
   VMCB12 field): subsets first, then complements, granularity doubling.
   The result is 1-minimal: removing any one component loses the signal.
3. For every numeric change left, ddmin over the bits in which its value
   differs from the default: a CR4 with three reserved bits set shrinks to
   the one bit that matters.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

from .spec import L1_BOOLEAN, L1_KNOBS, Scenario, SpecError, from_changes

Change = tuple[str, str, object]
# A plan yields candidate lists and receives the index of the first
# candidate that kept the signal (None: none did).
Plan = Generator[list[Scenario], int | None, None]


def _split(items: Sequence, n: int) -> list[list]:
    size, rest = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < rest else 0)
        out.append(list(items[start:end]))
        start = end
    return [c for c in out if c]


@dataclass
class Stats:
    steps: int = 0
    candidates: int = 0


class Shrinker:
    def __init__(self, scenario: Scenario) -> None:
        self.original = scenario
        self.best = scenario
        self.stats = Stats()
        self._plan = self._run()
        self._pending: list[Scenario] | None = next(self._plan)

    @property
    def done(self) -> bool:
        return self._pending is None

    def candidates(self) -> list[Scenario]:
        return list(self._pending or [])

    def feed(self, kept: Sequence[bool]) -> None:
        """Which of the last candidates still show the signal."""
        if self._pending is None:
            raise RuntimeError("the shrinker is done")
        if len(kept) != len(self._pending):
            raise ValueError(f"{len(kept)} results for {len(self._pending)} candidates")
        self.stats.steps += 1
        self.stats.candidates += len(kept)
        first = next((i for i, k in enumerate(kept) if k), None)
        try:
            self._pending = self._plan.send(first)
        except StopIteration:
            self._pending = None

    # ---- the plan ----------------------------------------------------------------

    def _valid(self, build: Callable[[], Scenario]) -> Scenario | None:
        try:
            return build()
        except SpecError:  # e.g. an L2 entry kept without the mode it needs
            return None

    def _ask(self, options: list[tuple[object, Callable[[], Scenario]]]
             ) -> Generator[list[Scenario], int | None, object | None]:
        """Offer the valid options; return the first one that kept the signal."""
        built = [(tag, self._valid(b)) for tag, b in options]
        valid = [(tag, s) for tag, s in built if s is not None]
        if not valid:
            return None
        idx = yield [s for _, s in valid]
        return None if idx is None else valid[idx][0]

    def _run(self) -> Plan:
        kind = self.best.kind
        empty = yield from self._ask([((), lambda: from_changes(kind, []))])
        if empty is not None:
            self.best = from_changes(kind, [])
            return
        items = yield from self._ddmin(self.best.changes(),
                                       lambda keep: from_changes(kind, keep))
        self.best = from_changes(kind, items)
        for change in self.best.changes():
            yield from self._shrink_value(change)

    def _ddmin(self, items: list, build: Callable[[list], Scenario]
               ) -> Generator[list[Scenario], int | None, list]:
        n = 2
        while len(items) >= 2:
            chunks = _split(items, n)
            options: list[tuple[object, Callable[[], Scenario]]] = [
                (c, lambda c=c: build(c)) for c in chunks]
            if len(chunks) > 2:
                for c in chunks:
                    rest = [x for x in items if x not in c]
                    options.append((rest, lambda r=rest: build(r)))
            picked = yield from self._ask(options)
            if picked is not None:
                reduced_to_chunk = any(picked is c for c in chunks)
                items = list(picked)  # type: ignore[arg-type]
                n = 2 if reduced_to_chunk else max(n - 1, 2)
                continue
            if n >= len(items):
                break
            n = min(2 * n, len(items))
        return items

    def _baseline(self, change: Change) -> int | None:
        group, key, _value = change
        if group == "l1":
            return None if key in L1_BOOLEAN else L1_KNOBS[key]
        if group not in ("vmcb", "smm"):
            return None
        without = self.best.without([change])
        return without.vmcb12_image()[key]

    def _shrink_value(self, change: Change) -> Generator[list[Scenario], int | None, None]:
        group, key, value = change
        base = self._baseline(change)
        if base is None or not isinstance(value, int):
            return
        differing = [1 << b for b in range(64) if (value ^ base) >> b & 1]
        if len(differing) < 2:
            return

        def with_bits(bits: list[int]) -> Scenario:
            v = base
            for b in bits:
                v ^= b
            others = [c for c in self.best.changes() if c != change]
            return from_changes(self.best.kind, [*others, (group, key, v)])

        bits = yield from self._ddmin(differing, with_bits)
        self.best = with_bits(bits)
