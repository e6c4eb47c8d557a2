"""JUnit XML for GitLab, Jenkins and GitHub test summaries.

One <testsuite> per cell (kernel or model profile x configuration), one
<testcase> per case with <failure>, <error> or <skipped> carrying the
reason.  A cell that broke (no run report) is one <testcase> named
"kvmtest run" with an <error>; kernel WARN/BUG lines outside every case
are one failed <testcase> named "kernel log outside cases", so the XML
fails exactly when `kvmtest run` would.

The layout follows the common JUnit conventions (the Ant/Maven surefire
format that GitLab, Jenkins and the GitHub reporters read): counts as
attributes of <testsuites> and <testsuite>, classname + name per testcase.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from . import results as res

# XML 1.0 has no place for most control characters (a kernel console has them).
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
FAILURE_TYPES = {"fail": "failure", "error": "error"}


def _clean(text: object) -> str:
    return _NOT_XML.sub("\ufffd", "" if text is None else str(text))


def _el(parent: ET.Element, tag: str, text: str | None = None, **attrs: object) -> ET.Element:
    e = ET.SubElement(parent, tag, {k: _clean(v) for k, v in attrs.items() if v is not None})
    if text:
        e.text = _clean(text)
    return e


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else ""


def _suite(root: ET.Element, cell: dict) -> dict[str, int]:
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    suite = _el(root, "testsuite", name=cell["key"],
                time=f"{cell['duration_s']:.3f}" if cell.get("duration_s") is not None else None)
    props = _el(suite, "properties")
    package = cell.get("package") or {}
    for name, value in (("backend", cell["backend"]), ("target", cell["target"]),
                        ("config", cell["config"].get("label")), ("kernel", cell.get("kernel")),
                        ("package.version", package.get("version")),
                        ("fingerprint", cell.get("fingerprint")),
                        ("profile", cell.get("profile")), ("status", cell["status"])):
        if value is not None:
            _el(props, "property", name=name, value=value)
    classname = cell["key"]
    if cell["status"] in (res.ERROR, res.MISSING):
        tc = _el(suite, "testcase", name="kvmtest run", classname=classname)
        _el(tc, "error", cell.get("error"), message=_first_line(cell.get("error")),
            type=f"exit {cell['exit_code']}")
        counts["tests"] += 1
        counts["errors"] += 1
    for r in cell["results"]:
        tc = _el(suite, "testcase", name=r["id"], classname=classname)
        counts["tests"] += 1
        v = r["verdict"]
        if v == "skip":
            _el(tc, "skipped", message=r.get("reason") or "skipped")
            counts["skipped"] += 1
        elif v in FAILURE_TYPES:
            tag = FAILURE_TYPES[v]
            body = "\n".join(filter(None, [r.get("reason"),
                                           f"observed: {r.get('observed_summary')}"]))
            _el(tc, tag, body, message=_first_line(r.get("reason")) or v, type=v)
            counts["failures" if tag == "failure" else "errors"] += 1
    outside = cell.get("kernel_warnings_outside_cases") or []
    if outside:
        tc = _el(suite, "testcase", name="kernel log outside cases", classname=classname)
        _el(tc, "failure", "\n".join(outside), message=_first_line(outside[0]),
            type="kernel log")
        counts["tests"] += 1
        counts["failures"] += 1
    if cell.get("notes"):
        _el(suite, "system-out", "\n".join(cell["notes"]))
    for k, v in counts.items():
        suite.set(k, str(v))
    # ElementTree keeps insertion order: put the counts next to the name.
    suite.attrib = {"name": suite.attrib.pop("name"), **suite.attrib}
    return counts


def render(result: dict) -> str:
    """JUnit XML of a matrix result (or a run report loaded as one)."""
    root = ET.Element("testsuites", {"name": "kvmtest"})
    total = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for cell in result["cells"]:
        for k, v in _suite(root, cell).items():
            total[k] += v
    for k, v in total.items():
        root.set(k, str(v))
    times = [c["duration_s"] for c in result["cells"] if c.get("duration_s") is not None]
    if times:
        root.set("time", f"{result.get('wall_s') or sum(times):.3f}")
    ET.indent(root, space=" ")
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def from_run(run: dict) -> str:
    """JUnit XML of a `kvmtest run --json` report."""
    return render(res.from_run(run))
