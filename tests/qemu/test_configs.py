"""Real kernels in the non-default kvm_amd configurations: npt=0 (L1 on
shadow paging, no NP_ENABLE) and vGIF (-cpu EPYC,+vgif: STGI/CLGI no longer
intercepted).  One boot per kernel x configuration, the whole catalogue each
(~30-60 s under TCG); the default configuration is test_kernels.py's.

Each run gets test_kernels.check_tier_run()'s checks -- fingerprint, every
failure a known bug of the profile listed in docs/findings.md, and the
model's profile in the same configuration agreeing observation by
observation, field by field, but for tests/data/parity_differences.toml --
plus two of its own:

- the configuration really is in effect in the guest (kvm_amd's effective
  parameters, from the agent's facts): a silently ignored --cpu or
  --kvm-amd-param would otherwise just skip the configuration's cases;
- exactly the cases whose configuration needs this configuration does not
  meet are skipped, and the configuration's own cases ran.
"""

from __future__ import annotations

import json

import pytest
from test_kernels import KERNELS, check_tier_run

from kvmtest import judge as j
from kvmtest.backends.model import ModelBackend
from kvmtest.cases import catalogue
from kvmtest.session import skip_reason

pytestmark = pytest.mark.qemu

# config -> (kvm_amd parameter that proves it, its values when in effect,
# a case that only this configuration runs)
PROOF = {
    "npt0": ("npt", ("N", "0"), "control/np-enable-without-npt[gif1]"),
    "vgif": ("vgif", ("Y", "1"), "insn/svme0-stgi-vgif"),
}
MODEL_PARAMS = {"npt0": {"npt": "0"}, "vgif": {"vgif": "1"}}


@pytest.mark.parametrize("config", list(PROOF))
@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.name)
def test_kernel_in_config(kernel, config, tmp_path, run_qemu_cli):
    report = check_tier_run(kernel, config, tmp_path, run_qemu_cli)
    param, on, own_case = PROOF[config]
    facts = json.loads((tmp_path / "artifacts" / "result.json").read_text())["facts"]
    assert facts["kvm_amd"][param] in on, f"{config} not in effect: {facts['kvm_amd']}"

    verdicts = {c["id"]: c["verdict"] for c in report["cases"]}
    model = ModelBackend(kernel.profile, kvm_amd_params=MODEL_PARAMS[config])
    cases = catalogue(facts["maxphyaddr"])
    assert {i for i, v in verdicts.items() if v == j.SKIP} == {
        c.id for c in cases if skip_reason(model, c)}
    assert verdicts[own_case] != j.SKIP
