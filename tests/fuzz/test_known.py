"""Known differences and documented explanations: each covers exactly the
fields and conditions it names.  Observations are hand-made where they stand
for a kernel's (this host's KVM has no SVM); see docs/findings.md for where
each was measured."""

from __future__ import annotations

from collections import Counter

from kvmtest.fuzz import known, oracles
from kvmtest.fuzz.campaign import Targets
from kvmtest.fuzz.explain import explain_signal
from kvmtest.fuzz.runners import ModelRunner
from kvmtest.fuzz.spec import parse
from kvmtest.observation import Observation


def obs(**kw) -> Observation:
    base = dict(outcome="sync", exit_code=0x81, exit_info_1=0, exit_info_2=0, gif=False,
                guest_mode=False, event_inj=0, exit_int_info=0)
    return Observation(**{**base, **kw})


def test_exitinfo_of_an_exit_without_exitinfo_is_not_a_difference():
    s = parse("gif1")
    counted: Counter[str] = Counter()
    k = obs(exit_info_1=0x200000006, exit_info_2=0x4000)
    assert oracles.differential("model", k, obs(), s, counted) is None
    assert counted == {"exitinfo-undefined": 1}
    # ... but it is for an IOIO exit, whose EXITINFO1 the APM defines.
    sig = oracles.differential("model", obs(exit_code=0x7B, exit_info_1=0x800010),
                               obs(exit_code=0x7B, exit_info_1=0x800011), s)
    assert sig is not None and sig.signature == "exit_info_1"


def test_ioio_address_size_bits_only():
    s = parse("gif1 l2=l2_ioio")
    a, b = obs(exit_code=0x7B, exit_info_1=0x800010), obs(exit_code=0x7B, exit_info_1=0x800210)
    assert oracles.differential("model", a, b, s) is None
    assert oracles.differential("against", a, b, s) is not None  # a model rule only


def test_nested_paging_rule_needs_np_and_foreign_tables():
    k, m = obs(exit_code=0x400), obs(exit_code=0x81)
    assert oracles.differential("model", k, m, parse("gif1 vmcb:nested_ctl=0x1")) is None
    assert oracles.differential("model", k, m, parse(
        "gif1 vmcb:nested_cr3=0x4000,nested_ctl=0x1")) is not None
    assert oracles.differential("model", k, m, parse("gif1")) is not None


def test_eventinj_rule_spares_plain_exceptions():
    k, m = obs(outcome="exception", vector=2), obs(outcome="exception", vector=13)
    nmi = parse("gif1 vmcb:event_inj=0x8000020d")  # NMI type, vector 13
    gp = parse("gif1 vmcb:event_inj=0x80000b0d")  # #GP with its error code
    assert oracles.differential("model", k, m, nmi) is None
    assert oracles.differential("model", k, m, gp) is not None


def test_every_rule_says_why_and_where():
    names = [r.name for r in known.RULES]
    assert len(names) == len(set(names))
    for r in known.RULES:
        assert r.why and r.oracles


def test_documented_hang_is_explained_only_where_it_applies():
    targets = Targets(kernel=ModelRunner("fixed"))
    hang = oracles.Signal("model", "outcome=timeout|exception")
    assert "fuzz 1" in (explain_signal(hang, "gif1 vmcb:intercept_misc2=0x1", targets) or "")
    assert explain_signal(hang, "gif1 l2=l2_ud", targets) is None
    qemu = oracles.Signal("crash:kernel", "qemu: fatal: invalid tss type")
    assert "QEMU" in (explain_signal(qemu, "gif1", targets) or "")
    panic = oracles.Signal("crash:kernel", "Kernel panic - not syncing: Fatal exception")
    assert explain_signal(panic, "gif1", targets) is None
    targets.close()


def test_legacy_idt_rule_only_outside_long_mode():
    """The 6.1.192 observation of `gif1 mode=prot32 l2=l2_ud` (KVM_EXIT_HLT
    after the gate chain) against the model's (vector 0), as the seed-7
    campaign measured them (docs/findings.md, model-legacy-idt)."""
    k = obs(outcome="unexpected_exit", exit_code=0, exits=["HltExit"])
    m = obs(outcome="exception", vector=0, error_code=0x1002E0, rip=0, exits=["IoExit"])
    assert oracles.differential("model", k, m, parse("gif1 mode=prot32 l2=l2_ud")) is None
    assert oracles.differential("model", k, m, parse("gif1 l2=l2_ud")) is not None
    assert oracles.differential("against", k, m, parse("gif1 mode=prot32 l2=l2_ud")) is not None


def test_noncanonical_rip_rule_needs_a_noncanonical_rip():
    """6.1.192: #GP at the non-canonical RIP; the model: #DF elsewhere."""
    k = obs(outcome="exception", vector=13, error_code=0, rip=0x8000001002A0)
    m = obs(outcome="exception", vector=8, error_code=0, rip=0x3FFFFF20)
    bad = parse("gif1 vmcb:cs.selector=0x9,rip=0x8000001002a0")
    assert oracles.differential("model", k, m, bad) is None
    assert oracles.differential("model", k, m, parse("gif1 vmcb:cs.selector=0x9")) is not None
    assert oracles.differential("model", k, m, parse(
        "gif1 vmcb:rip=0xffff8000001002a0")) is not None  # canonical: no excuse


def test_documented_kernel_findings_are_explained_only_where_they_apply():
    """The two signals of the seed-7 campaign on 6.1.192 that are kernel
    behaviour (docs/findings.md, kvmtest fuzz 8 and 9), with the signatures
    the campaign printed."""
    targets = Targets(kernel=ModelRunner("fixed"))
    lost = oracles.Signal("model", "outcome=sync|unexpected_exit")
    assert "fuzz 8" in (explain_signal(lost, "smm gif1 vmcb:event_inj=0x80000303", targets)
                        or "")
    assert explain_signal(lost, "smm gif1 vmcb:event_inj=0x80000306", targets) is None  # #UD
    internal = oracles.Signal("model", "outcome=internal_error|sync")
    spec = "gif1 mode=pae l2=l2_rdmsr vmcb:nested_cr3=0x4000,nested_ctl=0x1"
    assert "fuzz 9" in (explain_signal(internal, spec, targets) or "")
    assert explain_signal(internal, "gif1 mode=pae l2=l2_rdmsr", targets) is None  # no NP
    targets.close()
