"""Configuration text: parse, label and JSON round trip (kvmtest.config)."""

import pytest

from kvmtest.config import Config, ConfigError


@pytest.mark.parametrize(("text", "cpu", "params", "label"), [
    ("default", None, {}, "default"),
    ("", None, {}, "default"),
    ("npt=0", None, {"npt": "0"}, "npt=0"),
    ("cpu=EPYC,+vgif", "EPYC,+vgif", {}, "cpu=EPYC,+vgif"),
    ("vgif=1  npt=0 cpu=EPYC,+vgif", "EPYC,+vgif", {"npt": "0", "vgif": "1"},
     "npt=0 vgif=1 cpu=EPYC,+vgif"),
])
def test_parse(text, cpu, params, label):
    c = Config.parse(text)
    assert (c.cpu, c.kvm_amd_params, c.label) == (cpu, params, label)
    assert Config.from_json(c.to_json()) == c
    assert Config.parse(c.label) == c


@pytest.mark.parametrize("text", ["npt", "npt=", "NPT=0", "npt=0 npt=1", "cpu=a cpu=b",
                                  "npt=0;rm", "=1"])
def test_parse_rejects(text):
    with pytest.raises(ConfigError):
        Config.parse(text)
