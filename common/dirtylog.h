/* Dirty-page logging for live migration (vhost-user spec "Migration", protocol.md 1.10).
 *
 * The front-end's log is a bitmap over guest-physical memory, one bit per 4 KiB page:
 * page p is bit p % 8 of byte p / 8.  Every process of the daemon that writes guest memory
 * sets bits in the same shared mapping, as the front-end clears them, so each bit is set with
 * an atomic or ("Use atomic operations, as the log may be concurrently manipulated").
 *
 * Included by the native request engine (worker/engine.c) and by the helpers Python calls
 * (common/native_build.py), so both data planes mark with this one function. */
#ifndef VFS_DIRTYLOG_H
#define VFS_DIRTYLOG_H

#include <stdint.h>
#include <string.h>

#define VFS_LOG_PAGE_SHIFT 12u            /* VHOST_LOG_PAGE: 0x1000 */

/* Mark the pages of guest-physical [gpa, gpa + len) in the `size`-byte log at `log`.  Pages
 * past the end of the log are not marked: the front-end sized the log to cover its memory
 * (QEMU's vhost_get_log_size), so such an address is in no guest RAM it migrates. */
static inline void vfs_log_range(uint8_t *log, uint64_t size, uint64_t gpa, uint64_t len) {
    if (log == 0 || len == 0)
        return;
    uint64_t first = gpa >> VFS_LOG_PAGE_SHIFT, last;
    if (__builtin_add_overflow(gpa, len - 1, &last))
        last = UINT64_MAX;
    last >>= VFS_LOG_PAGE_SHIFT;
    uint64_t pages = size << 3;              /* size <= 2**61: checked by the control plane */
    if (last >= pages)
        last = pages - 1;
    for (uint64_t p = first; p <= last && p < pages; p++) {
        /* Release: the bytes written to the page are visible before its bit is, so a
         * front-end that clears the bit and copies the page copies them too.  Always the
         * read-modify-write, never a plain "already set?" load first: that load could pass
         * the page's stores and see a bit the front-end is about to clear. */
        __atomic_fetch_or(log + (p >> 3), (uint8_t)(1u << (p & 7)), __ATOMIC_RELEASE);
    }
}

/* Reads the 16 bytes of the descriptor at guest-physical `gpa` (an indirect table entry,
 * which may straddle two regions) into `out`: 0, or -1 when it is not in guest memory. */
typedef int (*vfs_log_read_fn)(const void *ctx, uint64_t gpa, uint8_t *out);

#define VFS_LOG_DESC_SIZE 16u
#define VFS_LOG_F_NEXT 1u
#define VFS_LOG_F_WRITE 2u
#define VFS_LOG_F_INDIRECT 4u

/* Mark the first `used_len` bytes of the writable part of the chain at `head` of the ring
 * whose descriptor table (`ring_size` entries) is mapped at `desc`: the bytes the reply's
 * used.len covers, whoever wrote them and however (copies, preadv straight into guest
 * memory).  The chain is walked again, by guest-physical address, as libvhost-user's
 * vu_log_queue_fill does: the driver cannot have reused its descriptors, whose used element
 * is not published yet.  Walked with the walker's own bounds (loops, nested tables, `next`
 * outside the table), so a driver that rewrote its in-flight descriptors only stops it early:
 * it can make the daemon mark fewer of its own pages, never touch anything but the log. */
static inline void vfs_log_chain(uint8_t *log, uint64_t size, const uint8_t *desc,
                                 uint32_t ring_size, uint16_t head, uint32_t used_len,
                                 vfs_log_read_fn read, const void *ctx) {
    uint64_t left = used_len, table = 0;
    uint32_t limit = ring_size, count = 0, i = head;
    int in_table = 0;
    while (left && i < limit) {
        uint8_t raw[VFS_LOG_DESC_SIZE];
        uint64_t addr, at;
        uint32_t len;
        uint16_t flags, next;
        if (++count > limit)
            return;
        if (in_table) {
            if (__builtin_add_overflow(table, (uint64_t)i * VFS_LOG_DESC_SIZE, &at)
                    || read(ctx, at, raw) != 0)
                return;
        } else {
            memcpy(raw, desc + (uint64_t)i * VFS_LOG_DESC_SIZE, sizeof raw);
        }
        __atomic_signal_fence(__ATOMIC_SEQ_CST);   /* decode the copy, never re-read */
        memcpy(&addr, raw, 8);
        memcpy(&len, raw + 8, 4);
        memcpy(&flags, raw + 12, 2);
        memcpy(&next, raw + 14, 2);
        if (flags & VFS_LOG_F_INDIRECT) {
            if (in_table || (flags & VFS_LOG_F_NEXT) || len < VFS_LOG_DESC_SIZE)
                return;
            table = addr;
            limit = len / VFS_LOG_DESC_SIZE < (1u << 16) ? len / VFS_LOG_DESC_SIZE : (1u << 16);
            in_table = 1;
            i = 0;
            count = 0;
            continue;
        }
        if (flags & VFS_LOG_F_WRITE) {
            uint64_t k = len < left ? len : left;
            vfs_log_range(log, size, addr, k);
            left -= k;
        }
        if (!(flags & VFS_LOG_F_NEXT))
            return;
        i = next;
    }
}

#endif
