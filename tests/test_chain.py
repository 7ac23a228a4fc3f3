"""Reader/Writer over a chain's buffers: byte streams independent of buffer boundaries."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvirtiofsd.worker.chain import ChainTooShort, Reader, Writer


def segments(*sizes: int, fill: bytes | None = None) -> tuple[bytearray, list[memoryview]]:
    """One backing buffer cut into consecutive segments of the given sizes."""
    total = sum(sizes)
    buf = bytearray(fill[:total] if fill is not None else bytes(total))
    view = memoryview(buf)
    out, pos = [], 0
    for n in sizes:
        out.append(view[pos : pos + n])
        pos += n
    return buf, out


DATA = bytes(range(256)) * 4


class TestReader:
    def test_reads_across_segments(self):
        _, segs = segments(3, 0, 5, 1, 7, fill=DATA)
        r = Reader(segs)
        assert r.remaining == 16
        assert r.read(2) == DATA[0:2]
        assert r.read(4) == DATA[2:6]        # spans 3 buffers (and skips the empty one)
        assert r.read(3) == DATA[6:9]        # ends exactly on a boundary
        assert r.remaining == 7
        assert r.read_all() == DATA[9:16]
        assert r.remaining == 0
        assert r.read(0) == b""

    def test_read_returns_a_copy(self):
        buf, segs = segments(4, fill=b"abcd")
        data = Reader(segs).read(4)
        buf[:] = b"zzzz"
        assert data == b"abcd"

    def test_read_struct_across_boundary(self):
        st_ = struct.Struct("<IQ")
        raw = st_.pack(7, 2**40 + 3)
        _, segs = segments(5, 3, 4, fill=raw)
        assert Reader(segs).read_struct(st_) == (7, 2**40 + 3)

    def test_too_short_leaves_cursor(self):
        _, segs = segments(2, 2, fill=b"wxyz")
        r = Reader(segs)
        r.read(1)
        with pytest.raises(ChainTooShort):
            r.read(4)
        with pytest.raises(ChainTooShort):
            r.read_struct(struct.Struct("<I"))
        assert r.remaining == 3
        assert r.read(3) == b"xyz"

    @pytest.mark.parametrize("n", [-1, -5])
    def test_negative_length_rejected(self, n):
        _, segs = segments(4, 4, fill=DATA)
        r = Reader(segs)
        r.read(2)
        for op in (r.read, r.skip, r.views):
            with pytest.raises(ChainTooShort):
                op(n)
        assert r.remaining == 6
        assert r.read(6) == DATA[2:8]

    def test_skip_and_views(self):
        _, segs = segments(4, 4, 4, fill=DATA)
        r = Reader(segs)
        r.skip(3)
        views = r.views(6)
        assert [bytes(v) for v in views] == [DATA[3:4], DATA[4:8], DATA[8:9]]
        assert r.remaining == 3
        with pytest.raises(ChainTooShort):
            r.views(4)
        assert r.read(3) == DATA[9:12]

    def test_views_alias_guest_memory(self):
        buf, segs = segments(8)
        (v,) = Reader(segs).views(8)
        buf[0] = 42
        assert v[0] == 42

    def test_empty_chain(self):
        r = Reader([])
        assert r.remaining == 0
        assert r.read_all() == b""
        assert r.views(0) == []
        with pytest.raises(ChainTooShort):
            r.read(1)


class TestWriter:
    def test_write_across_segments_counts_written(self):
        buf, segs = segments(3, 0, 2, 5)
        w = Writer(segs)
        assert w.remaining == 10
        w.write(b"ab")
        w.write(b"cdefg")
        assert w.written == 7
        assert w.remaining == 3
        assert bytes(buf) == b"abcdefg\0\0\0"
        w.write(memoryview(b"hij"))
        assert bytes(buf) == b"abcdefghij"
        assert (w.written, w.remaining) == (10, 0)

    def test_too_short_writes_nothing(self):
        buf, segs = segments(2, 2)
        w = Writer(segs)
        w.write(b"a")
        with pytest.raises(ChainTooShort):
            w.write(b"bcde")
        assert bytes(buf) == b"a\0\0\0"
        assert w.written == 1

    def test_views_do_not_consume(self):
        buf, segs = segments(3, 4)
        w = Writer(segs)
        w.write(b"h")
        views = w.views(100)            # clamped to what is left
        assert [len(v) for v in views] == [2, 4]
        assert w.views(3) == w.views(3)
        assert [len(v) for v in w.views(3)] == [2, 1]
        assert w.views(0) == []
        assert w.views(-1) == []
        assert w.written == 1
        views[0][:] = b"el"
        views[1][:2] = b"lo"
        w.advance(4)
        assert (w.written, w.remaining) == (5, 2)
        assert bytes(buf[:5]) == b"hello"

    def test_advance_past_end(self):
        _, segs = segments(4)
        w = Writer(segs)
        with pytest.raises(ChainTooShort):
            w.advance(5)
        with pytest.raises(ChainTooShort):
            w.advance(-1)
        assert w.written == 0

    def test_skip_counts_toward_written(self):
        buf, segs = segments(2, 6)
        w = Writer(segs)
        w.skip(3)
        w.write(b"xy")
        assert w.written == 5              # used.len covers up to the last byte written
        assert bytes(buf[3:5]) == b"xy"
        w.write_at(0, b"HDR")
        assert bytes(buf[:5]) == b"HDRxy"

    def test_write_at_header_after_body(self):
        buf, segs = segments(3, 3, 4)
        w = Writer(segs)
        w.write(b"\0" * 4)                 # header placeholder spanning two buffers
        w.write(b"body!!")
        w.write_at(0, b"LEN6")
        w.write_at(5, b"B")
        assert bytes(buf) == b"LEN6bBdy!!"
        assert w.written == 10

    def test_write_at_beyond_written(self):
        buf, segs = segments(4, 4)
        w = Writer(segs)
        w.write(b"abc")
        with pytest.raises(ChainTooShort):
            w.write_at(1, b"xyz")
        with pytest.raises(ChainTooShort):
            w.write_at(-1, b"x")
        assert bytes(buf[:3]) == b"abc"
        w.write_at(3, b"")

    def test_empty_writer(self):
        w = Writer([])
        assert (w.written, w.remaining) == (0, 0)
        w.write(b"")
        assert w.views(10) == []
        with pytest.raises(ChainTooShort):
            w.write(b"x")


@given(
    sizes=st.lists(st.integers(0, 9), max_size=8),
    cuts=st.lists(st.integers(0, 12), max_size=10),
)
def test_reader_stream_independent_of_layout(sizes, cuts):
    total = sum(sizes)
    data = DATA[:total]
    _, segs = segments(*sizes, fill=data)
    r = Reader(segs)
    out = b""
    for c in cuts:
        c = min(c, r.remaining)
        out += r.read(c)
    out += r.read_all()
    assert out == data


@given(
    sizes=st.lists(st.integers(0, 9), max_size=8),
    cuts=st.lists(st.integers(0, 12), max_size=10),
)
def test_writer_stream_independent_of_layout(sizes, cuts):
    total = sum(sizes)
    data = DATA[:total]
    buf, segs = segments(*sizes)
    w = Writer(segs)
    pos = 0
    for i, c in enumerate(cuts):
        c = min(c, w.remaining)
        if i % 2:
            w.write(data[pos : pos + c])
        else:
            views = w.views(c)
            k = 0
            for v in views:
                v[:] = data[pos + k : pos + k + len(v)]
                k += len(v)
            w.advance(c)
        pos += c
    w.write(data[pos:])
    assert bytes(buf) == data
    assert w.written == total
