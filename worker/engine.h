/* The native request engine of one queue worker: the split ring, guest memory, the FUSE
 * in-header and the inflight journal records in C (worker/engine.c; Python face: engine.py).
 *
 * One engine serves one virtqueue from one single-threaded worker.  It never allocates per
 * request: the iovec array is sized when a ring starts.  Everything it reads from the rings
 * comes from the guest and goes through one bounds-checked translation gate (gpa_to_iov). */
#ifndef VFS_ENGINE_H
#define VFS_ENGINE_H

#include <stdint.h>
#include <sys/uio.h>

#include "state.h"

#define VFS_ENGINE_MAX_REGIONS 64       /* vhost-user memory slots (the control channel's 32) */

/* Daemon options the native handlers do not implement (vfs_engine_set_defer()).  Each bit
 * hands to Python every request the option changes; Python implements every option.
 * What a native handler must do before it may serve such a request is in engine.c. */
enum vfs_engine_defer {
    VFS_DEFER_IDS = 1u << 0,        /* --translate-uid/-gid: credentials and owners */
    VFS_DEFER_XATTR = 1u << 1,      /* --xattrmap, --posix-acl, --security-label: xattr names */
    VFS_DEFER_CREATE = 1u << 2,     /* --posix-acl, --security-label: creating requests */
    VFS_DEFER_OPEN = 1u << 3,       /* --preserve-noatime, --allow-mmap: open flags and replies */
    VFS_DEFER_KILLPRIV = 1u << 4,   /* --killpriv-v2: set-id and capability clearing */
    VFS_DEFER_ENTRIES = 1u << 5,    /* --inode-file-handles=mandatory: requests that make an
                                     * inode known (each must have a file handle) */
};

/* What vfs_engine_run() stopped for. */
enum vfs_engine_status {
    VFS_ENGINE_EMPTY = 0,     /* ring empty and notifications re-enabled (or no ring) */
    VFS_ENGINE_CONTROL = 1,   /* a control message waits on the channel */
    VFS_ENGINE_DEFER = 2,     /* the popped request (head, iov, in) is for Python to serve */
    VFS_ENGINE_WALK = 3,      /* a chain the engine does not walk (malformed, or more buffers
                                 than its iovec array): Python walks `head` and serves it */
    VFS_ENGINE_BROKEN = 4,    /* the ring is broken: stopped, err eventfd written, `why` says */
};

struct vfs_engine_region {   /* one guest memory region, mapped by the worker at `host` */
    uint64_t gpa, size, uaddr;
    uint8_t *host;
};

struct vfs_fuse_in {         /* fuse_in_header (protocol.md 4.2), decoded once per request */
    uint32_t len, opcode;
    uint64_t unique, nodeid;
    uint32_t uid, gid, pid;
    uint16_t total_extlen, padding;
};

/* What the native handlers need of the filesystem (worker/passthrough.py's options and state).
 * The credentials in force are shared with PassthroughFs: the worker copies them across each
 * time a request passes between the two planes. */
struct vfs_engine_fs {
    const uint64_t *session;  /* the FUSE session word (fuse_server.Session); NULL: none */
    int proc_fd;              /* the worker's /proc/self/fd */
    uint32_t timeout;         /* entry and attribute timeout of the cache mode, in seconds */
    uint8_t enabled;          /* 0: every request goes to Python */
    uint8_t readonly, switch_creds, set_groups;
    uint8_t groups_empty;     /* no supplementary groups in force (as the kernel's requests) */
    uint8_t submounts;        /* --announce-submounts */
    uint32_t fsuid, fsgid;    /* in force */
    uint32_t euid;            /* the daemon's own uid (checks made as the daemon) */
    uint32_t open_strip;      /* O_* flags an OPEN never passes on */
    uint32_t file_open_flags, dir_open_flags;   /* fuse_open_out.open_flags of the cache mode */
    uint8_t writeback;        /* --writeback */
    uint64_t python_ops[2];   /* opcodes (< 128) always served by Python (test hooks) */
    /* File locks (worker/locks.py): the count of lock owners on the shared board (NULL: none).
     * While it is not zero FLUSH and RELEASE go to Python, which drops the closing owner's
     * locks (and the released handle's own); so does a RELEASE that drops a flock lock
     * (FUSE_RELEASE_FLOCK_UNLOCK). */
    const uint32_t *lock_owners;
};

/* Dirty-page logging (vhost-user "Migration"; common/dirtylog.h): the front-end's log as this
 * worker mapped it, or log NULL while logging is off. */
struct vfs_engine_log {
    uint8_t *log;
    uint64_t size;            /* bytes of log at `log` */
    uint64_t used_gpa;        /* guest-physical address of the used ring (SET_VRING_ADDR log) */
    uint32_t ring;            /* 1: the used ring's writes are logged too (VHOST_VRING_F_LOG) */
};

struct vfs_engine_opened {   /* an fd pin_inode opened from an inode's file handle */
    uint64_t nodeid;
    int fd;
};

struct vfs_engine {
    struct vfs_engine_region regions[VFS_ENGINE_MAX_REGIONS];
    uint32_t nregions;
    /* the ring; size 0 when none runs */
    uint32_t size;
    uint8_t *desc, *avail, *used;
    uint16_t next_avail, shadow_avail, next_used, signalled_used;
    uint8_t signalled_valid, event_idx, indirect, notify_due;
    int chan_fd, call_fd, err_fd;
    uint32_t poll_every;      /* requests served between two looks at the channel */
    uint32_t since_poll;
    /* the chain being served: iov[0, nreadable) readable, then nwritable writable buffers */
    struct iovec *iov;
    uint32_t iov_cap, nreadable, nwritable;
    uint64_t readable_bytes, writable_bytes;
    uint16_t head, pos;       /* its descriptor and avail position */
    uint32_t has_in;          /* 1: `in` holds a whole fuse_in_header */
    struct vfs_fuse_in in;
    /* shared state and counters */
    struct vfs_jq *jq;
    struct vfs_arena *arena;  /* NULL: no tables (then every request goes to Python) */
    uint32_t queue;
    struct vfs_engine_fs fs;
    uint64_t native;          /* requests answered natively */
    /* the share's root as the kernel names it (/proc/self/fd), read at the first LOOKUP */
    int root_fd;
    uint32_t root_len;        /* 0: not read yet */
    char root_path[4096];
    uint8_t *dirbuf;          /* getdents64 buffer, allocated at the first READDIRPLUS */
    uint32_t poll_us, spin_us; /* --poll-us, and the busy-poll window it adapts to */
    uint32_t defer;           /* enum vfs_engine_defer bits */
    uint64_t completed, deferred, walked, batches, notifies;
    char why[160];            /* what broke the ring (VFS_ENGINE_BROKEN) */
    uint64_t *stats;          /* this queue's common/stats.py block; NULL: not counted */
    int32_t last_err;         /* the errno of the native reply being made (0: success) */
    struct vfs_engine_log dlog;
    /* Test hooks (worker/testhooks.py): called at each kill point (enum vfs_engine_point) of
     * a natively served request whose opcode is in probe_ops.  NULL: none. */
    void (*probe)(uint32_t opcode, uint32_t point);
    uint64_t probe_ops[2];
    int8_t openat2;           /* openat2(2) usable: 0 not asked yet, 1 yes, -1 no */
    /* Inodes kept as file handles (--inode-file-handles=prefer): the fds pin_inode opened for
     * the request being served, each closed by the unpin_inode of its nodeid.  A request pins
     * at most three inodes; a fourth would be refused with EMFILE, never leaked. */
    struct vfs_engine_opened opened[4];
    uint32_t nopened;
};

/* The kill points of a request (worker/testhooks.py POINTS), where struct vfs_engine's probe
 * is called. */
enum vfs_engine_point {
    VFS_POINT_POPPED = 1,     /* taken and journaled, nothing executed */
    VFS_POINT_EXECUTING = 2,  /* the pre-state journaled, the call not made */
    VFS_POINT_EXECUTED = 3,   /* the call made, no reply yet */
    VFS_POINT_REPLIED = 4,    /* the reply in guest memory and journaled, not pushed */
    VFS_POINT_PUSHED = 5,     /* the used element published, the journal slot not freed */
};

/* Set up an engine for queue `queue`, whose control channel is `chan_fd`, journaling through
 * `jq` (the worker's own view) and counting requests in `arena`; no ring yet. */
void vfs_engine_init(struct vfs_engine *e, int chan_fd, struct vfs_jq *jq,
                     struct vfs_arena *arena, uint32_t queue);
/* Release what vfs_engine_start allocated. */
void vfs_engine_fini(struct vfs_engine *e);
/* Replace the region table (the caller keeps the mappings alive): 0, or -EINVAL with `why`. */
int  vfs_engine_add_region(struct vfs_engine *e, uint64_t gpa, uint64_t size, uint64_t uaddr,
                           void *host);
void vfs_engine_clear_regions(struct vfs_engine *e);
/* Start (or restart over a new region table) a ring at `next_avail`; the next used index is
 * read from the ring (vhost-user SET_VRING_BASE).  0, -EINVAL (`why` set) or -ENOMEM. */
int  vfs_engine_start(struct vfs_engine *e, uint32_t size, uint64_t desc, uint64_t avail,
                      uint64_t used, uint16_t next_avail, int event_idx, int indirect);
void vfs_engine_stop(struct vfs_engine *e);
void vfs_engine_set_fds(struct vfs_engine *e, int call_fd, int err_fd);
/* Count every natively answered request in `queue_block` (common/stats.py; NULL: none), as
 * FuseServer.handle counts those Python answers. */
void vfs_engine_set_stats(struct vfs_engine *e, uint64_t *queue_block);
/* Hand to Python every request the options in `defer` (enum vfs_engine_defer) affect. */
void vfs_engine_set_defer(struct vfs_engine *e, uint32_t defer);
/* Serve the ring until one of enum vfs_engine_status happens. */
int  vfs_engine_run(struct vfs_engine *e);
/* vfs_engine_run(), and while the ring is empty, wait in poll(2) for a kick on `kick_fd` (-1:
 * none) or a control message; EMPTY when the wait was interrupted or the ring stopped. */
int  vfs_engine_serve(struct vfs_engine *e, int kick_fd);
/* Busy-poll an empty ring up to `us` microseconds before sleeping (0: never). */
void vfs_engine_set_poll_us(struct vfs_engine *e, uint32_t us);
/* Complete `head` with `used_len` reply bytes: journal, push, notify if the driver asks. */
void vfs_engine_complete(struct vfs_engine *e, uint16_t head, uint32_t used_len);
/* vfs_engine_complete() step by step: journal the reply, push it, journal the push (and
 * notify); a worker with test hooks stops between them. */
void vfs_engine_replied(struct vfs_engine *e, uint16_t head, uint32_t used_len);
void vfs_engine_push(struct vfs_engine *e, uint16_t head, uint32_t used_len);
void vfs_engine_pushed(struct vfs_engine *e, uint16_t head);
/* Log every write to guest memory from now on in `log` (`size` bytes), the used ring's too when
 * `ring` (at guest-physical `used_gpa`); log NULL turns logging off.  The caller keeps the
 * mapping alive until logging is turned off or moved to another log. */
void vfs_engine_set_log(struct vfs_engine *e, uint8_t *log, uint64_t size, int ring,
                        uint64_t used_gpa);
/* Signal the call eventfd if the driver wants to hear of what was pushed (spec 2.7.10). */
void vfs_engine_notify(struct vfs_engine *e);

#endif
