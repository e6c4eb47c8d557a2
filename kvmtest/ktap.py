"""KTAP v1 (Documentation/dev-tools/ktap.rst) of a matrix result.

A run report comes out exactly as `kvmtest run --ktap` writes it; a matrix
is one KTAP subtest per cell (indented two spaces, "# Subtest: <cell>"),
whose own result is "ok" when the cell passed.
"""

from __future__ import annotations

from . import results as res


def _name(text: str) -> str:
    # A KTAP description cannot hold '#' or a newline.
    return " ".join(text.replace("#", "_").split())


def _comment(text: str) -> str:
    return " ".join(str(text).split())


def cell_lines(cell: dict) -> list[str]:
    """The KTAP of one cell, as `kvmtest run --ktap` writes a run."""
    lines = ["KTAP version 1",
             f"# kvmtest backend={cell['backend']} kernel={cell.get('kernel') or cell['target']}",
             f"1..{len(cell['results'])}"]
    if cell["status"] in (res.ERROR, res.MISSING):
        lines += [f"# error: {_comment(part)}" for part in (cell.get("error") or "").splitlines()
                  if part.strip()]
    for i, r in enumerate(cell["results"], 1):
        name = r["id"].replace("#", "_")
        if r["verdict"] == "skip":
            lines.append(f"ok {i} {name} # SKIP {r.get('reason') or ''}".rstrip())
            continue
        if r["verdict"] != "pass":
            for part in (r.get("reason") or r["verdict"]).split("; "):
                lines.append(f"# {name}: {part}")
        lines.append(f"{'ok' if r['verdict'] == 'pass' else 'not ok'} {i} {name}")
    if cell["status"] not in (res.ERROR, res.MISSING):
        s = cell["summary"]
        lines.append(f"# fingerprint: {cell.get('fingerprint')}")
        lines.append(f"# totals: pass:{s['passed']} fail:{s['failed']} xfail:0 xpass:0 "
                     f"skip:{s['skipped']} error:{s['errors']}")
    return lines


def render(result: dict, flat: bool = False) -> str:
    """KTAP text; FLAT (one cell only): the cell's KTAP with no nesting."""
    cells = result["cells"]
    if flat:
        if len(cells) != 1:
            raise ValueError("flat KTAP needs exactly one cell")
        return "\n".join(cell_lines(cells[0])) + "\n"
    lines = ["KTAP version 1", f"# kvmtest matrix: {len(cells)} cells", f"1..{len(cells)}"]
    for i, cell in enumerate(cells, 1):
        sub = cell_lines(cell)
        sub.insert(1, f"# Subtest: {_name(cell['key'])}")
        lines += ["  " + line for line in sub]
        for w in cell.get("kernel_warnings_outside_cases") or []:
            lines.append(f"# {_name(cell['key'])}: kernel log outside cases: {_comment(w)}")
        if cell["status"] == res.UNTESTED:
            lines.append(f"ok {i} {_name(cell['key'])} # SKIP nothing tested")
        else:
            ok = "ok" if cell["status"] == res.PASS else "not ok"
            lines.append(f"{ok} {i} {_name(cell['key'])}")
    return "\n".join(lines) + "\n"
