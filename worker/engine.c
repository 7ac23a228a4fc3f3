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
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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
    uint64_t end;
    if (__builtin_add_overflow(gpa, len, &end))
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
    uint64_t end;
    if (__builtin_add_overflow(uaddr, len, &end))
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
    uint64_t end;
    if (e->nregions >= VFS_ENGINE_MAX_REGIONS || size == 0 || host == NULL
            || __builtin_add_overflow(gpa, size, &end)
            || __builtin_add_overflow(uaddr, size, &end)) {
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
    const volatile uint8_t *p = table + (uint64_t)i * DESC_SIZE;
    d->addr = *(const volatile uint64_t *)p;
    d->len = *(const volatile uint32_t *)(p + 8);
    d->flags = *(const volatile uint16_t *)(p + 12);
    d->next = *(const volatile uint16_t *)(p + 14);
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
}

void vfs_engine_fini(struct vfs_engine *e) {
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
    if (!e->event_idx)
        store16(e->used, USED_F_NO_NOTIFY);
}

/* Ask for a kick on the next buffer; 1 if buffers are already waiting (then serve them: a chain
 * published before the request became visible would never be kicked for). */
static int enable_notification(struct vfs_engine *e) {
    if (e->event_idx)
        store16(e->used + 4 + 8 * e->size, e->next_avail);
    else
        store16(e->used, 0);
    /* Store (avail_event / flags) -> load (avail idx): a full barrier (protocol.md 2.5 step 3). */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return load16(e->avail + 2) != e->next_avail;
}

/* -- push (spec 2.7.8) -------------------------------------------------------------------- */

static void push(struct vfs_engine *e, uint16_t head, uint32_t used_len) {
    uint8_t *elem = e->used + 4 + 8 * (uint32_t)(e->next_used & (e->size - 1));
    __atomic_store_n((uint32_t *)elem, (uint32_t)head, __ATOMIC_RELAXED);
    __atomic_store_n((uint32_t *)(elem + 4), used_len, __ATOMIC_RELAXED);
    /* The element and the reply bytes before the used idx that publishes them (2.7.8.2). */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    e->next_used++;
    __atomic_store_n((uint16_t *)(e->used + 2), e->next_used, __ATOMIC_RELAXED);
}

static void complete(struct vfs_engine *e, uint16_t head, uint32_t used_len) {
    vfs_jq_replied(e->jq, head, used_len, e->next_used);
    push(e, head, used_len);
    vfs_jq_pushed(e->jq, head);
    if (e->arena != NULL)
        vfs_counter_add(e->arena, e->queue, 1);
    e->completed++;
    e->notify_due = 1;
}

void vfs_engine_complete(struct vfs_engine *e, uint16_t head, uint32_t used_len) {
    if (e->size == 0)
        return;
    complete(e, head, used_len);
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

/* -- native handlers --------------------------------------------------------------------- */

/* Serve the request in e->in natively: the used length, or -1 to hand it to Python. */
static int64_t serve_native(struct vfs_engine *e) {
    (void)e;
    return -1;
}

/* -- the batch loop ------------------------------------------------------------------------- */

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
        int64_t used = e->has_in ? serve_native(e) : -1;
        if (used < 0) {
            e->deferred++;
            e->since_poll = e->poll_every;
            vfs_engine_notify(e);
            return VFS_ENGINE_DEFER;
        }
        complete(e, e->head, (uint32_t)used);
        e->since_poll++;
    }
}
