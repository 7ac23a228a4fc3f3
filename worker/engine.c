/* The native request engine: one split virtqueue served in C (virtio spec 2.7; protocol.md
 * 2.2-2.5).  Python (worker/engine.py, worker/main.py) keeps the control channel, recovery and
 * every request the engine hands back; worker/virtqueue.py is the reference this must match.
 *
 * Guest-controlled input: the avail ring, the descriptor tables and the request bytes.  The
 * only way from a guest address to host memory is gpa_to_iov() (and ring_ptr() for the ring
 * parts the front-end placed), both overflow-safe.  A chain the engine finds anything wrong
 * with is not diagnosed here: it is handed back (VFS_ENGINE_WALK) and the Python walker, which
 * is the reference, rejects it with its own message, so both planes fail alike. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "dirtylog.h"
#include "engine.h"

#define DESC_SIZE 16u
#define F_NEXT 1u
#define F_WRITE 2u
#define F_INDIRECT 4u
#define AVAIL_F_NO_INTERRUPT 1u
#define USED_F_NO_NOTIFY 1u
#define MAX_INDIRECT (1u << 16)      /* `next` is 16 bits: no chain reaches past this entry */
#define MAX_CHAIN_BYTES (1ull << 32)
#define MIN_IOV 1024u                /* a 1 MiB request in 4 KiB pages, with room to spare */
#define IN_HEADER_SIZE 40u

/* -- guest memory: the one translation gate ---------------------------------------------- */

/* Append host iovecs covering guest-physical [gpa, gpa + len) to iov[*n .. cap).  A buffer is
 * contiguous only in guest-physical space, so it may cross into the next region
 * (protocol.md 5.2).  0, -EFAULT (a byte outside guest memory) or -ENOBUFS (no room). */
static int gpa_to_iov(const struct vfs_engine *e, uint64_t gpa, uint64_t len, struct iovec *iov,
                      uint32_t *n, uint32_t cap) {
    uint64_t last;
    /* The last byte must be addressable; a range may end exactly at 2**64. */
    if (len && __builtin_add_overflow(gpa, len - 1, &last))
        return -EFAULT;
    while (len) {
        const struct vfs_engine_region *r = NULL;
        for (uint32_t i = 0; i < e->nregions; i++) {
            const struct vfs_engine_region *c = &e->regions[i];
            if (gpa >= c->gpa && gpa - c->gpa < c->size) {
                r = c;
                break;
            }
        }
        if (r == NULL)
            return -EFAULT;
        if (*n >= cap)
            return -ENOBUFS;
        uint64_t off = gpa - r->gpa;
        uint64_t k = r->size - off < len ? r->size - off : len;
        iov[*n].iov_base = r->host + off;
        iov[*n].iov_len = (size_t)k;
        (*n)++;
        gpa += k;
        len -= k;
    }
    return 0;
}

/* The host address of guest-physical [gpa, gpa + len) when it lies inside one region. */
static uint8_t *gpa_contiguous(const struct vfs_engine *e, uint64_t gpa, uint64_t len) {
    struct iovec one;
    uint32_t n = 0;
    if (gpa_to_iov(e, gpa, len, &one, &n, 1) != 0 || n != 1)
        return NULL;
    return one.iov_base;
}

/* Front-end user range [uaddr, uaddr + len) inside one region (ring parts, SET_VRING_ADDR). */
static uint8_t *ring_ptr(const struct vfs_engine *e, uint64_t uaddr, uint64_t len) {
    uint64_t last;
    if (len && __builtin_add_overflow(uaddr, len - 1, &last))
        return NULL;
    for (uint32_t i = 0; i < e->nregions; i++) {
        const struct vfs_engine_region *r = &e->regions[i];
        if (uaddr >= r->uaddr && uaddr - r->uaddr <= r->size && len <= r->size - (uaddr - r->uaddr))
            return r->host + (uaddr - r->uaddr);
    }
    return NULL;
}

void vfs_engine_clear_regions(struct vfs_engine *e) { e->nregions = 0; }

int vfs_engine_add_region(struct vfs_engine *e, uint64_t gpa, uint64_t size, uint64_t uaddr,
                          void *host) {
    uint64_t last;
    /* As guestmem.py: a region may end exactly at 2**64, not past it. */
    if (e->nregions >= VFS_ENGINE_MAX_REGIONS || size == 0 || host == NULL
            || __builtin_add_overflow(gpa, size - 1, &last)
            || __builtin_add_overflow(uaddr, size - 1, &last)) {
        snprintf(e->why, sizeof e->why, "region gpa=%#llx size=%#llx: not usable by the engine",
                 (unsigned long long)gpa, (unsigned long long)size);
        return -EINVAL;
    }
    struct vfs_engine_region *r = &e->regions[e->nregions++];
    r->gpa = gpa;
    r->size = size;
    r->uaddr = uaddr;
    r->host = host;
    return 0;
}

/* -- ring memory accesses ---------------------------------------------------------------- */

/* The driver writes these concurrently: every field is loaded once, through a volatile or
 * atomic access, into a local the rest of the code uses (no double fetch). */
static inline uint16_t load16(const uint8_t *p) {
    return __atomic_load_n((const uint16_t *)p, __ATOMIC_RELAXED);
}

static inline void store16(uint8_t *p, uint16_t v) {
    __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELAXED);
}

struct desc { uint64_t addr; uint32_t len; uint16_t flags, next; };

static inline void load_desc(const uint8_t *table, uint32_t i, struct desc *d) {
    /* One copy of the 16 bytes, then decoded from the copy: the guest may place an indirect
     * table at any address (no alignment is promised for guest memory we map), and may change
     * it meanwhile, so every field is read exactly once and without an unaligned load. */
    uint8_t raw[DESC_SIZE];
    memcpy(raw, table + (uint64_t)i * DESC_SIZE, sizeof raw);
    __atomic_signal_fence(__ATOMIC_SEQ_CST);   /* decode the copy, never re-read the table */
    memcpy(&d->addr, raw, 8);
    memcpy(&d->len, raw + 8, 4);
    memcpy(&d->flags, raw + 12, 2);
    memcpy(&d->next, raw + 14, 2);
}

/* -- life cycle ---------------------------------------------------------------------------- */

void vfs_engine_init(struct vfs_engine *e, int chan_fd, struct vfs_jq *jq,
                     struct vfs_arena *arena, uint32_t queue) {
    memset(e, 0, sizeof *e);
    e->arena = arena;
    e->queue = queue;
    e->chan_fd = chan_fd;
    e->call_fd = -1;
    e->err_fd = -1;
    e->jq = jq;
    e->poll_every = 8;
    e->root_fd = -1;
}

void vfs_engine_set_defer(struct vfs_engine *e, uint32_t defer) {
    e->defer = defer;
}

void vfs_engine_set_stats(struct vfs_engine *e, uint64_t *queue_block) {
    e->stats = queue_block;
}

void vfs_engine_fini(struct vfs_engine *e) {
    free(e->dirbuf);
    e->dirbuf = NULL;
    free(e->iov);
    e->iov = NULL;
    e->iov_cap = 0;
    e->size = 0;
}

void vfs_engine_set_fds(struct vfs_engine *e, int call_fd, int err_fd) {
    e->call_fd = call_fd;
    e->err_fd = err_fd;
}

int vfs_engine_start(struct vfs_engine *e, uint32_t size, uint64_t desc, uint64_t avail,
                     uint64_t used, uint16_t next_avail, int event_idx, int indirect) {
    /* The caller validated size and alignment (SplitQueue); checked again, cheaply. */
    if (size == 0 || size > 32768 || (size & (size - 1)) || (desc & 15) || (avail & 1)
            || (used & 3)) {
        snprintf(e->why, sizeof e->why, "ring of %u entries is misplaced", size);
        return -EINVAL;
    }
    /* used_event / avail_event exist only with EVENT_IDX (QEMU vhost_get_{avail,used}_size). */
    uint64_t trailer = event_idx ? 2 : 0;
    uint8_t *d = ring_ptr(e, desc, (uint64_t)DESC_SIZE * size);
    uint8_t *a = ring_ptr(e, avail, 4 + 2ull * size + trailer);
    uint8_t *u = ring_ptr(e, used, 4 + 8ull * size + trailer);
    if (d == NULL || a == NULL || u == NULL) {
        snprintf(e->why, sizeof e->why, "ring of %u entries is not inside guest memory", size);
        return -EINVAL;
    }
    uint32_t cap = 2 * size > MIN_IOV ? 2 * size : MIN_IOV;
    if (cap != e->iov_cap) {
        struct iovec *iov = calloc(cap, sizeof *iov);
        if (iov == NULL)
            return -ENOMEM;
        free(e->iov);
        e->iov = iov;
        e->iov_cap = cap;
    }
    e->size = size;
    e->desc = d;
    e->avail = a;
    e->used = u;
    e->event_idx = event_idx != 0;
    e->indirect = indirect != 0;
    e->next_avail = next_avail;
    e->shadow_avail = next_avail;
    e->next_used = load16(u + 2);
    e->signalled_used = 0;
    e->signalled_valid = 0;
    e->notify_due = 0;
    e->since_poll = 0;
    return 0;
}

void vfs_engine_stop(struct vfs_engine *e) { e->size = 0; }

/* -- dirty-page logging (vhost-user "Migration", protocol.md 1.10) ------------------------- */

/* Logging costs nothing while it is off: the used-ring writers test e->dlog.log once, and
 * every byte of a reply is marked in one place, when the reply is pushed (push_logged), from
 * the descriptors themselves -- whichever plane wrote the reply (a native handler, Python for a
 * deferred or recovered request) and however (copies, preadv straight into guest memory). */

void vfs_engine_set_log(struct vfs_engine *e, uint8_t *log, uint64_t size, int ring,
                        uint64_t used_gpa) {
    e->dlog.log = size ? log : NULL;
    e->dlog.size = size;
    e->dlog.ring = ring != 0;
    e->dlog.used_gpa = used_gpa;
}

/* A write to the used ring at `offset`: logged at log_guest_addr + offset, and only with
 * VHOST_VRING_F_LOG (the address may lie outside guest RAM, spec "Migration"). */
static inline void log_used(const struct vfs_engine *e, uint64_t offset, uint64_t len) {
    uint64_t gpa;
    if (__builtin_expect(e->dlog.log != NULL, 0) && e->dlog.ring
            && !__builtin_add_overflow(e->dlog.used_gpa, offset, &gpa))
        vfs_log_range(e->dlog.log, e->dlog.size, gpa, len);
}

/* An indirect table's descriptor for vfs_log_chain(), through the translation gate. */
static int read_desc_gpa(const void *ctx, uint64_t gpa, uint8_t *out) {
    const struct vfs_engine *e = ctx;
    struct iovec iov[2];
    uint32_t n = 0, done = 0;
    if (gpa_to_iov(e, gpa, DESC_SIZE, iov, &n, 2) != 0)
        return -1;
    for (uint32_t k = 0; k < n; k++) {
        memcpy(out + done, iov[k].iov_base, iov[k].iov_len);
        done += (uint32_t)iov[k].iov_len;
    }
    return 0;
}

/* push() while logging: the reply's pages and the used element are marked before the used idx
 * publishes them, the idx after it is written (Linux vhost's vhost_add_used order). */
static void push_logged(struct vfs_engine *e, uint16_t head, uint32_t used_len) {
    uint32_t slot = e->next_used & (e->size - 1);
    uint8_t *elem = e->used + 4 + 8 * slot;
    vfs_log_chain(e->dlog.log, e->dlog.size, e->desc, e->size, head, used_len, read_desc_gpa,
                  e);
    __atomic_store_n((uint32_t *)elem, (uint32_t)head, __ATOMIC_RELAXED);
    __atomic_store_n((uint32_t *)(elem + 4), used_len, __ATOMIC_RELAXED);
    log_used(e, 4 + 8ull * slot, 8);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    e->next_used++;
    __atomic_store_n((uint16_t *)(e->used + 2), e->next_used, __ATOMIC_RELAXED);
    log_used(e, 2, 2);
}

/* -- notifications (spec 2.7.10) ------------------------------------------------------------ */

static inline int need_event(uint16_t event, uint16_t new_idx, uint16_t old) {
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

static int should_notify(struct vfs_engine *e) {
    /* Store (used idx) -> load (flags / used_event): a full barrier. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (!e->event_idx)
        return !(load16(e->avail) & AVAIL_F_NO_INTERRUPT);
    uint16_t new_idx = e->next_used, old = e->signalled_used;
    int valid = e->signalled_valid;
    e->signalled_used = new_idx;
    e->signalled_valid = 1;
    if (!valid)
        return 1;
    return need_event(load16(e->avail + 4 + 2 * e->size), new_idx, old);
}

static void write_eventfd(int fd) {
    uint64_t one = 1;
    /* EAGAIN: the counter is saturated, the reader is signalled anyway; anything else means
     * the front-end closed its end, which the control plane deals with. */
    ssize_t n = write(fd, &one, sizeof one);
    (void)n;
}

void vfs_engine_notify(struct vfs_engine *e) {
    if (!e->notify_due || e->size == 0)
        return;
    e->notify_due = 0;
    if (should_notify(e) && e->call_fd >= 0) {
        write_eventfd(e->call_fd);
        e->notifies++;
    }
}

/* Ask the driver not to kick while a batch runs (advisory); with EVENT_IDX the avail_event
 * written last by enable_notification already says where the next kick is wanted. */
static void disable_notification(struct vfs_engine *e) {
    if (!e->event_idx) {
        store16(e->used, USED_F_NO_NOTIFY);
        log_used(e, 0, 2);
    }
}

/* Ask for a kick on the next buffer; 1 if buffers are already waiting (then serve them: a chain
 * published before the request became visible would never be kicked for). */
static int enable_notification(struct vfs_engine *e) {
    if (e->event_idx) {
        store16(e->used + 4 + 8 * e->size, e->next_avail);
        log_used(e, 4 + 8ull * e->size, 2);
    } else {
        store16(e->used, 0);
        log_used(e, 0, 2);
    }
    /* Store (avail_event / flags) -> load (avail idx): a full barrier (protocol.md 2.5 step 3). */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return load16(e->avail + 2) != e->next_avail;
}

/* -- push (spec 2.7.8) -------------------------------------------------------------------- */

static void push(struct vfs_engine *e, uint16_t head, uint32_t used_len) {
    if (__builtin_expect(e->dlog.log != NULL, 0)) {
        push_logged(e, head, used_len);
        return;
    }
    uint8_t *elem = e->used + 4 + 8 * (uint32_t)(e->next_used & (e->size - 1));
    __atomic_store_n((uint32_t *)elem, (uint32_t)head, __ATOMIC_RELAXED);
    __atomic_store_n((uint32_t *)(elem + 4), used_len, __ATOMIC_RELAXED);
    /* The element and the reply bytes before the used idx that publishes them (2.7.8.2). */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    e->next_used++;
    __atomic_store_n((uint16_t *)(e->used + 2), e->next_used, __ATOMIC_RELAXED);
}

static void pushed(struct vfs_engine *e, uint16_t head) {
    vfs_jq_pushed(e->jq, head);
    if (e->arena != NULL)
        vfs_counter_add(e->arena, e->queue, 1);
    e->completed++;
    e->notify_due = 1;
}

static void complete(struct vfs_engine *e, uint16_t head, uint32_t used_len) {
    vfs_jq_replied(e->jq, head, used_len, e->next_used);
    push(e, head, used_len);
    pushed(e, head);
}

void vfs_engine_complete(struct vfs_engine *e, uint16_t head, uint32_t used_len) {
    if (e->size == 0)
        return;
    complete(e, head, used_len);
    vfs_engine_notify(e);
}

/* vfs_engine_complete() in its three steps, for a worker with test hooks between them. */
void vfs_engine_replied(struct vfs_engine *e, uint16_t head, uint32_t used_len) {
    if (e->size != 0)
        vfs_jq_replied(e->jq, head, used_len, e->next_used);
}

void vfs_engine_push(struct vfs_engine *e, uint16_t head, uint32_t used_len) {
    if (e->size != 0)
        push(e, head, used_len);
}

void vfs_engine_pushed(struct vfs_engine *e, uint16_t head) {
    if (e->size == 0)
        return;
    pushed(e, head);
    vfs_engine_notify(e);
}

/* -- pop and walk --------------------------------------------------------------------------- */

/* Walk the chain at e->head into e->iov: 0, or -1 when Python must walk it (a rule broken,
 * spec 2.7.5.3 / 2.7.4.2, protocol.md 2.3; or more buffers than the iovec array holds). */
static int walk(struct vfs_engine *e) {
    const uint8_t *table = e->desc;
    uint32_t limit = e->size, count = 0, i = e->head, n = 0, nread = 0;
    uint64_t total = 0, rbytes = 0;
    int in_write = 0, in_table = 0;
    for (;;) {
        struct desc d;
        if (++count > limit)
            return -1;                         /* loop */
        load_desc(table, i, &d);
        if (d.flags & F_INDIRECT) {
            /* The WRITE flag of a descriptor pointing to a table is ignored (2.7.5.3.2). */
            if (in_table || !e->indirect || (d.flags & F_NEXT) || d.len == 0
                    || d.len % DESC_SIZE)
                return -1;
            /* A table straddling two regions is left to Python too (it copies it). */
            table = gpa_contiguous(e, d.addr, d.len);
            if (table == NULL)
                return -1;
            limit = d.len / DESC_SIZE < MAX_INDIRECT ? d.len / DESC_SIZE : MAX_INDIRECT;
            in_table = 1;
            i = 0;
            count = 0;
            continue;
        }
        if (d.flags & F_WRITE)
            in_write = 1;
        else if (in_write)
            return -1;                         /* readable after writable */
        if (d.len) {
            total += d.len;
            if (total > MAX_CHAIN_BYTES)
                return -1;
            if (gpa_to_iov(e, d.addr, d.len, e->iov, &n, e->iov_cap) != 0)
                return -1;
            if (!in_write) {
                nread = n;
                rbytes += d.len;
            }
        }
        if (!(d.flags & F_NEXT))
            break;
        if (d.next >= limit)
            return -1;
        i = d.next;
    }
    e->nreadable = nread;
    e->nwritable = n - nread;
    e->readable_bytes = rbytes;
    e->writable_bytes = total - rbytes;
    return 0;
}

/* Copy the first `len` readable bytes of the chain to `out`; the count copied. */
static uint32_t gather(const struct vfs_engine *e, void *out, uint32_t len) {
    uint8_t *o = out;
    uint32_t done = 0;
    for (uint32_t k = 0; k < e->nreadable && done < len; k++) {
        size_t m = e->iov[k].iov_len < len - done ? e->iov[k].iov_len : len - done;
        memcpy(o + done, e->iov[k].iov_base, m);
        done += (uint32_t)m;
    }
    return done;
}

/* The next avail entry into e->head/e->pos: 1 popped, 0 ring empty, -1 ring broken. */
static int pop(struct vfs_engine *e) {
    uint16_t last = e->next_avail;
    if (last == e->shadow_avail) {
        uint16_t idx = load16(e->avail + 2);
        if (idx == last)
            return 0;
        if ((uint16_t)(idx - last) > e->size) {
            snprintf(e->why, sizeof e->why, "avail idx %u is more than %u ahead of %u",
                     idx, e->size, last);
            return -1;
        }
        /* Ring entries and descriptors are not read before the avail idx that published
         * them (spec 2.7.13, protocol.md 2.5 step 1). */
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        e->shadow_avail = idx;
    }
    uint16_t head = load16(e->avail + 4 + 2 * (uint32_t)(last & (e->size - 1)));
    if (head >= e->size) {
        snprintf(e->why, sizeof e->why, "avail ring entry %u names descriptor %u >= %u",
                 last, head, e->size);
        return -1;
    }
    e->pos = last;
    e->head = head;
    e->next_avail = (uint16_t)(last + 1);
    return 1;
}

/* The decimal name of `fd` in /proc/self/fd, into `name` (16 bytes): snprintf's work for the
 * one case the handlers need, on every path through the proc directory. */
static void fd_name(char name[16], int fd) {
    char tmp[16];
    unsigned v = fd < 0 ? 0 : (unsigned)fd;
    int n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    for (int k = 0; k < n; k++)
        name[k] = tmp[n - 1 - k];
    name[n] = 0;
}

/* -- native handlers --------------------------------------------------------------------- */

/* Each mirrors the Python FuseServer + PassthroughFs path for the same request (the reference)
 * and must reply byte for byte what it replies.  Whatever that path treats specially is not
 * served here: the handler returns DEFER before it has changed anything, and Python answers. */
#define DEFER (-1)
#define OUT_HEADER_SIZE 16u
#define MAX_REQUEST ((1u << 20) + 0x1000)  /* fuse_server._MAX_REQUEST */
#define SYS_IOV_MAX 1024

enum {
    OP_LOOKUP = 1, OP_FORGET = 2, OP_GETATTR = 3, OP_SETATTR = 4, OP_SYMLINK = 6, OP_MKNOD = 8,
    OP_MKDIR = 9, OP_OPEN = 14, OP_READ = 15, OP_WRITE = 16, OP_STATFS = 17, OP_RELEASE = 18,
    OP_SETXATTR = 21, OP_GETXATTR = 22, OP_LISTXATTR = 23, OP_REMOVEXATTR = 24, OP_FLUSH = 25,
    OP_INIT = 26, OP_OPENDIR = 27, OP_RELEASEDIR = 29, OP_ACCESS = 34, OP_CREATE = 35,
    OP_BATCH_FORGET = 42, OP_READDIRPLUS = 44, OP_TMPFILE = 51,
};
#define WRITE_CACHE 1u
#define WRITE_KILL_SUIDGID 4u

struct fuse_out_header { uint32_t len; int32_t error; uint64_t unique; };
struct fuse_attr {
    uint64_t ino, size, blocks;
    int64_t atime, mtime, ctime;
    uint32_t atimensec, mtimensec, ctimensec, mode, nlink, uid, gid, rdev, blksize, flags;
};
struct fuse_entry_out {
    uint64_t nodeid, generation, entry_valid, attr_valid;
    uint32_t entry_valid_nsec, attr_valid_nsec;
    struct fuse_attr attr;
};
struct fuse_attr_out { uint64_t attr_valid; uint32_t attr_valid_nsec, dummy; struct fuse_attr attr; };
struct fuse_kstatfs {
    uint64_t blocks, bfree, bavail, files, ffree;
    uint32_t bsize, namelen, frsize, padding, spare[6];
};
struct fuse_read_in { uint64_t fh, offset; uint32_t size, read_flags; uint64_t lock_owner;
                      uint32_t flags, padding; };
struct fuse_write_in { uint64_t fh, offset; uint32_t size, write_flags; uint64_t lock_owner;
                       uint32_t flags, padding; };
struct fuse_flush_in { uint64_t fh; uint32_t unused, padding; uint64_t lock_owner; };
struct fuse_release_in { uint64_t fh; uint32_t flags, release_flags; uint64_t lock_owner; };
#define FUSE_RELEASE_FLOCK_UNLOCK (1u << 1)
struct fuse_access_in { uint32_t mask, padding; };
_Static_assert(sizeof(struct fuse_attr_out) == 104, "fuse_attr_out");
_Static_assert(sizeof(struct fuse_entry_out) == 128, "fuse_entry_out");
_Static_assert(sizeof(struct fuse_kstatfs) == 80, "fuse_kstatfs");
_Static_assert(sizeof(struct fuse_read_in) == 40, "fuse_read_in");
_Static_assert(sizeof(struct fuse_write_in) == 40, "fuse_write_in");
_Static_assert(sizeof(struct fuse_flush_in) == 24, "fuse_flush_in");
_Static_assert(sizeof(struct fuse_release_in) == 24, "fuse_release_in");
_Static_assert(sizeof(struct vfs_fuse_in) == IN_HEADER_SIZE, "fuse_in_header");

/* Copy `len` bytes at `off` of the readable part to `out` (the caller checked they exist). */
static void read_at(const struct vfs_engine *e, uint64_t off, void *out, uint64_t len) {
    uint8_t *o = out;
    for (uint32_t k = 0; k < e->nreadable && len; k++) {
        uint64_t n = e->iov[k].iov_len;
        if (off >= n) {
            off -= n;
            continue;
        }
        uint64_t m = n - off < len ? n - off : len;
        memcpy(o, (uint8_t *)e->iov[k].iov_base + off, m);
        o += m;
        len -= m;
        off = 0;
    }
}

/* Write `len` bytes at `off` of the writable part (the caller checked the room). */
static void write_at(const struct vfs_engine *e, uint64_t off, const void *src, uint64_t len) {
    const uint8_t *s = src;
    const struct iovec *w = e->iov + e->nreadable;
    for (uint32_t k = 0; k < e->nwritable && len; k++) {
        uint64_t n = w[k].iov_len;
        if (off >= n) {
            off -= n;
            continue;
        }
        uint64_t m = n - off < len ? n - off : len;
        memcpy((uint8_t *)w[k].iov_base + off, s, m);
        s += m;
        len -= m;
        off = 0;
    }
}

/* Up to `len` bytes from byte `skip` of `src` (`n` buffers) as iovecs in `out` (at most
 * `cap`); returns how many. */
static uint32_t sub_iov(const struct iovec *src, uint32_t n, uint64_t skip, uint64_t len,
                        struct iovec *out, uint32_t cap) {
    uint32_t m = 0;
    for (uint32_t k = 0; k < n && len && m < cap; k++) {
        uint64_t l = src[k].iov_len;
        if (skip >= l) {
            skip -= l;
            continue;
        }
        uint64_t take = l - skip < len ? l - skip : len;
        out[m].iov_base = (uint8_t *)src[k].iov_base + skip;
        out[m].iov_len = (size_t)take;
        m++;
        len -= take;
        skip = 0;
    }
    return m;
}

/* The reply header, then `body`: its used length.  The caller checked the room. */
static int64_t reply(struct vfs_engine *e, const void *body, uint32_t len) {
    struct fuse_out_header h = {OUT_HEADER_SIZE + len, 0, e->in.unique};
    write_at(e, 0, &h, sizeof h);
    if (len)
        write_at(e, sizeof h, body, len);
    return OUT_HEADER_SIZE + len;
}

/* An error: the header alone (protocol.md 4.2; FuseServer._error maps out-of-range to EIO). */
static int64_t reply_error(struct vfs_engine *e, int err) {
    if (err <= 0 || err >= 512)
        err = EIO;
    struct fuse_out_header h = {OUT_HEADER_SIZE, -err, e->in.unique};
    write_at(e, 0, &h, sizeof h);
    e->last_err = err;
    return OUT_HEADER_SIZE;
}

/* PassthroughFs._as_caller: the caller's fsuid/fsgid and (no extension: none) supplementary
 * groups.  0, or DEFER when a switch fails (Python repeats it and answers the error). */
static int as_caller(struct vfs_engine *e) {
    struct vfs_engine_fs *fs = &e->fs;
    if (!fs->switch_creds)
        return 0;
    uint32_t gid = e->in.gid, uid = e->in.uid;
    if (gid != fs->fsgid) {
        setfsgid(gid);
        /* setfsgid reports the previous id and never fails visibly; ask again to know. */
        if ((uint32_t)setfsgid(gid) != gid)
            return DEFER;
        fs->fsgid = gid;
    }
    if (uid != fs->fsuid) {
        setfsuid(uid);
        if ((uint32_t)setfsuid(uid) != uid)
            return DEFER;
        fs->fsuid = uid;
    }
    if (!fs->groups_empty && fs->set_groups) {
        if (setgroups(0, NULL) != 0) {
            if (errno != EPERM)
                return DEFER;
            /* A user namespace with setgroups denied (user_namespaces(7)). */
            fs->set_groups = 0;
            return 0;
        }
        fs->groups_empty = 1;
    }
    return 0;
}

/* Pin an inode / a handle, journaled as JournaledInodes/JournaledHandles do it: the pin is
 * recorded after it is taken and forgotten before it is released. */
static int pin_inode(struct vfs_engine *e, uint64_t nodeid, int *fd) {
    if (e->nopened == sizeof e->opened / sizeof e->opened[0])
        return -EMFILE;
    int rc = vfs_inode_acquire(e->arena, nodeid, fd);
    /* -EIO: an inode a restored state could not find again (vfs_inode_restore); an inode
     * kept as a file handle answers what open_by_handle_at(2) said (ESTALE: the file is gone),
     * as PassthroughFs does. */
    if (rc < 0)
        return rc == -EBADF || rc == -EINVAL ? -EBADF : rc;
    if (rc == VFS_OPENED) {
        e->opened[e->nopened++] = (struct vfs_engine_opened){nodeid, *fd};
        vfs_jq_own_fd(e->jq, *fd);   /* closed by a successor if this worker dies now */
    }
    vfs_jq_pin(e->jq, VFS_PIN_INODE, nodeid);
    return 0;
}

static void unpin_inode(struct vfs_engine *e, uint64_t nodeid) {
    vfs_jq_unpin(e->jq, VFS_PIN_INODE, nodeid);
    vfs_inode_release(e->arena, nodeid);
    /* The fd opened for the latest pin of `nodeid`, if it was kept as a file handle. */
    for (uint32_t i = e->nopened; i-- > 0;) {
        if (e->opened[i].nodeid == nodeid) {
            int fd = e->opened[i].fd;
            e->opened[i] = e->opened[--e->nopened];
            vfs_jq_disown_fd(e->jq, fd);
            /* Checked and ignored: an O_PATH fd, released by Linux whatever close says. */
            int rc = close(fd);
            (void)rc;
            return;
        }
    }
}

/* PassthroughFs._pin_handle: EBADF unless `fh` belongs to `nodeid` (virtiofsd). */
static int pin_handle(struct vfs_engine *e, uint64_t fh, uint64_t nodeid, int *fd) {
    uint64_t owner;
    uint32_t flags;
    int rc = vfs_handle_acquire(e->arena, fh, fd, &owner, &flags);
    if (rc != 0)
        return rc == -EIO ? -EIO : -EBADF;
    vfs_jq_pin(e->jq, VFS_PIN_HANDLE, fh);
    if (owner != nodeid) {
        vfs_jq_unpin(e->jq, VFS_PIN_HANDLE, fh);
        vfs_handle_release(e->arena, fh);
        return -EBADF;
    }
    return 0;
}

static void unpin_handle(struct vfs_engine *e, uint64_t fh) {
    vfs_jq_unpin(e->jq, VFS_PIN_HANDLE, fh);
    vfs_handle_release(e->arena, fh);
}

/* fuse_server.attr_fields: fuse_attr of a stat result. */
static void fill_attr(struct fuse_attr *a, const struct stat *st, uint32_t flags) {
    a->ino = st->st_ino;
    a->size = (uint64_t)st->st_size;
    a->blocks = (uint64_t)st->st_blocks;
    a->atime = st->st_atim.tv_sec;
    a->mtime = st->st_mtim.tv_sec;
    a->ctime = st->st_ctim.tv_sec;
    a->atimensec = (uint32_t)st->st_atim.tv_nsec;
    a->mtimensec = (uint32_t)st->st_mtim.tv_nsec;
    a->ctimensec = (uint32_t)st->st_ctim.tv_nsec;
    a->mode = st->st_mode;
    a->nlink = (uint32_t)st->st_nlink;
    a->uid = st->st_uid;
    a->gid = st->st_gid;
    /* glibc's dev_t equals the kernel's new_encode_dev() for every major < 4096 and minor
     * < 2**20, which is what fuse_attr.rdev carries. */
    a->rdev = (uint32_t)st->st_rdev;
    a->blksize = (uint32_t)st->st_blksize;
    a->flags = flags;
}

static int64_t do_getattr(struct vfs_engine *e, uint64_t body_len) {
    /* fuse_getattr_in: the fh adds nothing (an open file is the inode's file). */
    if (body_len < 16 || e->writable_bytes < OUT_HEADER_SIZE + sizeof(struct fuse_attr_out))
        return DEFER;
    if (as_caller(e))
        return DEFER;
    int fd, rc;
    struct stat st;
    if ((rc = pin_inode(e, e->in.nodeid, &fd)) != 0)
        return reply_error(e, -rc);
    int err = fstat(fd, &st) != 0 ? errno : 0;
    unpin_inode(e, e->in.nodeid);
    if (err)
        return reply_error(e, err);
    if (st.st_nlink > UINT32_MAX)
        return DEFER;                         /* Python's struct refuses it: let it answer */
    struct fuse_attr_out out = {.attr_valid = e->fs.timeout};
    fill_attr(&out.attr, &st, 0);
    return reply(e, &out, sizeof out);
}

static int64_t do_statfs(struct vfs_engine *e) {
    if (e->writable_bytes < OUT_HEADER_SIZE + sizeof(struct fuse_kstatfs))
        return DEFER;
    if (as_caller(e))
        return DEFER;
    int fd, rc;
    struct statvfs s;
    if ((rc = pin_inode(e, e->in.nodeid, &fd)) != 0)
        return reply_error(e, -rc);
    int err = fstatvfs(fd, &s) != 0 ? errno : 0;
    unpin_inode(e, e->in.nodeid);
    if (err)
        return reply_error(e, err);
    if (s.f_bsize > UINT32_MAX || s.f_namemax > UINT32_MAX || s.f_frsize > UINT32_MAX)
        return DEFER;
    struct fuse_kstatfs out = {
        .blocks = s.f_blocks, .bfree = s.f_bfree, .bavail = s.f_bavail, .files = s.f_files,
        .ffree = s.f_ffree, .bsize = (uint32_t)s.f_bsize, .namelen = (uint32_t)s.f_namemax,
        .frsize = (uint32_t)s.f_frsize,
    };
    return reply(e, &out, sizeof out);
}

/* preadv/pwritev of `len` bytes from byte `skip` of `bufs`, continuing after short transfers
 * as PassthroughFs.read/write do; the bytes moved, or -errno. */
static int64_t transfer(struct vfs_engine *e, int fd, int writing, const struct iovec *bufs,
                        uint32_t nbufs, uint64_t skip, uint64_t len, uint64_t offset) {
    struct iovec *part = e->iov + e->nreadable + e->nwritable;
    uint32_t room = e->iov_cap - e->nreadable - e->nwritable;
    uint64_t total = 0;
    for (;;) {
        uint32_t m = sub_iov(bufs, nbufs, skip + total, len - total, part,
                             room < SYS_IOV_MAX ? room : SYS_IOV_MAX);
        ssize_t n = writing ? pwritev(fd, part, (int)m, (off_t)(offset + total))
                            : preadv(fd, part, (int)m, (off_t)(offset + total));
        if (n < 0) {
            if (errno == EINTR)
                continue;                     /* as Python's os.preadv (PEP 475) */
            return -errno;
        }
        total += (uint64_t)n;
        if (n == 0 || total >= len)
            return (int64_t)total;
    }
}

static int64_t do_read(struct vfs_engine *e, uint64_t body_len) {
    struct fuse_read_in in;
    if (body_len < sizeof in || e->writable_bytes < OUT_HEADER_SIZE)
        return DEFER;
    /* The iovecs of the destination need room after the chain's own. */
    if (e->iov_cap - e->nreadable - e->nwritable < e->nwritable)
        return DEFER;
    read_at(e, IN_HEADER_SIZE, &in, sizeof in);
    if (as_caller(e))
        return DEFER;
    int fd, rc;
    if ((rc = pin_handle(e, in.fh, e->in.nodeid, &fd)) != 0)
        return reply_error(e, -rc);
    uint64_t want = e->writable_bytes - OUT_HEADER_SIZE;
    if (in.size < want)
        want = in.size;
    int64_t n = in.offset >= (1ull << 63) ? -EINVAL
              : transfer(e, fd, 0, e->iov + e->nreadable, e->nwritable, OUT_HEADER_SIZE, want,
                         in.offset);
    unpin_handle(e, in.fh);
    if (n < 0)
        return reply_error(e, (int)-n);
    struct fuse_out_header h = {OUT_HEADER_SIZE + (uint32_t)n, 0, e->in.unique};
    write_at(e, 0, &h, sizeof h);
    return h.len;
}

static int64_t do_write(struct vfs_engine *e, uint64_t body_len) {
    struct fuse_write_in in;
    if (body_len < sizeof in || e->fs.readonly
            || e->writable_bytes < OUT_HEADER_SIZE + 8
            || e->iov_cap - e->nreadable - e->nwritable < e->nreadable)
        return DEFER;
    read_at(e, IN_HEADER_SIZE, &in, sizeof in);
    /* Too large a size is Python's EINVAL; O_APPEND writes are journaled as non-idempotent
     * (worker/recovery.py) and KILL_SUIDGID drops privileges: all answered by Python. */
    if (in.size > body_len - sizeof in || (in.write_flags & WRITE_KILL_SUIDGID)
            || ((in.flags & O_APPEND) && !(in.write_flags & WRITE_CACHE)))
        return DEFER;
    if (as_caller(e))
        return DEFER;
    int fd, rc;
    if ((rc = pin_handle(e, in.fh, e->in.nodeid, &fd)) != 0)
        return reply_error(e, -rc);
    int64_t n = in.offset >= (1ull << 63) ? -EINVAL
              : transfer(e, fd, 1, e->iov, e->nreadable, IN_HEADER_SIZE + sizeof in, in.size,
                         in.offset);
    unpin_handle(e, in.fh);
    if (n < 0)
        return reply_error(e, (int)-n);
    uint32_t out[2] = {(uint32_t)n, 0};
    return reply(e, out, sizeof out);
}

/* Locks to release on this FLUSH or RELEASE: Python's (see lock_owners in engine.h). */
static int locks_to_release(const struct vfs_engine *e, uint32_t release_flags) {
    const uint32_t *owners = e->fs.lock_owners;
    if (e->in.opcode == OP_RELEASE && (release_flags & FUSE_RELEASE_FLOCK_UNLOCK))
        return 1;
    return (e->in.opcode == OP_FLUSH || e->in.opcode == OP_RELEASE) && owners != NULL
        && __atomic_load_n(owners, __ATOMIC_ACQUIRE) != 0;
}

static int64_t do_flush(struct vfs_engine *e, uint64_t body_len) {
    struct fuse_flush_in in;
    if (body_len < sizeof in || e->writable_bytes < OUT_HEADER_SIZE)
        return DEFER;
    if (locks_to_release(e, 0))
        return DEFER;
    read_at(e, IN_HEADER_SIZE, &in, sizeof in);
    if (as_caller(e))
        return DEFER;
    int fd, rc;
    if ((rc = pin_handle(e, in.fh, e->in.nodeid, &fd)) != 0)
        return reply_error(e, -rc);
    /* The guest closed one of its descriptors: closing a duplicate does what that close does
     * on the host (write-back errors, POSIX locks dropped) -- virtiofsd. */
    int err = 0, d = dup(fd);
    if (d < 0)
        err = errno;
    else if (close(d) != 0)
        err = errno;
    unpin_handle(e, in.fh);
    return err ? reply_error(e, err) : reply(e, NULL, 0);
}

static int64_t do_release(struct vfs_engine *e, uint64_t body_len) {
    struct fuse_release_in in;
    if (body_len < sizeof in || e->writable_bytes < OUT_HEADER_SIZE)
        return DEFER;
    read_at(e, IN_HEADER_SIZE, &in, sizeof in);
    if (locks_to_release(e, in.release_flags))
        return DEFER;
    int fd, rc;
    if ((rc = pin_handle(e, in.fh, e->in.nodeid, &fd)) != 0)
        return reply_error(e, -rc);
    rc = vfs_handle_remove(e->arena, in.fh);
    unpin_handle(e, in.fh);              /* the fd closes here, or at the last user's unpin */
    return rc ? reply_error(e, -rc) : reply(e, NULL, 0);
}

static int64_t do_access(struct vfs_engine *e, uint64_t body_len) {
    struct fuse_access_in in;
    if (body_len < sizeof in || e->writable_bytes < OUT_HEADER_SIZE)
        return DEFER;
    read_at(e, IN_HEADER_SIZE, &in, sizeof in);
    uint32_t mask = in.mask & (R_OK | W_OK | X_OK);
    if ((mask & W_OK) && e->fs.readonly)
        return DEFER;
    if (as_caller(e))
        return DEFER;
    int fd, rc;
    if ((rc = pin_inode(e, e->in.nodeid, &fd)) != 0)
        return reply_error(e, -rc);
    char name[16];
    fd_name(name, fd);
    /* AT_EACCESS: with the fsuid/fsgid, groups and capabilities in force, the caller's. */
    int err = faccessat(e->fs.proc_fd, name, (int)mask, AT_EACCESS) != 0 ? errno : 0;
    unpin_inode(e, e->in.nodeid);
    return err ? reply_error(e, err) : reply(e, NULL, 0);
}

/* -- LOOKUP (PassthroughFs.lookup) -- */
#define NAME_MAX_FUSE 255
#define STATX_MNT_ID_BIT 0x1000u
#define STATX_MNT_ID_OFF 144
#define ATTR_SUBMOUNT 1u
#define RESOLVE_LOOKUP (0x08 | 0x04 | 0x02)  /* BENEATH | NO_SYMLINKS | NO_MAGICLINKS */
#ifndef SYS_openat2
#define SYS_openat2 437
#endif

/* openat2(2) kept beneath `dir` (passthrough._open_beneath); -errno on failure. */
static int open_beneath(int dir, const char *name, uint64_t flags) {
    uint64_t how[3] = {flags | O_NOFOLLOW, 0, RESOLVE_LOOKUP};
    long fd = syscall(SYS_openat2, dir, name, how, sizeof how);
    return fd < 0 ? -errno : (int)fd;
}

/* The mount id (statx STATX_MNT_ID), 0 when the kernel does not say; -errno on failure. */
static int64_t mnt_id(int fd) {
    uint64_t buf[32];                             /* struct statx is 256 bytes */
    memset(buf, 0, sizeof buf);
    if (statx(fd, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW, STATX_MNT_ID_BIT,
              (struct statx *)buf) != 0)
        return -errno;
    uint32_t mask;
    memcpy(&mask, buf, sizeof mask);
    return (mask & STATX_MNT_ID_BIT) ? (int64_t)buf[STATX_MNT_ID_OFF / 8] : 0;
}

/* fstat(2) and mnt_id() of `fd` in one statx(2): 0, or -errno.  The fields are those fstat
 * reports, from the same kernel attributes (cp_new_stat): device numbers new_encode_dev()d,
 * EOVERFLOW where that encoding cannot hold them. */
static int stat_mnt(int fd, struct stat *st, int64_t *mnt) {
    union { struct statx x; uint64_t raw[32]; } b;
    _Static_assert(sizeof b == 256, "struct statx");
    memset(&b, 0, sizeof b);
    if (statx(fd, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW, STATX_BASIC_STATS | STATX_MNT_ID_BIT,
              &b.x) != 0)
        return -errno;
    const struct statx *x = &b.x;
    if (x->stx_dev_major >= 4096 || x->stx_dev_minor >= (1u << 20)
            || x->stx_rdev_major >= 4096 || x->stx_rdev_minor >= (1u << 20))
        return -EOVERFLOW;
    memset(st, 0, sizeof *st);
    st->st_dev = (x->stx_dev_minor & 0xff) | (x->stx_dev_major << 8)
               | ((uint64_t)(x->stx_dev_minor & ~0xffu) << 12);
    st->st_rdev = (x->stx_rdev_minor & 0xff) | (x->stx_rdev_major << 8)
                | ((uint64_t)(x->stx_rdev_minor & ~0xffu) << 12);
    st->st_ino = x->stx_ino;
    st->st_mode = x->stx_mode;
    st->st_nlink = x->stx_nlink;
    st->st_uid = x->stx_uid;
    st->st_gid = x->stx_gid;
    st->st_size = (off_t)x->stx_size;
    st->st_blksize = x->stx_blksize;
    st->st_blocks = (blkcnt_t)x->stx_blocks;
    st->st_atim = (struct timespec){x->stx_atime.tv_sec, x->stx_atime.tv_nsec};
    st->st_mtim = (struct timespec){x->stx_mtime.tv_sec, x->stx_mtime.tv_nsec};
    st->st_ctim = (struct timespec){x->stx_ctime.tv_sec, x->stx_ctime.tv_nsec};
    *mnt = (x->stx_mask & STATX_MNT_ID_BIT) ? (int64_t)b.raw[STATX_MNT_ID_OFF / 8] : 0;
    return 0;
}

/* /proc/self/fd/N's target into `out` (NUL-terminated): its length, -errno, or -ENAMETOOLONG
 * when it does not fit (then Python, which has no limit, answers). */
static int fd_path(const struct vfs_engine *e, int fd, char *out, size_t size) {
    char name[16];
    fd_name(name, fd);
    ssize_t n = readlinkat(e->fs.proc_fd, name, out, size);
    if (n < 0)
        return -errno;
    if ((size_t)n >= size)
        return -ENAMETOOLONG;
    out[n] = 0;
    return (int)n;
}

/* PassthroughFs._reachable, run as the daemon: 0, -errno to answer, or DEFER.  Without
 * `directory` (an inode about to change, _check_inode_beneath) a non-directory passes when it
 * has no name left, or when the kernel's name for it ends in " (deleted)". */
static int reachable(struct vfs_engine *e, int fd, int directory) {
    struct stat have, found;
    char path[sizeof e->root_path];
    if (fstat(fd, &have) != 0)
        return -errno;
    if (!S_ISDIR(have.st_mode)) {
        if (directory)
            return -ENOTDIR;              /* what resolving a name in it would say */
        if (have.st_nlink == 0)
            return 0;
    }
    int n = fd_path(e, fd, path, sizeof path);
    if (n == -ENAMETOOLONG)
        return DEFER;
    if (n < 0)
        return n;
    const char *root = e->root_path;
    size_t rlen = e->root_len;
    int ok;
    if (rlen == 1 && root[0] == '/') {
        /* The share is this process's root: reaching this very inode is the question. */
        const char *rel = path;
        while (*rel == '/')
            rel++;
        ok = fstatat(e->root_fd, *rel ? rel : ".", &found, AT_SYMLINK_NOFOLLOW) == 0;
    } else {
        if ((size_t)n < rlen || memcmp(path, root, rlen) != 0
                || (path[rlen] != 0 && path[rlen] != '/'))
            return -ENOENT;
        const char *rel = path + rlen;
        while (*rel == '/')
            rel++;
        int rfd = open_beneath(e->root_fd, *rel ? rel : ".",
                               O_PATH | (directory ? O_DIRECTORY : 0) | O_CLOEXEC);
        if (rfd == -ENOSYS)
            return DEFER;
        ok = rfd >= 0 && fstat(rfd, &found) == 0;
        if (rfd >= 0)
            close(rfd);
    }
    if (ok && found.st_dev == have.st_dev && found.st_ino == have.st_ino)
        return 0;
    static const char deleted[] = " (deleted)";
    size_t dl = sizeof deleted - 1;
    if (!directory && (size_t)n >= dl && memcmp(path + n - dl, deleted, dl) == 0)
        return 0;
    return -ENOENT;
}

/* reachable() with the daemon's own fsuid (PassthroughFs._check_beneath with `directory`,
 * _check_inode_beneath without). */
static int check_reachable(struct vfs_engine *e, int fd, int directory) {
    if (e->root_len == 0) {
        int rfd;
        if (pin_inode(e, VFS_ROOT_ID, &rfd) != 0)
            return DEFER;
        int n = fd_path(e, rfd, e->root_path, sizeof e->root_path);
        unpin_inode(e, VFS_ROOT_ID);
        if (n <= 0)
            return DEFER;
        /* The root is never forgotten: its fd stays valid for the worker's lifetime. */
        e->root_fd = rfd;
        e->root_len = (uint32_t)n;
    }
    uint32_t fsuid = e->fs.fsuid;
    int as_daemon = e->fs.switch_creds && fsuid != e->fs.euid;
    if (as_daemon)
        setfsuid(e->fs.euid);
    int r = reachable(e, fd, directory);
    if (as_daemon)
        setfsuid(fsuid);
    return r;
}

static int check_beneath(struct vfs_engine *e, int dir_fd) {
    return check_reachable(e, dir_fd, 1);
}

/* PassthroughFs._register: count one lookup of the inode behind the O_PATH `fd` (owned by
 * this call) found in the directory `pfd`, journaled as an effect: 0 with `out` filled, -errno,
 * or DEFER. */
static int register_fd(struct vfs_engine *e, int pfd, int fd, struct fuse_entry_out *out) {
    struct stat st, pst;
    uint32_t flags = 0;
    int64_t mnt = 0;
    memset(&st, 0, sizeof st);
    int err = stat_mnt(fd, &st, &mnt);
    if (!err && st.st_nlink > UINT32_MAX)
        err = DEFER;                      /* Python's struct refuses it: let it answer */
    if (!err && e->fs.submounts && S_ISDIR(st.st_mode)) {
        /* A directory on another filesystem or mount is a submount (FUSE_ATTR_SUBMOUNT). */
        if (fstat(pfd, &pst) != 0) {
            err = -errno;
        } else if (pst.st_dev != st.st_dev) {
            flags = ATTR_SUBMOUNT;
        } else {
            int64_t pm = mnt_id(pfd);
            if (pm < 0)
                err = (int)pm;
            else if (pm != mnt)
                flags = ATTR_SUBMOUNT;
        }
    }
    int inserted = 0;
    memset(out, 0, sizeof *out);
    if (!err) {
        int rc = vfs_inode_lookup_or_insert(e->arena, fd, st.st_dev, st.st_ino, (uint64_t)mnt,
                                            &out->nodeid, &inserted);
        if (rc != 0)
            err = rc;
        else
            vfs_jq_add_effect(e->jq, VFS_EFFECT_LOOKUP, out->nodeid);
    }
    if (!inserted)
        close(fd);
    if (err)
        return err;
    out->entry_valid = e->fs.timeout;
    out->attr_valid = e->fs.timeout;
    fill_attr(&out->attr, &st, flags);
    return 0;
}

/* PassthroughFs._lookup_at of a checked `name` in the directory `pfd` (pinned, beneath the
 * root), the caller's credentials in force: 0 with `out` filled (one lookup counted,
 * journaled as an effect), -errno, or DEFER (EACCES and EPERM included: Python serves those
 * again with the directory's group, member retry). */
static int lookup_in(struct vfs_engine *e, int pfd, const char *name,
                     struct fuse_entry_out *out) {
    int fd = open_beneath(pfd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
    if (fd == -ENOSYS || fd == -EACCES || fd == -EPERM)
        return DEFER;
    if (fd < 0)
        return fd;
    return register_fd(e, pfd, fd, out);
}

/* PassthroughFs.lookup of a checked `name` in `parent`: lookup_in() after the parent is
 * pinned and checked to be beneath the root. */
static int lookup_name(struct vfs_engine *e, uint64_t parent, const char *name,
                       struct fuse_entry_out *out) {
    int pfd, rc;
    if ((rc = pin_inode(e, parent, &pfd)) != 0)
        return rc;
    int r = check_beneath(e, pfd);
    if (r == 0)
        r = lookup_in(e, pfd, name, out);
    unpin_inode(e, parent);
    return r == -EACCES || r == -EPERM ? DEFER : r;
}

static int64_t do_lookup(struct vfs_engine *e, uint64_t body_len) {
    char name[NAME_MAX_FUSE + 2];
    if (e->writable_bytes < OUT_HEADER_SIZE + sizeof(struct fuse_entry_out))
        return DEFER;
    /* fuse_server._name: exactly one NUL-terminated name; '.', '..', long or odd names are
     * Python's. */
    if (body_len < 2 || body_len > NAME_MAX_FUSE + 1)
        return DEFER;
    read_at(e, IN_HEADER_SIZE, name, body_len);
    if (name[body_len - 1] != 0 || memchr(name, 0, body_len - 1) != NULL
            || memchr(name, '/', body_len - 1) != NULL || strcmp(name, ".") == 0
            || strcmp(name, "..") == 0)
        return DEFER;
    if (as_caller(e))
        return DEFER;
    struct fuse_entry_out out;
    int r = lookup_name(e, e->in.nodeid, name, &out);
    if (r == DEFER)
        return DEFER;
    if (r < 0)
        return reply_error(e, -r);
    return reply(e, &out, sizeof out);
}

/* -- READDIRPLUS (FuseServer._readdirplus over PassthroughFs.readdir and lookup) -- */
#define MAX_DIR_BUFFER (1u << 20)          /* passthrough.MAX_BUFFER_SIZE */
#define DIRENT_HEAD 24u                    /* fuse_dirent before the name */

struct fuse_dirent_head { uint64_t ino, off; uint32_t namelen, type; };

#define DIRENT64_MIN 24u                   /* the smallest getdents64 record */
#define DIRENT64_MAX 280u                  /* the largest: a NAME_MAX name */
#define DIRENTPLUS_MIN 160u                /* the smallest reply record: a 1-byte name */

/* The next getdents64 read of a READDIRPLUS: about as many records as `room` bytes of reply
 * take, guessed from the average record `avg` so far, and no more than `left` bytes (what
 * Python's one buffer has left).  Reading no further than the reply uses keeps the directory's
 * position where the next request starts: ext4 then goes on with the hash-ordered listing it
 * built, rather than building it again for every reply (ext4_dx_readdir). */
static uint64_t dir_chunk(uint64_t room, uint64_t avg, uint64_t left) {
    /* A reply record is its getdents64 record plus 128 to 136 bytes (fuse_entry_out and the
     * fuse_dirent head replace the 19-byte head, both rounded to 8). */
    uint64_t c = room * avg / (avg + 136);
    if (c < DIRENT64_MIN)
        c = DIRENT64_MIN;
    return c < left ? c : left;
}

static long getdents_into(int fd, uint8_t *buf, uint64_t want, uint64_t left) {
    long n = syscall(SYS_getdents64, fd, buf, want);
    if (n < 0 && errno == EINVAL && want < DIRENT64_MAX && left > want)
        /* The next record is longer than `want`: room for any record (within `left`). */
        n = syscall(SYS_getdents64, fd, buf, left < DIRENT64_MAX ? left : DIRENT64_MAX);
    return n;
}

static int64_t do_readdirplus(struct vfs_engine *e, uint64_t body_len) {
    struct fuse_read_in in;
    if (body_len < sizeof in || e->writable_bytes < OUT_HEADER_SIZE)
        return DEFER;
    read_at(e, IN_HEADER_SIZE, &in, sizeof in);
    if (in.size > MAX_DIR_BUFFER)
        return DEFER;                         /* Python's ENOMEM */
    uint64_t size = e->writable_bytes - OUT_HEADER_SIZE;
    if (in.size < size)
        size = in.size;
    if (size == 0)
        return reply(e, NULL, 0);
    if (as_caller(e))
        return DEFER;
    if (e->dirbuf == NULL) {
        /* Once per worker, at its first READDIRPLUS: getdents64 needs a buffer this large. */
        e->dirbuf = malloc(MAX_DIR_BUFFER);
        if (e->dirbuf == NULL)
            return DEFER;
    }
    /* Python reads one getdents64 buffer of `bufsize` bytes: the entries a reply may list are
     * those its records fill, read here in smaller parts (dir_chunk) and counted in `listed`. */
    uint64_t bufsize = size < 4096 ? 4096 : size;
    int fd, pfd, rc;
    if ((rc = pin_handle(e, in.fh, e->in.nodeid, &fd)) != 0)
        return reply_error(e, -rc);
    int r = check_beneath(e, fd);
    long n = 0;
    uint64_t avg = DIRENT64_MIN, listed = 0, nread = 0;
    if (r == 0) {
        /* The position is the open file description's, shared by every queue; the guest
         * serialises getdents on one open directory, so no two READDIRs of one fh race.
         * Seeking to where it is already changes nothing (vfs_setpos). */
        if (lseek(fd, (off_t)in.offset, SEEK_SET) < 0)
            r = -errno;
        else if ((n = getdents_into(fd, e->dirbuf, dir_chunk(size, avg, bufsize),
                                    bufsize)) < 0)
            r = -errno;
    }
    /* The names are looked up in the handle's directory, pinned once for the request and
     * checked beneath the root once, above (Python pins and checks it for every name: only a
     * directory the host moves out of the share meanwhile could tell the two apart). */
    if (r == 0 && pin_inode(e, e->in.nodeid, &pfd) != 0)
        r = DEFER;                            /* Python's EBADF for every name */
    if (r != 0) {
        unpin_handle(e, in.fh);
        return r == DEFER ? DEFER : reply_error(e, -r);
    }
    uint64_t used = 0;
    int64_t result = -2;                      /* -2: the reply made so far */
    for (long pos = 0;;) {
        if (pos + 19 > n) {
            /* This part is listed: read the next while the reply has room for an entry. */
            if (n <= 0 || size - used < DIRENTPLUS_MIN || listed >= bufsize)
                break;
            n = getdents_into(fd, e->dirbuf, dir_chunk(size - used, avg, bufsize - listed),
                              bufsize - listed);
            pos = 0;
            continue;                         /* 0 (the end) or an error: done */
        }
        uint64_t ino;
        int64_t off;
        uint16_t reclen;
        uint8_t type;
        memcpy(&ino, e->dirbuf + pos, 8);
        memcpy(&off, e->dirbuf + pos + 8, 8);
        memcpy(&reclen, e->dirbuf + pos + 16, 2);
        type = e->dirbuf[pos + 18];
        if (reclen < 19 || pos + reclen > n || listed + reclen > bufsize)
            break;                            /* the end of what Python's buffer holds */
        listed += reclen;
        nread++;
        avg = listed / nread;
        const char *name = (const char *)e->dirbuf + pos + 19;
        const char *nul = memchr(name, 0, reclen - 19);
        uint32_t namelen = (uint32_t)(nul != NULL ? nul - name : reclen - 19);
        pos += reclen;
        uint64_t rec = (sizeof(struct fuse_entry_out) + DIRENT_HEAD + namelen + 7) & ~7ull;
        if (used + rec > size) {
            if (used == 0)                    /* not even one entry fits: getdents(2)'s EINVAL */
                result = reply_error(e, EINVAL);
            break;                            /* checked before the lookup: nothing to undo */
        }
        struct fuse_entry_out entry;
        if ((namelen == 1 && name[0] == '.') || (namelen == 2 && name[0] == '.'
                                                 && name[1] == '.')) {
            /* Not looked up (no lookup count): a negative entry carrying ino and type. */
            memset(&entry, 0, sizeof entry);
            entry.attr.ino = ino;
            entry.attr.mode = (uint32_t)type << 12;
        } else if (nul == NULL || namelen > NAME_MAX_FUSE) {
            if (used == 0)
                result = DEFER;
            break;
        } else {
            int lr = lookup_in(e, pfd, name, &entry);
            if (lr == -ENOENT)
                continue;                     /* removed since it was listed */
            if (lr != 0) {
                /* Keep what was counted (the guest asks again), or answer as Python. */
                if (used == 0)
                    result = lr == DEFER ? DEFER : reply_error(e, -lr);
                break;
            }
        }
        struct fuse_dirent_head d = {ino, (uint64_t)off, namelen, type};
        static const uint8_t zeros[8];
        uint64_t at = OUT_HEADER_SIZE + used;
        write_at(e, at, &entry, sizeof entry);
        write_at(e, at + sizeof entry, &d, sizeof d);
        write_at(e, at + sizeof entry + sizeof d, name, namelen);
        write_at(e, at + sizeof entry + sizeof d + namelen, zeros,
                 rec - sizeof entry - sizeof d - namelen);
        used += rec;
    }
    unpin_inode(e, e->in.nodeid);
    unpin_handle(e, in.fh);
    if (result != -2)
        return result;
    struct fuse_out_header h = {OUT_HEADER_SIZE + (uint32_t)used, 0, e->in.unique};
    write_at(e, 0, &h, sizeof h);
    return h.len;
}

/* -- OPEN and OPENDIR (PassthroughFs.open / opendir) -- */
#define OPEN_KILL_SUIDGID 1u

struct fuse_open_in { uint32_t flags, open_flags; };
struct fuse_open_out { uint64_t fh; uint32_t open_flags; int32_t backing_id; };

/* An I/O fd for the inode behind the O_PATH `fd`, through its /proc magic link (with the mode
 * Python's os.open passes). */
static int reopen(const struct vfs_engine *e, int fd, int flags) {
    char name[16];
    fd_name(name, fd);
    int r = openat(e->fs.proc_fd, name, (flags & ~O_NOFOLLOW) | O_CLOEXEC, 0777);
    return r < 0 ? -errno : r;
}

/* PassthroughFs._check_openable: the mode, or -errno. */
static int check_openable(int fd, int directory, mode_t *mode) {
    struct stat st;
    if (fstat(fd, &st) != 0)
        return -errno;
    *mode = st.st_mode;
    if (S_ISREG(st.st_mode) || S_ISDIR(st.st_mode))
        return directory && !S_ISDIR(st.st_mode) ? -ENOTDIR : 0;
    /* What open(2) of the magic link would say for a symlink; other types are refused. */
    return S_ISLNK(st.st_mode) ? -ELOOP : -ENXIO;
}

static int64_t do_open(struct vfs_engine *e, uint64_t body_len, int directory) {
    struct fuse_open_in in;
    if (body_len < sizeof in || e->writable_bytes < OUT_HEADER_SIZE + sizeof(struct fuse_open_out))
        return DEFER;
    read_at(e, IN_HEADER_SIZE, &in, sizeof in);
    int flags;
    if (directory) {
        flags = O_RDONLY | O_DIRECTORY;
    } else {
        /* --readonly refusals, the writeback O_RDWR upgrade and KILL_SUIDGID truncation are
         * Python's. */
        if (e->fs.readonly || e->fs.writeback)
            return DEFER;
        flags = (int)in.flags & ~(int)e->fs.open_strip;
        if ((in.open_flags & OPEN_KILL_SUIDGID) && (flags & O_TRUNC))
            return DEFER;
        /* An open that can change the inode (for writing, truncating, an O_TMPFILE) first
         * checks that the inode is still in the share (PassthroughFs._check_inode_beneath):
         * Python's. */
        if ((flags & O_ACCMODE) != O_RDONLY || (flags & O_TRUNC) ||
            (flags & O_TMPFILE) == O_TMPFILE)
            return DEFER;
    }
    if (as_caller(e))
        return DEFER;
    int ifd, rc;
    if ((rc = pin_inode(e, e->in.nodeid, &ifd)) != 0)
        return reply_error(e, -rc);
    mode_t mode = 0;
    int r = check_openable(ifd, directory, &mode);
    if (r == 0 && directory)
        r = check_beneath(e, ifd);
    int fd = r == 0 ? reopen(e, ifd, flags) : r;
    uint64_t fh = 0;
    if (fd >= 0) {
        rc = vfs_handle_insert(e->arena, fd, e->in.nodeid, (uint32_t)flags, &fh);
        if (rc != 0) {
            close(fd);
            fd = rc;
        } else {
            vfs_jq_add_effect(e->jq, VFS_EFFECT_HANDLE, fh);
        }
    }
    unpin_inode(e, e->in.nodeid);
    /* EACCES/EPERM: Python serves it again with the inode's group (member retry); nothing
     * has changed. */
    if (fd == DEFER || fd == -EACCES || fd == -EPERM)
        return DEFER;
    if (fd < 0)
        return reply_error(e, -fd);
    struct fuse_open_out out = {
        fh, S_ISDIR(mode) ? e->fs.dir_open_flags : e->fs.file_open_flags, 0};
    return reply(e, &out, sizeof out);
}

/* One FORGET, journaled as JournaledInodes.forget does outside a replay: the lookup count it
 * finds is recorded before it is applied, and the FORGET counted after. */
static void forget_one(struct vfs_engine *e, uint64_t nodeid, uint64_t nlookup) {
    uint64_t before = 0, ignored;
    uint32_t pins;
    int fd;
    if (vfs_inode_info(e->arena, nodeid, &before, &pins, &fd) != 0)
        before = 0;                       /* unknown or stale: forgetting it changes nothing */
    vfs_jq_forgetting(e->jq, nodeid, before);
    vfs_inode_forget(e->arena, nodeid, nlookup, &ignored);
    vfs_jq_note_forget(e->jq);
}

/* FORGET and BATCH_FORGET have no reply (used length 0). */
static int64_t do_forget(struct vfs_engine *e, uint64_t body_len) {
    uint64_t nlookup;
    if (body_len < sizeof nlookup)
        return DEFER;
    read_at(e, IN_HEADER_SIZE, &nlookup, sizeof nlookup);
    forget_one(e, e->in.nodeid, nlookup);
    return 0;
}

static int64_t do_batch_forget(struct vfs_engine *e, uint64_t body_len) {
    uint32_t count;
    if (body_len < 8)
        return DEFER;
    read_at(e, IN_HEADER_SIZE, &count, sizeof count);
    if (8 + (uint64_t)count * 16 > body_len)
        return DEFER;                     /* Python logs and ignores it */
    for (uint32_t k = 0; k < count; k++) {
        uint64_t one[2];
        read_at(e, IN_HEADER_SIZE + 8 + (uint64_t)k * 16, one, sizeof one);
        forget_one(e, one[0], one[1]);
    }
    return 0;
}

/* -- creating, removing and changing inodes (PassthroughFs through recovery.JournaledFs) -- */

/* Each of these is non-idempotent or changes an inode, so worker/recovery.py's records are
 * kept as JournaledFs keeps them: the pre-state of the names involved is journaled (EXECUTING)
 * before the call, and a successor replays from it (in Python).  A handler returns DEFER
 * only before its change, or after a refusal that changed nothing (EACCES/EPERM, which
 * Python serves again with more groups, _member_retry), or, for SETATTR, whose steps are
 * idempotent, after any step; Python then serves the request from its start. */
enum { OP_UNLINK = 10, OP_RMDIR = 11 };
#define PRE_NAMES 1u                  /* recovery.PRE_NAMES: (dev, ino) of the name */
#define PRE_F_A 1u                    /* recovery.F_A: the name existed */
#define PRE_F_UNKNOWN 4u              /* recovery.F_UNKNOWN: the pre-state could not be taken */

enum {
    FATTR_MODE = 1u << 0, FATTR_UID = 1u << 1, FATTR_GID = 1u << 2, FATTR_SIZE = 1u << 3,
    FATTR_ATIME = 1u << 4, FATTR_MTIME = 1u << 5, FATTR_FH = 1u << 6,
    FATTR_ATIME_NOW = 1u << 7, FATTR_MTIME_NOW = 1u << 8, FATTR_KILL_SUIDGID = 1u << 11,
};

struct fuse_create_in { uint32_t flags, mode, umask, open_flags; };
struct fuse_mkdir_in { uint32_t mode, umask; };
struct fuse_setattr_in {
    uint32_t valid, padding;
    uint64_t fh, size, lock_owner;
    int64_t atime, mtime, ctime;
    uint32_t atimensec, mtimensec, ctimensec, mode, unused4, uid, gid, unused5;
};
_Static_assert(sizeof(struct fuse_setattr_in) == 88, "fuse_setattr_in");
_Static_assert(sizeof(struct fuse_open_out) == 16, "fuse_open_out");

/* A test hook's kill point, for a request the hooks name (NULL probe: never). */
static inline void probe_at(const struct vfs_engine *e, uint32_t point) {
    uint32_t op = e->in.opcode;
    if (e->probe != NULL && op < 128 && (e->probe_ops[op / 64] >> (op % 64) & 1))
        e->probe(op, point);
}

/* The one name after a `skip`-byte struct (fuse_server._name), copied to `name`: 0, or DEFER
 * for what Python answers (a name that is not exactly one NUL-terminated component, long,
 * "." or "..": PassthroughFs._check_name's EINVAL/ENAMETOOLONG). */
static int body_name(const struct vfs_engine *e, uint64_t skip, uint64_t body_len,
                     char name[NAME_MAX_FUSE + 2]) {
    if (body_len < skip + 2 || body_len - skip > NAME_MAX_FUSE + 1)
        return DEFER;
    uint64_t n = body_len - skip;
    read_at(e, IN_HEADER_SIZE + skip, name, n);
    if (name[n - 1] != 0 || memchr(name, 0, n - 1) != NULL || memchr(name, '/', n - 1) != NULL
            || strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
        return DEFER;
    return 0;
}

/* Whether openat2(2) can be used (passthrough._have_openat2, asked once): without it Python
 * opens by openat(2), and creating requests are Python's. */
static int have_openat2(struct vfs_engine *e) {
    if (e->openat2 == 0) {
        uint64_t how[3] = {0, 0, 0};
        long r = syscall(SYS_openat2, -1, "", how, sizeof how);
        e->openat2 = r < 0 && (errno == ENOSYS || errno == EPERM) ? -1 : 1;
        if (r >= 0)
            close((int)r);
    }
    return e->openat2 > 0;
}

/* JournaledFs._names of one name, journaled as the pre-state (EXECUTING) and followed by the
 * "executing" kill point: what `name` in the pinned `pfd` is, asked as the daemon
 * (PassthroughFs.identify); pfd < 0, the parent could not be pinned: unknown. */
static void journal_names(struct vfs_engine *e, int pfd, const char *name) {
    uint32_t flags = PRE_F_UNKNOWN;
    uint64_t dev = 0, ino = 0;
    if (pfd >= 0) {
        uint32_t fsuid = e->fs.fsuid;
        int as_daemon = e->fs.switch_creds && fsuid != e->fs.euid;
        if (as_daemon)
            setfsuid(e->fs.euid);
        struct stat st;
        if (fstatat(pfd, name, &st, AT_SYMLINK_NOFOLLOW) == 0) {
            flags = PRE_F_A;
            dev = st.st_dev;
            ino = st.st_ino;
        } else if (errno == ENOENT) {
            flags = 0;
        }
        if (as_daemon)
            setfsuid(fsuid);
    }
    vfs_jq_executing(e->jq, PRE_NAMES, flags, dev, ino, 0, 0);
    probe_at(e, VFS_POINT_EXECUTING);
}

/* The first steps of a request that makes or removes `name` in the request's node: the
 * caller's credentials, the parent pinned, the pre-state journaled, the parent checked to be
 * beneath the root.  0 with *pfd pinned; else the parent is not pinned and *res is the reply
 * (an error's used length, or DEFER). */
static int name_change_begin(struct vfs_engine *e, const char *name, int *pfd, int64_t *res) {
    *res = DEFER;
    if (as_caller(e))
        return -1;
    probe_at(e, VFS_POINT_POPPED);
    int rc = pin_inode(e, e->in.nodeid, pfd);
    if (rc != 0) {
        journal_names(e, -1, name);
        *res = reply_error(e, -rc);
        return -1;
    }
    journal_names(e, *pfd, name);
    int r = check_beneath(e, *pfd);
    if (r != 0) {
        unpin_inode(e, e->in.nodeid);
        *res = r == DEFER ? DEFER : reply_error(e, -r);
        return -1;
    }
    return 0;
}

/* The entry of what a creating request just made as `name` in `pfd` (PassthroughFs._lookup_at):
 * 0 with `out` filled, or -errno.  The inode exists now, so nothing is handed to Python any
 * more: what Python's struct would refuse (a link count past 2**32) is its EIO. */
static int made_entry(struct vfs_engine *e, int pfd, const char *name,
                      struct fuse_entry_out *out) {
    int fd = open_beneath(pfd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return fd;
    int r = register_fd(e, pfd, fd, out);
    return r == DEFER ? -EIO : r;
}

/* CREATE (PassthroughFs.create): O_CREAT | O_EXCL beneath the parent, the entry, the handle.
 * --readonly (which opens an existing file), write-back's O_RDWR upgrade and a name that
 * exists without O_EXCL in the request (opened as it is) are Python's. */
static int64_t do_create(struct vfs_engine *e, uint64_t body_len) {
    struct fuse_create_in in;
    char name[NAME_MAX_FUSE + 2];
    if (body_len < sizeof in || e->writable_bytes < OUT_HEADER_SIZE
            + sizeof(struct fuse_entry_out) + sizeof(struct fuse_open_out))
        return DEFER;
    read_at(e, IN_HEADER_SIZE, &in, sizeof in);
    if (body_name(e, sizeof in, body_len, name) || e->fs.readonly || e->fs.writeback
            || !have_openat2(e))
        return DEFER;
    int flags = (int)in.flags & ~(int)e->fs.open_strip;
    if (flags < 0)
        return DEFER;                 /* Python's OverflowError: EINVAL */
    flags |= O_CREAT | O_EXCL | O_NOFOLLOW;
    int pfd;
    int64_t res;
    if (name_change_begin(e, name, &pfd, &res))
        return res;
    uint64_t how[3] = {(uint64_t)(flags | O_CLOEXEC), in.mode & 07777, RESOLVE_LOOKUP};
    long fd = syscall(SYS_openat2, pfd, name, how, sizeof how);
    int err = fd < 0 ? errno : 0;
    if (err == EACCES || err == EPERM || (err == EEXIST && !(in.flags & O_EXCL))) {
        unpin_inode(e, e->in.nodeid);
        return DEFER;                 /* nothing made */
    }
    if (err) {
        unpin_inode(e, e->in.nodeid);
        return reply_error(e, err);
    }
    struct fuse_entry_out entry;
    int r = made_entry(e, pfd, name, &entry);
    unpin_inode(e, e->in.nodeid);
    uint64_t fh = 0;
    if (r == 0) {
        r = vfs_handle_insert_j(e->arena, e->jq, (int)fd, entry.nodeid,
                                (uint32_t)(flags & ~(O_CREAT | O_EXCL)), &fh);
        if (r != 0)
            vfs_inode_forget_j(e->arena, e->jq, entry.nodeid, 1);
    }
    if (r != 0) {
        close((int)fd);
        return reply_error(e, -r);
    }
    probe_at(e, VFS_POINT_EXECUTED);
    struct { struct fuse_entry_out entry; struct fuse_open_out open; } out = {
        entry, {fh, e->fs.file_open_flags, 0}};
    _Static_assert(sizeof out == 144, "create reply");
    return reply(e, &out, sizeof out);
}

/* MKDIR (PassthroughFs.mkdir): the umask is the guest's to apply (no FUSE_DONT_MASK without
 * --posix-acl, whose requests are Python's). */
static int64_t do_mkdir(struct vfs_engine *e, uint64_t body_len) {
    struct fuse_mkdir_in in;
    char name[NAME_MAX_FUSE + 2];
    if (body_len < sizeof in || e->writable_bytes < OUT_HEADER_SIZE
            + sizeof(struct fuse_entry_out))
        return DEFER;
    read_at(e, IN_HEADER_SIZE, &in, sizeof in);
    if (body_name(e, sizeof in, body_len, name) || e->fs.readonly || !have_openat2(e))
        return DEFER;
    int pfd;
    int64_t res;
    if (name_change_begin(e, name, &pfd, &res))
        return res;
    int err = mkdirat(pfd, name, in.mode & 07777) != 0 ? errno : 0;
    struct fuse_entry_out entry;
    int r = err ? -err : made_entry(e, pfd, name, &entry);
    unpin_inode(e, e->in.nodeid);
    if (r != 0)
        return reply_error(e, -r);
    probe_at(e, VFS_POINT_EXECUTED);
    return reply(e, &entry, sizeof entry);
}

/* UNLINK and RMDIR (PassthroughFs.unlink / rmdir); a refusal is served again by Python with
 * the parent's group (_member_retry). */
static int64_t do_remove(struct vfs_engine *e, uint64_t body_len, int how) {
    char name[NAME_MAX_FUSE + 2];
    if (e->writable_bytes < OUT_HEADER_SIZE || body_name(e, 0, body_len, name)
            || e->fs.readonly)
        return DEFER;
    int pfd;
    int64_t res;
    if (name_change_begin(e, name, &pfd, &res))
        return res;
    int err = unlinkat(pfd, name, how) != 0 ? errno : 0;
    unpin_inode(e, e->in.nodeid);
    if (err == EACCES || err == EPERM)
        return DEFER;                 /* nothing removed */
    if (err)
        return reply_error(e, err);
    probe_at(e, VFS_POINT_EXECUTED);
    return reply(e, NULL, 0);
}

/* PassthroughFs._truncate without KILL_SUIDGID: 0 or -errno. */
static int truncate_inode(struct vfs_engine *e, int ifd, int hfd, uint64_t size) {
    if (size >= (1ull << 63))
        return -EINVAL;
    if (hfd >= 0)
        return ftruncate(hfd, (off_t)size) != 0 ? -errno : 0;
    mode_t mode;
    int r = check_openable(ifd, 0, &mode);
    if (r != 0)
        return r;
    if (S_ISDIR(mode))
        return -EISDIR;
    /* truncate(2) needs write permission only, so no read access is asked for. */
    int fd = reopen(e, ifd, O_WRONLY | O_NONBLOCK);
    if (fd < 0)
        return fd;
    r = ftruncate(fd, (off_t)size) != 0 ? -errno : 0;
    close(fd);
    return r;
}

/* The steps of a SETATTR (PassthroughFs.setattr), in its order: 0 or -errno. */
static int setattr_steps(struct vfs_engine *e, const struct fuse_setattr_in *in, int ifd,
                         int hfd) {
    uint32_t valid = in->valid;
    char name[16];
    fd_name(name, ifd);
    if (valid & FATTR_MODE) {
        mode_t mode = in->mode & 07777;
        if ((hfd >= 0 ? fchmod(hfd, mode) : fchmodat(e->fs.proc_fd, name, mode, 0)) != 0)
            return -errno;
    }
    if (valid & (FATTR_UID | FATTR_GID)) {
        uid_t uid = valid & FATTR_UID ? in->uid : (uid_t)-1;
        gid_t gid = valid & FATTR_GID ? in->gid : (gid_t)-1;
        if (fchownat(ifd, "", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) != 0)
            return -errno;
    }
    if (valid & FATTR_SIZE) {
        int r = truncate_inode(e, ifd, hfd, in->size);
        if (r != 0)
            return r;
    }
    if (valid & (FATTR_ATIME | FATTR_MTIME | FATTR_ATIME_NOW | FATTR_MTIME_NOW)) {
        struct timespec ts[2] = {{0, UTIME_OMIT}, {0, UTIME_OMIT}};
        if (valid & FATTR_ATIME_NOW)
            ts[0].tv_nsec = UTIME_NOW;
        else if (valid & FATTR_ATIME)
            ts[0] = (struct timespec){in->atime, in->atimensec};
        if (valid & FATTR_MTIME_NOW)
            ts[1].tv_nsec = UTIME_NOW;
        else if (valid & FATTR_MTIME)
            ts[1] = (struct timespec){in->mtime, in->mtimensec};
        if ((hfd >= 0 ? futimens(hfd, ts) : utimensat(e->fs.proc_fd, name, ts, 0)) != 0)
            return -errno;
    }
    /* FATTR_CTIME: the host sets ctime itself on every change above. */
    return 0;
}

/* SETATTR of mode, owner, size and times, on the inode or through a handle.  Dropping set-id
 * bits as the daemon after the caller's chmod is refused, and every other EACCES/EPERM, are
 * Python's (PassthroughFs._chmod, _member_retry): the steps are idempotent, so Python serves
 * the request again from its start.  KILL_SUIDGID on a truncation is Python's too. */
static int64_t do_setattr(struct vfs_engine *e, uint64_t body_len) {
    struct fuse_setattr_in in;
    if (body_len < sizeof in || e->writable_bytes < OUT_HEADER_SIZE
            + sizeof(struct fuse_attr_out) || e->fs.readonly)
        return DEFER;
    read_at(e, IN_HEADER_SIZE, &in, sizeof in);
    if ((in.valid & FATTR_KILL_SUIDGID) && (in.valid & FATTR_SIZE) && !(in.valid & FATTR_MODE))
        return DEFER;
    if (as_caller(e))
        return DEFER;
    probe_at(e, VFS_POINT_POPPED);
    int ifd, rc;
    if ((rc = pin_inode(e, e->in.nodeid, &ifd)) != 0)
        return reply_error(e, -rc);
    int r = check_reachable(e, ifd, 0);
    int hfd = -1;
    if (r == 0 && (in.valid & FATTR_FH))
        r = pin_handle(e, in.fh, e->in.nodeid, &hfd);
    if (r == 0) {
        probe_at(e, VFS_POINT_EXECUTING);
        r = setattr_steps(e, &in, ifd, hfd);
        if (hfd >= 0)
            unpin_handle(e, in.fh);
    }
    struct stat st;
    memset(&st, 0, sizeof st);
    if (r == 0 && fstat(ifd, &st) != 0)
        r = -errno;
    unpin_inode(e, e->in.nodeid);
    if (r == DEFER || r == -EACCES || r == -EPERM || (r == 0 && st.st_nlink > UINT32_MAX))
        return DEFER;
    if (r != 0)
        return reply_error(e, -r);
    probe_at(e, VFS_POINT_EXECUTED);
    struct fuse_attr_out out = {.attr_valid = e->fs.timeout};
    fill_attr(&out.attr, &st, 0);
    return reply(e, &out, sizeof out);
}

/* complete() with the test hooks' kill points between its steps. */
static void complete_probed(struct vfs_engine *e, uint16_t head, uint32_t used_len) {
    vfs_jq_replied(e->jq, head, used_len, e->next_used);
    probe_at(e, VFS_POINT_REPLIED);
    push(e, head, used_len);
    probe_at(e, VFS_POINT_PUSHED);
    pushed(e, head);
}

/* Does an active option the native handlers do not implement change this request?  Then
 * Python serves it.  What a native handler must do to serve it instead:
 *  IDS       map the caller's uid/gid/groups guest->host before acting as them (a forbidden
 *            id: EIO for CREATE/MKNOD/MKDIR/SYMLINK and a SETATTR owner, else the overflow
 *            id), map SETATTR's uid/gid, and the owners of every attr it replies host->guest.
 *            Every request but FORGET carries credentials or replies attributes.
 *  XATTR     translate names by the xattr map (GETXATTR/SETXATTR/REMOVEXATTR; LISTXATTR
 *            filters and renames), and the ACL/label rules of --posix-acl/--security-label.
 *  CREATE    apply the umask itself when the parent has no default ACL (FUSE_DONT_MASK) and
 *            set the security context a FUSE_SECURITY_CTX extension carries on the new inode.
 *  OPEN      keep O_NOATIME in the open flags with --preserve-noatime (it is stripped
 *            otherwise).  (--allow-mmap only adds DIRECT_IO_ALLOW_MMAP at INIT, which Python
 *            answers: nothing for the engine to do.)
 *  KILLPRIV  with HANDLE_KILLPRIV_V2 negotiated, drop S_ISUID (and S_ISGID when group-
 *            executable) on WRITE with WRITE_KILL_SUIDGID, SETATTR size with
 *            FATTR_KILL_SUIDGID (and no mode), OPEN/CREATE with O_TRUNC and
 *            OPEN_KILL_SUIDGID -- also for a caller whose fsuid keeps CAP_FSETID; with a map that
 *            renames security.capability, remove the renamed xattr on those same requests
 *            (passthrough.py, _drop_mapped_caps).
 * Always, whatever the options: without --posix-acl the ACL xattr names are refused
 * (ENOTSUP) and left out of LISTXATTR, and LISTXATTR's size is the host list's. */
static int deferred_by_options(const struct vfs_engine *e) {
    uint32_t op = e->in.opcode, d = e->defer;
    if (d == 0 || op == OP_INIT)
        return 0;
    if ((d & VFS_DEFER_IDS) && op != OP_FORGET && op != OP_BATCH_FORGET)
        return 1;
    if ((d & VFS_DEFER_XATTR) && op >= OP_SETXATTR && op <= OP_REMOVEXATTR)
        return 1;
    if ((d & VFS_DEFER_CREATE) && (op == OP_CREATE || op == OP_MKNOD || op == OP_MKDIR ||
                                   op == OP_SYMLINK || op == OP_TMPFILE))
        return 1;
    if ((d & VFS_DEFER_OPEN) && (op == OP_OPEN || op == OP_CREATE))
        return 1;
    if ((d & VFS_DEFER_KILLPRIV) && (op == OP_WRITE || op == OP_SETATTR || op == OP_OPEN ||
                                     op == OP_CREATE))
        return 1;
    if ((d & VFS_DEFER_ENTRIES) && (op == OP_LOOKUP || op == OP_READDIRPLUS || op == OP_CREATE ||
                                    op == OP_MKNOD || op == OP_MKDIR || op == OP_SYMLINK ||
                                    op == OP_TMPFILE))
        return 1;
    return 0;
}

/* Serve the request in e->in natively: the used length, or DEFER to hand it to Python.  The
 * checks before the switch are FuseServer.handle's, in its order. */
static int64_t serve_native(struct vfs_engine *e) {
    if (deferred_by_options(e))
        return DEFER;
    const struct vfs_engine_fs *fs = &e->fs;
    if (!fs->enabled || e->arena == NULL || fs->session == NULL
            || !(__atomic_load_n(fs->session, __ATOMIC_ACQUIRE) & 1))
        return DEFER;                     /* no session yet: Python answers (EIO or INIT) */
    uint32_t op = e->in.opcode;
    if (op < 128 && (e->fs.python_ops[op / 64] >> (op % 64) & 1))
        return DEFER;                     /* a worker with test hooks on this opcode */
    uint32_t len = e->in.len;
    if (len < IN_HEADER_SIZE || len - IN_HEADER_SIZE > e->readable_bytes - IN_HEADER_SIZE
            || len > MAX_REQUEST)
        return DEFER;
    uint64_t body_len = len - IN_HEADER_SIZE;
    /* Extensions (supplementary groups) change the credentials: Python's. */
    if (e->in.total_extlen && e->in.opcode != OP_WRITE)
        return DEFER;
    switch (e->in.opcode) {
    case OP_LOOKUP: return do_lookup(e, body_len);
    case OP_FORGET: return do_forget(e, body_len);
    case OP_BATCH_FORGET: return do_batch_forget(e, body_len);
    case OP_GETATTR: return do_getattr(e, body_len);
    case OP_STATFS: return do_statfs(e);
    case OP_READ: return do_read(e, body_len);
    case OP_WRITE: return do_write(e, body_len);
    case OP_FLUSH: return do_flush(e, body_len);
    case OP_RELEASE: return do_release(e, body_len);
    case OP_RELEASEDIR: return do_release(e, body_len);
    case OP_ACCESS: return do_access(e, body_len);
    case OP_READDIRPLUS: return do_readdirplus(e, body_len);
    case OP_OPEN: return do_open(e, body_len, 0);
    case OP_OPENDIR: return do_open(e, body_len, 1);
    case OP_CREATE: return do_create(e, body_len);
    case OP_MKDIR: return do_mkdir(e, body_len);
    case OP_UNLINK: return do_remove(e, body_len, 0);
    case OP_RMDIR: return do_remove(e, body_len, AT_REMOVEDIR);
    case OP_SETATTR: return do_setattr(e, body_len);
    default: return DEFER;
    }
}

/* -- the batch loop ------------------------------------------------------------------------- */

#define NOTIFY_NOW_BYTES (64u << 10)   /* a request moving this much is announced at once */

/* A natively answered request into the queue's statistics, as FuseServer.handle records one
 * Python answers (the opcode it started, then count, errno and latency).  FORGET and
 * BATCH_FORGET, which get no reply, count with errno 0 there too. */
static void count_native(struct vfs_engine *e, const struct timespec *t0) {
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    int64_t ns = (int64_t)(t1.tv_sec - t0->tv_sec) * 1000000000 + (t1.tv_nsec - t0->tv_nsec);
    __atomic_store_n(&e->stats[2], (uint64_t)e->in.opcode, __ATOMIC_RELAXED);   /* last opcode */
    vfs_stats_record(e->stats, e->in.opcode, (uint32_t)e->last_err, ns > 0 ? (uint64_t)ns : 0);
}

static int control_pending(const struct vfs_engine *e) {
    struct pollfd p = {.fd = e->chan_fd, .events = POLLIN};
    int r = poll(&p, 1, 0);
    return r > 0;
}

int vfs_engine_run(struct vfs_engine *e) {
    if (e->size == 0)
        return VFS_ENGINE_EMPTY;
    e->batches++;
    disable_notification(e);
    for (;;) {
        if (e->since_poll >= e->poll_every) {
            e->since_poll = 0;
            vfs_engine_notify(e);
            if (control_pending(e)) {
                enable_notification(e);
                return VFS_ENGINE_CONTROL;
            }
        }
        int r = pop(e);
        if (r < 0) {
            vfs_engine_notify(e);             /* what was served before the broken entry */
            e->size = 0;
            /* The front-end learns through the error notifier (vhost-user SET_VRING_ERR);
             * the device needs a reset (virtio spec 2.1.2, DEVICE_NEEDS_RESET). */
            if (e->err_fd >= 0)
                write_eventfd(e->err_fd);
            return VFS_ENGINE_BROKEN;
        }
        if (r == 0) {
            if (enable_notification(e)) {
                disable_notification(e);
                continue;
            }
            vfs_engine_notify(e);
            return VFS_ENGINE_EMPTY;
        }
        if (walk(e) != 0) {
            e->walked++;
            e->since_poll = e->poll_every;    /* Python takes time: look at the channel next */
            vfs_engine_notify(e);
            return VFS_ENGINE_WALK;
        }
        uint8_t hdr[IN_HEADER_SIZE];
        uint32_t got = gather(e, hdr, sizeof hdr);
        uint32_t opcode = 0;
        uint64_t unique = 0;
        /* What the journal records: opcode and unique when the chain holds them. */
        if (got >= 16) {
            memcpy(&opcode, hdr + 4, 4);
            memcpy(&unique, hdr + 8, 8);
        }
        e->has_in = got == IN_HEADER_SIZE;
        if (e->has_in)
            memcpy(&e->in, hdr, sizeof e->in);
        vfs_jq_popped(e->jq, e->head, e->pos, opcode, unique, 1);
        struct timespec t0 = {0, 0};
        if (e->stats && e->has_in) {
            e->last_err = 0;
            clock_gettime(CLOCK_MONOTONIC, &t0);   /* vDSO: no system call */
        }
        int64_t used = e->has_in ? serve_native(e) : -1;
        if (used >= 0 && e->stats)
            count_native(e, &t0);
        if (used < 0) {
            e->deferred++;
            e->since_poll = e->poll_every;
            vfs_engine_notify(e);
            return VFS_ENGINE_DEFER;
        }
        if (e->probe != NULL)
            complete_probed(e, e->head, (uint32_t)used);
        else
            complete(e, e->head, (uint32_t)used);
        e->native++;
        e->since_poll++;
        /* Completions are announced together, every poll_every requests or when the ring runs
         * empty: one eventfd write for a batch of small requests.  A request that moved much
         * data took long enough that its driver, waiting for it to send the next one, would
         * leave the ring to run dry meanwhile: it is announced at once (virtiofsd signals
         * every request; EVENT_IDX still lets the driver decline). */
        if ((uint64_t)used + e->readable_bytes >= NOTIFY_NOW_BYTES)
            vfs_engine_notify(e);
    }
}

/* --poll-us: spin on the avail index for up to e->spin_us before sleeping.  The window adapts:
 * it doubles (up to poll_us) when a spin finds work and halves when it does not, so an idle
 * queue soon sleeps at once and a busy one keeps its requests' latency low.  1: work came. */
static int spin(struct vfs_engine *e) {
    if (e->spin_us == 0)
        return 0;
    struct timespec t0, now;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        if (load16(e->avail + 2) != e->next_avail) {
            e->spin_us = e->spin_us * 2 < e->poll_us ? e->spin_us * 2 : e->poll_us;
            return 1;
        }
        clock_gettime(CLOCK_MONOTONIC, &now);
        int64_t us = (now.tv_sec - t0.tv_sec) * 1000000 + (now.tv_nsec - t0.tv_nsec) / 1000;
        if (us >= e->spin_us) {
            e->spin_us /= 2;
            return 0;
        }
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
    }
}

void vfs_engine_set_poll_us(struct vfs_engine *e, uint32_t us) {
    e->poll_us = us;
    e->spin_us = us;
}

int vfs_engine_serve(struct vfs_engine *e, int kick_fd) {
    for (;;) {
        int status = vfs_engine_run(e);
        if (status != VFS_ENGINE_EMPTY || e->size == 0)
            return status;
        if (spin(e))
            continue;
        if (e->poll_us && e->spin_us == 0)
            e->spin_us = 1;                   /* the next kick starts the window again */
        /* Empty, notifications on: sleep until the driver kicks or a control message comes. */
        struct pollfd p[2] = {{.fd = e->chan_fd, .events = POLLIN},
                              {.fd = kick_fd, .events = POLLIN}};
        int n = poll(p, kick_fd >= 0 ? 2 : 1, -1);
        if (n < 0)
            return VFS_ENGINE_EMPTY;          /* EINTR: let the caller look at its signals */
        if (p[0].revents)
            return VFS_ENGINE_CONTROL;
        if (kick_fd >= 0 && (p[1].revents & POLLNVAL))
            return VFS_ENGINE_EMPTY;          /* not an fd: never spin on it */
        if (kick_fd >= 0 && p[1].revents) {
            uint64_t count;
            /* EAGAIN: another reader drained it; the ring is looked at either way. */
            ssize_t got = read(kick_fd, &count, sizeof count);
            (void)got;
        }
    }
}
