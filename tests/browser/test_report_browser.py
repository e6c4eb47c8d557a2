"""The HTML report in a real headless Chromium (Debian's chromium +
chromium-driver), driven over WebDriver: the DOM, colours, the differences
filter, the detail pane, escaping, and a screenshot.

Every report comes from real `kvmtest matrix`/`run` processes on the model
(and, for the broken column, a qemu cell whose kernel is not a kernel)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from webdriver import Browser, artifacts_dir, find_browser

from kvmtest import parity
from kvmtest import results as res
from kvmtest.report_html import COLOURS

pytestmark = pytest.mark.browser
PROFILES = ("legacy", "fixed", "7.x")
K = "save or smm or control"
HOSTILE = '</script><script>window.pwned=1</script><img src=x onerror="window.pwned=2">'


def kvmtest(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvmtest", *args], capture_output=True,
                          text=True, timeout=600)


def rgb(hex_colour: str) -> str:
    r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgb({r}, {g}, {b})"


@pytest.fixture(scope="module")
def browser():
    found = find_browser()
    if isinstance(found, str):
        pytest.skip(found)
    b = Browser(*found)
    yield b
    b.close()


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("html")
    args = ["matrix", "--backend", "model", "-k", K, "--config", "default", "--config", "npt=0"]
    for p in PROFILES:
        args += ["--profile", p]
    p = kvmtest(*args, "--json", str(d / "m.json"), "--html", str(d / "m.html"))
    assert p.returncode == 1, p.stderr
    return d / "m.html", json.loads((d / "m.json").read_text())


def expected_differing_rows(result: dict) -> set[str]:
    """Computed here from the JSON, not by the renderer: rows whose verdicts
    or parity-compared observed fields are not the same in every cell."""
    rows = set()
    for info in result["cases"]:
        rs = [r for c in result["cells"] for r in c["results"] if r["id"] == info["id"]]
        if len({r["verdict"] for r in rs}) > 1:
            rows.add(info["id"])
        seen = {json.dumps({f: (r["observed"] or {}).get(f) for f in (*parity.FIELDS, "l1")},
                           sort_keys=True) for r in rs if r["observed"]}
        if len(seen) > 1:
            rows.add(info["id"])
    return rows


VISIBLE_ROWS = """return Array.from(document.querySelectorAll('#grid tbody tr'))
  .filter(tr => getComputedStyle(tr).display !== 'none').map(tr => tr.dataset.case);"""


def test_grid_dom_colours_and_filter(browser, report):
    html_path, result = report
    browser.get(html_path.as_uri())
    n_cells, n_cases = len(result["cells"]), len(result["cases"])
    shape = browser.js("""return {
      rows: document.querySelectorAll('#grid tbody tr').length,
      heads: document.querySelectorAll('#grid thead th.col').length,
      perRow: Array.from(document.querySelectorAll('#grid tbody tr'))
              .map(tr => tr.querySelectorAll('td.v').length)};""")
    assert shape["rows"] == n_cases and shape["heads"] == n_cells == 6
    assert set(shape["perRow"]) == {n_cells}
    # every cell's class and colour is its JSON verdict's
    cells = browser.js("""return Array.from(document.querySelectorAll('#grid tbody tr')).map(
      tr => Array.from(tr.querySelectorAll('td.v')).map(
        td => [td.className.split(' ')[1], getComputedStyle(td).backgroundColor]));""")
    verdicts = set()
    for r, info in enumerate(result["cases"]):
        for c, cell in enumerate(result["cells"]):
            v = next(x["verdict"] for x in cell["results"] if x["id"] == info["id"])
            verdicts.add(v)
            assert cells[r][c] == [f"v-{v}", rgb(COLOURS[v])], (info["id"], cell["key"])
    assert {"pass", "fail"} <= verdicts
    # headers carry the fingerprint
    heads = browser.js("return Array.from(document.querySelectorAll('th.col .fp'))"
                       ".map(e => e.textContent);")
    assert heads == [f"fingerprint: {c['fingerprint']}" for c in result["cells"]]
    # differences only: exactly the rows that differ, then all again
    want = expected_differing_rows(result)
    assert 0 < len(want) < n_cases
    assert len(browser.js(VISIBLE_ROWS)) == n_cases
    browser.click("#diff-only")
    assert set(browser.js(VISIBLE_ROWS)) == want
    browser.click("#diff-only")
    assert len(browser.js(VISIBLE_ROWS)) == n_cases


def test_cell_click_opens_its_detail(browser, report):
    html_path, result = report
    browser.get(html_path.as_uri())
    case_id = "save/efer-svme0[gif1]"
    row = [c["id"] for c in result["cases"]].index(case_id)
    for col in (0, 4):  # legacy [default] fails it, 7.x [default] passes it
        cell = result["cells"][col]
        r = next(x for x in cell["results"] if x["id"] == case_id)
        browser.click(f'td.v[data-r="{row}"][data-c="{col}"]')
        shown = browser.js("""const p = document.getElementById('detail');
          return {hidden: p.hidden, title: p.querySelector('h2').textContent,
            cell: p.querySelector('.cellkey').textContent,
            reason: p.querySelector('.reason').textContent,
            observed: p.querySelector('.observed').textContent,
            tables: Array.from(p.querySelectorAll('table')).map(t => t.innerText),
            selected: document.querySelectorAll('td.sel').length};""")
        assert not shown["hidden"] and shown["selected"] == 1
        assert (shown["title"], shown["cell"]) == (case_id, cell["key"])
        assert shown["reason"] == (r["reason"] or
                                   "(none: the observation meets the expectation)")
        assert shown["observed"] == r["observed_summary"]
        assert any("efer\t0x500" in t for t in shown["tables"])  # the VMCB12 change
        assert any("gif\t" + ("True" if r["observed"]["gif"] else "False") in t
                   for t in shown["tables"])
    browser.screenshot(artifacts_dir() / "report-detail.png")
    browser.click("#close")
    assert browser.js("return document.getElementById('detail').hidden;")


def test_screenshot_of_the_grid(browser, report):
    html_path, _ = report
    browser.get(html_path.as_uri())
    browser.click("#diff-only")
    shot = artifacts_dir() / "report-grid.png"
    browser.screenshot(shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_broken_column_and_hostile_text(browser, tmp_path):
    """A real error cell (a qemu kernel that is not a kernel) next to a real
    model run whose kernel-controlled strings are planted markup (no kernel
    here prints that): nothing runs, the text shows as text."""
    run = tmp_path / "run.json"
    kvmtest("run", "--backend", "model", "--profile", "legacy", "-k", "save/efer",
            "--json", str(run))
    data = json.loads(run.read_text())
    data["cases"][0]["reason"] = HOSTILE
    data["kernel"] = HOSTILE
    run.write_text(json.dumps(data))
    broken = tmp_path / "broken.json"
    not_a_kernel = tmp_path / "bzImage"
    not_a_kernel.write_bytes(b"\0" * 4096)
    kvmtest("matrix", "--kernel", str(not_a_kernel), "-k", "save/efer",
            "--json", str(broken))
    page = tmp_path / "m.html"
    p = kvmtest("report", "merge", str(run), str(broken), "--html", str(page))
    assert p.returncode == 1, p.stderr
    browser.get(page.as_uri())
    state = browser.js("""return {pwned: window.pwned === undefined ? null : window.pwned,
      imgs: document.querySelectorAll('img').length,
      scripts: document.querySelectorAll('script').length,
      broken: Array.from(document.querySelectorAll('td.v[data-c="1"]')).map(td => td.className)};
      """)
    assert state["pwned"] is None and state["imgs"] == 0 and state["scripts"] == 2
    assert set(state["broken"]) == {"v v-none"}
    browser.click('th.col[data-c="0"]')
    kernel = browser.js("""return Array.from(document.querySelectorAll('#detail tr'))
      .filter(tr => tr.cells[0].textContent === 'kernel')[0].cells[1].textContent;""")
    assert kernel == HOSTILE
    browser.click('td.v[data-r="0"][data-c="0"]')
    assert browser.js("return document.querySelector('#detail .reason').textContent;") == HOSTILE
    browser.click('th.col[data-c="1"]')
    error = browser.js("return document.querySelector('#detail pre').textContent;")
    assert "not an x86 bzImage" in error
    assert res.load(broken)["cells"][0]["error"] == error
