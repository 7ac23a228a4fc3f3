"""GuestMemory: region validation, gpa/uaddr translation, removal with live views."""

from __future__ import annotations

import os

import pytest

from pyvirtiofsd.worker.guestmem import GuestMemory, GuestMemoryError

MiB = 1 << 20
PAGE = 4096


def memfd(size: int) -> int:
    fd = os.memfd_create("guestmem-test")
    os.ftruncate(fd, size)
    return fd


@pytest.fixture
def fds():
    opened: list[int] = []

    def make(size: int) -> int:
        fd = memfd(size)
        opened.append(fd)
        return fd

    yield make
    for fd in opened:
        os.close(fd)


@pytest.fixture
def mem(fds):
    """Two adjacent 1 MiB regions at GPA 0 (the second with an mmap offset), a gap, a third."""
    m = GuestMemory()
    m.add_region(0, MiB, 0x7F00_0000_0000, 0, fds(MiB))
    m.add_region(MiB, MiB, 0x7F00_1000_0000, 3 * PAGE + 8, fds(MiB + 3 * PAGE + 8))
    m.add_region(4 * MiB, MiB, 0x5555_0000_0000, 0, fds(MiB))
    yield m
    m.clear()


def test_regions_listed_in_gpa_order(fds):
    m = GuestMemory()
    m.add_region(4 * MiB, MiB, 0x1000_0000, 0, fds(MiB))
    m.add_region(0, MiB, 0x2000_0000, PAGE, fds(MiB + PAGE))
    assert m.regions == [(0, MiB, 0x2000_0000, PAGE), (4 * MiB, MiB, 0x1000_0000, 0)]
    assert len(m) == 2
    m.clear()
    assert m.regions == []


def test_mmap_offset_is_honoured(fds):
    fd = fds(2 * PAGE + 100)
    os.pwrite(fd, b"HEAD", 0)
    os.pwrite(fd, b"region starts here", PAGE + 7)
    m = GuestMemory()
    # A non page-aligned offset works because the mapping starts at file offset 0.
    m.add_region(0x10000, PAGE, 0x9000, PAGE + 7, fd)
    (v,) = m.gpa_views(0x10000, 18)
    assert bytes(v) == b"region starts here"
    assert bytes(m.uaddr_view(0x9000, 6)) == b"region"
    m.uaddr_view(0x9000, 1)[0] = ord("R")
    assert os.pread(fd, 1, PAGE + 7) == b"R"
    m.clear()


def test_gpa_views_inside_one_region(mem):
    (v,) = mem.gpa_views(MiB + 10, 100)
    v[:] = b"x" * 100
    assert bytes(mem.gpa_views(MiB + 10, 100)[0]) == b"x" * 100
    assert bytes(mem.uaddr_view(0x7F00_1000_0000 + 10, 100)) == b"x" * 100


def test_gpa_views_split_across_adjacent_regions(mem):
    views = mem.gpa_views(MiB - 3, 10)
    assert [len(v) for v in views] == [3, 7]
    views[0][:] = b"abc"
    views[1][:] = b"defghij"
    assert bytes(mem.uaddr_view(0x7F00_0000_0000 + MiB - 3, 3)) == b"abc"
    assert bytes(mem.uaddr_view(0x7F00_1000_0000, 7)) == b"defghij"


def test_gpa_views_exact_region_and_whole_memory_span(mem):
    assert [len(v) for v in mem.gpa_views(0, 2 * MiB)] == [MiB, MiB]
    assert [len(v) for v in mem.gpa_views(4 * MiB, MiB)] == [MiB]


def test_gpa_views_zero_length(mem):
    assert mem.gpa_views(0x300000, 0) == []   # even in the gap: nothing is touched


@pytest.mark.parametrize(
    ("gpa", "length"),
    [
        (0x300000, 1),                  # in the gap
        (2 * MiB - 1, 2),               # runs from region 1 into the gap
        (MiB - 1, MiB + 2),             # spans two adjacent regions, then the gap
        (5 * MiB - 16, 32),             # past the last region
        (5 * MiB, 1),                   # first byte after the last region
        (2**64 - 8, 16),                # wraps the address space
        (2**64 + 4096, 1),              # not a 64-bit address at all
        (0, -1),
    ],
)
def test_gpa_views_outside_memory(mem, gpa, length):
    with pytest.raises(GuestMemoryError, match=f"{gpa:#x}"):
        mem.gpa_views(gpa, length)


def test_gpa_below_first_region(fds):
    m = GuestMemory()
    m.add_region(MiB, MiB, 0, 0, fds(MiB))
    with pytest.raises(GuestMemoryError):
        m.gpa_views(MiB - 1, 1)
    with pytest.raises(GuestMemoryError):
        m.uaddr_view(MiB, 1)      # uaddr MiB is past the only user range [0, MiB)
    m.clear()


def test_empty_memory_rejects_everything():
    m = GuestMemory()
    with pytest.raises(GuestMemoryError):
        m.gpa_views(0, 1)
    with pytest.raises(GuestMemoryError):
        m.uaddr_view(0, 1)


def test_uaddr_view_must_stay_in_one_region(mem):
    assert len(mem.uaddr_view(0x7F00_0000_0000 + MiB - 4, 4)) == 4
    with pytest.raises(GuestMemoryError, match="not inside one"):
        mem.uaddr_view(0x7F00_0000_0000 + MiB - 4, 5)
    with pytest.raises(GuestMemoryError):
        mem.uaddr_view(0x7F00_0000_0000 - 1, 2)
    with pytest.raises(GuestMemoryError):
        mem.uaddr_view(0x7F00_0000_0000, -1)


@pytest.mark.parametrize(
    ("gpa", "size", "uaddr", "offset", "match"),
    [
        (0, 0, 0, 0, "empty"),
        (-PAGE, PAGE, 0, 0, "negative"),
        (2**64 - PAGE, 2 * PAGE, 0, 0, "wraps"),
        (0, 2 * PAGE, 2**64 - PAGE, 0, "wraps"),
        (0, 2 * PAGE, 0, 2**64 - PAGE, "wraps"),
    ],
)
def test_add_region_rejects_bad_ranges(fds, gpa, size, uaddr, offset, match):
    m = GuestMemory()
    with pytest.raises(GuestMemoryError, match=match):
        m.add_region(gpa, size, uaddr, offset, fds(4 * PAGE))
    assert m.regions == []


def test_region_may_end_exactly_at_top_of_address_space(fds):
    m = GuestMemory()
    m.add_region(2**64 - PAGE, PAGE, 2**64 - PAGE, 0, fds(PAGE))
    assert len(m.gpa_views(2**64 - 1, 1)[0]) == 1
    m.clear()


@pytest.mark.parametrize(
    ("gpa", "uaddr", "match"),
    [
        (MiB - 1, 0x9000_0000, "guest range"),       # last byte of region 0
        (MiB + MiB // 2, 0x9000_0000, "guest range"),
        (0x300000, 0x7F00_1000_0000 + 5, "user range"),
        (0x300000, 0x7F00_0000_0000 - PAGE + 1, "user range"),
    ],
)
def test_add_region_rejects_overlap(mem, fds, gpa, uaddr, match):
    before = mem.regions
    with pytest.raises(GuestMemoryError, match=match):
        mem.add_region(gpa, PAGE, uaddr, 0, fds(PAGE))
    assert mem.regions == before


def test_adjacent_regions_are_not_overlap(mem, fds):
    mem.add_region(2 * MiB, PAGE, 0x7F00_0000_0000 + MiB, 0, fds(PAGE))
    assert [len(v) for v in mem.gpa_views(MiB, MiB + PAGE)] == [MiB, PAGE]


def test_add_region_rejects_file_too_small(fds):
    m = GuestMemory()
    # Mapping past EOF would SIGBUS on first touch: refuse up front.
    with pytest.raises(GuestMemoryError, match="holds only"):
        m.add_region(0, MiB, 0, 0, fds(MiB - 1))
    with pytest.raises(GuestMemoryError, match="holds only"):
        m.add_region(0, MiB, 0, PAGE, fds(MiB))
    assert m.regions == []


def test_add_region_rejects_unmappable_and_closed_fds():
    m = GuestMemory()
    r, w = os.pipe()
    try:
        with pytest.raises(GuestMemoryError, match="mmap"):
            m.add_region(0, PAGE, 0, 0, r)
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(GuestMemoryError, match=f"fd {r}"):
        m.add_region(0, PAGE, 0, 0, r)
    assert m.regions == []


def test_add_region_does_not_close_fd(fds):
    fd = fds(PAGE)
    m = GuestMemory()
    m.add_region(0, PAGE, 0, 0, fd)
    os.fstat(fd)          # still open: the caller owns it
    m.clear()
    os.fstat(fd)


def test_mapping_outlives_fd(fds):
    fd = memfd(PAGE)
    m = GuestMemory()
    m.add_region(0, PAGE, 0, 0, fd)
    os.close(fd)
    m.gpa_views(0, 4)[0][:] = b"live"
    assert bytes(m.uaddr_view(0, 4)) == b"live"
    m.clear()


def test_remove_region(mem):
    mem.remove_region(MiB, MiB, 0x7F00_1000_0000)
    assert [r[0] for r in mem.regions] == [0, 4 * MiB]
    with pytest.raises(GuestMemoryError):
        mem.gpa_views(MiB, 1)
    with pytest.raises(GuestMemoryError):
        mem.gpa_views(MiB - 1, 2)       # no longer adjacent to anything
    with pytest.raises(GuestMemoryError):
        mem.uaddr_view(0x7F00_1000_0000, 1)
    assert len(mem.gpa_views(4 * MiB, 1)) == 1


def test_remove_region_ignores_mmap_offset_but_needs_exact_identity(mem):
    for args in [(MiB, MiB, 0), (MiB, MiB - 1, 0x7F00_1000_0000), (MiB + 1, MiB, 0x7F00_1000_0000)]:
        with pytest.raises(GuestMemoryError, match="no region"):
            mem.remove_region(*args)
    assert len(mem) == 3


def test_remove_region_with_views_still_held(mem):
    (held,) = mem.gpa_views(MiB, 8)
    held[:] = b"inflight"
    mem.remove_region(MiB, MiB, 0x7F00_1000_0000)
    # The in-flight request's buffer stays mapped until it is dropped.
    held[:] = b"finished"
    assert bytes(held) == b"finished"
    # The range can be reused at once by a new region.
    fd = memfd(MiB)
    mem.add_region(MiB, MiB, 0x7F00_1000_0000, 0, fd)
    os.close(fd)
    assert bytes(mem.gpa_views(MiB, 8)[0]) == bytes(8)
    del held


def test_clear_with_views_still_held(mem):
    held = mem.uaddr_view(0x5555_0000_0000, 4)
    mem.clear()
    held[:] = b"ok!!"
    assert mem.regions == []
