/*
 * Holds files and a directory open across a live migration (tests/test_guest_migration.py).
 *
 * Opens DIR/r.txt read-only, DIR/w.txt read-write and DIR/d as a directory, reads and lists
 * through them once, prints "@@HOLD ready", then waits until DIR/go exists (the host makes it
 * once the guest runs on the destination).  Then, through the same fds (the same FUSE fhs):
 * reads r.txt again (a failure is printed as "@@VAL after.read error MESSAGE"), writes "after"
 * at offset 6 of w.txt and fsyncs it, rewinds the directory and lists it again, and prints what
 * it got as "@@VAL NAME VALUE" lines.  Exit status 0 when every other call succeeded, 1 with an
 * "@@HOLD error ..." line otherwise.
 *
 * Usage: holder DIR.  Static, libc only: the guest's initramfs is busybox.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

static void die(const char *what)
{
    printf("@@HOLD error %s: %s\n", what, strerror(errno));
    exit(1);
}

/* The directory's names, sorted and joined by commas, through getdents64 on `fd`. */
static void list(int fd, char *out, size_t cap)
{
    char buf[4096], names[64][256];
    int n = 0;
    if (lseek(fd, 0, SEEK_SET) != 0)
        die("lseek dir");
    for (;;) {
        long got = syscall(SYS_getdents64, fd, buf, sizeof buf);
        if (got < 0)
            die("getdents64");
        if (got == 0)
            break;
        for (long off = 0; off < got;) {
            struct dirent64 *d = (struct dirent64 *)(buf + off);
            if (strcmp(d->d_name, ".") && strcmp(d->d_name, "..") && n < 64)
                snprintf(names[n++], sizeof names[0], "%s", d->d_name);
            off += d->d_reclen;
        }
    }
    qsort(names, n, sizeof names[0], (int (*)(const void *, const void *))strcmp);
    out[0] = 0;
    for (int i = 0; i < n; i++) {
        if (i)
            strncat(out, ",", cap - strlen(out) - 1);
        strncat(out, names[i], cap - strlen(out) - 1);
    }
}

int main(int argc, char **argv)
{
    char path[512], buf[256], names[4096];
    if (argc != 2) {
        fprintf(stderr, "usage: holder DIR\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IONBF, 0);
    snprintf(path, sizeof path, "%s/r.txt", argv[1]);
    int r = open(path, O_RDONLY);
    if (r < 0)
        die("open r.txt");
    snprintf(path, sizeof path, "%s/w.txt", argv[1]);
    int w = open(path, O_RDWR);
    if (w < 0)
        die("open w.txt");
    snprintf(path, sizeof path, "%s/d", argv[1]);
    int d = open(path, O_RDONLY | O_DIRECTORY);
    if (d < 0)
        die("open d");
    ssize_t got = pread(r, buf, sizeof buf - 1, 0);
    if (got < 0)
        die("pread before");
    list(d, names, sizeof names);
    printf("@@VAL before.read %.*s\n", (int)got, buf);
    printf("@@VAL before.list %s\n", names);
    printf("@@HOLD ready\n");

    struct stat st;
    snprintf(path, sizeof path, "%s/go", argv[1]);
    while (stat(path, &st) != 0)
        usleep(100 * 1000);

    /* The host may have deleted r.txt: with --migration-on-error=guest-error the read then
     * fails (EIO), which is reported, not fatal. */
    got = pread(r, buf, sizeof buf - 1, 0);
    if (got < 0)
        printf("@@VAL after.read error %s\n", strerror(errno));
    else
        printf("@@VAL after.read %.*s\n", (int)got, buf);
    if (pwrite(w, "after", 5, 6) != 5)
        die("pwrite after");
    if (fsync(w) != 0)
        die("fsync after");
    list(d, names, sizeof names);
    printf("@@VAL after.list %s\n", names);
    got = pread(w, buf, sizeof buf - 1, 0);
    if (got < 0)
        die("pread w after");
    printf("@@VAL after.w %.*s\n", (int)got, buf);
    printf("@@HOLD done\n");
    return 0;
}
