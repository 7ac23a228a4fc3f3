"""cffi build script for pyvirtiofsd's native helpers (built by setup.py at install time).

Python gives no memory-ordering guarantees on plain mmap reads and writes, has no atomic
compare-and-swap on shared memory, and no setfsuid(); these few functions supply exactly that.
The SIGSYS reporter must run without the interpreter (it fires inside a denied system call), and
openat2 has no Python wrapper.
"""

import os

from cffi import FFI

# The shared state (common/state.c) is compiled into this module so that Python calls the same
# functions as the native request engine; its declarations come from the header itself.
_HERE = os.path.dirname(os.path.abspath(__file__))
STATE_DIR = os.path.relpath(_HERE)
STATE_SOURCES = [os.path.join(STATE_DIR, "state.c")]
# Warnings as errors for the shared C, and the aliasing rule off: the same mapping words are
# read as u32 halves and u64 wholes.
# The interpreter's own CFLAGS may define _FORTIFY_SOURCE already: undefine it first.
CFLAGS = ["-Wall", "-Wextra", "-Werror", "-fno-strict-aliasing", "-U_FORTIFY_SOURCE",
          "-D_FORTIFY_SOURCE=2", "-fstack-protector-strong"]


def state_cdef() -> str:
    """state.h without its preprocessor lines: what cffi's cdef can read."""
    with open(os.path.join(_HERE, "state.h"), encoding="utf-8") as f:
        return "".join(line for line in f if not line.lstrip().startswith("#"))


CDEF = """
void vfs_fence(void);
uint64_t vfs_fetch_add64(uint64_t *word, uint64_t delta);
int vfs_setfsuid(uint32_t uid);
int vfs_setfsgid(uint32_t gid);
long vfs_raw_clone(unsigned long flags);
struct vfs_sigsys_slot { uint32_t pid; int32_t nr; uint32_t arch; uint32_t count; };
int vfs_sigsys_install(struct vfs_sigsys_slot *slot, uint32_t pid, int fd, const char *who);
int vfs_openat2(int dirfd, const char *path, uint64_t flags, uint64_t mode, uint64_t resolve);
int vfs_name_to_handle(int fd, uint8_t *handle, uint32_t *handle_len, int *handle_type,
                       uint64_t *mount_id);
int vfs_open_by_handle(int mount_fd, const uint8_t *handle, uint32_t handle_len,
                       int handle_type, int flags);
void vfs_log_mark(uint8_t *log, uint64_t size, uint64_t gpa, uint64_t len);
struct vfs_log_region { uint64_t gpa, size; uint8_t *host; };
void vfs_log_chain_regions(uint8_t *log, uint64_t size, const uint8_t *desc, uint32_t ring_size,
                           uint16_t head, uint32_t used_len,
                           const struct vfs_log_region *regions, uint32_t nregions);
#define VFS_STATS_QUEUE_WORDS 16
#define VFS_STATS_ERRNOS 128
#define VFS_STATS_OPCODES 64
#define VFS_STATS_BUCKETS 24
#define VFS_STATS_OP_WORDS 27
"""

SOURCE = r"""
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "state.h"
#include "dirtylog.h"
#include <errno.h>
#include <linux/futex.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/syscall.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

/* Full barrier: orders the used-ring index store before the used_event / avail.idx loads
 * (virtio spec 2.7.10 "Receiving Used Buffers" mirrored on the device side). */
void vfs_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

uint64_t vfs_fetch_add64(uint64_t *word, uint64_t delta) {
    return __atomic_fetch_add(word, delta, __ATOMIC_ACQ_REL);
}

/* setfsuid/setfsgid return the previous id and never fail visibly (man 2 setfsuid). */
int vfs_setfsuid(uint32_t uid) { return setfsuid(uid); }
int vfs_setfsgid(uint32_t gid) { return setfsgid(gid); }

/* clone(2) without a new stack behaves like fork(); the caller wraps it in
 * PyOS_BeforeFork/PyOS_AfterFork_* exactly as os.fork() does. */
long vfs_raw_clone(unsigned long flags) {
    return syscall(SYS_clone, flags, 0, 0, 0, 0);
}

/* The seccomp "kill" action, with a report.  The filter traps (SECCOMP_RET_TRAP) and this handler
 * records which system call was refused -- in a slot of a shared page the supervisor reads once
 * the process is dead, and as one line on `fd` -- then makes the same call again.  SIGSYS is
 * blocked while its handler runs, so the kernel cannot deliver the second trap and kills the
 * whole process with SIGSYS instead (force_sig_seccomp), exactly as SECCOMP_RET_KILL_PROCESS
 * would; the refused call never runs.  Only async-signal-safe code: no stdio, no allocation. */
struct vfs_sigsys_slot { uint32_t pid; int32_t nr; uint32_t arch; uint32_t count; };
static struct vfs_sigsys_slot *sigsys_slot;
static uint32_t sigsys_pid;
static int sigsys_fd = -1;
static char sigsys_line[96];
static size_t sigsys_prefix;
static int sigsys_installed;

static void vfs_on_sigsys(int sig, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    (void)sig;
    long a[6] = {0, 0, 0, 0, 0, 0};
#if defined(__x86_64__)
    greg_t *r = uc->uc_mcontext.gregs;
    a[0] = r[REG_RDI]; a[1] = r[REG_RSI]; a[2] = r[REG_RDX];
    a[3] = r[REG_R10]; a[4] = r[REG_R8]; a[5] = r[REG_R9];
#elif defined(__aarch64__)
    for (int i = 0; i < 6; i++)
        a[i] = (long)uc->uc_mcontext.regs[i];
#endif
    int nr = info->si_syscall;
    if (sigsys_slot) {
        sigsys_slot->nr = nr;
        sigsys_slot->arch = info->si_arch;
        __atomic_fetch_add(&sigsys_slot->count, 1, __ATOMIC_RELAXED);
        __atomic_store_n(&sigsys_slot->pid, sigsys_pid, __ATOMIC_RELEASE);
    }
    if (sigsys_fd >= 0) {
        char digits[12];
        size_t n = 0, len = sigsys_prefix;
        unsigned v = nr < 0 ? 0 : (unsigned)nr;
        do { digits[n++] = (char)('0' + v % 10); v /= 10; } while (v && n < sizeof digits);
        while (n && len < sizeof sigsys_line - 1)
            sigsys_line[len++] = digits[--n];
        sigsys_line[len++] = '\n';
        ssize_t ignored = write(sigsys_fd, sigsys_line, len);
        (void)ignored;
    }
    syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]);
    /* Only reached if the call was allowed after all (no filter): do not carry on as if it ran. */
    signal(SIGSYS, SIG_DFL);
    raise(SIGSYS);
    _exit(128 + SIGSYS);
}

int vfs_sigsys_install(struct vfs_sigsys_slot *slot, uint32_t pid, int fd, const char *who) {
    struct sigaction sa;
    size_t n = strlen(who);
    static const char what[] = ": seccomp refused system call ";
    if (n + sizeof what + 12 > sizeof sigsys_line) {
        errno = ENAMETOOLONG;
        return -1;
    }
    memcpy(sigsys_line, who, n);
    memcpy(sigsys_line + n, what, sizeof what - 1);
    sigsys_prefix = n + sizeof what - 1;
    sigsys_slot = slot;
    sigsys_pid = pid;
    sigsys_fd = fd;
    /* A child inherits the handler: it only retargets the report, with no system call (its
     * parent's filter may already refuse rt_sigaction on SIGSYS). */
    if (sigsys_installed)
        return 0;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = vfs_on_sigsys;
    sa.sa_flags = SA_SIGINFO;
    sigfillset(&sa.sa_mask);
    if (sigaction(SIGSYS, &sa, NULL) != 0)
        return -1;
    sigsys_installed = 1;
    return 0;
}

/* openat2(2) (Linux 5.6): struct open_how is {flags, mode, resolve}, all u64.  The number is
 * the same on every architecture (asm-generic numbering from 5.x on). */
#ifndef SYS_openat2
#define SYS_openat2 437
#endif
int vfs_openat2(int dirfd, const char *path, uint64_t flags, uint64_t mode, uint64_t resolve) {
    uint64_t how[3] = {flags, mode, resolve};
    return (int)syscall(SYS_openat2, dirfd, path, how, sizeof how);
}

/* File handles (name_to_handle_at(2)), for --inode-file-handles and file-handles migration.
 * `handle` holds MAX_HANDLE_SZ (128) bytes; *handle_len gets the length used.  The 64-bit
 * mount id (AT_HANDLE_MNT_ID_UNIQUE) is not asked for: the classic int one names the mount in
 * /proc/self/mountinfo and statx's STATX_MNT_ID alike. */
#include <fcntl.h>
int vfs_name_to_handle(int fd, uint8_t *handle, uint32_t *handle_len, int *handle_type,
                       uint64_t *mount_id) {
    union { struct file_handle fh; uint8_t raw[sizeof(struct file_handle) + 128]; } u;
    int mnt = 0;
    u.fh.handle_bytes = 128;
    if (name_to_handle_at(fd, "", &u.fh, &mnt, AT_EMPTY_PATH) != 0)
        return -1;
    memcpy(handle, u.fh.f_handle, u.fh.handle_bytes);
    *handle_len = u.fh.handle_bytes;
    *handle_type = u.fh.handle_type;
    *mount_id = (uint64_t)(uint32_t)mnt;
    return 0;
}

int vfs_open_by_handle(int mount_fd, const uint8_t *handle, uint32_t handle_len,
                       int handle_type, int flags) {
    union { struct file_handle fh; uint8_t raw[sizeof(struct file_handle) + 128]; } u;
    if (handle_len == 0 || handle_len > 128) {
        errno = EINVAL;
        return -1;
    }
    u.fh.handle_bytes = handle_len;
    u.fh.handle_type = handle_type;
    memcpy(u.fh.f_handle, handle, handle_len);
    return open_by_handle_at(mount_fd, &u.fh, flags);
}

/* Dirty-page logging from the Python data plane: the engine's own marking (dirtylog.h). */
void vfs_log_mark(uint8_t *log, uint64_t size, uint64_t gpa, uint64_t len) {
    vfs_log_range(log, size, gpa, len);
}

/* The Python plane's guest memory, for vfs_log_chain's reads of indirect tables: its regions
 * by guest-physical address, sorted, each mapped at `host`. */
struct vfs_log_region { uint64_t gpa, size; uint8_t *host; };
struct vfs_log_regions { const struct vfs_log_region *r; uint32_t n; };

static int vfs_log_read_regions(const void *ctx, uint64_t gpa, uint8_t *out) {
    const struct vfs_log_regions *m = ctx;
    uint32_t done = 0;
    while (done < VFS_LOG_DESC_SIZE) {
        const struct vfs_log_region *r = NULL;
        for (uint32_t k = 0; k < m->n; k++) {
            if (gpa >= m->r[k].gpa && gpa - m->r[k].gpa < m->r[k].size) {
                r = &m->r[k];
                break;
            }
        }
        if (r == NULL)
            return -1;
        uint64_t off = gpa - r->gpa, k = r->size - off;
        if (k > VFS_LOG_DESC_SIZE - done)
            k = VFS_LOG_DESC_SIZE - done;
        memcpy(out + done, r->host + off, k);
        done += (uint32_t)k;
        if (__builtin_add_overflow(gpa, k, &gpa))
            return -1;
    }
    return 0;
}

/* vfs_log_chain() for the Python plane (worker/virtqueue.py), the same walk as the engine's. */
void vfs_log_chain_regions(uint8_t *log, uint64_t size, const uint8_t *desc, uint32_t ring_size,
                           uint16_t head, uint32_t used_len,
                           const struct vfs_log_region *regions, uint32_t nregions) {
    struct vfs_log_regions m = {regions, nregions};
    vfs_log_chain(log, size, desc, ring_size, head, used_len, vfs_log_read_regions, &m);
}
"""

ffi = FFI()
ffi.cdef(CDEF + state_cdef())
ffi.set_source("pyvirtiofsd.common._native", SOURCE, sources=STATE_SOURCES,
               include_dirs=[STATE_DIR], extra_compile_args=CFLAGS)

if __name__ == "__main__":
    ffi.compile(verbose=True)
