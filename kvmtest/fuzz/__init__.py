"""kvmtest fuzz: differential exploration of nested SVM.

A *scenario* (spec.py) is a Case written as data: the default VMCB12 plus
field changes, an L2 mode, the L1 state and GIF mode, optionally an SMI in
L2 or a KVM_SET_NESTED_STATE round trip.  It prints as one line and parses
back, so any finding replays with ``kvmtest run --scenario SPEC``.

- fields.py / l2modes.py: what can change, from the VMCB layout, field
  widths, the APM's reserved bits and the check boundaries (MAXPHYADDR,
  canonical limits); never from the catalogue's defects.
- generator.py: scenarios, deterministic from a seed, steered by the
  model's check coverage.
- runners.py: the same scenarios on the model, on a kernel under QEMU, ...
- oracles.py: the contract (kvmtest.judge), the model (kvmtest.parity), a
  second kernel, kernel WARN/BUG; each gives a behaviour signature.
- shrink.py: delta debugging down to the fewest changes that keep a
  behaviour.
- campaign.py / findings.py / promote.py: the loop, the finding files, and
  finding -> catalogue row.
"""
