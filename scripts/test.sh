#!/bin/bash
# Runs the whole test suite (unit, frontend-driver, real QEMU guests) after scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
exec .venv/bin/pytest -q -p no:cacheprovider --no-skips "$@"
