"""cffi build script for pyvirtiofsd's native helpers (built by setup.py at install time).

Python gives no memory-ordering guarantees on plain mmap reads and writes, has no atomic
compare-and-swap on shared memory, and no setfsuid(); these few functions supply exactly that.
"""

from cffi import FFI

CDEF = """
void vfs_fence(void);
uint32_t vfs_cas32(uint32_t *word, uint32_t expected, uint32_t desired);
uint64_t vfs_fetch_add64(uint64_t *word, uint64_t delta);
int vfs_lock(uint32_t *word, uint32_t me);
void vfs_unlock(uint32_t *word);
int vfs_setfsuid(uint32_t uid);
int vfs_setfsgid(uint32_t gid);
long vfs_raw_clone(unsigned long flags);
"""

SOURCE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <signal.h>
#include <stdint.h>
#include <sys/fsuid.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* Full barrier: orders the used-ring index store before the used_event / avail.idx loads
 * (virtio spec 2.7.10 "Receiving Used Buffers" mirrored on the device side). */
void vfs_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

uint32_t vfs_cas32(uint32_t *word, uint32_t expected, uint32_t desired) {
    __atomic_compare_exchange_n(word, &expected, desired, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    return expected;   /* the value seen: == expected on success */
}

uint64_t vfs_fetch_add64(uint64_t *word, uint64_t delta) {
    return __atomic_fetch_add(word, delta, __ATOMIC_ACQ_REL);
}

/* A process-shared lock whose word holds the owner's pid (0 = free) and, in bit 31, a flag
 * saying someone may be sleeping on it, so an uncontended unlock costs no futex syscall
 * (Drepper, "Futexes Are Tricky", mutex #2).  Waiters sleep with a timeout and, when the owner
 * no longer exists, take the lock over: a worker that dies holding it must not wedge the other
 * queues.  Returns 0, or 1 when the lock was taken over from a dead owner (the caller may then
 * repair the structure it protects). */
#define VFS_WAITERS 0x80000000u

int vfs_lock(uint32_t *word, uint32_t me) {
    struct timespec ts = {0, 5 * 1000 * 1000};
    uint32_t want = me;
    for (;;) {
        uint32_t seen = vfs_cas32(word, 0, want);
        if (seen == 0)
            return 0;
        uint32_t owner = seen & ~VFS_WAITERS;
        if (owner == me)     /* our own stale ownership (e.g. after a respawn with a reused pid) */
            return 1;
        if (kill((pid_t)owner, 0) == -1 && errno == ESRCH) {
            if (vfs_cas32(word, seen, me | VFS_WAITERS) == seen)
                return 1;
            continue;
        }
        if (!(seen & VFS_WAITERS) && vfs_cas32(word, seen, seen | VFS_WAITERS) != seen)
            continue;
        syscall(SYS_futex, word, FUTEX_WAIT, seen | VFS_WAITERS, &ts, NULL, 0);
        /* Others may still sleep: keep the flag set when we get the lock after waiting. */
        want = me | VFS_WAITERS;
    }
}

void vfs_unlock(uint32_t *word) {
    if (__atomic_exchange_n(word, 0, __ATOMIC_RELEASE) & VFS_WAITERS)
        syscall(SYS_futex, word, FUTEX_WAKE, 1, NULL, NULL, 0);
}

/* setfsuid/setfsgid return the previous id and never fail visibly (man 2 setfsuid). */
int vfs_setfsuid(uint32_t uid) { return setfsuid(uid); }
int vfs_setfsgid(uint32_t gid) { return setfsgid(gid); }

/* clone(2) without a new stack behaves like fork(); the caller wraps it in
 * PyOS_BeforeFork/PyOS_AfterFork_* exactly as os.fork() does. */
long vfs_raw_clone(unsigned long flags) {
    return syscall(SYS_clone, flags, 0, 0, 0, 0);
}
"""

ffi = FFI()
ffi.cdef(CDEF)
ffi.set_source("pyvirtiofsd.common._native", SOURCE)

if __name__ == "__main__":
    ffi.compile(verbose=True)
