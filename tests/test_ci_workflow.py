"""The GitHub Actions workflow (.github/workflows/kvmtest-matrix.yml) is
valid, and its steps work: every `run:` step of the shard jobs and of the
merge job is executed here, in order, with bash as GitHub runs it, against
a model matrix (tests/data/matrix-model.toml) standing in for the qemu one.

What cannot exist here is simulated, and only that: the `uses:` actions
(checkout, cache, artifact upload/download, the JUnit summary) become file
copies and checks of their inputs; the install step is not re-run (it is
scripts/install.sh, which .ci/run runs before every test run)."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

yaml = pytest.importorskip(
    "yaml", reason="PyYAML is missing: pip install -e '.[dev]' (scripts/install.sh does it)")

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "kvmtest-matrix.yml"
MODEL_MATRIX = ROOT / "tests" / "data" / "matrix-model.toml"
KNOWN_ACTIONS = {"actions/checkout", "actions/cache", "actions/upload-artifact",
                 "actions/download-artifact", "mikepenz/action-junit-report"}
EXPR = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")


@pytest.fixture(scope="module")
def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def test_workflow_is_valid(workflow):
    # PyYAML reads the bare key `on` as True (YAML 1.1)
    triggers = workflow.get("on", workflow.get(True))
    assert {"push", "pull_request"} <= set(triggers)
    assert set(workflow["jobs"]) == {"shard", "merge"}
    shard, merge = workflow["jobs"]["shard"], workflow["jobs"]["merge"]
    shards = shard["strategy"]["matrix"]["shard"]
    assert shards == list(range(1, int(workflow["env"]["SHARDS"]) + 1))
    assert shard["strategy"]["fail-fast"] is False  # one shard's failure keeps the others
    assert merge["needs"] == "shard" and merge["if"] == "always()"
    for job in (shard, merge):
        assert job["container"] == "debian:12"  # Debian's archive gives the kernels
        for step in job["steps"]:
            assert ("run" in step) != ("uses" in step), step
            if "uses" in step:
                name, _, version = step["uses"].partition("@")
                assert name in KNOWN_ACTIONS and version.startswith("v"), step["uses"]
            else:
                assert subprocess.run(["bash", "-n", "-c", step["run"]]).returncode == 0
    # The kernel cache is kvmtest's own cache directory, keyed by the
    # packages this shard boots (its plan step writes them).
    cache = next(s for s in shard["steps"] if s.get("uses", "").startswith("actions/cache"))
    env = {k: v for k, v in os.environ.items() if k != "KVMTEST_CACHE"}
    default = subprocess.run([sys.executable, "-c", "from kvmtest.qemu.kernels import "
                              "cache_root; print(cache_root())"], env=env, capture_output=True,
                             text=True, check=True).stdout.strip()
    assert Path(cache["with"]["path"].replace("~", str(Path.home()))) == Path(default)
    assert "hashFiles('shard-kernels.txt')" in cache["with"]["key"]
    # The file CI compares is a qemu matrix of the five Debian kernels.
    from kvmtest.matrix import load_file, make_plan

    plan = make_plan(file=load_file(str(ROOT / workflow["env"]["MATRIX_FILE"])))
    assert plan.backend == "qemu" and len(plan.cells) == 15


class Runner:
    """Runs a workflow job's steps like a runner would, on this machine."""

    def __init__(self, workflow: dict, tmp: Path, matrix_file: Path) -> None:
        self.workflow = workflow
        self.tmp = tmp
        self.artifacts = tmp / "artifact-store"
        self.bin = tmp / "bin"
        self.bin.mkdir()
        # `kvmtest` on PATH is this tree (not whatever is installed).
        shim = self.bin / "kvmtest"
        shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m kvmtest \"$@\"\n")
        shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
        self.env = {**os.environ, **{k: str(v) for k, v in workflow["env"].items()},
                    "MATRIX_FILE": str(matrix_file), "PATH": f"{self.bin}:{os.environ['PATH']}",
                    "PYTHONPATH": str(ROOT)}
        self.log: list[tuple[str, str, int]] = []

    def expand(self, text: str, matrix: dict) -> str:
        def value(m: re.Match) -> str:
            expr = m.group(1)
            if expr.startswith("matrix."):
                return str(matrix[expr.removeprefix("matrix.")])
            if expr.startswith("env."):
                return self.env[expr.removeprefix("env.")]
            if expr.startswith("hashFiles("):
                return "HASH"
            raise AssertionError(f"expression the test does not know: {expr}")

        return EXPR.sub(value, text)

    def run_job(self, name: str, matrix: dict) -> int:
        job = self.workflow["jobs"][name]
        ws = self.tmp / f"{name}-{'-'.join(map(str, matrix.values())) or 'job'}"
        ws.mkdir()
        summary = ws / "step-summary.md"
        failed = 0
        for step in job["steps"]:
            if failed and step.get("if") != "always()":
                continue
            label = step.get("name") or step["uses"]
            if "uses" in step:
                rc = self.action(step, ws, matrix)
            elif "scripts/install.sh" in step["run"]:
                rc = 0  # .ci/run runs scripts/install.sh before the tests
            else:
                script = self.expand(step["run"], matrix)
                shell = ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script] \
                    if step.get("shell") == "bash" else ["bash", "-e", "-c", script]
                p = subprocess.run(shell, cwd=ws, capture_output=True, text=True, timeout=600,
                                   env={**self.env, "GITHUB_STEP_SUMMARY": str(summary)})
                rc = p.returncode
                assert "Traceback" not in p.stderr, p.stderr
                assert rc in (0, 1), (label, p.stdout, p.stderr)
            self.log.append((name, label, rc))
            failed = failed or rc
        return failed

    def action(self, step: dict, ws: Path, matrix: dict) -> int:
        uses, args = step["uses"].partition("@")[0], step.get("with", {})
        if uses == "actions/upload-artifact":
            store = self.artifacts / self.expand(args["name"], matrix)
            store.mkdir(parents=True)
            for line in self.expand(args["path"], matrix).split():
                src = ws / line
                if src.is_dir():
                    shutil.copytree(src, store / line)
                elif src.exists():
                    shutil.copy(src, store / line)
        elif uses == "actions/download-artifact":
            assert args["merge-multiple"] is True
            dest = ws / args["path"]
            dest.mkdir()
            prefix = args["pattern"].rstrip("*")
            for store in sorted(self.artifacts.glob(f"{prefix}*")):
                shutil.copytree(store, dest, dirs_exist_ok=True)
        elif uses == "actions/cache":
            # The key's input exists before the cache step (written by the plan step).
            for name in re.findall(r"hashFiles\('([^']+)'\)", args["key"]):
                assert (ws / name).read_text().strip(), name
        elif uses == "mikepenz/action-junit-report":
            ET.parse(ws / args["report_paths"])
        return 0


def untimed(result: dict) -> dict:
    r = copy.deepcopy(result)
    for key in ("wall_s", "shard"):
        r.pop(key, None)
    for cell in r["cells"]:
        cell.pop("duration_s", None)
    return r


def test_workflow_steps_run_the_shards_and_merge(workflow, tmp_path):
    runner = Runner(workflow, tmp_path, MODEL_MATRIX)
    shards = workflow["jobs"]["shard"]["strategy"]["matrix"]["shard"]
    job_rcs = [runner.run_job("shard", {"shard": k}) for k in shards]
    assert runner.run_job("merge", {}) == 1  # the legacy profile fails its known bugs
    ran = [label for job, label, _ in runner.log]
    assert ran.count("Run the shard") == len(shards) and "Merge" in ran
    # each shard ran its slice of the plan: together exactly the plan's cells
    cells = []
    for k in shards:
        ws = tmp_path / f"shard-{k}"
        planned = (ws / "shard-cells.txt").read_text().splitlines()
        data = json.loads((ws / f"shard-{k}.json").read_text())
        assert [f"{c['target']}\t{c['config']['label']}" for c in data["cells"]] == planned
        cells += planned
    assert len(cells) == len(set(cells)) == 6
    assert any(job_rcs) and not all(job_rcs)  # shards holding legacy cells fail
    merged = tmp_path / "merge-job"
    result = json.loads((merged / "kvmtest-matrix.json").read_text())
    # the same as one machine running the whole matrix
    single = tmp_path / "single.json"
    p = subprocess.run([sys.executable, "-m", "kvmtest", "matrix", "--file", str(MODEL_MATRIX),
                        "--json", str(single)], capture_output=True, text=True, timeout=600,
                       env=runner.env)
    assert p.returncode == result["exit_code"] == 1
    assert untimed(result) == untimed(json.loads(single.read_text()))
    assert (merged / "kvmtest-matrix.html").read_text().startswith("<!DOCTYPE html>")
    assert "6 cells: 4 passed, 2 failed" in (merged / "step-summary.md").read_text()
