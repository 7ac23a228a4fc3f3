/* The state every queue worker shares, in C: the lock, the inode and handle tables with their
 * counters (layout: common/arena.py), and one queue's inflight journal (common/journal.py).
 * Python (through the _native cffi module) and the native request engine call these same
 * functions on the same MAP_SHARED mappings.  No function allocates; all table functions return
 * 0 or a negative errno.  One thread per process may use a struct vfs_arena (the lock owner is
 * the pid). */
#ifndef PYVIRTIOFSD_STATE_H
#define PYVIRTIOFSD_STATE_H

#include <stdint.h>

/* -- the lock ---------------------------------------------------------------------------------- */
/* lock word: pid of the owner | 0x80000000 waiters flag.  0, or 1 = taken over from a dead
 * owner (the caller then repairs what the lock protects). */
int vfs_lock(uint32_t *word, uint32_t me);
void vfs_unlock(uint32_t *word);

/* -- the arena: inode table, inode index, handle table, per-queue counters --------------------- */
#define VFS_ARENA_MAX_SLOTS (1u << 30)   /* per table; ids keep the slot in their low 32 bits */
#define VFS_ROOT_ID 1u                    /* FUSE_ROOT_ID: inode slot 1, generation 0 */

struct vfs_arena {            /* a process-local view of the shared mapping; filled by attach */
    uint8_t *base; uint64_t size;
    uint32_t max_inodes, buckets, max_handles, max_queues;
    uint64_t inodes_off, index_off, handles_off, fh_off;
    uint32_t pid;             /* lock owner id; the Python side refreshes it after fork/clone */
    /* --inode-file-handles=prefer (vfs_arena_use_file_handles): the share's filesystem, opened
     * by the supervisor (not O_PATH, as open_by_handle_at(2) needs), and its mount id; -1 when
     * inodes keep O_PATH fds.  Process-local: every process that pins inodes sets it. */
    int mount_fd;
    uint64_t fh_mnt_id;
};

/* Bytes a mapping for these capacities needs (0: a capacity outside 1..VFS_ARENA_MAX_SLOTS). */
uint64_t vfs_arena_size(uint32_t max_inodes, uint32_t max_handles, uint32_t max_queues);
/* Write the header of a zeroed mapping of vfs_arena_size() bytes: 0 / -EINVAL. */
int vfs_arena_format(void *base, uint64_t size, uint32_t max_inodes, uint32_t max_handles,
                     uint32_t max_queues);
/* Fill `a` from a formatted mapping, validating its header against `size`: 0 / -EINVAL. */
int vfs_arena_attach(struct vfs_arena *a, void *base, uint64_t size, uint32_t pid);

/* The inode index's hash of (dev, ino, mnt_id); the bucket is hash & (buckets - 1). */
uint64_t vfs_inode_hash(uint64_t dev, uint64_t ino, uint64_t mnt_id);

/* A cap on live inodes + handles together, so the guest cannot take the fds the daemon itself
 * needs (0: none).  A new entry past it is refused with -ENFILE, as by a full table (the guest
 * gets the same answer from either data plane); known inodes are still found. */
void vfs_arena_limit_fds(struct vfs_arena *a, uint32_t budget);
uint32_t vfs_arena_fd_budget(const struct vfs_arena *a);

/* --inode-file-handles=prefer: from now on a new inode on the share's own mount whose file
 * handle (name_to_handle_at(2)) fits VFS_FH_MAX bytes is kept as that handle, not as its fd
 * (which the insert then closes), and opened again with open_by_handle_at(2) through
 * `mount_fd` at each pin.  Inodes without a usable handle keep their fd. */
#define VFS_FH_MAX 40u
#define VFS_FD_BY_HANDLE (-2)    /* an entry's fd field: kept as a file handle */
#define VFS_OPENED 1             /* vfs_inode_acquire: the fd was opened for this pin */
void vfs_arena_use_file_handles(struct vfs_arena *a, int mount_fd, uint64_t mnt_id);

/* Inodes.  The table owns `fd` once it is stored; -EEXIST: root already set. */
int vfs_inode_set_root(struct vfs_arena *a, int fd, uint64_t dev, uint64_t ino);
/* Count one lookup; *inserted = 1 when a new entry now owns `fd` (else the caller closes it).
 * -ENFILE: table full or the fd budget reached. */
int vfs_inode_lookup_or_insert(struct vfs_arena *a, int fd, uint64_t dev, uint64_t ino,
                               uint64_t mnt_id, uint64_t *nodeid, int *inserted);
/* Pin: 0 with the entry's own fd, or VFS_OPENED with an O_PATH fd opened from its file handle,
 * which the caller closes once it has released the pin (-errno of open_by_handle_at, e.g.
 * -ESTALE for a file gone, and the pin undone, when it cannot be opened). */
int vfs_inode_acquire(struct vfs_arena *a, uint64_t nodeid, int *fd);
int vfs_inode_release(struct vfs_arena *a, uint64_t nodeid);            /* unpin; may close */
/* Drop up to `nlookup` lookups; *before = the count found (0 when -EBADF). */
int vfs_inode_forget(struct vfs_arena *a, uint64_t nodeid, uint64_t nlookup, uint64_t *before);
/* Forget every inode but the root; pinned ones close at their last release. */
int vfs_inode_forget_all(struct vfs_arena *a);
int vfs_inode_info(struct vfs_arena *a, uint64_t nodeid, uint64_t *nlookup, uint32_t *pins,
                   int *fd);
uint32_t vfs_inode_live(struct vfs_arena *a);      /* live entries, root included */
uint32_t vfs_inode_by_handle(struct vfs_arena *a); /* ... of which kept as a file handle */
uint32_t vfs_inode_repairs(struct vfs_arena *a);   /* takeovers from a dead lock owner */

/* Handles.  The table owns `fd` unless this returns -ENFILE (table full or fd budget). */
int vfs_handle_insert(struct vfs_arena *a, int fd, uint64_t nodeid, uint32_t flags, uint64_t *fh);
int vfs_handle_acquire(struct vfs_arena *a, uint64_t fh, int *fd, uint64_t *nodeid,
                       uint32_t *flags);
int vfs_handle_release(struct vfs_arena *a, uint64_t fh);
int vfs_handle_remove(struct vfs_arena *a, uint64_t fh);   /* RELEASE; closes at the last pin */
int vfs_handle_remove_all(struct vfs_arena *a);
uint32_t vfs_handle_live(struct vfs_arena *a);     /* open fds, removed-but-pinned included */
uint32_t vfs_handle_repairs(struct vfs_arena *a);

/* Saving and restoring the tables (common/devstate.py), while no queue serves.  *_entry: the
 * live entry in `slot` (0), -ENOENT for a free slot, -EINVAL past the last slot ever used.
 * *_restore: an entry at exactly the id given, in a slot that is free (-EEXIST otherwise,
 * -EINVAL outside the table or the root's slot); the table owns `fd` on success.  An inode
 * restored with fd < 0 is invalid (not found again): pinning it fails with -EIO, FORGET still
 * counts.  vfs_arena_restored() rebuilds the free lists and the index once all are in. */
/* vfs_inode_entry of an inode kept as a file handle opens it (VFS_OPENED: the caller closes
 * `*fd`; fd -1 if it cannot be opened any more). */
int vfs_inode_entry(struct vfs_arena *a, uint32_t slot, uint64_t *nodeid, uint64_t *nlookup,
                    uint64_t *dev, uint64_t *ino, uint64_t *mnt_id, int *fd);
int vfs_handle_entry(struct vfs_arena *a, uint32_t slot, uint64_t *fh, uint64_t *nodeid,
                     uint32_t *flags, int *fd);
int vfs_inode_restore(struct vfs_arena *a, uint64_t nodeid, int fd, uint64_t nlookup,
                      uint64_t dev, uint64_t ino, uint64_t mnt_id);
int vfs_handle_restore(struct vfs_arena *a, uint64_t fh, int fd, uint64_t nodeid,
                       uint32_t flags);
void vfs_arena_restored(struct vfs_arena *a);

/* Lock-free per-queue request counters (an out-of-range queue is ignored). */
void vfs_counter_add(struct vfs_arena *a, uint32_t queue, uint64_t n);
uint64_t vfs_counter_get(struct vfs_arena *a, uint32_t queue);

/* -- one queue's inflight journal ---------------------------------------------------------------- */
#define VFS_JQ_MAX_PINS 8
#define VFS_JQ_MAX_EFFECTS 8192
enum { VFS_JQ_FREE = 0, VFS_JQ_POPPED = 1, VFS_JQ_EXECUTING = 2, VFS_JQ_REPLIED = 3 };
enum { VFS_EFFECT_LOOKUP = 1, VFS_EFFECT_HANDLE = 2 };
enum { VFS_PIN_INODE = 1, VFS_PIN_HANDLE = 2 };

struct vfs_jq {               /* one queue's journal region (common/journal.py layout) */
    uint8_t *base; uint32_t capacity;
    int32_t head; uint64_t word;   /* the request being executed, as QueueJournal._head/_word */
    /* The front-end's vhost-user inflight region of this queue (split layout, protocol.md
     * 1.11; common/inflight.py) or NULL: kept current by popped, replied and pushed. */
    uint8_t *ifl; uint32_t ifl_num; uint16_t ifl_used;
};
uint64_t vfs_jq_region_size(uint32_t capacity, uint32_t page);   /* page: a power of two */
int vfs_jq_attach(struct vfs_jq *q, void *region, uint32_t capacity);   /* 0 / -EINVAL */
/* `head` was taken from avail position `pos`: returns its pop counter.  With `effects`, table
 * changes from here on are this request's. */
uint64_t vfs_jq_popped(struct vfs_jq *q, uint16_t head, uint16_t pos, uint32_t opcode,
                       uint64_t unique, int effects);
void vfs_jq_resume(struct vfs_jq *q, uint16_t head);   /* replaying the journaled `head` */
/* The current request is about to make a change that must not be repeated: its pre-state. */
void vfs_jq_executing(struct vfs_jq *q, uint32_t kind, uint32_t flags, uint64_t v0, uint64_t v1,
                      uint64_t v2, uint64_t v3);
void vfs_jq_replied(struct vfs_jq *q, uint16_t head, uint32_t used_len, uint16_t used_idx);
void vfs_jq_pushed(struct vfs_jq *q, uint16_t head);
/* Keep the split-ring inflight region at `region` (desc_num entries) current; NULL: none. */
int vfs_jq_set_inflight(struct vfs_jq *q, void *region, uint32_t desc_num);   /* 0 / -EINVAL */
int vfs_jq_pin(struct vfs_jq *q, int kind, uint64_t ident);          /* slot or -1 */
/* Record / drop an fd a successor must close (an inode's fd opened from its file handle):
 * recorded after it is opened, dropped before it is closed.  No room: it may leak. */
void vfs_jq_own_fd(struct vfs_jq *q, int fd);
void vfs_jq_disown_fd(struct vfs_jq *q, int fd);
void vfs_jq_unpin(struct vfs_jq *q, int kind, uint64_t ident);
void vfs_jq_begin_effects(struct vfs_jq *q, uint64_t counter, uint64_t forgets);
void vfs_jq_add_effect(struct vfs_jq *q, int kind, uint64_t ident);
void vfs_jq_forgetting(struct vfs_jq *q, uint64_t nodeid, uint64_t before);
void vfs_jq_note_forget(struct vfs_jq *q);

/* -- journaled table changes ------------------------------------------------------------------ */
/* The table functions above, with the queue's journal kept as worker/recovery.py requires: a pin
 * is recorded after it is taken and forgotten before it is dropped, a LOOKUP or HANDLE effect is
 * recorded after the table changed, a FORGET is announced (with the lookup count it found, under
 * the table's lock) before it is applied and counted after.  A kill between the two steps can
 * only leak a pin, a lookup or a handle, never undo one twice. */
int vfs_inode_lookup_j(struct vfs_arena *a, struct vfs_jq *q, int fd, uint64_t dev, uint64_t ino,
                       uint64_t mnt_id, uint64_t *nodeid, int *inserted);
int vfs_inode_acquire_j(struct vfs_arena *a, struct vfs_jq *q, uint64_t nodeid, int *fd);
int vfs_inode_release_j(struct vfs_arena *a, struct vfs_jq *q, uint64_t nodeid);
int vfs_inode_forget_j(struct vfs_arena *a, struct vfs_jq *q, uint64_t nodeid, uint64_t nlookup);
int vfs_handle_insert_j(struct vfs_arena *a, struct vfs_jq *q, int fd, uint64_t nodeid,
                        uint32_t flags, uint64_t *fh);
int vfs_handle_acquire_j(struct vfs_arena *a, struct vfs_jq *q, uint64_t fh, int *fd,
                         uint64_t *nodeid, uint32_t *flags);
int vfs_handle_release_j(struct vfs_arena *a, struct vfs_jq *q, uint64_t fh);

/* Live counts read without the locks: a snapshot for status reports that never waits. */
void vfs_arena_usage(const struct vfs_arena *a, uint32_t *inodes, uint32_t *handles);

/* One served request into a queue's statistics block (common/stats.py documents the layout;
 * these numbers must match it, which tests/test_status.py checks).  One process writes a
 * queue's block; the adds are atomic so that readers in other processes never see a torn word,
 * and the native data plane and the Python one share the block. */
#define VFS_STATS_QUEUE_WORDS 16
#define VFS_STATS_ERRNOS 128
#define VFS_STATS_OPCODES 64
#define VFS_STATS_BUCKETS 24
#define VFS_STATS_OP_WORDS (3 + VFS_STATS_BUCKETS)
void vfs_stats_record(uint64_t *queue, uint32_t opcode, uint32_t err, uint64_t ns);

#endif
