"""kvmtest.casecodec: Case / Observation <-> JSON, and the strict decoder the
host uses on what a guest sends."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from kvmtest.case import GIF0, INSN, NEED_SMM, NEED_SVM, SMM, Case, Expect, exception
from kvmtest.casecodec import CodecError, decode_case, encode_case, from_json, to_json
from kvmtest.cases import catalogue
from kvmtest.observation import Observation


@pytest.mark.parametrize("maxphyaddr", [40, 48, 52])
def test_every_catalogue_case_round_trips(maxphyaddr: int) -> None:
    cases = catalogue(maxphyaddr)
    wire = json.loads(json.dumps([encode_case(c) for c in cases]))
    for strict in (True, False):
        assert [decode_case(d, strict=strict) for d in wire] == list(cases)


def test_a_generated_case_round_trips_with_every_field_set() -> None:
    case = Case(
        id="gen/0001", family="fuzz", scenario=SMM, expect=Expect("shutdown"),
        source="generated", payload="smm", gif_mode=GIF0, params={"flags": 3},
        vmcb={"asid": 0, "exit_code": (1 << 64) - 1}, l2_entry="l2_vmmcall32",
        memory={0x3000: b"\x00\xff\x10", 0x1_0000_0000: b""}, smm_vmcb={"cr0": 1 << 63},
        needs=frozenset({NEED_SVM, NEED_SMM}),
        profiles={"legacy": exception(13, "vmrun_insn", error_code=0), "7.x": Expect("einval")},
        control_of="gen/0000",
    )
    data = json.loads(json.dumps(encode_case(case)))
    assert data["memory"] == {"0x3000": "00ff10", "0x100000000": ""}
    assert data["needs"] == sorted(case.needs)
    back = decode_case(data)
    assert back == case
    assert back.memory[0x3000] == b"\x00\xff\x10"


def test_defaults_are_left_out() -> None:
    case = Case(id="x", family="insn", scenario=INSN, expect=Expect("no_fault"), source="s")
    assert set(to_json(case)) == {"id", "family", "scenario", "expect", "source"}


def test_observation_round_trips() -> None:
    obs = Observation(outcome="sync", exit_code=(1 << 64) - 1, exit_info_1=0, gif=False,
                      guest_mode=False, l1={"rsp": 0x8000, "cr0": 0x80010033},
                      exits=["IoExit", "IoExit"], kernel_warnings=[], kernel_log_checked=True)
    assert from_json(Observation, json.loads(json.dumps(to_json(obs)))) == obs


@pytest.mark.parametrize(("data", "message"), [
    ({"outcome": "sync", "bogus": 1}, "unknown field"),
    ({}, "missing field"),
    ({"outcome": 1}, "Observation.outcome: expected a string"),
    ({"outcome": "sync", "exit_code": True}, "exit_code: expected a 64-bit integer"),
    ({"outcome": "sync", "exit_code": 1 << 64}, "exit_code: expected a 64-bit integer"),
    ({"outcome": "sync", "exit_code": 1.5}, "exit_code: expected a 64-bit integer"),
    ({"outcome": "sync", "gif": 1}, "gif: expected true/false"),
    ({"outcome": "sync", "exits": "IoExit"}, "exits: expected a list"),
    ({"outcome": "sync", "exits": [1]}, r"exits\[0\]: expected a string"),
    ({"outcome": "sync", "l1": {"rsp": "0"}}, r"l1\[rsp\]: expected a 64-bit integer"),
    ({"outcome": "sync", "l1": []}, "l1: expected an object"),
    ("sync", "expected an object"),
])
def test_strict_decoding_names_the_bad_field(data: object, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        from_json(Observation, data)


def test_strict_case_decoding_rejects_bad_memory() -> None:
    data = encode_case(catalogue()[0])
    with pytest.raises(CodecError, match="not a hex string"):
        decode_case({**data, "memory": {"0x10": "zz"}})
    with pytest.raises(CodecError, match="is not 0x-hex"):
        decode_case({**data, "memory": {"16": "00"}})


def test_a_field_of_an_unknown_type_fails_loudly() -> None:
    @dataclass
    class WithComplex:
        value: complex = 0j

    with pytest.raises(CodecError, match=r"WithComplex\.value.*cannot carry"):
        to_json(WithComplex())
    with pytest.raises(CodecError, match=r"WithComplex\.value.*cannot carry"):
        from_json(WithComplex, {})


def test_a_new_case_field_is_carried_without_codec_changes() -> None:
    """What another helper adding a Case field gets: carried, not dropped."""

    @dataclass(frozen=True)
    class Extended(Case):
        seed: int = 0
        tags: tuple[str, ...] = field(default_factory=tuple)

    case = Extended(id="e", family="fuzz", scenario=INSN, expect=Expect("no_fault"),
                    source="s", seed=7, tags=("a", "b"))
    data = json.loads(json.dumps(to_json(case)))
    assert data["seed"] == 7 and data["tags"] == ["a", "b"]
    assert from_json(Extended, data) == case
    minimal = Extended(id="e", family="f", scenario=INSN, expect=Expect("no_fault"), source="s")
    assert set(to_json(minimal)) == {"id", "family", "scenario", "expect", "source"}


def test_recursive_and_fixed_tuple_fields_round_trip() -> None:
    """Expect.alternatives holds Expects; l1_flipped and l2_event are fixed tuples."""
    inner = Expect("vmexit", exit_code=0x81, l2_event=(14, None))
    outer = Expect("vmexit_invalid", l1_flipped=(("pre_cr4", 1 << 6),), alternatives=(inner,))
    data = json.loads(json.dumps(to_json(outer)))
    assert data["alternatives"][0]["l2_event"] == [14, None]
    assert from_json(Expect, data) == outer
    with pytest.raises(CodecError, match=r"l2_event: expected a list of 2"):
        from_json(Expect, {**data, "l2_event": [14]})
