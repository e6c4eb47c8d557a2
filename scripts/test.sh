#!/usr/bin/env bash
# The README's test command: set up, then the whole suite (unit, real /dev/kvm,
# model, and the QEMU tier that boots real Debian kernels).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec python3 -m pytest -n auto -p no:cacheprovider "$@"
