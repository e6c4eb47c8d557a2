"""`-k EXPR` case selection, as in pytest: words match case-id substrings,
combined with and / or / not and parentheses."""

from __future__ import annotations

import re
from collections.abc import Iterable

from .case import Case

_TOKEN = re.compile(r"\s*(\(|\)|[^\s()]+)")
_OPS = {"and", "or", "not"}


class SelectionError(ValueError):
    pass


def matcher(expr: str):
    tokens = _TOKEN.findall(expr)
    if not tokens:
        raise SelectionError(f"empty -k expression {expr!r}")
    words = [t for t in tokens if t not in _OPS and t not in "()"]
    code = " ".join(t if t in _OPS or t in "()" else f"_w[{words.index(t)}]" for t in tokens)
    try:
        compiled = compile(code, "<-k>", "eval")
    except SyntaxError:
        raise SelectionError(f"cannot parse -k expression {expr!r}") from None

    def match(case_id: str) -> bool:
        return bool(eval(compiled, {"__builtins__": {}}, {"_w": [w in case_id for w in words]}))

    return match


def select(cases: Iterable[Case], expr: str | None) -> list[Case]:
    if not expr:
        return list(cases)
    m = matcher(expr)
    return [c for c in cases if m(c.id)]
