/* The machine's own limits, measured next to the daemons in the same run.
 *
 *   limits [SECONDS [DIR]]
 *
 * Prints one JSON object:
 *   memcpy_mb_s    copy bandwidth from an anonymous mapping into a MAP_SHARED memfd mapping
 *                  (the way file data reaches guest memory), 1 MiB at a time over 64 MiB
 *   preadv_mb_s    the kernel's own copy of the same: preadv(2) of a 64 MiB file in DIR's
 *                  page cache (default /var/tmp, where the benchmark's share is) into that
 *                  mapping, 1 MiB at a time in 256 iovecs of 4 KiB, as a READ's chain is laid
 *                  out -- what a daemon's READ cannot beat, however little else it does
 *   pwritev_mb_s   the other way, the file overwritten from the mapping (a WRITE's copy)
 *   syscall_ns     one bare system call (getppid) round trip into the kernel and back
 *   wakeup_rtt_us  eventfd ping-pong between two processes: the notification round trip a
 *                  request with one kick and one call costs at best
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define AREA (64UL << 20)
#define CHUNK (1UL << 20)

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double memcpy_mb_s(double seconds)
{
	int fd = memfd_create("limits", 0);
	if (fd < 0 || ftruncate(fd, AREA)) {
		perror("memfd");
		exit(1);
	}
	char *dst = mmap(NULL, AREA, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	char *src = mmap(NULL, AREA, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (dst == MAP_FAILED || src == MAP_FAILED) {
		perror("mmap");
		exit(1);
	}
	memset(src, 0x5a, AREA);
	memset(dst, 0, AREA);
	double best = 0;
	double end = now() + seconds;
	while (now() < end) {
		double t0 = now();
		for (size_t off = 0; off < AREA; off += CHUNK)
			memcpy(dst + off, src + off, CHUNK);
		double rate = AREA / (now() - t0) / 1e6;
		if (rate > best)
			best = rate;
	}
	munmap(dst, AREA);
	munmap(src, AREA);
	close(fd);
	return best;
}

/* preadv (writing = 0) or pwritev of a 64 MiB unnamed file in `dir` against a shared memfd
 * mapping, 1 MiB at a time in 4 KiB iovecs: the best MB/s of the passes made in `seconds`. */
static double kernel_copy_mb_s(double seconds, const char *dir, int writing)
{
	int fd = open(dir, O_TMPFILE | O_RDWR, 0600);
	int mfd = memfd_create("limits", 0);
	if (fd < 0 || mfd < 0 || ftruncate(mfd, AREA)) {
		perror("kernel copy");
		exit(1);
	}
	char *mem = mmap(NULL, AREA, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
	if (mem == MAP_FAILED) {
		perror("mmap");
		exit(1);
	}
	memset(mem, 0x5a, AREA);
	for (size_t off = 0; off < AREA; off += CHUNK)
		if (pwrite(fd, mem + off, CHUNK, (off_t)off) != (ssize_t)CHUNK) {
			perror("pwrite");
			exit(1);
		}
	enum { PAGES = CHUNK / 4096 };
	struct iovec iov[PAGES];
	double best = 0;
	double end = now() + seconds;
	while (now() < end) {
		double t0 = now();
		for (size_t off = 0; off < AREA; off += CHUNK) {
			for (size_t i = 0; i < PAGES; i++) {
				iov[i].iov_base = mem + off + i * 4096;
				iov[i].iov_len = 4096;
			}
			ssize_t n = writing ? pwritev(fd, iov, PAGES, (off_t)off)
					    : preadv(fd, iov, PAGES, (off_t)off);
			if (n != (ssize_t)CHUNK) {
				perror("kernel copy");
				exit(1);
			}
		}
		double rate = AREA / (now() - t0) / 1e6;
		if (rate > best)
			best = rate;
	}
	munmap(mem, AREA);
	close(mfd);
	close(fd);
	return best;
}

static double syscall_ns(double seconds)
{
	double best = 1e9;
	double end = now() + seconds;
	while (now() < end) {
		const long n = 200000;
		double t0 = now();
		for (long i = 0; i < n; i++)
			syscall(SYS_getppid);
		double ns = (now() - t0) / n * 1e9;
		if (ns < best)
			best = ns;
	}
	return best;
}

static double wakeup_rtt_us(double seconds)
{
	int ping = eventfd(0, 0), pong = eventfd(0, 0);
	uint64_t v = 1;
	pid_t pid = fork();
	if (pid == 0) {
		for (;;) {
			if (read(ping, &v, 8) != 8 || v == 2)
				_exit(0);
			if (write(pong, &v, 8) != 8)
				_exit(1);
		}
	}
	long rounds = 0;
	double t0 = now(), end = t0 + seconds;
	while (now() < end) {
		for (int i = 0; i < 1000; i++) {
			v = 1;
			if (write(ping, &v, 8) != 8 || read(pong, &v, 8) != 8) {
				perror("eventfd");
				exit(1);
			}
		}
		rounds += 1000;
	}
	double us = (now() - t0) / rounds * 1e6;
	v = 2;
	if (write(ping, &v, 8) != 8)
		perror("eventfd");
	waitpid(pid, NULL, 0);
	return us;
}

int main(int argc, char **argv)
{
	double s = argc > 1 ? atof(argv[1]) : 1.0;
	const char *dir = argc > 2 ? argv[2] : "/var/tmp";
	double mc = memcpy_mb_s(s), sc = syscall_ns(s / 2), rtt = wakeup_rtt_us(s / 2);
	double rd = kernel_copy_mb_s(s / 2, dir, 0), wr = kernel_copy_mb_s(s / 2, dir, 1);
	printf("{\"memcpy_mb_s\": %.1f, \"syscall_ns\": %.1f, \"wakeup_rtt_us\": %.2f, "
	       "\"preadv_mb_s\": %.1f, \"pwritev_mb_s\": %.1f}\n", mc, sc, rtt, rd, wr);
	return 0;
}
