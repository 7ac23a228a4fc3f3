/* The shared state in C: the process-shared lock, the inode and handle tables, the per-queue
 * counters, and the hot path of one queue's inflight journal.  The layouts and the reasoning
 * about a worker killed at any instruction are in common/arena.py and common/journal.py; this
 * file follows them store for store.  No allocation, no global mutable state.
 *
 * Crash ordering.  A store that commits something (an entry's state word, a journal slot, the
 * journal's `next` word) is a release store, so the compiler cannot move an earlier store of
 * the same update after it; on the hardware side, a killed process's completed stores are in the
 * shared mapping for whoever comes next.  VFS_CRASH_POINT() marks the places between the stores
 * of an update; a test build defines it to die there, in production it is nothing. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "state.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <signal.h>
#include <stddef.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef VFS_CRASH_POINT
#define VFS_CRASH_POINT() ((void)0)
#endif

/* -- the lock ---------------------------------------------------------------------------------- */

/* A process-shared lock whose word holds the owner's pid (0 = free) and, in bit 31, a flag
 * saying someone may be sleeping on it, so an uncontended unlock costs no futex syscall
 * (Drepper, "Futexes Are Tricky", mutex #2).  Waiters sleep with a timeout and, when the owner
 * no longer exists, take the lock over: a worker that dies holding it must not wedge the other
 * queues. */
#define VFS_WAITERS 0x80000000u

static uint32_t cas32(uint32_t *word, uint32_t expected, uint32_t desired)
{
    __atomic_compare_exchange_n(word, &expected, desired, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    return expected;   /* the value seen: == expected on success */
}

int vfs_lock(uint32_t *word, uint32_t me)
{
    struct timespec ts = {0, 5 * 1000 * 1000};
    uint32_t want = me;
    for (;;) {
        uint32_t seen = cas32(word, 0, want);
        if (seen == 0)
            return 0;
        uint32_t owner = seen & ~VFS_WAITERS;
        if (owner == me)     /* our own stale ownership (e.g. after a respawn with a reused pid) */
            return 1;
        /* EPERM means the owner exists under another uid: alive. */
        if (kill((pid_t)owner, 0) == -1 && errno == ESRCH) {
            if (cas32(word, seen, me | VFS_WAITERS) == seen)
                return 1;
            continue;
        }
        if (!(seen & VFS_WAITERS) && cas32(word, seen, seen | VFS_WAITERS) != seen)
            continue;
        /* 0, or EAGAIN (the word changed), ETIMEDOUT (look at the owner again), EINTR: all
         * mean "try again".  Nothing else can happen for an aligned word in a mapping; if it
         * did, this would become a polling loop, never a lock taken without owning it. */
        long waited = syscall(SYS_futex, word, FUTEX_WAIT, seen | VFS_WAITERS, &ts, NULL, 0);
        (void)waited;
        /* Others may still sleep: keep the flag set when we get the lock after waiting. */
        want = me | VFS_WAITERS;
    }
}

void vfs_unlock(uint32_t *word)
{
    if (__atomic_exchange_n(word, 0, __ATOMIC_RELEASE) & VFS_WAITERS) {
        /* The number of waiters woken, or -1 only for a bad address: nothing to do then. */
        long woken = syscall(SYS_futex, word, FUTEX_WAKE, 1, NULL, NULL, 0);
        (void)woken;
    }
}

/* -- the arena layout (common/arena.py) ---------------------------------------------------------- */

#define ARENA_MAGIC "PVFSARN2"
#define ARENA_VERSION 3u
#define INODE_HDR_OFF 64
#define HANDLE_HDR_OFF 128
#define COUNTERS_OFF 192
#define FD_BUDGET_OFF 32

struct arena_header {
    char magic[8];
    uint32_t version, max_inodes, buckets, max_handles, max_queues;
};

struct table_hdr {            /* at INODE_HDR_OFF / HANDLE_HDR_OFF; all derived but `lock` */
    uint32_t lock, free_head, hwm, live, index_used, repairs;
    uint32_t by_handle;       /* live entries kept as a file handle: they hold no fd */
};

/* Both kinds of entry start with the same 24 bytes, which is all the slot core touches. */
struct slot_head {
    uint64_t state;           /* generation << 32 | FREE / LIVE / CLOSING: the truth */
    uint64_t aux;             /* inode: nlookup; handle: nodeid */
    uint32_t pins;
    int32_t fd;
};

struct inode_entry {
    struct slot_head h;
    uint64_t dev, ino, mnt_id;
    uint32_t next_free, pad;
};

struct handle_entry {
    struct slot_head h;
    uint32_t flags, next_free;
};

/* The file handle of inode slot N, in a side table of max_inodes + 1 entries after the handle
 * table: written before the entry is committed with fd VFS_FD_BY_HANDLE and not changed while
 * the entry lives, so a pinned entry's handle is read without the lock.  Kept apart from the
 * inode entry so that the index probes, which read entries, stay within 56 bytes a slot. */
struct inode_fh {
    int32_t type;
    uint32_t len;
    uint8_t bytes[VFS_FH_MAX];
};

_Static_assert(sizeof(struct arena_header) == 28, "arena header layout");
_Static_assert(sizeof(struct table_hdr) == 28, "table header layout");
_Static_assert(sizeof(struct inode_fh) == 48, "inode file handle layout");
_Static_assert(sizeof(struct inode_entry) == 56, "inode entry layout");
_Static_assert(sizeof(struct handle_entry) == 32, "handle entry layout");
_Static_assert(offsetof(struct inode_entry, next_free) == 48, "inode next_free");
_Static_assert(offsetof(struct handle_entry, next_free) == 28, "handle next_free");

#define ST_FREE 0u
#define ST_LIVE 1u
#define ST_CLOSING 2u         /* handle removed by RELEASE while pinned: unusable, fd open */
#define LOW32 0xFFFFFFFFull
#define IDX_EMPTY 0u
#define IDX_TOMB 0xFFFFFFFFu
#define CLOSE_BATCH 64

static uint64_t align64(uint64_t n) { return (n + 63) & ~(uint64_t)63; }

/* Offsets of the regions for these capacities; 0 when a capacity is out of range. */
static int layout(uint32_t max_inodes, uint32_t max_handles, uint32_t max_queues,
                  uint32_t *buckets, uint64_t *inodes_off, uint64_t *index_off,
                  uint64_t *handles_off, uint64_t *fh_off, uint64_t *size)
{
    if (max_inodes < 1 || max_inodes > VFS_ARENA_MAX_SLOTS || max_handles < 1 ||
        max_handles > VFS_ARENA_MAX_SLOTS || max_queues < 1 || max_queues > VFS_ARENA_MAX_SLOTS)
        return -EINVAL;
    uint64_t b = 1;
    while (b < 2 * (uint64_t)max_inodes)   /* a power of two, at least twice the slots */
        b <<= 1;
    *buckets = (uint32_t)b;
    *inodes_off = align64(COUNTERS_OFF + 8 * (uint64_t)max_queues);
    *index_off = align64(*inodes_off + sizeof(struct inode_entry) * ((uint64_t)max_inodes + 1));
    *handles_off = align64(*index_off + 4 * b);
    *fh_off = align64(*handles_off + sizeof(struct handle_entry) * ((uint64_t)max_handles + 1));
    *size = *fh_off + sizeof(struct inode_fh) * ((uint64_t)max_inodes + 1);
    return 0;
}

uint64_t vfs_arena_size(uint32_t max_inodes, uint32_t max_handles, uint32_t max_queues)
{
    uint32_t buckets;
    uint64_t io, xo, ho, fo, size;
    if (layout(max_inodes, max_handles, max_queues, &buckets, &io, &xo, &ho, &fo, &size))
        return 0;
    return size;
}

int vfs_arena_format(void *base, uint64_t size, uint32_t max_inodes, uint32_t max_handles,
                     uint32_t max_queues)
{
    struct arena_header h;
    uint32_t buckets;
    uint64_t io, xo, ho, fo, need;
    if (!base || ((uintptr_t)base & 63) ||
        layout(max_inodes, max_handles, max_queues, &buckets, &io, &xo, &ho, &fo, &need) ||
        size < need)
        return -EINVAL;
    memcpy(h.magic, ARENA_MAGIC, 8);
    h.version = ARENA_VERSION;
    h.max_inodes = max_inodes;
    h.buckets = buckets;
    h.max_handles = max_handles;
    h.max_queues = max_queues;
    memcpy(base, &h, sizeof h);
    /* Slot 1 is reserved for the root, so the inode high-water mark starts at 2. */
    struct table_hdr ih = {0, 0, 2, 0, 0, 0, 0}, hh = {0, 0, 1, 0, 0, 0, 0};
    memcpy((uint8_t *)base + INODE_HDR_OFF, &ih, sizeof ih);
    memcpy((uint8_t *)base + HANDLE_HDR_OFF, &hh, sizeof hh);
    return 0;
}

int vfs_arena_attach(struct vfs_arena *a, void *base, uint64_t size, uint32_t pid)
{
    struct arena_header h;
    uint32_t buckets;
    uint64_t io, xo, ho, fo, need;
    if (!base || ((uintptr_t)base & 63) || size < sizeof h)
        return -EINVAL;
    memcpy(&h, base, sizeof h);
    if (memcmp(h.magic, ARENA_MAGIC, 8) || h.version != ARENA_VERSION ||
        layout(h.max_inodes, h.max_handles, h.max_queues, &buckets, &io, &xo, &ho, &fo, &need) ||
        buckets != h.buckets || size < need)
        return -EINVAL;
    a->base = base;
    a->size = size;
    a->max_inodes = h.max_inodes;
    a->buckets = buckets;
    a->max_handles = h.max_handles;
    a->max_queues = h.max_queues;
    a->inodes_off = io;
    a->index_off = xo;
    a->handles_off = ho;
    a->fh_off = fo;
    a->pid = pid;
    a->mount_fd = -1;
    a->fh_mnt_id = 0;
    return 0;
}

void vfs_arena_use_file_handles(struct vfs_arena *a, int mount_fd, uint64_t mnt_id)
{
    a->mount_fd = mount_fd;
    a->fh_mnt_id = mnt_id;
}

/* -- the slot-table core shared by both tables --------------------------------------------------- */
/* An entry is committed, or freed, by one aligned 8-byte store of its state word; every other
 * field of the table (free list, high-water mark, live count, the inode index) is derived from
 * the state words and rebuilt by slots_repair() after a takeover. */

struct slots {                /* process-local description of one table */
    struct table_hdr *hdr;
    uint8_t *ent;             /* slot 0: unused by inodes; for handles, see slot_of_id() */
    uint32_t esize, cap;
    uint32_t next_off;        /* offset of next_free in an entry */
    uint32_t first;           /* first slot the allocator hands out */
    int inodes;               /* the inode table: indexed, and counting lookups */
};

static struct slots inode_slots(const struct vfs_arena *a)
{
    struct slots t = {(struct table_hdr *)(a->base + INODE_HDR_OFF), a->base + a->inodes_off,
                      sizeof(struct inode_entry), a->max_inodes,
                      offsetof(struct inode_entry, next_free), 2, 1};
    return t;
}

static struct slots handle_slots(const struct vfs_arena *a)
{
    struct slots t = {(struct table_hdr *)(a->base + HANDLE_HDR_OFF), a->base + a->handles_off,
                      sizeof(struct handle_entry), a->max_handles,
                      offsetof(struct handle_entry, next_free), 1, 0};
    return t;
}

static struct slot_head *slot_at(const struct slots *t, uint32_t slot)
{
    return (struct slot_head *)(t->ent + (uint64_t)slot * t->esize);
}

static uint32_t *next_of(const struct slots *t, uint32_t slot)
{
    return (uint32_t *)(t->ent + (uint64_t)slot * t->esize + t->next_off);
}

/* The entry an id names, or NULL when its slot is outside the table (the generation is checked
 * by the caller against the state word). */
/* Handle slot 0 is never handed out, but a state loaded from the Rust virtiofsd may put a
 * handle there: its fhs count from 0, and the guest keeps them (common/rsstate.py).  It is
 * never on the free list (0 ends that list): freed, it only stops counting as live. */
static int slot_ok(const struct slots *t, uint32_t s)
{
    return (s != 0 || !t->inodes) && s <= t->cap;
}

static struct slot_head *slot_of_id(const struct slots *t, uint64_t id, uint32_t *slot)
{
    uint32_t s = (uint32_t)(id & LOW32);
    if (!slot_ok(t, s))
        return NULL;
    *slot = s;
    return slot_at(t, s);
}

/* `live` is also read by the fd-budget check under the other table's lock: atomic stores. */
static void live_add(struct table_hdr *h, uint32_t delta)
{
    __atomic_store_n(&h->live, __atomic_load_n(&h->live, __ATOMIC_RELAXED) + delta,
                     __ATOMIC_RELAXED);
}

static uint32_t hwm_of(const struct slots *t)
{
    uint32_t hwm = t->hdr->hwm;
    return hwm < t->cap + 1 ? hwm : t->cap + 1;
}

/* Take a slot off the free list (or above the high-water mark) and count it live; 0 = full.
 * The slot's state word still says FREE: the caller fills the entry, then commits it. */
static uint32_t slots_claim(const struct slots *t)
{
    struct table_hdr *h = t->hdr;
    uint32_t slot;
    if (h->free_head) {
        slot = h->free_head;
        h->free_head = *next_of(t, slot);
    } else if (h->hwm <= t->cap) {
        slot = h->hwm;
        h->hwm = slot + 1;
    } else {
        return 0;
    }
    live_add(h, 1);
    VFS_CRASH_POINT();
    return slot;
}

static void slot_commit(struct slot_head *e, uint64_t state)
{
    __atomic_store_n(&e->state, state, __ATOMIC_RELEASE);
    VFS_CRASH_POINT();
}

/* Free the entry: FREE with the next generation, so no stale id reaches the next occupant. */
static void slot_commit_free(struct slot_head *e, uint64_t state)
{
    slot_commit(e, (((state >> 32) + 1) & LOW32) << 32);
}

/* Put a slot freed by slot_commit_free() back on the free list. */
static void slots_push_free(const struct slots *t, uint32_t slot)
{
    if (slot_at(t, slot)->fd == VFS_FD_BY_HANDLE)
        __atomic_store_n(&t->hdr->by_handle, t->hdr->by_handle - 1, __ATOMIC_RELAXED);
    *next_of(t, slot) = t->hdr->free_head;
    VFS_CRASH_POINT();
    t->hdr->free_head = slot;
    live_add(t->hdr, (uint32_t)-1);
    VFS_CRASH_POINT();
}

/* Rebuild free list, high-water mark and live count from the state words. */
static void slots_rebuild(const struct slots *t)
{
    struct table_hdr *h = t->hdr;
    uint32_t hwm = h->hwm < t->first ? t->first : hwm_of(t);
    uint32_t live = 0, by_handle = 0, free_head = 0;
    for (uint32_t slot = hwm - 1; slot >= 1; slot--) {
        if ((slot_at(t, slot)->state & LOW32) != ST_FREE) {
            live++;
            by_handle += slot_at(t, slot)->fd == VFS_FD_BY_HANDLE;
        } else if (slot >= t->first) {
            *next_of(t, slot) = free_head;
            free_head = slot;
        }
    }
    if (!t->inodes && (slot_at(t, 0)->state & LOW32) != ST_FREE)
        live++;
    h->free_head = free_head;
    h->hwm = hwm;
    __atomic_store_n(&h->live, live, __ATOMIC_RELAXED);
    __atomic_store_n(&h->by_handle, by_handle, __ATOMIC_RELAXED);
    h->index_used = 0;
}

static void slots_repair(const struct slots *t)
{
    slots_rebuild(t);
    t->hdr->repairs++;
}

static void close_owned(int fd)
{
    if (fd < 0)
        return;               /* an invalid entry's -1, or one kept as a file handle */
    /* Checked and deliberately ignored: the entry is gone whatever close() says (an O_PATH fd,
     * or a file whose write-back errors FLUSH/FSYNC reported already), and Linux releases the
     * fd even when it returns EINTR or EIO. */
    int rc = close(fd);
    (void)rc;
}

static void close_all(const int *fds, unsigned n)
{
    for (unsigned i = 0; i < n; i++)
        close_owned(fds[i]);
}

/* -- the inode table and its index --------------------------------------------------------------- */

/* murmur3's 64-bit finaliser, chained over mnt_id, dev and ino: every input bit reaches every
 * bucket bit, so inode numbers handed out in sequence spread over the whole index. */
static uint64_t fmix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return x;
}

uint64_t vfs_inode_hash(uint64_t dev, uint64_t ino, uint64_t mnt_id)
{
    return fmix64(fmix64(fmix64(mnt_id) ^ dev) ^ ino);
}

static struct inode_entry *inode_at(const struct slots *t, uint32_t slot)
{
    return (struct inode_entry *)slot_at(t, slot);
}

static uint32_t *index_of(const struct vfs_arena *a)
{
    return (uint32_t *)(a->base + a->index_off);
}

static uint32_t bucket_of(const struct vfs_arena *a, const struct inode_entry *e)
{
    return (uint32_t)(vfs_inode_hash(e->dev, e->ino, e->mnt_id) & (a->buckets - 1));
}

static void index_rebuild(const struct vfs_arena *a, const struct slots *t)
{
    uint32_t *idx = index_of(a), mask = a->buckets - 1, used = 0, hwm = hwm_of(t);
    memset(idx, 0, 4 * (uint64_t)a->buckets);
    for (uint32_t slot = 2; slot < hwm; slot++) {
        const struct inode_entry *e = inode_at(t, slot);
        if ((e->h.state & LOW32) != ST_LIVE || e->h.fd == -1)
            continue;         /* an invalid entry must not answer a LOOKUP of a new inode */
        uint32_t b = bucket_of(a, e);
        while (idx[b] != IDX_EMPTY)
            b = (b + 1) & mask;
        idx[b] = slot;
        used++;
    }
    t->hdr->index_used = used;
    VFS_CRASH_POINT();
}

/* Store `slot` (committed, known absent) in the first empty or tombstone bucket of its chain. */
static void index_put(const struct vfs_arena *a, const struct slots *t, uint32_t slot,
                      uint32_t b)
{
    uint32_t *idx = index_of(a), mask = a->buckets - 1;
    while (idx[b] != IDX_EMPTY && idx[b] != IDX_TOMB)
        b = (b + 1) & mask;
    if (idx[b] == IDX_EMPTY) {
        if (((uint64_t)t->hdr->index_used + 1) * 4 > (uint64_t)a->buckets * 3) {
            /* Too few empty buckets left for short probes: drop the tombstones.  The entry is
             * committed already, so the rebuild indexes it too. */
            index_rebuild(a, t);
            return;
        }
        t->hdr->index_used++;
    }
    idx[b] = slot;
    VFS_CRASH_POINT();
}

static void index_remove(const struct vfs_arena *a, const struct slots *t, uint32_t slot,
                         uint32_t b)
{
    uint32_t *idx = index_of(a), mask = a->buckets - 1, n;
    for (n = 0; n <= mask; n++) {
        if (idx[b] == slot)
            break;
        if (idx[b] == IDX_EMPTY)
            return;          /* not indexed (a crash before the index store, repaired since) */
        b = (b + 1) & mask;
    }
    if (n > mask)
        return;
    if (idx[(b + 1) & mask] != IDX_EMPTY) {
        idx[b] = IDX_TOMB;   /* a probe chain may run through this bucket */
        VFS_CRASH_POINT();
        return;
    }
    /* Nothing probes past an empty bucket: turn this and the tombstones before it empty. */
    uint32_t freed = 0;
    while ((idx[b] == slot || idx[b] == IDX_TOMB) && freed <= mask) {
        idx[b] = IDX_EMPTY;
        freed++;
        b = (b - 1) & mask;
    }
    t->hdr->index_used -= freed;
    VFS_CRASH_POINT();
}

/* -- the fd budget (both tables) ------------------------------------------------------------- */

static uint32_t *budget_of(const struct vfs_arena *a)
{
    return (uint32_t *)(a->base + FD_BUDGET_OFF);
}

void vfs_arena_limit_fds(struct vfs_arena *a, uint32_t budget)
{
    __atomic_store_n(budget_of(a), budget, __ATOMIC_RELAXED);
}

uint32_t vfs_arena_fd_budget(const struct vfs_arena *a)
{
    return __atomic_load_n(budget_of(a), __ATOMIC_RELAXED);
}

/* Whether a new entry would pass the budget.  Called under one table's lock; the other table's
 * count may be a few entries old, which moves the cap by as much, never the safety margin the
 * budget leaves below the process's fd limit. */
static int over_budget(const struct vfs_arena *a)
{
    uint32_t budget = vfs_arena_fd_budget(a);
    if (!budget)
        return 0;
    const struct table_hdr *ih = (const struct table_hdr *)(a->base + INODE_HDR_OFF);
    /* Inodes kept as file handles hold no fd. */
    uint64_t held =
        (uint64_t)__atomic_load_n(&ih->live, __ATOMIC_RELAXED) -
        __atomic_load_n(&ih->by_handle, __ATOMIC_RELAXED) +
        __atomic_load_n(&((struct table_hdr *)(a->base + HANDLE_HDR_OFF))->live,
                        __ATOMIC_RELAXED);
    return held >= budget;
}

/* -- what both tables do the same way -------------------------------------------------------- */

static void table_lock(const struct vfs_arena *a, const struct slots *t)
{
    if (vfs_lock(&t->hdr->lock, a->pid)) {
        slots_repair(t);
        if (t->inodes)
            index_rebuild(a, t);
    }
}

static void table_unlock(const struct slots *t) { vfs_unlock(&t->hdr->lock); }

/* Free a slot whose last user let go (its fd is the caller's to close, after the lock). */
static void table_free(const struct vfs_arena *a, const struct slots *t, uint32_t slot)
{
    struct slot_head *e = slot_at(t, slot);
    slot_commit_free(e, e->state);
    if (t->inodes)
        index_remove(a, t, slot, bucket_of(a, inode_at(t, slot)));
    if (slot)
        slots_push_free(t, slot);
    else
        live_add(t->hdr, (uint32_t)-1);     /* handle slot 0: see slot_of_id() */
}

/* The state word a live entry named by `id` has: generation << 32 | LIVE. */
static uint64_t live_word(uint64_t id) { return (id & ~LOW32) | ST_LIVE; }

/* Whether the owner has let go of a live entry -- FORGET down to no lookups (never the root),
 * or RELEASE -- so that its fd closes with the last pin and its id no longer pins it. */
static int dropped(const struct slots *t, uint32_t slot, const struct slot_head *e)
{
    if (t->inodes)
        return e->aux == 0 && slot != VFS_ROOT_ID;
    return (e->state & LOW32) == ST_CLOSING;
}

/* Pin the entry `id` names, unless it is unknown, stale or dropped; `*out` gets a copy of its
 * head (and `*flags` a handle's flags) taken under the lock. */
static int table_pin(const struct vfs_arena *a, const struct slots *t, uint64_t id,
                     struct slot_head *out, uint32_t *flags)
{
    uint32_t slot;
    struct slot_head *e = slot_of_id(t, id, &slot);
    int rc = -EBADF;
    if (!e)
        return rc;
    table_lock(a, t);
    if (e->state == live_word(id) && !dropped(t, slot, e) && e->fd == -1) {
        rc = -EIO;            /* restored as invalid: its inode could not be found again */
    } else if (e->state == live_word(id) && !dropped(t, slot, e)) {
        e->pins++;
        *out = *e;
        if (flags)
            *flags = ((const struct handle_entry *)e)->flags;
        rc = 0;
    }
    table_unlock(t);
    return rc;
}

/* Unpin; the last pin of a dropped entry frees it and closes its fd. */
static int table_unpin(const struct vfs_arena *a, const struct slots *t, uint64_t id)
{
    uint32_t slot;
    struct slot_head *e = slot_of_id(t, id, &slot);
    int rc = -EBADF, close_fd = -1;
    if (!e)
        return rc;
    table_lock(a, t);
    uint64_t gen_word = id & ~LOW32;
    if (e->pins != 0 && (e->state == (gen_word | ST_LIVE) || e->state == (gen_word | ST_CLOSING))) {
        if (e->pins == 1 && dropped(t, slot, e)) {
            close_fd = e->fd;
            table_free(a, t, slot);
        } else {
            e->pins--;
        }
        rc = 0;
    }
    table_unlock(t);
    if (close_fd >= 0)
        close_owned(close_fd);
    return rc;
}

/* End of a FUSE session: every live entry from `first` on is dropped -- freed now, or, if
 * pinned, at its last release.  The lock is dropped to close every CLOSE_BATCH fds (no
 * allocation, no close under the lock), so this is not one atomic step: an entry made meanwhile
 * in a slot already passed stays, as if it had come after the session ended. */
static void table_drop_all(const struct vfs_arena *a, const struct slots *t)
{
    uint32_t slot = t->inodes ? t->first : 0, end;      /* handle slot 0: see slot_of_id() */
    do {
        int fds[CLOSE_BATCH];
        unsigned n = 0;
        table_lock(a, t);
        end = hwm_of(t);
        for (; slot < end && n < CLOSE_BATCH; slot++) {
            struct slot_head *e = slot_at(t, slot);
            if ((e->state & LOW32) != ST_LIVE)
                continue;
            if (e->pins == 0) {
                fds[n++] = e->fd;
                table_free(a, t, slot);
            } else if (t->inodes) {
                e->aux = 0;
            } else {
                slot_commit(e, (e->state & ~LOW32) | ST_CLOSING);
            }
        }
        table_unlock(t);
        close_all(fds, n);
    } while (slot < end);
}

static uint32_t table_live(const struct vfs_arena *a, const struct slots *t)
{
    table_lock(a, t);
    uint32_t live = t->hdr->live;
    table_unlock(t);
    return live;
}

/* -- the inode table ---------------------------------------------------------------------------- */

int vfs_inode_set_root(struct vfs_arena *a, int fd, uint64_t dev, uint64_t ino)
{
    struct slots t = inode_slots(a);
    struct inode_entry *e = inode_at(&t, VFS_ROOT_ID);
    int rc = -EEXIST;
    table_lock(a, &t);
    if ((e->h.state & LOW32) == ST_FREE) {
        e->h.aux = 1;
        e->h.pins = 0;
        e->h.fd = fd;
        e->dev = dev;
        e->ino = ino;
        e->mnt_id = 0;
        slot_commit(&e->h, ST_LIVE);    /* the root's generation is always 0 */
        live_add(t.hdr, 1);
        rc = 0;
    }
    table_unlock(&t);
    return rc;
}

static struct inode_fh *fh_at(const struct vfs_arena *a, uint32_t slot)
{
    return (struct inode_fh *)(a->base + a->fh_off + (uint64_t)slot * sizeof(struct inode_fh));
}

/* The file handle of the inode behind `fd`, when one can be kept for it: on the share's own
 * mount (the only filesystem `mount_fd` names) and no longer than VFS_FH_MAX.  Asked before
 * the lock is taken, as virtiofsd asks for it on every lookup. */
static int handle_of(const struct vfs_arena *a, int fd, uint64_t mnt_id, struct inode_fh *out)
{
    union {
        struct file_handle fh;
        uint8_t raw[sizeof(struct file_handle) + VFS_FH_MAX];
    } u;
    int mnt;
    if (a->mount_fd < 0 || mnt_id != a->fh_mnt_id)
        return 0;
    u.fh.handle_bytes = VFS_FH_MAX;
    /* EOVERFLOW (a longer handle), EOPNOTSUPP (a filesystem without them): keep the fd. */
    if (name_to_handle_at(fd, "", &u.fh, &mnt, AT_EMPTY_PATH) != 0)
        return 0;
    out->type = u.fh.handle_type;
    out->len = u.fh.handle_bytes;
    memcpy(out->bytes, u.fh.f_handle, u.fh.handle_bytes);
    return 1;
}

/* open_by_handle_at(2) of a pinned entry's handle, as an O_PATH fd: the fd, or -errno. */
static int open_fh(const struct vfs_arena *a, uint32_t slot)
{
    const struct inode_fh *h = fh_at(a, slot);
    union {
        struct file_handle fh;
        uint8_t raw[sizeof(struct file_handle) + VFS_FH_MAX];
    } u;
    if (h->len > VFS_FH_MAX)
        return -EIO;          /* never written so: a corrupt mapping */
    u.fh.handle_bytes = h->len;
    u.fh.handle_type = h->type;
    memcpy(u.fh.f_handle, h->bytes, h->len);
    /* open_by_handle_at needs CAP_DAC_READ_SEARCH, which a request served with the caller's
     * fsuid has lost from the effective set (capabilities(7), "Effect of user ID changes on
     * capabilities"): open as the daemon, then give the caller's fsuid back.  setfsuid(-1)
     * changes nothing and tells the fsuid in force. */
    uid_t daemon = geteuid(), caller = (uid_t)setfsuid((uid_t)-1);
    if (caller != daemon)
        setfsuid(daemon);
    int fd = open_by_handle_at(a->mount_fd, &u.fh, O_PATH | O_CLOEXEC);
    int err = errno;
    if (caller != daemon)
        setfsuid(caller);
    return fd >= 0 ? fd : -err;
}

/* Whether the entry in `slot`, kept as a file handle, is another file than the one whose handle
 * is `fh` although (dev, ino) match: its file was deleted -- nothing held it open, as an fd
 * would -- and the inode number went to a new file (a new generation in the handle).  The
 * stale entry must not answer for the new file (virtiofsd looks inodes up by handle first);
 * it stays, answering ESTALE, until the guest forgets it. */
static int other_file(const struct vfs_arena *a, uint32_t slot, const struct inode_entry *e,
                      int by_handle, const struct inode_fh *fh)
{
    if (!by_handle || e->h.fd != VFS_FD_BY_HANDLE)
        return 0;
    const struct inode_fh *kept = fh_at(a, slot);
    return kept->type != fh->type || kept->len != fh->len ||
           memcmp(kept->bytes, fh->bytes, fh->len) != 0;
}

int vfs_inode_lookup_or_insert(struct vfs_arena *a, int fd, uint64_t dev, uint64_t ino,
                               uint64_t mnt_id, uint64_t *nodeid, int *inserted)
{
    struct slots t = inode_slots(a);
    struct inode_fh fh = {0, 0, {0}};
    int by_handle = handle_of(a, fd, mnt_id, &fh);
    uint32_t *idx = index_of(a), mask = a->buckets - 1;
    uint32_t h = (uint32_t)(vfs_inode_hash(dev, ino, mnt_id) & mask), b = h, slot = 0;
    int rc = 0;
    *inserted = 0;
    table_lock(a, &t);
    /* The root is kept out of the index and matched by (dev, ino) alone, whatever mnt_id. */
    struct inode_entry *root = inode_at(&t, VFS_ROOT_ID);
    if (root->h.state == ST_LIVE && root->dev == dev && root->ino == ino) {
        root->h.aux++;
        *nodeid = VFS_ROOT_ID;
        goto out;
    }
    for (uint32_t n = 0; n <= mask; n++, b = (b + 1) & mask) {
        uint32_t s = idx[b];
        if (s == IDX_EMPTY)
            break;
        if (s == IDX_TOMB || s > t.cap)
            continue;
        const struct inode_entry *e = inode_at(&t, s);
        if (e->ino == ino && e->dev == dev && e->mnt_id == mnt_id &&
            (e->h.state & LOW32) == ST_LIVE && !other_file(a, s, e, by_handle, &fh)) {
            slot = s;
            break;
        }
    }
    if (slot) {
        /* A forgotten entry still pinned by a request in flight is revived as-is. */
        struct inode_entry *e = inode_at(&t, slot);
        e->h.aux++;
        *nodeid = (e->h.state & ~LOW32) | slot;
        goto out;
    }
    slot = over_budget(a) ? 0 : slots_claim(&t);
    if (!slot) {
        rc = -ENFILE;
        goto out;
    }
    struct inode_entry *e = inode_at(&t, slot);
    uint64_t gen_word = e->h.state & ~LOW32;
    e->h.aux = 1;
    e->h.pins = 0;
    e->h.fd = by_handle ? VFS_FD_BY_HANDLE : fd;
    e->dev = dev;
    e->ino = ino;
    e->mnt_id = mnt_id;
    e->next_free = 0;
    if (by_handle) {
        *fh_at(a, slot) = fh;
        /* Counted before the commit: a crash between the two leaves a count one too high
         * (the fd budget one entry stricter) until the next repair recounts. */
        __atomic_store_n(&t.hdr->by_handle, t.hdr->by_handle + 1, __ATOMIC_RELAXED);
    }
    slot_commit(&e->h, gen_word | ST_LIVE);
    index_put(a, &t, slot, h);
    *nodeid = gen_word | slot;
    *inserted = 1;
out:
    table_unlock(&t);
    if (*inserted && by_handle)
        close_owned(fd);      /* the table keeps the handle: this fd is owned and not kept */
    return rc;
}

int vfs_inode_acquire(struct vfs_arena *a, uint64_t nodeid, int *fd)
{
    struct slots t = inode_slots(a);
    struct slot_head got;
    int rc = table_pin(a, &t, nodeid, &got, NULL);
    if (rc != 0)
        return rc;
    if (got.fd != VFS_FD_BY_HANDLE) {
        *fd = got.fd;
        return 0;
    }
    /* Pinned, so the slot and its handle stay as they are: open it without the lock.  A file
     * deleted since answers ESTALE, which the request gets (as virtiofsd answers it). */
    int opened = a->mount_fd >= 0 ? open_fh(a, (uint32_t)(nodeid & LOW32)) : -EIO;
    if (opened < 0) {
        table_unpin(a, &t, nodeid);
        return opened;
    }
    *fd = opened;
    return VFS_OPENED;
}

int vfs_inode_release(struct vfs_arena *a, uint64_t nodeid)
{
    struct slots t = inode_slots(a);
    return table_unpin(a, &t, nodeid);
}

/* FORGET; with a journal `q`, announced there (with the count found) before it is applied. */
static int inode_forget(struct vfs_arena *a, struct vfs_jq *q, uint64_t nodeid, uint64_t nlookup,
                        uint64_t *before)
{
    struct slots t = inode_slots(a);
    uint32_t slot;
    struct slot_head *e = slot_of_id(&t, nodeid, &slot);
    int rc = -EBADF, close_fd = -1;
    *before = 0;
    if (!e) {
        if (q)
            vfs_jq_forgetting(q, nodeid, 0);   /* unknown: forgetting it changes nothing */
        return rc;
    }
    table_lock(a, &t);
    if (e->state != live_word(nodeid)) {
        if (q)
            vfs_jq_forgetting(q, nodeid, 0);
    } else {
        uint64_t count = e->aux;
        *before = count;
        if (q)
            vfs_jq_forgetting(q, nodeid, count);
        count -= nlookup < count ? nlookup : count;
        if (count == 0 && e->pins == 0 && slot != VFS_ROOT_ID) {
            close_fd = e->fd;
            table_free(a, &t, slot);
        } else {
            e->aux = count;
        }
        rc = 0;
    }
    table_unlock(&t);
    if (close_fd >= 0)
        close_owned(close_fd);
    return rc;
}

int vfs_inode_forget(struct vfs_arena *a, uint64_t nodeid, uint64_t nlookup, uint64_t *before)
{
    return inode_forget(a, NULL, nodeid, nlookup, before);
}

int vfs_inode_forget_all(struct vfs_arena *a)
{
    struct slots t = inode_slots(a);
    table_drop_all(a, &t);
    return 0;
}

int vfs_inode_info(struct vfs_arena *a, uint64_t nodeid, uint64_t *nlookup, uint32_t *pins,
                   int *fd)
{
    struct slots t = inode_slots(a);
    uint32_t slot;
    struct slot_head *e = slot_of_id(&t, nodeid, &slot);
    int rc = -EBADF;
    if (!e)
        return rc;
    table_lock(a, &t);
    if (e->state == live_word(nodeid)) {
        *nlookup = e->aux;
        *pins = e->pins;
        *fd = e->fd;
        rc = 0;
    }
    table_unlock(&t);
    return rc;
}

uint32_t vfs_inode_live(struct vfs_arena *a)
{
    struct slots t = inode_slots(a);
    return table_live(a, &t);
}

uint32_t vfs_inode_by_handle(struct vfs_arena *a)
{
    struct slots t = inode_slots(a);
    table_lock(a, &t);
    uint32_t n = t.hdr->by_handle;
    table_unlock(&t);
    return n;
}

uint32_t vfs_inode_repairs(struct vfs_arena *a)
{
    return __atomic_load_n(&inode_slots(a).hdr->repairs, __ATOMIC_RELAXED);
}

/* -- the handle table ------------------------------------------------------------------------- */

int vfs_handle_insert(struct vfs_arena *a, int fd, uint64_t nodeid, uint32_t flags, uint64_t *fh)
{
    struct slots t = handle_slots(a);
    int rc = 0;
    table_lock(a, &t);
    uint32_t slot = over_budget(a) ? 0 : slots_claim(&t);
    if (slot) {
        struct handle_entry *e = (struct handle_entry *)slot_at(&t, slot);
        uint64_t gen_word = e->h.state & ~LOW32;
        e->h.aux = nodeid;
        e->h.pins = 0;
        e->h.fd = fd;
        e->flags = flags;
        e->next_free = 0;
        slot_commit(&e->h, gen_word | ST_LIVE);
        *fh = gen_word | slot;
    } else {
        rc = -ENFILE;
    }
    table_unlock(&t);
    return rc;
}

int vfs_handle_acquire(struct vfs_arena *a, uint64_t fh, int *fd, uint64_t *nodeid,
                       uint32_t *flags)
{
    struct slots t = handle_slots(a);
    struct slot_head got;
    int rc = table_pin(a, &t, fh, &got, flags);
    if (rc == 0) {
        *fd = got.fd;
        *nodeid = got.aux;
    }
    return rc;
}

int vfs_handle_release(struct vfs_arena *a, uint64_t fh)
{
    struct slots t = handle_slots(a);
    return table_unpin(a, &t, fh);
}

int vfs_handle_remove(struct vfs_arena *a, uint64_t fh)
{
    struct slots t = handle_slots(a);
    uint32_t slot;
    struct slot_head *e = slot_of_id(&t, fh, &slot);
    int rc = -EBADF, close_fd = -1;
    if (!e)
        return rc;
    table_lock(a, &t);
    if (e->state == live_word(fh)) {
        if (e->pins == 0) {
            close_fd = e->fd;
            table_free(a, &t, slot);
        } else {
            slot_commit(e, (fh & ~LOW32) | ST_CLOSING);
        }
        rc = 0;
    }
    table_unlock(&t);
    if (close_fd >= 0)
        close_owned(close_fd);
    return rc;
}

int vfs_handle_remove_all(struct vfs_arena *a)
{
    struct slots t = handle_slots(a);
    table_drop_all(a, &t);
    return 0;
}

uint32_t vfs_handle_live(struct vfs_arena *a)
{
    struct slots t = handle_slots(a);
    return table_live(a, &t);
}

uint32_t vfs_handle_repairs(struct vfs_arena *a)
{
    return __atomic_load_n(&handle_slots(a).hdr->repairs, __ATOMIC_RELAXED);
}

/* -- counters ----------------------------------------------------------------------------------- */

void vfs_counter_add(struct vfs_arena *a, uint32_t queue, uint64_t n)
{
    if (queue < a->max_queues)
        __atomic_fetch_add((uint64_t *)(a->base + COUNTERS_OFF) + queue, n, __ATOMIC_RELAXED);
}

uint64_t vfs_counter_get(struct vfs_arena *a, uint32_t queue)
{
    if (queue >= a->max_queues)
        return 0;
    return __atomic_load_n((uint64_t *)(a->base + COUNTERS_OFF) + queue, __ATOMIC_RELAXED);
}

/* -- one queue's inflight journal (common/journal.py) ------------------------------------------ */
/* Written only by the queue's single-threaded worker and read once it is dead, so the only
 * ordering that matters is program order against a kill: every store is a release store (and a
 * crash point in the test build). */

#define JQ_NEXT 0
#define JQ_PUSHING 1
#define JQ_EFF_OWNER 4
#define JQ_EFF_COUNT 5        /* u32 count, u32 overflow */
#define JQ_EFF_FORGETS 6
#define JQ_PENDING_NODE 7
#define JQ_FDS 8              /* 16 x i32, fd + 1 (0: empty): QueueJournal.own_fd */
#define JQ_MAX_FDS 16
#define JQ_PINS 16
#define JQ_PIN_KINDS_OFF (24 * 8)
#define JQ_PENDING_BEFORE 25
#define JQ_PENDING_INDEX 26
#define JQ_HEADER_SIZE 256
#define JQ_SLOT_SIZE 64
#define JQ_PUSHING_FLAG (1ull << 63)
#define JQ_COUNTER_MASK ((1ull << 40) - 1)
#define JQ_MAX_CAPACITY 32768

static uint64_t *jq_w(const struct vfs_jq *q, unsigned i) { return (uint64_t *)q->base + i; }

static uint64_t *jq_slot(const struct vfs_jq *q, uint32_t head)
{
    return (uint64_t *)(q->base + JQ_HEADER_SIZE + (uint64_t)head * JQ_SLOT_SIZE);
}

static uint64_t get64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }

static void put64(uint64_t *p, uint64_t v)
{
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
    VFS_CRASH_POINT();
}

static void put32(uint32_t *p, uint32_t v)
{
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
    VFS_CRASH_POINT();
}

static void put8(uint8_t *p, uint8_t v)
{
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
    VFS_CRASH_POINT();
}

uint64_t vfs_jq_region_size(uint32_t capacity, uint32_t page)
{
    uint64_t n = JQ_HEADER_SIZE + (uint64_t)capacity * JQ_SLOT_SIZE + VFS_JQ_MAX_EFFECTS * 9;
    return (n + page - 1) & ~((uint64_t)page - 1);
}

int vfs_jq_attach(struct vfs_jq *q, void *region, uint32_t capacity)
{
    if (!region || ((uintptr_t)region & 63) || capacity < 1 || capacity > JQ_MAX_CAPACITY)
        return -EINVAL;
    q->base = region;
    q->capacity = capacity;
    q->head = -1;
    q->word = 0;
    q->ifl = NULL;
    q->ifl_num = 0;
    q->ifl_used = 0;
    return 0;
}

/* The vhost-user inflight region (protocol.md 1.11, split ring): a 16-byte queue header
 * (features u64, version u16, desc_num u16, last_batch_head u16, used_idx u16), then one
 * 16-byte DescStateSplit per head (inflight u8, padding[5], next u16, counter u64).  The
 * journal's pop counter is the region's fetch counter: both only grow, in pop order. */
#define IFL_LAST_BATCH_HEAD 12
#define IFL_USED_IDX 14
#define IFL_DESC 16

int vfs_jq_set_inflight(struct vfs_jq *q, void *region, uint32_t desc_num)
{
    if (region != NULL && (((uintptr_t)region & 7) || desc_num < 1 || desc_num > 32768))
        return -EINVAL;
    q->ifl = region;
    q->ifl_num = region != NULL ? desc_num : 0;
    return 0;
}

static uint8_t *ifl_desc(const struct vfs_jq *q, uint16_t head)
{
    return q->ifl + IFL_DESC + (uint32_t)head * 16;
}

static void put16(uint16_t *p, uint16_t v)
{
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

uint64_t vfs_jq_popped(struct vfs_jq *q, uint16_t head, uint16_t pos, uint32_t opcode,
                       uint64_t unique, int effects)
{
    if (head >= q->capacity)
        return UINT64_MAX;   /* the ring's heads are checked against its size <= capacity */
    uint64_t counter = get64(jq_w(q, JQ_NEXT)) >> 16;
    uint64_t *s = jq_slot(q, head);
    put32((uint32_t *)(s + 1), 0);          /* used length */
    put32((uint32_t *)(s + 1) + 1, opcode);
    put64(s + 2, unique);
    uint64_t word = VFS_JQ_POPPED | (uint64_t)pos << 8 | (counter & JQ_COUNTER_MASK) << 24;
    put64(s, word);                                               /* commit the slot */
    put64(jq_w(q, JQ_NEXT), (counter + 1) << 16 | (uint16_t)(pos + 1));   /* then the index */
    if (q->ifl != NULL && head < q->ifl_num) {
        /* Spec "inflight I/O tracking", on fetching: the counter, then the inflight flag. */
        uint8_t *d = ifl_desc(q, head);
        __atomic_store_n((uint64_t *)(d + 8), counter, __ATOMIC_RELAXED);
        __atomic_store_n(d, (uint8_t)1, __ATOMIC_RELEASE);
    }
    q->head = head;
    q->word = word;
    if (effects)
        vfs_jq_begin_effects(q, counter, 0);
    return counter;
}

void vfs_jq_resume(struct vfs_jq *q, uint16_t head)
{
    if (head >= q->capacity)
        return;
    q->head = head;
    q->word = (get64(jq_slot(q, head)) & ~(uint64_t)0xFF) | VFS_JQ_POPPED;
}

void vfs_jq_executing(struct vfs_jq *q, uint32_t kind, uint32_t flags, uint64_t v0, uint64_t v1,
                      uint64_t v2, uint64_t v3)
{
    if (q->head < 0)
        return;
    uint64_t *s = jq_slot(q, (uint32_t)q->head);
    put32((uint32_t *)(s + 3), kind);
    put32((uint32_t *)(s + 3) + 1, flags);
    put64(s + 4, v0);
    put64(s + 5, v1);
    put64(s + 6, v2);
    put64(s + 7, v3);
    put64(s, (q->word & ~(uint64_t)0xFF) | VFS_JQ_EXECUTING);
}

void vfs_jq_replied(struct vfs_jq *q, uint16_t head, uint32_t used_len, uint16_t used_idx)
{
    if (head >= q->capacity)
        return;
    uint64_t *s = jq_slot(q, head);
    put32((uint32_t *)(s + 1), used_len);
    put64(s, (get64(s) & ~(uint64_t)0xFF) | VFS_JQ_REPLIED);
    put64(jq_w(q, JQ_EFF_OWNER), 0);
    put64(jq_w(q, JQ_PUSHING), JQ_PUSHING_FLAG | (uint64_t)used_idx << 16 | head);
    q->head = -1;
    if (q->ifl != NULL && head < q->ifl_num) {
        /* On completing (a batch of one): link the head into the batch list before the used
         * ring's idx moves, so a reconnect can tell whether this push went out. */
        put16((uint16_t *)(ifl_desc(q, head) + 6),
              __atomic_load_n((uint16_t *)(q->ifl + IFL_LAST_BATCH_HEAD), __ATOMIC_RELAXED));
        put16((uint16_t *)(q->ifl + IFL_LAST_BATCH_HEAD), head);
        q->ifl_used = (uint16_t)(used_idx + 1);
    }
}

void vfs_jq_pushed(struct vfs_jq *q, uint16_t head)
{
    if (head >= q->capacity)
        return;
    put64(jq_slot(q, head), VFS_JQ_FREE);
    put64(jq_w(q, JQ_PUSHING), 0);
    if (q->ifl != NULL && head < q->ifl_num) {
        /* The used idx went out: the head is no longer in flight, then the copy of used idx. */
        __atomic_store_n(ifl_desc(q, head), (uint8_t)0, __ATOMIC_RELEASE);
        put16((uint16_t *)(q->ifl + IFL_USED_IDX), q->ifl_used);
    }
}

/* QueueJournal.own_fd / disown_fd: an fd this worker holds in the fd table its queue's
 * successor inherits, which that successor closes (JournaledArena.reclaim). */
void vfs_jq_own_fd(struct vfs_jq *q, int fd)
{
    int32_t *fds = (int32_t *)jq_w(q, JQ_FDS);
    for (unsigned i = 0; i < JQ_MAX_FDS; i++) {
        if (__atomic_load_n(&fds[i], __ATOMIC_RELAXED) == 0) {
            __atomic_store_n(&fds[i], fd + 1, __ATOMIC_RELEASE);
            return;
        }
    }
}

void vfs_jq_disown_fd(struct vfs_jq *q, int fd)
{
    int32_t *fds = (int32_t *)jq_w(q, JQ_FDS);
    for (unsigned i = 0; i < JQ_MAX_FDS; i++) {
        if (__atomic_load_n(&fds[i], __ATOMIC_RELAXED) == fd + 1) {
            __atomic_store_n(&fds[i], 0, __ATOMIC_RELEASE);
            return;
        }
    }
}

int vfs_jq_pin(struct vfs_jq *q, int kind, uint64_t ident)
{
    uint8_t *kinds = q->base + JQ_PIN_KINDS_OFF;
    for (unsigned i = 0; i < VFS_JQ_MAX_PINS; i++) {
        if (!get64(jq_w(q, JQ_PINS + i))) {
            put8(&kinds[i], (uint8_t)kind);
            put64(jq_w(q, JQ_PINS + i), ident);
            return (int)i;
        }
    }
    return -1;
}

void vfs_jq_unpin(struct vfs_jq *q, int kind, uint64_t ident)
{
    const uint8_t *kinds = q->base + JQ_PIN_KINDS_OFF;
    for (unsigned i = 0; i < VFS_JQ_MAX_PINS; i++) {
        if (get64(jq_w(q, JQ_PINS + i)) == ident && kinds[i] == (uint8_t)kind) {
            put64(jq_w(q, JQ_PINS + i), 0);
            return;
        }
    }
}

/* The owner is stored last: until then the record still describes the previous owner, or (a
 * replay) the same request. */
void vfs_jq_begin_effects(struct vfs_jq *q, uint64_t counter, uint64_t forgets)
{
    put64(jq_w(q, JQ_PENDING_NODE), 0);
    put64(jq_w(q, JQ_EFF_COUNT), 0);
    put64(jq_w(q, JQ_EFF_FORGETS), forgets);
    put64(jq_w(q, JQ_EFF_OWNER), counter + 1);
}

void vfs_jq_add_effect(struct vfs_jq *q, int kind, uint64_t ident)
{
    uint32_t *count = (uint32_t *)jq_w(q, JQ_EFF_COUNT);
    uint64_t effects = JQ_HEADER_SIZE + (uint64_t)q->capacity * JQ_SLOT_SIZE;
    if (!get64(jq_w(q, JQ_EFF_OWNER)))
        return;
    uint32_t n = __atomic_load_n(count, __ATOMIC_RELAXED);
    if (n >= VFS_JQ_MAX_EFFECTS) {
        put32(count + 1, 1);   /* overflow: the rest can only leak */
        return;
    }
    put8(q->base + effects + VFS_JQ_MAX_EFFECTS * 8 + n, (uint8_t)kind);
    put64((uint64_t *)(q->base + effects) + n, ident);
    put32(count, n + 1);        /* commit */
}

void vfs_jq_forgetting(struct vfs_jq *q, uint64_t nodeid, uint64_t before)
{
    if (!get64(jq_w(q, JQ_EFF_OWNER)))
        return;
    put64(jq_w(q, JQ_PENDING_BEFORE), before);
    put64(jq_w(q, JQ_PENDING_INDEX), get64(jq_w(q, JQ_EFF_FORGETS)));
    put64(jq_w(q, JQ_PENDING_NODE), nodeid);
}

/* Counted first: the pending record then names an index already counted, which a replay
 * ignores. */
void vfs_jq_note_forget(struct vfs_jq *q)
{
    if (!get64(jq_w(q, JQ_EFF_OWNER)))
        return;
    put64(jq_w(q, JQ_EFF_FORGETS), get64(jq_w(q, JQ_EFF_FORGETS)) + 1);
    put64(jq_w(q, JQ_PENDING_NODE), 0);
}

/* -- journaled table changes (state.h says the order and why) --------------------------------- */

int vfs_inode_lookup_j(struct vfs_arena *a, struct vfs_jq *q, int fd, uint64_t dev, uint64_t ino,
                       uint64_t mnt_id, uint64_t *nodeid, int *inserted)
{
    int rc = vfs_inode_lookup_or_insert(a, fd, dev, ino, mnt_id, nodeid, inserted);
    if (rc == 0)
        vfs_jq_add_effect(q, VFS_EFFECT_LOOKUP, *nodeid);
    return rc;
}

int vfs_inode_acquire_j(struct vfs_arena *a, struct vfs_jq *q, uint64_t nodeid, int *fd)
{
    int rc = vfs_inode_acquire(a, nodeid, fd);
    if (rc == VFS_OPENED)
        vfs_jq_own_fd(q, *fd);   /* a successor closes it if this worker dies holding it */
    if (rc >= 0)
        vfs_jq_pin(q, VFS_PIN_INODE, nodeid);   /* -1 (no room): the pin may leak, no worse */
    return rc;
}

int vfs_inode_release_j(struct vfs_arena *a, struct vfs_jq *q, uint64_t nodeid)
{
    vfs_jq_unpin(q, VFS_PIN_INODE, nodeid);
    return vfs_inode_release(a, nodeid);
}

int vfs_inode_forget_j(struct vfs_arena *a, struct vfs_jq *q, uint64_t nodeid, uint64_t nlookup)
{
    uint64_t before;
    int rc = inode_forget(a, q, nodeid, nlookup, &before);
    vfs_jq_note_forget(q);
    return rc;
}

int vfs_handle_insert_j(struct vfs_arena *a, struct vfs_jq *q, int fd, uint64_t nodeid,
                        uint32_t flags, uint64_t *fh)
{
    int rc = vfs_handle_insert(a, fd, nodeid, flags, fh);
    if (rc == 0)
        vfs_jq_add_effect(q, VFS_EFFECT_HANDLE, *fh);
    return rc;
}

int vfs_handle_acquire_j(struct vfs_arena *a, struct vfs_jq *q, uint64_t fh, int *fd,
                         uint64_t *nodeid, uint32_t *flags)
{
    int rc = vfs_handle_acquire(a, fh, fd, nodeid, flags);
    if (rc == 0)
        vfs_jq_pin(q, VFS_PIN_HANDLE, fh);
    return rc;
}

int vfs_handle_release_j(struct vfs_arena *a, struct vfs_jq *q, uint64_t fh)
{
    vfs_jq_unpin(q, VFS_PIN_HANDLE, fh);
    return vfs_handle_release(a, fh);
}

void vfs_arena_usage(const struct vfs_arena *a, uint32_t *inodes, uint32_t *handles)
{
    *inodes = __atomic_load_n(&inode_slots(a).hdr->live, __ATOMIC_RELAXED);
    *handles = __atomic_load_n(&handle_slots(a).hdr->live, __ATOMIC_RELAXED);
}

/* -- per-request statistics (common/stats.py) ------------------------------------------------ */

static inline void stats_add(uint64_t *word, uint64_t n)
{
    __atomic_fetch_add(word, n, __ATOMIC_RELAXED);
}

void vfs_stats_record(uint64_t *queue, uint32_t opcode, uint32_t err, uint64_t ns)
{
    uint64_t *op = queue + VFS_STATS_QUEUE_WORDS + VFS_STATS_ERRNOS
                   + (uint64_t)(opcode < VFS_STATS_OPCODES ? opcode : 0) * VFS_STATS_OP_WORDS;
    uint64_t us = ns / 1000 + (ns % 1000 != 0);
    /* Bucket b counts latencies <= 2^b microseconds; the last one everything above. */
    unsigned b = us <= 1 ? 0 : 64 - (unsigned)__builtin_clzll(us - 1);
    if (b >= VFS_STATS_BUCKETS)
        b = VFS_STATS_BUCKETS - 1;
    stats_add(&queue[0], 1);
    stats_add(&op[0], 1);
    stats_add(&op[2], ns);
    stats_add(&op[3 + b], 1);
    if (err) {
        stats_add(&queue[1], 1);
        stats_add(&op[1], 1);
        stats_add(&queue[VFS_STATS_QUEUE_WORDS + (err < VFS_STATS_ERRNOS ? err : 0)], 1);
    }
}

/* -- saving and restoring the tables (common/devstate.py) --------------------------------------- */
/* Both run while no queue serves (the rings are stopped), so a table does not change under a
 * walk; each entry is still read under the lock, as every other reader does. */

int vfs_inode_entry(struct vfs_arena *a, uint32_t slot, uint64_t *nodeid, uint64_t *nlookup,
                    uint64_t *dev, uint64_t *ino, uint64_t *mnt_id, int *fd)
{
    struct slots t = inode_slots(a);
    int rc = -ENOENT;
    if (slot == 0 || slot > t.cap)
        return -EINVAL;
    table_lock(a, &t);
    if (slot >= hwm_of(&t)) {
        rc = -EINVAL;
    } else {
        const struct inode_entry *e = inode_at(&t, slot);
        /* Forgotten entries still pinned are not the guest's any more: not part of a state. */
        if ((e->h.state & LOW32) == ST_LIVE && !dropped(&t, slot, &e->h)) {
            *nodeid = (e->h.state & ~LOW32) | slot;
            *nlookup = e->h.aux;
            *dev = e->dev;
            *ino = e->ino;
            *mnt_id = e->mnt_id;
            *fd = e->h.fd;
            rc = 0;
        }
    }
    table_unlock(&t);
    if (rc == 0 && *fd == VFS_FD_BY_HANDLE) {
        /* Walked while no queue serves: nothing frees the entry meanwhile. */
        int opened = a->mount_fd >= 0 ? open_fh(a, slot) : -EIO;
        *fd = opened >= 0 ? opened : -1;
        rc = opened >= 0 ? VFS_OPENED : 0;
    }
    return rc;
}

int vfs_handle_entry(struct vfs_arena *a, uint32_t slot, uint64_t *fh, uint64_t *nodeid,
                     uint32_t *flags, int *fd)
{
    struct slots t = handle_slots(a);
    int rc = -ENOENT;
    if (!slot_ok(&t, slot))
        return -EINVAL;
    table_lock(a, &t);
    if (slot >= hwm_of(&t)) {
        rc = -EINVAL;
    } else {
        const struct handle_entry *e = (const struct handle_entry *)slot_at(&t, slot);
        if ((e->h.state & LOW32) == ST_LIVE) {
            *fh = (e->h.state & ~LOW32) | slot;
            *nodeid = e->h.aux;
            *flags = e->flags;
            *fd = e->h.fd;
            rc = 0;
        }
    }
    table_unlock(&t);
    return rc;
}

/* Claim exactly the slot and generation `id` names; the caller fills and commits the entry.
 * The free list is left stale: vfs_arena_restored() rebuilds it once all entries are in. */
static struct slot_head *restore_claim(const struct slots *t, uint64_t id, int *rc)
{
    uint32_t slot;
    struct slot_head *e = slot_of_id(t, id, &slot);
    *rc = -EINVAL;
    if (!e || (slot < t->first && slot != 0))
        return NULL;
    *rc = -EEXIST;
    if ((e->state & LOW32) != ST_FREE)
        return NULL;
    if (t->hdr->hwm <= slot)
        t->hdr->hwm = slot + 1;
    *rc = 0;
    return e;
}

int vfs_inode_restore(struct vfs_arena *a, uint64_t nodeid, int fd, uint64_t nlookup,
                      uint64_t dev, uint64_t ino, uint64_t mnt_id)
{
    struct slots t = inode_slots(a);
    struct inode_fh fh = {0, 0, {0}};
    /* Found again by a load, an inode is kept as the lookups of this daemon keep it. */
    int rc, by_handle = fd >= 0 && handle_of(a, fd, mnt_id, &fh);
    table_lock(a, &t);
    struct inode_entry *e = (struct inode_entry *)restore_claim(&t, nodeid, &rc);
    if (e) {
        e->h.aux = nlookup;
        e->h.pins = 0;
        e->h.fd = by_handle ? VFS_FD_BY_HANDLE : fd;
        e->dev = dev;
        e->ino = ino;
        e->mnt_id = mnt_id;
        e->next_free = 0;
        if (by_handle)
            *fh_at(a, (uint32_t)(nodeid & LOW32)) = fh;   /* counted by vfs_arena_restored */
        slot_commit(&e->h, (nodeid & ~LOW32) | ST_LIVE);
    }
    table_unlock(&t);
    if (e && by_handle)
        close_owned(fd);
    return rc;
}

int vfs_handle_restore(struct vfs_arena *a, uint64_t fh, int fd, uint64_t nodeid,
                       uint32_t flags)
{
    struct slots t = handle_slots(a);
    int rc;
    table_lock(a, &t);
    struct handle_entry *e = (struct handle_entry *)restore_claim(&t, fh, &rc);
    if (e) {
        e->h.aux = nodeid;
        e->h.pins = 0;
        e->h.fd = fd;
        e->flags = flags;
        e->next_free = 0;
        slot_commit(&e->h, (fh & ~LOW32) | ST_LIVE);
    }
    table_unlock(&t);
    return rc;
}

void vfs_arena_restored(struct vfs_arena *a)
{
    struct slots it = inode_slots(a), ht = handle_slots(a);
    table_lock(a, &it);
    slots_rebuild(&it);
    index_rebuild(a, &it);
    table_unlock(&it);
    table_lock(a, &ht);
    slots_rebuild(&ht);
    table_unlock(&ht);
}
