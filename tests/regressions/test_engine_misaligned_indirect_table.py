"""Found by the chain fuzzer on the sanitizer build (tests/test_sanitized_fuzz.py): an indirect
descriptor table at an odd guest address made the engine load its descriptors as misaligned
64-bit words (UBSan: "load of misaligned address ... which requires 8 byte alignment").  The
guest chooses that address; the engine must read descriptors from any address without
undefined behaviour, and pop the chain as the reference walker does."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests import sanitizer

SCRIPT = r"""
from tests.test_engine import Rig, request
from tests.test_virtqueue import FakeGuest
from pyvirtiofsd.worker.engine import Status

g = FakeGuest()
r = Rig(g)
hdr = g.alloc(40)
out = g.alloc(64)
g.alloc(1)
table = g.alloc(16 * 2)              # odd: the allocator bumps by the size asked for
assert table % 2 == 1
g.write(hdr, bytes(40))
head = g.add_chain([(hdr, 40, False), (out, 64, True)], indirect=True, table=table)
g.publish(head)
ref = g.queue().walk(head)
status = r.e.run()
print(status.name, [len(v) for v in ref.readable + ref.writable])
assert status in (Status.DEFER, Status.WALK), status
"""


@pytest.fixture(scope="module")
def built() -> Path:
    return sanitizer.build()


def test_indirect_table_at_an_odd_address(built: Path) -> None:
    r = sanitizer.run([sys.executable, "-c", SCRIPT], timeout=120)
    assert r.clean, r.describe()
