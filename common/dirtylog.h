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

#endif
