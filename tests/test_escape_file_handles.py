"""tests/test_escape.py again with --inode-file-handles=prefer, in every sandbox mode.

Inodes kept as file handles are opened with open_by_handle_at(2), which with
CAP_DAC_READ_SEARCH could reach any inode of the filesystem: the handles come only from the
daemon's own lookups beneath the share, and nothing outside it may be read or changed through
them either.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.test_escape import *  # noqa: F403 -- the tests and their fixtures, re-collected here

PREFER = "--inode-file-handles=prefer"


@pytest.fixture
def daemon_factory(daemon_factory) -> Callable:
    """conftest's daemon_factory, every daemon keeping its inodes as file handles."""
    def start(*args: str, **kw):
        return daemon_factory(PREFER, *args, **kw)
    return start
