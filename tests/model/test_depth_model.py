"""Catalogue-depth cases on the model in the configurations the default
model (kvm_amd.MODEL_DEFAULTS) is not: vGIF on.  Each profile fails exactly
its known bugs there, as the kernels measured under --cpu EPYC,+vgif do."""

import pytest

from kvmtest import judge as j
from kvmtest.backends.model import ModelBackend
from kvmtest.case import NEED_VGIF
from kvmtest.cases import catalogue
from kvmtest.session import run_cases

pytestmark = pytest.mark.model
VGIF_CASES = [c for c in catalogue() if NEED_VGIF in c.needs]


@pytest.mark.parametrize("profile", j.PROFILES)
def test_vgif_cases_fail_exactly_their_known_bugs(profile):
    assert VGIF_CASES
    results = run_cases(ModelBackend(profile, kvm_amd_params={"vgif": "1"}), VGIF_CASES, profile)
    failed = {r.case.id for r in results if r.verdict.verdict != j.PASS}
    bugs = {c.id for c in VGIF_CASES if c.profiles and j.expectation(c, profile).known_bug}
    assert failed == bugs
    # STGI after the host restored GIF=1: no #UD on any kernel (7.x's
    # svm_set_gif(true) drops the intercept its recalculation had set).
    assert "perm/stgi-svme0-vgif-restored" in bugs


def test_default_model_skips_them_for_the_configuration():
    results = run_cases(ModelBackend("7.x"), VGIF_CASES, None)
    assert all(r.verdict.verdict == j.SKIP and "vgif" in r.verdict.reason for r in results)
