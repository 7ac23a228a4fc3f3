/* locktool: take file locks in the guest the three ways Linux has, for tests/test_guest.py.
 *
 *   locktool KIND FILE try   TYPE START LEN          exit 0: taken (and dropped at exit),
 *                                                     1: someone else holds a conflicting lock
 *   locktool KIND FILE wait  TYPE START LEN          blocks until taken; prints "got", exit 0
 *   locktool KIND FILE hold  TYPE START LEN READY GO takes it (blocking), creates READY, holds
 *                                                     it until GO exists, exits 0
 *   locktool KIND FILE getlk TYPE START LEN          prints "TYPE START LEN PID" of the lock in
 *                                                     the way ("u 0 0 0": none)
 *
 * KIND: flock (flock(2); START/LEN ignored), posix (fcntl F_SETLK/F_SETLKW, owned by the
 * process) or ofd (F_OFD_SETLK/F_OFD_SETLKW, owned by the open file description).
 * TYPE: r (shared) or w (exclusive).  Anything unexpected: a message and exit 2.
 * Static, no library but libc: it runs from the busybox initramfs. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) {
    fprintf(stderr, "locktool: %s: %s\n", what, strerror(errno));
    exit(2);
}

static int lock(const char *kind, int fd, int type, long start, long len, int block) {
    if (strcmp(kind, "flock") == 0)
        return flock(fd, (type == F_WRLCK ? LOCK_EX : LOCK_SH) | (block ? 0 : LOCK_NB));
    struct flock fl = {.l_type = (short)type, .l_whence = SEEK_SET, .l_start = start,
                       .l_len = len};
    int ofd = strcmp(kind, "ofd") == 0;
    if (!ofd && strcmp(kind, "posix") != 0) {
        fprintf(stderr, "locktool: unknown kind %s\n", kind);
        exit(2);
    }
    int cmd = ofd ? (block ? F_OFD_SETLKW : F_OFD_SETLK) : (block ? F_SETLKW : F_SETLK);
    return fcntl(fd, cmd, &fl);
}

static void wait_for(const char *path) {
    struct timespec ts = {0, 20 * 1000 * 1000};
    while (access(path, F_OK) != 0)
        nanosleep(&ts, NULL);
}

int main(int argc, char **argv) {
    if (argc < 7) {
        fprintf(stderr, "usage: locktool KIND FILE try|wait|hold|getlk r|w START LEN "
                        "[READY GO]\n");
        return 2;
    }
    const char *kind = argv[1], *file = argv[2], *op = argv[3];
    int type = strcmp(argv[4], "w") == 0 ? F_WRLCK : F_RDLCK;
    long start = strtol(argv[5], NULL, 10), len = strtol(argv[6], NULL, 10);
    int fd = open(file, type == F_WRLCK ? O_RDWR : O_RDONLY);
    if (fd < 0)
        die(file);
    if (strcmp(op, "try") == 0) {
        if (lock(kind, fd, type, start, len, 0) == 0)
            return 0;
        if (errno == EAGAIN || errno == EACCES || errno == EWOULDBLOCK)
            return 1;
        die("lock");
    }
    if (strcmp(op, "wait") == 0) {
        if (lock(kind, fd, type, start, len, 1) != 0)
            die("lock");
        printf("got\n");
        return 0;
    }
    if (strcmp(op, "hold") == 0 && argc == 9) {
        if (lock(kind, fd, type, start, len, 1) != 0)
            die("lock");
        int r = open(argv[7], O_CREAT | O_WRONLY, 0644);
        if (r < 0)
            die(argv[7]);
        close(r);
        wait_for(argv[8]);
        return 0;
    }
    if (strcmp(op, "getlk") == 0 && strcmp(kind, "flock") != 0) {
        struct flock fl = {.l_type = (short)type, .l_whence = SEEK_SET, .l_start = start,
                           .l_len = len};
        if (fcntl(fd, strcmp(kind, "ofd") == 0 ? F_OFD_GETLK : F_GETLK, &fl) != 0)
            die("getlk");
        printf("%c %ld %ld %d\n", fl.l_type == F_UNLCK ? 'u' : fl.l_type == F_WRLCK ? 'w' : 'r',
               (long)fl.l_start, (long)fl.l_len, (int)fl.l_pid);
        return 0;
    }
    fprintf(stderr, "locktool: bad operation %s\n", op);
    return 2;
}
