#!/bin/bash
# Long fuzzing run: every harness in tests/test_fuzz_*.py with N examples (default 100000) of
# fresh random input, failures kept in .hypothesis/ for replay.  CI runs the same harnesses with
# a small, fixed budget (tests/fuzzing.py).
set -euo pipefail
cd "$(dirname "$0")/.."
export FUZZ_EXAMPLES="${1:-100000}"
exec .venv/bin/pytest -q -p no:cacheprovider tests/test_fuzz_*.py --hypothesis-show-statistics
