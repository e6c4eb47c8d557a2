"""A static, self-contained HTML report of a matrix result (or one run).

The grid (cases x cells, coloured by verdict, a fingerprint per column) is
rendered here, escaped, so it reads without JavaScript; a small inline
script adds the "differences only" filter and the detail pane.  The detail
data travels as JSON in a <script type="application/json"> element with
'<', '>' and '&' written as \\u escapes, and the script only ever sets
textContent: case data and kernel output are untrusted, none of it can
become markup.  No network, no server: a Content-Security-Policy forbids
every fetch.
"""

from __future__ import annotations

import html
import json
from typing import Any

from . import __version__
from . import results as res

VERDICT_MARK = {"pass": "pass", "fail": "FAIL", "error": "ERROR", "skip": "skip"}
STATUS_MARK = {res.PASS: "PASS", res.FAIL: "FAIL", res.ERROR: "ERROR",
               res.UNTESTED: "NOTHING TESTED", res.MISSING: "MISSING"}
# No network: nothing may be fetched, inline style and script only.
CSP = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
       "img-src data:")
# Verdict colours (the browser test reads them back).
COLOURS = {"pass": "#c8e6c9", "fail": "#ef9a9a", "error": "#ffcc80", "skip": "#e0e0e0",
           "none": "#ffffff"}

CSS = """
*{box-sizing:border-box}
body{font:13px/1.35 system-ui,sans-serif;margin:0;color:#1b1b1b;background:#fafafa}
header{padding:10px 16px;background:#263238;color:#fff}
header h1{font-size:17px;margin:0 0 4px}
header .meta{color:#cfd8dc}
.bar{padding:8px 16px;display:flex;gap:18px;align-items:center;flex-wrap:wrap;
 border-bottom:1px solid #ddd;background:#fff}
.legend span{display:inline-block;padding:1px 8px;margin-right:4px;border:1px solid #bbb}
main{display:flex;align-items:flex-start}
#gridwrap{overflow:auto;flex:1 1 auto;max-height:calc(100vh - 90px)}
table#grid{border-collapse:separate;border-spacing:0}
#grid th,#grid td{border-right:1px solid #ddd;border-bottom:1px solid #ddd;padding:2px 6px}
#grid thead th{position:sticky;top:0;background:#eceff1;vertical-align:bottom;z-index:2;
 font-weight:normal;text-align:left;min-width:120px;max-width:220px;cursor:pointer}
#grid thead th.corner{left:0;z-index:3;cursor:default}
#grid th.case{position:sticky;left:0;background:#fff;text-align:left;font-weight:normal;
 font-family:ui-monospace,monospace;white-space:nowrap;z-index:1}
#grid th.col .target{font-weight:bold;word-break:break-all}
#grid th.col .fp{font-family:ui-monospace,monospace}
#grid th.col.st-fail,#grid th.col.st-error,#grid th.col.st-missing{border-top:4px solid #c62828}
#grid th.col.st-pass{border-top:4px solid #2e7d32}
#grid th.col.st-error,#grid th.col.st-missing{background:#ffe0b2}
td.v{text-align:center;cursor:pointer;font-family:ui-monospace,monospace;min-width:60px}
td.v-pass{background:#c8e6c9}td.v-fail{background:#ef9a9a;font-weight:bold}
td.v-error{background:#ffcc80;font-weight:bold}td.v-skip{background:#e0e0e0;color:#555}
td.v-none{background:#ffffff;color:#999}
td.sel{outline:3px solid #1565c0;outline-offset:-3px}
tr.differs th.case::before{content:"\\394  ";color:#c62828;font-weight:bold}
body.diff-only tr.same{display:none}
#detail{flex:0 0 42%;max-height:calc(100vh - 90px);overflow:auto;background:#fff;
 border-left:2px solid #90a4ae;padding:10px 14px}
#detail[hidden]{display:none}
#detail h2{font-size:15px;margin:0 0 2px;font-family:ui-monospace,monospace;word-break:break-all}
#detail h3{font-size:13px;margin:12px 0 3px;color:#37474f}
#detail table{border-collapse:collapse}
#detail td,#detail th{border:1px solid #ddd;padding:1px 6px;text-align:left;vertical-align:top;
 font-family:ui-monospace,monospace}
#detail .diff{background:#fff59d}
#detail pre{white-space:pre-wrap;word-break:break-all;background:#f5f5f5;padding:6px;margin:0}
.badge{display:inline-block;padding:1px 8px;border:1px solid #999}
#close{float:right}
"""

SCRIPT = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("kvmtest-data").textContent);
  var pane = document.getElementById("detail");
  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function section(title) { pane.appendChild(el("h3", title)); }
  function para(text, cls) { var p = el("p", text, cls); pane.appendChild(p); return p; }
  function pre(text) { pane.appendChild(el("pre", text)); }
  function table(rows, head, mark) {
    var t = el("table");
    if (head) {
      var tr = el("tr");
      head.forEach(function (h) { tr.appendChild(el("th", h)); });
      t.appendChild(tr);
    }
    rows.forEach(function (row) {
      var tr = el("tr");
      if (mark && mark(row)) tr.className = "diff";
      row.forEach(function (v) { tr.appendChild(el("td", v)); });
      t.appendChild(tr);
    });
    pane.appendChild(t);
    return t;
  }
  function pairs(obj) {
    return Object.keys(obj || {}).map(function (k) { return [k, obj[k]]; });
  }
  function open(kind) {
    while (pane.firstChild) pane.removeChild(pane.firstChild);
    var close = el("button", "close", null);
    close.id = "close";
    close.addEventListener("click", function () { pane.hidden = true; select(null); });
    pane.appendChild(close);
    pane.hidden = false;
    pane.dataset.kind = kind;
  }
  function badge(verdict) {
    var b = el("span", verdict, "badge v-" + verdict);
    b.style.background = data.colours[verdict] || "";
    return b;
  }
  function showCase(r, c) {
    var info = data.cases[r], cell = data.cells[c], res = data.results[r][c];
    open("case");
    pane.dataset.row = r; pane.dataset.cell = c;
    pane.appendChild(el("h2", info.id));
    para(cell.key, "cellkey");
    var v = para("verdict: ");
    v.appendChild(badge(res ? res.verdict : "none"));
    if (!res) para(cell.error ? "no result: the cell broke (" + cell.error.split("\n")[0] + ")"
                                : "this cell did not run this case");
    section("Expected");
    if (typeof info.expected === "string") para(info.expected, "expected");
    else if (info.expected) table(pairs(info.expected), ["profile", "expectation"],
      function (row) { return res && res.profiles.indexOf(row[0]) >= 0; });
    if (res) {
      section("Observed");
      para(res.observed_summary || "-", "observed");
      if (res.observed.length) table(res.observed, ["field", "value"],
        function (row) { return info.differs.fields.indexOf(row[0]) >= 0; });
      section("Reason");
      para(res.reason || "(none: the observation meets the expectation)", "reason");
      if (res.profiles.length) { section("Profiles this observation matches");
        para(res.profiles.join(", ")); }
    }
    if (info.differs.verdicts || info.differs.fields.length) {
      section("Across cells");
      if (info.differs.fields.length)
        para("observed fields that differ: " + info.differs.fields.join(", "), "differs");
      table(data.cells.map(function (other, i) {
        var o = data.results[r][i];
        return [other.key, o ? o.verdict : "-", o ? (o.observed_summary || "-") : "-"];
      }), ["cell", "verdict", "observed"], function (row) { return row[0] === cell.key; });
    }
    if (info.vmcb && Object.keys(info.vmcb).length) {
      section("VMCB12 fields the case changes"); table(pairs(info.vmcb), ["field", "value"]); }
    if (info.smm_vmcb && Object.keys(info.smm_vmcb).length) {
      section("VMCB12 fields the SMM handler writes");
      table(pairs(info.smm_vmcb), ["field", "value"]); }
    if (info.params && Object.keys(info.params).length) {
      section("Payload parameters"); table(pairs(info.params), ["param", "value"]); }
    if (info.memory && info.memory.length) {
      section("Guest memory the case adds");
      table(info.memory.map(function (m) { return [m.gpa, m.bytes + " bytes", m.head]; }),
            ["gpa", "size", "first bytes"]); }
    section("Case");
    table([["family", info.family], ["scenario", info.scenario || "-"],
           ["GIF mode", info.gif_mode || "-"],
           ["negative control of", info.control_of || "-"],
           ["configurations", (info.configs || []).join(", ") || "any"]]);
    section("Source"); para(info.source || "-", "source");
  }
  function showCell(c) {
    var cell = data.cells[c];
    open("cell");
    pane.dataset.cell = c;
    pane.appendChild(el("h2", cell.key));
    var v = para("status: "); v.appendChild(el("span", cell.status, "badge"));
    table([["backend", cell.backend], ["kernel", cell.kernel || "-"],
           ["package", cell.package || "-"], ["configuration", cell.config],
           ["profile", cell.profile || "-"], ["fingerprint", cell.fingerprint || "-"],
           ["summary", cell.summary], ["exit code", cell.exit_code],
           ["duration", cell.duration]]);
    if (cell.error) { section("Error"); pre(cell.error); }
    if (cell.warnings.length) {
      section("Kernel log outside cases"); pre(cell.warnings.join("\n")); }
    if (cell.notes.length) { section("Notes"); pre(cell.notes.join("\n")); }
  }
  var selected = null;
  function select(td) {
    if (selected) selected.classList.remove("sel");
    selected = td;
    if (td) td.classList.add("sel");
  }
  var grid = document.getElementById("grid");
  grid.addEventListener("click", function (ev) {
    var td = ev.target.closest("td.v");
    if (td) { select(td); showCase(+td.dataset.r, +td.dataset.c); return; }
    var th = ev.target.closest("th.col");
    if (th) { select(null); showCell(+th.dataset.c); }
  });
  grid.addEventListener("keydown", function (ev) {
    if (ev.key === "Enter" && ev.target.matches("td.v")) ev.target.click();
  });
  var toggle = document.getElementById("diff-only");
  function applyFilter() { document.body.classList.toggle("diff-only", toggle.checked); }
  toggle.addEventListener("change", applyFilter);
  applyFilter();
})();
"""


def _e(text: Any) -> str:
    return html.escape("" if text is None else str(text), quote=True)


def _show(value: Any) -> str:
    """Observed values as kvmtest.parity shows them: ints in hex (64-bit
    values would lose precision as JavaScript numbers)."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        return hex(value)
    if isinstance(value, list):
        return ", ".join(_show(v) for v in value)
    return str(value)


def _observed_rows(observed: dict | None) -> list[list[str]]:
    rows = []
    for k, v in (observed or {}).items():
        if k == "l1" and isinstance(v, dict):
            rows += [[f"l1.{reg}", _show(x)] for reg, x in v.items()]
        else:
            rows.append([k, _show(v)])
    return rows


def _package_text(cell: dict) -> str | None:
    p = cell.get("package")
    if not p:
        return None
    return " ".join(filter(None, [p.get("name"), p.get("version")])) or p.get("release")


def _summary_text(cell: dict) -> str:
    s = cell["summary"]
    return (f"{s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped, "
            f"{s['errors']} errors")


def page_data(result: dict) -> dict:
    """Everything the detail pane shows, strings only where precision matters."""
    diffs = res.differences(result)
    cells = result["cells"]
    by_cell = [{r["id"]: r for r in c["results"]} for c in cells]
    cases = []
    results = []
    for info in result["cases"]:
        d = diffs.get(info["id"], {"verdicts": False, "fields": []})
        cases.append({**info, "differs": d})
        row = []
        for lookup in by_cell:
            r = lookup.get(info["id"])
            row.append(None if r is None else {
                "verdict": r["verdict"], "reason": r.get("reason") or "",
                "observed_summary": r.get("observed_summary"),
                "observed": _observed_rows(r.get("observed")),
                "profiles": list(r.get("profiles") or [])})
        results.append(row)
    return {
        "colours": COLOURS,
        "cells": [{"key": c["key"], "backend": c["backend"], "kernel": c.get("kernel"),
                   "package": _package_text(c), "config": c["config"].get("label"),
                   "profile": c.get("profile"), "fingerprint": c.get("fingerprint"),
                   "status": c["status"], "summary": _summary_text(c),
                   "exit_code": c.get("exit_code"), "error": c.get("error"),
                   "duration": (f"{c['duration_s']:.1f} s" if c.get("duration_s") is not None
                                else "-"),
                   "notes": c.get("notes") or [],
                   "warnings": c.get("kernel_warnings_outside_cases") or []}
                  for c in cells],
        "cases": cases,
        "results": results,
    }


def _json_for_script(data: dict) -> str:
    # Inside <script> only "</script" (and "<!--") could end the element early.
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _header(c: int, cell: dict) -> str:
    config = cell["config"].get("label")
    kernel = cell.get("kernel") or ""
    status = STATUS_MARK.get(cell["status"], cell["status"])
    lines = [f'<div class="target">{_e(cell["target"])}</div>',
             f'<div class="config">config: {_e(config)}</div>']
    # The booted kernel: its package version (the name is the target) and release.
    version = (cell.get("package") or {}).get("version")
    booted = " ".join(filter(None, [version, f"({kernel})" if version and kernel else kernel]))
    if booted and kernel != cell["target"] and cell["backend"] != "model":
        lines.append(f'<div class="kernel">{_e(booted)}</div>')
    if cell["status"] in (res.ERROR, res.MISSING):
        first = (cell.get("error") or "").strip().splitlines()[:1]
        lines.append(f'<div class="error">{_e(status)}: {_e(first[0] if first else "")}</div>')
    else:
        lines.append(f'<div class="fp">fingerprint: {_e(cell.get("fingerprint"))}</div>')
        lines.append(f'<div class="sum">{_e(_summary_text(cell))}</div>')
        lines.append(f'<div class="status">{_e(status)}</div>')
    return (f'<th class="col st-{_e(cell["status"])}" data-c="{c}" tabindex="0" '
            f'title="{_e(cell["key"])}">{"".join(lines)}</th>')


def render(result: dict, title: str | None = None) -> str:
    data = page_data(result)
    cells = result["cells"]
    s = result.get("summary") or res.summary(cells)
    n_diff = sum(1 for c in data["cases"] if c["differs"]["verdicts"] or c["differs"]["fields"])
    title = title or (f"kvmtest: {len(cells)} cell{'s' * (len(cells) != 1)} x "
                      f"{len(data['cases'])} cases")
    rows = []
    for r, info in enumerate(data["cases"]):
        differs = info["differs"]["verdicts"] or bool(info["differs"]["fields"])
        tds = []
        for c, cell_result in enumerate(data["results"][r]):
            verdict = cell_result["verdict"] if cell_result else "none"
            mark = VERDICT_MARK.get(verdict, "\u2014")
            tip = cell_result["reason"] if cell_result else "no result"
            tds.append(f'<td class="v v-{_e(verdict)}" data-r="{r}" data-c="{c}" tabindex="0" '
                       f'title="{_e(tip)}">{_e(mark)}</td>')
        rows.append(f'<tr class="{"differs" if differs else "same"}" data-case="{_e(info["id"])}">'
                    f'<th class="case" scope="row">{_e(info["id"])}</th>{"".join(tds)}</tr>')
    heads = "".join(_header(c, cell) for c, cell in enumerate(cells))
    legend = "".join(f'<span class="v-{v}" style="background:{COLOURS[v]}">{_e(m)}</span>'
                     for v, m in (("pass", "pass"), ("fail", "FAIL"), ("error", "ERROR"),
                                  ("skip", "skip"), ("none", "\u2014 no result")))
    counts = ", ".join(f"{v} {k}" for k, v in s.items() if k != "cells" and v)
    shard = f"; shard {result['shard']}" if result.get("shard") else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{CSS}</style></head>
<body>
<header><h1>{_e(title)}</h1>
<div class="meta">cells: {_e(counts) or "none"}; exit code {_e(result.get("exit_code"))}\
{_e(shard)}; kvmtest {_e(__version__)}</div></header>
<div class="bar"><label><input type="checkbox" id="diff-only"> differences only</label>
<span id="diff-count">{n_diff} of {len(data["cases"])} cases differ between cells</span>
<span class="legend">{legend}</span>
<span>click a cell for its detail, a column header for the run</span></div>
<noscript><p>The grid reads without JavaScript; the filter and the detail pane need it.</p>\
</noscript>
<main><div id="gridwrap"><table id="grid">
<thead><tr><th class="corner">case</th>{heads}</tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table></div>
<aside id="detail" hidden></aside></main>
<script type="application/json" id="kvmtest-data">{_json_for_script(data)}</script>
<script>{SCRIPT}</script>
</body></html>
"""
