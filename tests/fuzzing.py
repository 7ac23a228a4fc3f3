"""Budgets for the fuzz harnesses (tests/test_fuzz_*.py).

In CI every harness runs a fixed, derandomized set of examples, small enough that all of them
together stay well under 90 seconds; the chain and FUSE harnesses run a second time on the
ASan/UBSan build of the native engine (tests/test_sanitized_fuzz.py).  For a long run of both,
one command:

    scripts/fuzz.sh [N]          # FUZZ_EXAMPLES=N, default 100000

FUZZ_EXAMPLES scales every harness to that many examples (harnesses that start a daemon per
example use a tenth of it) and draws fresh random examples on every run.  A crash a harness
finds is fixed and kept as a test in tests/regressions/.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

LONG = "FUZZ_EXAMPLES" in os.environ


def budget(ci: int, *, expensive: bool = False) -> settings:
    """Hypothesis settings for a harness whose CI budget is `ci` examples."""
    n = int(os.environ["FUZZ_EXAMPLES"]) if LONG else ci
    if LONG and expensive:
        n = max(ci, n // 10)
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=not LONG,
        database=None if not LONG else settings.default.database,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much,
                               HealthCheck.function_scoped_fixture],
        print_blob=True,
    )
