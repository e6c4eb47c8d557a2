"""The command line as a user meets it: real processes, real /dev/kvm (or a
real device node made to be unusable), exit codes and one-line errors."""

import json
import os
import shutil

import pytest
from clirun import kvmtest, one_line_error

from kvmtest.cli import EXIT_ENV, EXIT_FAIL, EXIT_PASS, EXIT_USAGE


def test_list_json_has_the_documented_fields():
    p = kvmtest("list", "--json")
    assert p.returncode == EXIT_PASS
    rows = json.loads(p.stdout)
    assert len(rows) >= 60
    for r in rows:
        assert {"id", "family", "gif_mode", "expect", "source"} <= set(r)


def test_list_json_gives_configs():
    rows = {r["id"]: r for r in json.loads(kvmtest("list", "--json").stdout)}
    assert rows["control/np-enable-without-npt[gif1]"]["configs"] == ["no_npt"]
    assert rows["insn/svme0-stgi-vgif"]["configs"] == ["vgif"]
    assert rows["insn/svme0-stgi"]["configs"] == ["no_vgif"]
    assert rows["control/asid0[gif1]"]["configs"] == []
    assert all(r["source"] for r in rows.values())


def test_model_takes_kvm_amd_params_and_records_them(tmp_path):
    out = tmp_path / "r.json"
    p = kvmtest("run", "--backend", "model", "--profile", "fixed", "--kvm-amd-param", "vgif=1",
                "-k", "svme0-stgi", "--json", str(out))
    report = json.loads(out.read_text())
    assert report["config"]["kvm_amd"] == {"vgif": "1"}
    verdicts = {c["id"]: c["verdict"] for c in report["cases"]}
    # vGIF: the no-vGIF case skips, its twin runs (and fails: a known bug).
    assert verdicts["insn/svme0-stgi"] == "skip" and verdicts["insn/svme0-stgi-vgif"] == "fail"
    assert p.returncode == EXIT_FAIL


@pytest.mark.parametrize("args,words", [
    (("--backend", "model", "--kvm-amd-param", "avic=1"), "does not emulate"),
    (("--backend", "model", "--kvm-amd-param", "npt=maybe"), "want 0/1"),
    (("--backend", "model", "--kvm-amd-param", "nrips=1"), "nrips"),
    (("--backend", "model", "--cpu", "EPYC"), "--cpu needs --backend qemu"),
    (("--backend", "kvm", "--kvm-amd-param", "npt=0"), "needs --backend qemu or model"),
])
def test_configuration_usage_errors(args, words):
    p = kvmtest("run", *args)
    assert p.returncode == EXIT_USAGE and words in one_line_error(p)


def test_missing_dev_kvm_is_one_line_and_exit_3(tmp_path):
    p = kvmtest("run", "--backend", "kvm", env={"KVMTEST_DEV_KVM": str(tmp_path / "kvm")})
    assert p.returncode == EXIT_ENV
    assert "modprobe kvm_amd" in one_line_error(p)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv (util-linux) to make an unopenable node")
def test_no_permission_names_mode_and_group(tmp_path):
    """A real device node with mode 000, opened by root without
    CAP_DAC_OVERRIDE: the kernel itself refuses it."""
    node = tmp_path / "kvm"
    os.mknod(node, 0o020000, os.makedev(10, 232))
    os.chmod(node, 0)
    p = kvmtest("run", "--backend", "kvm", env={"KVMTEST_DEV_KVM": str(node)},
                prefix=("setpriv", "--bounding-set", "-dac_override,-dac_read_search",
                        "--inh-caps", "-all"))
    assert p.returncode == EXIT_ENV
    line = one_line_error(p)
    assert "no permission" in line and "c--------- root:root): no one may open it" in line
    assert "chmod 0660" in line and "-aG root" not in line


@pytest.mark.kvm
def test_run_json_and_ktap_on_real_kvm(tmp_path, real_kvm):
    """The no-SVM family on this host's KVM; SVM families skip with the reason."""
    out, ktap = tmp_path / "r.json", tmp_path / "r.ktap"
    p = kvmtest("run", "--backend", "kvm", "-k", "insn or asid0", "--json", str(out),
                "--ktap", str(ktap))
    report = json.loads(out.read_text())
    assert {"backend", "profile", "kernel", "fingerprint", "summary", "cases"} <= set(report)
    assert set(report["summary"]) == {"passed", "failed", "skipped", "errors"}
    for c in report["cases"]:
        assert {"id", "verdict", "expected", "observed", "reason"} <= set(c)
    nosvm = [c for c in report["cases"] if c["id"].startswith("insn/nosvm-")]
    # The vGIF/vls variants need kvm_amd with that configuration.
    config = [c for c in nosvm if c["id"].endswith(("-vgif", "-vls"))]
    plain = [c for c in nosvm if c not in config]
    assert plain and all(c["verdict"] == "pass" for c in plain)
    assert all(c["verdict"] in ("pass", "skip") for c in config)
    if not real_kvm["svm"]:
        svm = [c for c in report["cases"] if not c["id"].startswith("insn/nosvm-")]
        assert svm and all(c["verdict"] == "skip" for c in svm)
        assert all("host KVM has no SVM" in c["reason"] for c in svm)
    assert p.returncode == (EXIT_PASS if report["summary"]["failed"] == 0 else EXIT_FAIL)
    lines = ktap.read_text().splitlines()
    assert lines[0] == "KTAP version 1"
    assert f"1..{len(report['cases'])}" in lines
    assert sum(line.startswith(("ok ", "not ok ")) for line in lines) == len(report["cases"])


def test_info_json_is_truthful_about_this_host():
    p = kvmtest("info", "--json")
    assert p.returncode == EXIT_PASS
    facts = json.loads(p.stdout)
    for key in ("api_version", "vendor", "kvm_module", "nested", "svm", "maxphyaddr", "caps",
                "backends"):
        assert key in facts
    with open("/proc/cpuinfo") as f:
        assert f"vendor_id\t: {facts['vendor']}" in f.read()
    assert set(facts["backends"]) == {"kvm", "qemu", "model"}
    assert kvmtest("info").stdout.count("\n") == 1


def _dmesg_restricted() -> bool:
    try:
        with open("/proc/sys/kernel/dmesg_restrict") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


@pytest.mark.kvm
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not _dmesg_restricted(),
                    reason="needs root, setpriv and kernel.dmesg_restrict=1 to take /dev/kmsg away")
def test_unreadable_kernel_log_is_reported_not_clean(real_kvm, tmp_path):
    """Without CAP_SYSLOG the kernel refuses /dev/kmsg: the run says the log
    was not checked, and the JSON says so per case."""
    out = tmp_path / "r.json"
    p = kvmtest("run", "--backend", "kvm", "-k", "nosvm-vmrun", "--json", str(out),
                prefix=("setpriv", "--bounding-set", "-syslog", "--inh-caps", "-all"))
    assert "kernel log not checked for 1 cases" in p.stdout
    case = json.loads(out.read_text())["cases"][0]
    assert case["observed"]["kernel_log_checked"] is False
