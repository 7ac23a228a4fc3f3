"""FUSE ABI tables: sizes and offsets against fuse.h 7.45 (protocol.md 4.7), packing helpers."""

from __future__ import annotations

import pytest

from pyvirtiofsd.common import fuse_abi as fa

# sizeof() of each struct per protocol.md 4.7 / Appendix A.
SIZES = {
    "IN_HEADER": 40, "OUT_HEADER": 16, "INIT_IN": 64, "INIT_OUT": 64, "ATTR": 88,
    "ENTRY_OUT": 128, "ATTR_OUT": 104, "GETATTR_IN": 16, "SETATTR_IN": 88, "OPEN_IN": 8,
    "CREATE_IN": 16, "OPEN_OUT": 16, "READ_IN": 40, "WRITE_IN": 40, "WRITE_OUT": 8,
    "RELEASE_IN": 24, "FLUSH_IN": 24, "FSYNC_IN": 16, "KSTATFS": 80, "FORGET_IN": 8,
    "FORGET_ONE": 16, "BATCH_FORGET_IN": 8, "MKNOD_IN": 16, "MKDIR_IN": 8, "RENAME_IN": 8,
    "RENAME2_IN": 16, "LINK_IN": 8, "SETXATTR_IN": 16, "GETXATTR_IN": 8, "GETXATTR_OUT": 8,
    "FILE_LOCK": 24, "LK_IN": 48, "ACCESS_IN": 8, "INTERRUPT_IN": 8, "BMAP_IN": 16,
    "BMAP_OUT": 8, "IOCTL_IN": 32, "IOCTL_OUT": 16, "POLL_IN": 24, "POLL_OUT": 8,
    "FALLOCATE_IN": 32, "LSEEK_IN": 24, "LSEEK_OUT": 8, "COPY_FILE_RANGE_IN": 56,
    "COPY_FILE_RANGE_OUT": 8, "SETUPMAPPING_IN": 40, "REMOVEMAPPING_IN": 4,
    "REMOVEMAPPING_ONE": 16, "SYNCFS_IN": 8, "STATX_IN": 24, "SX_TIME": 16, "STATX": 256,
    "STATX_OUT": 288, "DIRENT": 24, "EXT_HEADER": 8, "SECCTX_HEADER": 8, "SECCTX": 8,
    "NOTIFY_INVAL_INODE_OUT": 24, "NOTIFY_INVAL_ENTRY_OUT": 16, "NOTIFY_DELETE_OUT": 24,
    "NOTIFY_STORE_OUT": 24, "NOTIFY_RETRIEVE_OUT": 32, "NOTIFY_RETRIEVE_IN": 40,
}


@pytest.mark.parametrize("name,size", sorted(SIZES.items()))
def test_struct_sizes(name: str, size: int) -> None:
    st = getattr(fa, name)
    assert st.format.startswith("<")
    assert st.size == size


def test_opcode_numbers() -> None:
    assert fa.Opcode.LOOKUP == 1 and fa.Opcode.FORGET == 2 and fa.Opcode.MKNOD == 8
    assert fa.Opcode.INIT == 26 and fa.Opcode.BATCH_FORGET == 42 and fa.Opcode.RENAME2 == 45
    assert fa.Opcode.SYNCFS == 50 and fa.Opcode.STATX == 52 and fa.Opcode.COPY_FILE_RANGE_64 == 53
    assert 7 not in fa.Opcode._value2member_map_ and 19 not in fa.Opcode._value2member_map_
    assert fa.INIT_BSWAP_RESERVED == 436207616


def test_init_flag_bits() -> None:
    assert fa.InitFlag.INIT_EXT == 1 << 30
    assert fa.InitFlag.SECURITY_CTX == 1 << 32
    assert fa.InitFlag.CREATE_SUPP_GROUP == 1 << 34
    assert fa.InitFlag.REQUEST_TIMEOUT == 1 << 42
    assert fa.SetattrValid.KILL_SUIDGID == 1 << 11
    assert fa.OpenOutFlag.PARALLEL_DIRECT_WRITES == 1 << 6


def test_field_offsets() -> None:
    # Spot-check offsets from protocol.md 4.7 by packing a marker into one field at a time.
    hdr = fa.InHeader(len=0x11, opcode=0x22, unique=0x33, nodeid=0x44, uid=0x55, gid=0x66,
                      pid=0x77, total_extlen=0x88).pack()
    assert [hdr[i] for i in (0, 4, 8, 16, 24, 28, 32, 36)] == [
        0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]
    out = fa.InitOut(7, 45, max_write=0xAA, time_gran=0xBB, max_pages=0xCC, flags2=0xDD,
                     request_timeout=0xEE).pack()
    assert (out[20], out[24], out[28], out[32], out[40]) == (0xAA, 0xBB, 0xCC, 0xDD, 0xEE)
    sa = fa.SetattrIn(valid=1, fh=2, size=3, atime=4, mtime=5, atimensec=6, mtimensec=7,
                      mode=8, uid=9, gid=10).pack()
    assert (sa[0], sa[8], sa[16], sa[32], sa[40], sa[56], sa[60], sa[68], sa[76], sa[80]) == (
        1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
    assert fa.COPY_FILE_RANGE_IN.pack(1, 2, 3, 4, 5, 6, 7)[40] == 6


def test_tuple_round_trips() -> None:
    attr = fa.Attr(1, 2, 3, -4, 5, 6, 7, 8, 9, 0o100644, 1, 1000, 1000, 0, 4096, 1)
    e = fa.EntryOut(5, 0, 1, 1, 0, 0, attr)
    packed = e.pack()
    assert len(packed) == 128
    assert fa.EntryOut.unpack(packed) == e
    ao = fa.AttrOut(1, 500, attr)
    assert fa.AttrOut.unpack(ao.pack()) == ao
    ii = fa.InitIn(7, 45, 65536, int(fa.InitFlag.INIT_EXT), 0x4)
    assert fa.InitIn.unpack(ii.pack()) == ii
    assert ii.all_flags == fa.InitFlag.INIT_EXT | fa.InitFlag.CREATE_SUPP_GROUP
    # Without INIT_EXT the flags2 word is not part of the flag set.
    assert fa.InitIn(7, 45, 0, 0, 0x4).all_flags == 0
    # Pre-7.36 kernels send only 16 bytes.
    assert fa.InitIn.unpack(fa.INIT_IN_COMPAT.pack(7, 31, 4096, 1)) == (7, 31, 4096, 1, 0)


def test_header_validity() -> None:
    assert fa.InHeader(40, 1, 1, 1, 0, 0, 0, 0).is_valid()
    assert not fa.InHeader(39, 1, 1, 1, 0, 0, 0, 0).is_valid()
    assert not fa.InHeader(48, 1, 1, 1, 0, 0, 0, 2).is_valid()
    assert fa.OutHeader(16, -2, 9).is_valid()
    assert not fa.OutHeader(16, 5, 9).is_valid()
    assert not fa.OutHeader(16, -512, 9).is_valid()


def test_dirent_packing() -> None:
    rec = fa.pack_dirent(7, 1, 4, b"abc")
    assert len(rec) == 32 and len(rec) == fa.dirent_size(3)
    assert rec[24:27] == b"abc" and rec[27:] == bytes(5)
    rec8 = fa.pack_dirent(7, 2, 8, b"12345678")   # 24 + 8 is already aligned: no padding
    assert len(rec8) == 32
    body = rec + rec8
    assert fa.unpack_dirents(body) == [fa.Dirent(7, 1, 4, b"abc"), fa.Dirent(7, 2, 8, b"12345678")]
    with pytest.raises(ValueError):
        fa.unpack_dirents(body[:-9])
    assert fa.rec_align(0) == 0 and fa.rec_align(1) == 8 and fa.rec_align(8) == 8


def test_direntplus_packing() -> None:
    attr = fa.Attr(9, 0, 0, 0, 0, 0, 0, 0, 0, 0o40755, 2, 0, 0, 0, 4096, 0)
    entry = fa.EntryOut(9, 0, 1, 1, 0, 0, attr)
    rec = fa.pack_direntplus(entry.pack(), 9, 3, 4, b"d")
    assert len(rec) == fa.direntplus_size(1) == 160
    (parsed,) = fa.unpack_direntplus(rec)
    assert parsed.entry == entry and parsed.dirent == fa.Dirent(9, 3, 4, b"d")


def test_extensions() -> None:
    groups = fa.pack_supp_groups((100,))
    assert len(groups) == 16    # 8 header + 4 count + 4 gid, already aligned
    secctx = fa.SECCTX_HEADER.pack(8, 0)   # an empty security context header
    exts = list(fa.iter_extensions(secctx + groups))
    assert [t for t, _ in exts] == [0, fa.ExtType.GROUPS]
    assert fa.unpack_supp_groups(exts[1][1]) == (100,)
    for bad in (fa.EXT_HEADER.pack(4, 32), fa.EXT_HEADER.pack(12, 32) + bytes(4),
                fa.EXT_HEADER.pack(64, 32), b"\0" * 4):
        with pytest.raises(ValueError):
            list(fa.iter_extensions(bad))
    with pytest.raises(ValueError):
        fa.unpack_supp_groups(fa.SUPP_GROUPS.pack(3) + bytes(4))
