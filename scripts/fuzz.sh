#!/bin/bash
# Long fuzzing run, one command: every harness in tests/test_fuzz_*.py with N examples (default
# 100000) of fresh random input, then the chain and FUSE harnesses again on the
# AddressSanitizer/UBSan build of the native engine (tests/sanitizer.py: built first; any
# sanitizer report from any process fails the run).  Failures are kept in .hypothesis/ for
# replay.  CI runs the same harnesses with a small, fixed budget (tests/fuzzing.py,
# tests/test_sanitized_fuzz.py).
set -euo pipefail
cd "$(dirname "$0")/.."
export FUZZ_EXAMPLES="${1:-100000}"
.venv/bin/pytest -q -p no:cacheprovider tests/test_fuzz_*.py --hypothesis-show-statistics
exec .venv/bin/python -m tests.sanitizer tests/test_fuzz_chain.py tests/test_fuzz_fuse.py \
    -k "engine or daemon"
