r"""cffi build script for the native request engine (worker/engine.c + common/state.c).

setup.py builds `pyvirtiofsd.worker._engine` with the hardening flags below.  The same sources
build a second module, `pyvirtiofsd.worker._engine_asan`, under AddressSanitizer and
UndefinedBehaviorSanitizer for the fuzzers:

    python worker/engine_build.py --sanitize      # builds _engine_asan next to _engine
    PYVIRTIOFSD_ENGINE=asan LD_PRELOAD=$(gcc -print-file-name=libasan.so) \
        ASAN_OPTIONS=detect_leaks=0 python -m pytest ...

worker/engine.py imports the module PYVIRTIOFSD_ENGINE names (unset or "default": _engine).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))
_COMMON = os.path.join(os.path.dirname(_HERE), "common")

CDEF = """
struct vfs_jq;
struct vfs_arena;

#define VFS_ENGINE_MAX_REGIONS 64
enum vfs_engine_status {
    VFS_ENGINE_EMPTY = 0, VFS_ENGINE_CONTROL = 1, VFS_ENGINE_DEFER = 2, VFS_ENGINE_WALK = 3,
    VFS_ENGINE_BROKEN = 4,
};
enum vfs_engine_defer {
    VFS_DEFER_IDS = 1, VFS_DEFER_XATTR = 2, VFS_DEFER_CREATE = 4, VFS_DEFER_OPEN = 8,
    VFS_DEFER_KILLPRIV = 16,
};
struct iovec { void *iov_base; size_t iov_len; };
struct vfs_engine_region { uint64_t gpa, size, uaddr; uint8_t *host; };
struct vfs_fuse_in {
    uint32_t len, opcode; uint64_t unique, nodeid; uint32_t uid, gid, pid;
    uint16_t total_extlen, padding;
};
struct vfs_engine_fs {
    const uint64_t *session;
    int proc_fd;
    uint32_t timeout;
    uint8_t enabled;
    uint8_t readonly, switch_creds, set_groups;
    uint8_t groups_empty;
    uint8_t submounts;
    uint32_t fsuid, fsgid;
    uint32_t euid;
    uint32_t open_strip;
    uint32_t file_open_flags, dir_open_flags;
    uint8_t writeback;
    uint64_t python_ops[2];
};
struct vfs_engine {
    struct vfs_engine_region regions[64];
    uint32_t nregions;
    uint32_t size;
    uint8_t *desc, *avail, *used;
    uint16_t next_avail, shadow_avail, next_used, signalled_used;
    uint8_t signalled_valid, event_idx, indirect, notify_due;
    int chan_fd, call_fd, err_fd;
    uint32_t poll_every;
    uint32_t since_poll;
    struct iovec *iov;
    uint32_t iov_cap, nreadable, nwritable;
    uint64_t readable_bytes, writable_bytes;
    uint16_t head, pos;
    uint32_t has_in;
    struct vfs_fuse_in in;
    struct vfs_jq *jq;
    struct vfs_arena *arena;
    uint32_t queue;
    struct vfs_engine_fs fs;
    uint64_t native;
    int root_fd;
    uint32_t root_len;
    char root_path[4096];
    uint8_t *dirbuf;
    uint32_t poll_us, spin_us;
    uint32_t defer;
    uint64_t completed, deferred, walked, batches, notifies;
    char why[160];
    uint64_t *stats;
    int32_t last_err;
};
void vfs_engine_init(struct vfs_engine *e, int chan_fd, struct vfs_jq *jq,
                     struct vfs_arena *arena, uint32_t queue);
void vfs_engine_fini(struct vfs_engine *e);
int  vfs_engine_add_region(struct vfs_engine *e, uint64_t gpa, uint64_t size, uint64_t uaddr,
                           void *host);
void vfs_engine_clear_regions(struct vfs_engine *e);
int  vfs_engine_start(struct vfs_engine *e, uint32_t size, uint64_t desc, uint64_t avail,
                      uint64_t used, uint16_t next_avail, int event_idx, int indirect);
void vfs_engine_stop(struct vfs_engine *e);
void vfs_engine_set_fds(struct vfs_engine *e, int call_fd, int err_fd);
void vfs_engine_set_defer(struct vfs_engine *e, uint32_t defer);
void vfs_engine_set_stats(struct vfs_engine *e, uint64_t *queue_block);
int  vfs_engine_run(struct vfs_engine *e);
int  vfs_engine_serve(struct vfs_engine *e, int kick_fd);
void vfs_engine_set_poll_us(struct vfs_engine *e, uint32_t us);
void vfs_engine_complete(struct vfs_engine *e, uint16_t head, uint32_t used_len);
void vfs_engine_notify(struct vfs_engine *e);
void vfs_engine_replied(struct vfs_engine *e, uint16_t head, uint32_t used_len);
void vfs_engine_push(struct vfs_engine *e, uint16_t head, uint32_t used_len);
void vfs_engine_pushed(struct vfs_engine *e, uint16_t head);
"""

_HARDENING = ["-O2", "-D_FORTIFY_SOURCE=3", "-fstack-protector-strong", "-fno-strict-aliasing",
              "-Wall", "-Wextra", "-Werror"]
# -fno-wrapv undoes the -fwrapv CPython's flags bring, which would hide signed overflow from
# UBSan.
_SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer",
             "-fno-sanitize-recover=undefined", "-fno-wrapv"]


def make_ffi(sanitize: bool = False, absolute: bool = False) -> FFI:
    """The engine module; with `sanitize`, the ASan/UBSan build used by the fuzzers.  Source
    paths are relative to the project (setup.py wants them so) unless `absolute`."""
    where = (lambda p: p) if absolute else os.path.relpath
    ffi = FFI()
    ffi.cdef(CDEF)
    name = "pyvirtiofsd.worker._engine_asan" if sanitize else "pyvirtiofsd.worker._engine"
    flags = _HARDENING + (_SANITIZE if sanitize else [])
    ffi.set_source(
        name,
        '#include "engine.h"\n',
        sources=[where(os.path.join(_HERE, "engine.c")), where(os.path.join(_COMMON, "state.c"))],
        include_dirs=[_HERE, _COMMON],
        extra_compile_args=flags,
        extra_link_args=["-fsanitize=address,undefined"] if sanitize else [],
    )
    return ffi


ffi = make_ffi(sanitize=False)

def build_in_place(sanitize: bool) -> str:
    """Compile next to this file (the editable install's package directory); the module path."""
    with tempfile.TemporaryDirectory() as tmp:
        built = make_ffi(sanitize, absolute=True).compile(tmpdir=tmp, verbose=False)
        dest = os.path.join(_HERE, os.path.basename(built))
        shutil.move(built, dest)
    return dest


if __name__ == "__main__":
    print(build_in_place("--sanitize" in sys.argv[1:]))
