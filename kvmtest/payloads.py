"""Load assembled guest payloads (flat image + symbol table).

Installed packages carry prebuilt ``kvmtest/payloads/*.bin``; in a source
checkout (editable install) a payload older than its sources is rebuilt, so
editing a ``.S`` file needs no reinstall.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

from . import layout

PKG_DIR = Path(__file__).resolve().parent
OUT_DIR = PKG_DIR / "payloads"
SRC_DIR = PKG_DIR.parent / "guest_payloads"


class PayloadError(RuntimeError):
    pass


@dataclass(frozen=True)
class Payload:
    """A built guest payload: its flat image and symbol addresses."""
    name: str
    image: bytes  # loaded at layout.CODE_GPA
    symbols: dict[str, int]  # name -> GPA

    @property
    def entry(self) -> int:
        return self.symbols["l1_entry"]

    def sym(self, name: str) -> int:
        try:
            return self.symbols[name]
        except KeyError:
            raise PayloadError(f"payload {self.name!r} has no symbol {name!r}") from None


# Set by the qemu backend for its guest: payloads were built on the host.
PREBUILT_ENV = "KVMTEST_PAYLOADS_PREBUILT"


def _stale() -> bool:
    if not SRC_DIR.is_dir() or os.environ.get(PREBUILT_ENV) == "1":
        return False  # installed package or prebuilt: nothing to rebuild
    bins = list(OUT_DIR.glob("*.bin"))
    if not bins:
        return True
    # Imported here: the qemu guest (prebuilt payloads) never needs the builder.
    from . import payload_build

    newest_src = payload_build.sources_digest(SRC_DIR, PKG_DIR)
    return min(p.stat().st_mtime for p in bins) < newest_src or len(bins) < len(
        [s for s in SRC_DIR.glob("*.S") if s.name != payload_build.COMMON]
    )


def _ensure_built() -> None:
    if not _stale():
        return
    OUT_DIR.mkdir(exist_ok=True)
    # xdist workers may race here: one builds, the others wait and re-check.
    with open(OUT_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _stale():
            from . import payload_build

            try:
                payload_build.build_all(SRC_DIR, PKG_DIR, OUT_DIR)
            except payload_build.PayloadBuildError as e:
                raise PayloadError(str(e)) from None


@functools.cache
def load_payload(name: str) -> Payload:
    _ensure_built()
    binary = OUT_DIR / f"{name}.bin"
    if not binary.exists():
        known = sorted(p.stem for p in OUT_DIR.glob("*.bin"))
        raise PayloadError(f"no payload {name!r} (known: {', '.join(known)})")
    image = binary.read_bytes()
    if len(image) > layout.CODE_MAX:
        raise PayloadError(f"payload {name!r} is {len(image)} bytes, over {layout.CODE_MAX}")
    symbols = json.loads((OUT_DIR / f"{name}.json").read_text())
    return Payload(name, image, {k: v for k, v in symbols.items() if not k.startswith("_")})
