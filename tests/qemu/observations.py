"""Comparing two whole-catalogue runs of the qemu backend field by field
(tests/qemu/test_parking.py, test_reload.py)."""

from __future__ import annotations

import dataclasses
import re

from kvmtest.observation import Observation

PID = re.compile(r"PID: \d+")


def comparable(out: dict[str, Observation | str]) -> dict[str, object]:
    """QemuBackend.run_batch's result as plain data: each observation as a
    dict (a skip reason as it is), the PID in a WARN line left out: the
    agent is another process in each boot."""
    result: dict[str, object] = {}
    for case_id, obs in out.items():
        if isinstance(obs, str):  # a skip reason
            result[case_id] = obs
            continue
        data = dataclasses.asdict(obs)
        data["kernel_warnings"] = [PID.sub("PID: -", w) for w in data["kernel_warnings"] or []]
        result[case_id] = data
    return result


def differences(a: dict[str, object], b: dict[str, object]) -> dict[str, object]:
    """Case id -> the observation fields A and B disagree on (or A's skip
    reason), for every case where they differ; {} when they agree."""
    assert a.keys() == b.keys()
    return {case_id: [field for field in obs if obs[field] != b[case_id][field]]
            if isinstance(obs, dict) else obs
            for case_id, obs in a.items() if obs != b[case_id]}
