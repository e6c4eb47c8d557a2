#!/usr/bin/env bash
# Mutation score of the verdict-deciding modules (docs/mutation.md):
#   scripts/mutation.sh [MODULE...] [--diffs] [--keep] [--report-only]
# MODULE: judge runner build checks svm-vmrun ucall params vmcb record kmsg (default: all).
# CPU-heavy (about half an hour on 2 cores for all): not part of .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 scripts/mutation.py "$@"
