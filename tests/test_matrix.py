"""`kvmtest matrix` and `kvmtest report merge` on the model backend: real
model runs (every cell is a real `kvmtest run` process), no mocks."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kvmtest import matrix
from kvmtest import results as res
from kvmtest.judge import PROFILES

CONFIGS = ["default", "npt=0"]
K = "save/ or negative/save- or smm or control/asid"  # legacy and 7.x disagree on several of these


def kvmtest(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvmtest", *args], capture_output=True,
                          text=True, timeout=600, cwd=cwd)


def untimed(result: dict) -> dict:
    """A matrix result without the fields that depend on when and where it ran."""
    r = copy.deepcopy(result)
    for key in ("wall_s", "shard"):
        r.pop(key, None)
    for cell in r["cells"]:
        cell.pop("duration_s", None)
    return r


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> dict:
    """Every profile x {default, npt=0} on the model, in one machine."""
    out = tmp_path_factory.mktemp("matrix") / "full.json"
    p = kvmtest("matrix", "--backend", "model", "--config", CONFIGS[0], "--config", CONFIGS[1],
                "-k", K, "--json", str(out))
    assert p.returncode == 1, p.stderr  # the legacy profile fails its known bugs
    return json.loads(out.read_text())


def test_matrix_has_a_column_per_cell(full):
    keys = [c["key"] for c in full["cells"]]
    assert keys == [f"model:{p} [{c}]" for p in PROFILES for c in CONFIGS]
    assert [e["key"] for e in full["plan"]] == keys
    for cell in full["cells"]:
        assert cell["config"]["label"] in CONFIGS
        assert cell["config"]["kvm_amd"] == ({"npt": "0"} if cell["config"]["label"] == "npt=0"
                                             else {})
        assert cell["fingerprint"].split(" or ")[0] == cell["profile"] or \
            cell["profile"] in cell["fingerprint"]
        ids = [r["id"] for r in cell["results"]]
        assert ids == [c["id"] for c in full["cases"]]
        s = cell["summary"]
        assert sum(s.values()) == len(ids)
        assert cell["status"] == ("fail" if s["failed"] or s["errors"] else "pass")
    # Static case data once, for the HTML detail: what the case changes.
    by_id = {c["id"]: c for c in full["cases"]}
    assert by_id["save/efer-svme0[gif1]"]["vmcb"] == {"efer": "0x500"}
    assert by_id["negative/save-efer-svme0[gif1]"]["control_of"] == "save/efer-svme0[gif1]"


def test_matrix_verdicts_are_the_runs_verdicts(full, tmp_path):
    """A cell holds exactly what `kvmtest run` reports for that profile and config."""
    out = tmp_path / "run.json"
    p = kvmtest("run", "--backend", "model", "--profile", "legacy", "--kvm-amd-param", "npt=0",
                "-k", K, "--json", str(out))
    assert p.returncode == 1
    run = json.loads(out.read_text())
    cell = next(c for c in full["cells"] if c["key"] == "model:legacy [npt=0]")
    assert cell["results"] == [{k: c[k] for k in res.RESULT_FIELDS} for c in run["cases"]]
    assert (cell["fingerprint"], cell["summary"], cell["config"]) == \
        (run["fingerprint"], run["summary"], run["config"])


def test_exit_code_is_zero_only_when_every_cell_passes(tmp_path):
    # (7.x keeps no known bug in these cases; it does in some SMM ones)
    p = kvmtest("matrix", "--profile", "7.x", "--config", "default", "--config", "vgif=1",
                "-k", "save/ or negative/save- or control/asid", "--json", str(tmp_path / "m.json"))
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "m.json").read_text())["summary"]["pass"] == 2
    p = kvmtest("matrix", "--profile", "7.x", "--profile", "legacy", "-k", K)
    assert p.returncode == 1


def test_progress_shows_cells_starting_and_finishing(tmp_path):
    p = kvmtest("matrix", "--profile", "legacy", "--profile", "7.x", "-k", "save/efer", "-j", "1")
    lines = p.stderr.splitlines()
    assert lines[0].startswith("matrix: 2 of 2 cells")
    assert "[1/2] start  model:legacy [default]" in lines
    done = [line for line in lines if "FAIL   model:legacy [default]" in line]
    assert done and "failed" in done[0] and "fingerprint legacy" in done[0]
    assert any(line.startswith("[2/2] PASS   model:7.x [default]") for line in lines)
    # stdout: a line per cell and a total
    assert p.stdout.splitlines()[-1].startswith("2 cells: 1 passed, 1 failed")


def test_matrix_file(tmp_path):
    f = tmp_path / "m.toml"
    f.write_text('backend = "model"\nprofiles = ["legacy", "7.x"]\n'
                 'configs = ["default", "vgif=1"]\nk = "asid0"\ntimeout = 3\n')
    out = tmp_path / "m.json"
    p = kvmtest("matrix", "--file", str(f), "--json", str(out))
    result = json.loads(out.read_text())
    assert p.returncode == 1
    assert [c["key"] for c in result["cells"]] == [
        "model:legacy [default]", "model:legacy [vgif=1]", "model:7.x [default]",
        "model:7.x [vgif=1]"]
    assert result["selection"] == {"k": "asid0", "timeout": 3.0, "profile": None}
    assert all("asid0" in c["id"] for c in result["cases"])
    # the command line replaces the file's value
    p = kvmtest("matrix", "--file", str(f), "--profile", "7.x", "--json", str(out))
    assert p.returncode == 0
    assert len(json.loads(out.read_text())["cells"]) == 2


@pytest.mark.parametrize("args, message", [
    (["--config", "npt"], "not NAME=VALUE"),
    (["--config", "npt=0", "--config", "npt=0"], "given twice"),
    (["--config", "cpu=EPYC"], "the model has no CPU model"),
    (["--backend", "model", "--kernel", "debian:x"], "--kernel needs --backend qemu"),
    (["--backend", "qemu"], "needs --kernel"),
    (["--kernel", "a", "--profile", "legacy", "--profile", "7.x"], "at most one"),
    (["-k", "no-such-case"], "no case matches"),
    (["-k", "(save"], "cannot parse"),
    (["--shard", "3/2"], "--shard wants K/N"),
    (["--shard", "x"], "--shard wants K/N"),
    (["-j", "0"], "-j wants a positive number"),
    (["--timeout", "0"], "--timeout must be positive"),
    (["--timeout", "nan"], "--timeout must be positive"),
    (["--kernel", "/nonexistent/bzImage"], "--kernel /nonexistent/bzImage: no such file"),
    (["--json", "/nonexistent/dir/m.json"], "cannot write"),
    (["--file", "/nonexistent.toml"], "--file /nonexistent.toml"),
])
def test_usage_errors_exit_2_before_running(args, message):
    p = kvmtest("matrix", *args)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr
    assert "Traceback" not in p.stderr and "start" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_bad_matrix_file(tmp_path):
    for text, message in (("kernels = 'x'", "must be a list"), ("colour = 1", "unknown keys"),
                          ("[[", "not TOML"), ("timeout = 'x'", "number of seconds")):
        f = tmp_path / "m.toml"
        f.write_text(text)
        p = kvmtest("matrix", "--file", str(f))
        assert p.returncode == 2 and message in p.stderr, (text, p.stderr)


def test_broken_cells_are_error_cells_and_the_rest_still_run(tmp_path):
    """Two kernels that cannot boot: each is an error cell with run's message
    and exit code (3: environment); nothing is skipped or passed."""
    not_a_kernel = tmp_path / "vmlinuz"
    not_a_kernel.write_bytes(b"\0" * 4096)
    not_a_tree = tmp_path / "tree"  # a directory without arch/x86/boot/bzImage
    not_a_tree.mkdir()
    out = tmp_path / "m.json"
    p = kvmtest("matrix", "--kernel", str(not_a_tree), "--kernel", str(not_a_kernel),
                "--config", "default", "--config", "npt=0", "-k", "asid0", "--json", str(out),
                "--junit", str(tmp_path / "j.xml"), "--html", str(tmp_path / "m.html"))
    assert p.returncode == 3, p.stderr
    result = json.loads(out.read_text())
    assert [c["status"] for c in result["cells"]] == ["error"] * 4
    assert "not a built kernel tree" in result["cells"][0]["error"]
    assert "not an x86 bzImage" in result["cells"][2]["error"]
    assert all(c["exit_code"] == 3 and c["results"] == [] for c in result["cells"])
    assert p.stderr.count("ERROR  ") == 4
    assert (tmp_path / "j.xml").read_text().count("<error ") == 4


# ---------------------------------------------------------------- sharding


def test_shards_partition_the_plan_deterministically():
    plan = matrix.make_plan(backend="model", configs=["default", "npt=0", "vgif=1"])
    keys = [c.key for c in plan.cells]
    for n in (1, 2, 3, 5, 12, 13):
        shards = [[c.key for c in plan.shard(i, n)] for i in range(1, n + 1)]
        flat = [k for s in shards for k in s]
        assert sorted(flat) == sorted(keys)  # every cell exactly once
        assert all(s == [k for k in keys if k in s] for s in shards)  # plan order inside
        sizes = [len(s) for s in shards]
        assert max(sizes) - min(sizes) <= 1
    # Another machine, the same plan declared in another order: the same slices.
    other = matrix.make_plan(backend="model", profiles=list(reversed(PROFILES)),
                             configs=["vgif=1", "default", "npt=0"])
    for i in (1, 2, 3):
        assert {c.key for c in other.shard(i, 3)} == {c.key for c in plan.shard(i, 3)}


def test_shards_keep_a_boots_cells_together():
    """qemu: the cells that share a boot land in one shard, and the shards
    stay balanced (.github/kvmtest-matrix.toml's 15 cells: 5 per shard)."""
    kernels = [f"debian:k{i}" for i in range(5)]
    configs = ["default", "npt=0", "cpu=EPYC,+vgif"]
    plan = matrix.make_plan(kernels=kernels, configs=configs)
    other = matrix.make_plan(kernels=kernels[::-1], configs=configs[::-1])
    shards = [plan.shard(i, 3) for i in (1, 2, 3)]
    assert sorted(c.key for s in shards for c in s) == sorted(c.key for c in plan.cells)
    assert [len(s) for s in shards] == [5, 5, 5]
    for k in kernels:
        assert sum(1 for s in shards if any(c.key == f"{k} [npt=0]" for c in s)
                   and any(c.key == f"{k} [default]" for c in s)) == 1
    for i, s in enumerate(shards, 1):
        assert {c.key for c in other.shard(i, 3)} == {c.key for c in s}


def test_merged_shards_equal_a_single_machine_run(full, tmp_path):
    shards = []
    for i in (1, 2, 3):
        out = tmp_path / f"shard{i}.json"
        p = kvmtest("matrix", "--backend", "model", "--config", "default", "--config", "npt=0",
                    "-k", K, "--shard", f"{i}/3", "--json", str(out))
        assert p.returncode in (0, 1), p.stderr
        data = json.loads(out.read_text())
        assert data["shard"] == f"{i}/3" and len(data["cells"]) in (2, 3)
        shards.append(str(out))
    merged = tmp_path / "merged.json"
    p = kvmtest("report", "merge", *shards, "--json", str(merged),
                "--html", str(tmp_path / "m.html"), "--junit", str(tmp_path / "m.xml"))
    assert p.returncode == full["exit_code"] == 1
    assert untimed(json.loads(merged.read_text())) == untimed(full)


def test_merge_reports_a_missing_shard_and_refuses_duplicates(tmp_path):
    paths = []
    for i in (1, 2):
        out = tmp_path / f"s{i}.json"
        kvmtest("matrix", "--profile", "7.x", "--profile", "fixed", "-k", "control/asid0",
                "--shard", f"{i}/2", "--json", str(out))
        paths.append(str(out))
    out = tmp_path / "m.json"
    p = kvmtest("report", "merge", paths[0], "--json", str(out))
    result = json.loads(out.read_text())
    assert p.returncode == 4
    assert [c["status"] for c in result["cells"]].count("missing") == 1
    assert "did not report" in p.stdout
    p = kvmtest("report", "merge", paths[0], paths[0])
    assert p.returncode == 2 and "more than one input" in p.stderr
    p = kvmtest("report", "merge", *paths)
    assert p.returncode == 0


def test_merge_of_plain_runs(tmp_path):
    """Run reports merge too: a column each, in the order given."""
    runs = []
    for profile in ("legacy", "7.x"):
        out = tmp_path / f"{profile}.json"
        kvmtest("run", "--backend", "model", "--profile", profile, "-k", "asid0",
                "--json", str(out))
        runs.append(str(out))
    out = tmp_path / "m.json"
    p = kvmtest("report", "merge", *runs, "--json", str(out))
    result = json.loads(out.read_text())
    assert [c["key"] for c in result["cells"]] == ["model:legacy [default]", "model:7.x [default]"]
    assert p.returncode == 1 and result["plan"] is None


def test_exit_code_precedence():
    def cell(status, rc):
        return {"status": status, "exit_code": rc}

    assert res.exit_code([cell("pass", 0), cell("fail", 1), cell("error", 4)]) == 1
    assert res.exit_code([cell("pass", 0), cell("error", 4), cell("error", 3)]) == 4
    assert res.exit_code([cell("pass", 0), cell("error", 3)]) == 3
    assert res.exit_code([cell("pass", 0), cell("missing", 4)]) == 4
    assert res.exit_code([cell("untested", 125), cell("untested", 125)]) == 125
    assert res.exit_code([cell("pass", 0), cell("untested", 125)]) == 0


def test_schema_keys(full):
    """The keys docs/ci.md documents for kvmtest-matrix/1 (readers rely on them)."""
    assert full["schema"] == "kvmtest-matrix/1"
    assert set(full) == {"schema", "plan", "shard", "selection", "summary", "exit_code",
                         "wall_s", "cells", "cases"}
    assert set(full["summary"]) == {"cells", "pass", "fail", "error", "untested", "missing"}
    for entry in full["plan"]:
        assert set(entry) == {"key", "target", "backend", "profile", "config"}
    for cell in full["cells"]:
        assert set(cell) == {"key", "target", "backend", "profile", "config", "kernel",
                             "package", "fingerprint", "summary", "status", "exit_code",
                             "error", "duration_s", "notes", "kernel_warnings_outside_cases",
                             "results"}
        assert set(cell["config"]) == {"label", "cpu", "kvm_amd"}
        for r in cell["results"]:
            assert set(r) == set(res.RESULT_FIELDS)
    for case in full["cases"]:
        assert set(case) == {"id", "family", "gif_mode", "scenario", "expected", "source",
                             "control_of", "configs", "vmcb", "smm_vmcb", "params", "memory"}


def test_boot_groups_share_a_boot_per_kernel_and_cpu_model(monkeypatch):
    """qemu cells that differ only in kvm_amd parameters share a boot (kvm_amd
    is reloaded between them); a CPU model is its own boot; larger groups
    first, each in plan order; model cells and KVMTEST_SHARE_BOOT=0 never share."""
    monkeypatch.delenv("KVMTEST_SHARE_BOOT", raising=False)
    plan = matrix.make_plan(kernels=["debian:a", "debian:b"],
                            configs=["default", "npt=0", "cpu=EPYC,+vgif",
                                     "npt=0 cpu=EPYC,+vgif", "vgif=0"])
    groups = [[c.key for c in g] for g in matrix.boot_groups(plan.cells)]
    assert groups == [
        ["debian:a [default]", "debian:a [npt=0]", "debian:a [vgif=0]"],
        ["debian:b [default]", "debian:b [npt=0]", "debian:b [vgif=0]"],
        ["debian:a [cpu=EPYC,+vgif]", "debian:a [npt=0 cpu=EPYC,+vgif]"],
        ["debian:b [cpu=EPYC,+vgif]", "debian:b [npt=0 cpu=EPYC,+vgif]"],
    ]
    # A shard holds whole groups: they form again in it, unsplit.
    for i in (1, 2):
        assert sorted(len(g) for g in matrix.boot_groups(plan.shard(i, 2))) == [2, 3]
    model = matrix.make_plan(backend="model", configs=CONFIGS)
    assert all(len(g) == 1 for g in matrix.boot_groups(model.cells))
    monkeypatch.setenv("KVMTEST_SHARE_BOOT", "0")
    assert [len(g) for g in matrix.boot_groups(plan.cells)] == [1] * len(plan.cells)


def test_watchdog_fires_once_its_time_passes_without_a_restart():
    """A group's cells each get a lone cell's budget: the matrix restarts the
    watchdog at each cell's start."""
    fired = threading.Event()
    dog = matrix._Watchdog(0.3)
    dog.start(fired.set)
    for _ in range(4):  # restarted in time: never fires
        time.sleep(0.15)
        dog.restart()
    assert not fired.is_set() and not dog.fired
    assert fired.wait(2.0) and dog.fired
    dog.restart()  # fired is final
    dog.cancel()
