/* Metadata loop run inside the guest: create N empty files, stat each, unlink each.
 *
 *   metaloop DIR N
 *
 * Prints one line "@@VAL meta CREATE_OPS STAT_OPS UNLINK_OPS" (operations per second of each
 * phase, guest clock).  Between phases the guest's dentry and inode caches are dropped, so
 * each stat and unlink reaches the daemon instead of being answered from the guest's cache.
 * Built static so the busybox-only initramfs can run it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void drop_caches(void)
{
	int fd = open("/proc/sys/vm/drop_caches", O_WRONLY);
	if (fd < 0 || write(fd, "2", 1) != 1) {
		perror("drop_caches");
		exit(1);
	}
	close(fd);
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: %s DIR N\n", argv[0]);
		return 2;
	}
	const char *dir = argv[1];
	long n = atol(argv[2]);
	char path[4096];
	struct stat st;
	double rate[3];

	if (mkdir(dir, 0755) && errno != EEXIST) {
		perror(dir);
		return 1;
	}
	for (int phase = 0; phase < 3; phase++) {
		sync();
		drop_caches();
		double t0 = now();
		for (long i = 0; i < n; i++) {
			snprintf(path, sizeof path, "%s/f%06ld", dir, i);
			if (phase == 0) {
				int fd = open(path, O_CREAT | O_EXCL | O_WRONLY, 0644);
				if (fd < 0 || close(fd)) {
					perror(path);
					return 1;
				}
			} else if (phase == 1 ? stat(path, &st) : unlink(path)) {
				perror(path);
				return 1;
			}
		}
		rate[phase] = n / (now() - t0);
	}
	rmdir(dir);
	printf("@@VAL meta %.1f %.1f %.1f\n", rate[0], rate[1], rate[2]);
	return 0;
}
