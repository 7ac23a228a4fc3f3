/*
 * fsx-style data verifier run inside the test guest (tests/test_guest.py).
 *
 * One file, driven by a seeded random sequence of pwrite, pread, ftruncate, fsync, fstat and
 * close/reopen, against an in-memory model of what the file must hold.  Every read is compared
 * byte for byte with the model; the first difference, short transfer or failed call is printed
 * and ends the run with status 1.  Every MARK operations a line "@@KILL NAME OP" goes to stdout
 * (the host kills a daemon process when it sees one); at the end the whole file is read back
 * and "@@VAL NAME.size N" and "@@VAL NAME.fnv HEX" (FNV-1a 64 of the model) are printed so the
 * host can check the file it sees too.
 *
 * Usage: fsx FILE OPS SEED MAXLEN MARK NAME
 * Static, libc only: the guest's initramfs is busybox.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_IO (64 * 1024)

static const char *name;
static const char *path;
static long op;
static uint64_t rng_state;
static unsigned char *model;
static unsigned char *buf;
static size_t size;
static size_t maxlen;
static int fd = -1;

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

static void fail(const char *fmt, ...)
{
	va_list ap;

	printf("@@FSX FAIL %s op %ld: ", name, op);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
	exit(1);
}

/* xorshift64*: reproducible from the seed, no libc state. */
static uint64_t rnd(void)
{
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 0x2545F4914F6CDD1DULL;
}

static size_t below(size_t n)
{
	return n ? (size_t)(rnd() % n) : 0;
}

static void open_file(int flags)
{
	fd = open(path, O_RDWR | O_CLOEXEC | flags, 0644);
	if (fd < 0)
		fail("open %s: %s", path, strerror(errno));
}

static void do_write(void)
{
	size_t off = below(maxlen);
	size_t len = 1 + below(maxlen - off < MAX_IO ? maxlen - off : MAX_IO);
	size_t done = 0;
	uint64_t word = rnd();

	for (size_t i = 0; i < len; i++) {
		if (i % 8 == 0)
			word = rnd();
		buf[i] = (unsigned char)(word >> (8 * (i % 8)));
	}
	while (done < len) {
		ssize_t n = pwrite(fd, buf + done, len - done, (off_t)(off + done));

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			fail("pwrite %zu at %zu: %s", len - done, off + done,
			     n < 0 ? strerror(errno) : "wrote nothing");
		done += (size_t)n;
	}
	if (off > size)
		memset(model + size, 0, off - size);
	memcpy(model + off, buf, len);
	if (off + len > size)
		size = off + len;
}

static void check_range(size_t off, size_t len)
{
	size_t want = off >= size ? 0 : (size - off < len ? size - off : len);
	size_t done = 0;

	while (done < len) {
		ssize_t n = pread(fd, buf + done, len - done, (off_t)(off + done));

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			fail("pread %zu at %zu: %s", len - done, off + done, strerror(errno));
		if (n == 0)
			break;
		done += (size_t)n;
	}
	if (done != want)
		fail("pread at %zu: %zu bytes, the file holds %zu there (size %zu)", off, done,
		     want, size);
	for (size_t i = 0; i < want; i++) {
		if (buf[i] != model[off + i])
			fail("byte %zu is 0x%02x, expected 0x%02x (read %zu at %zu, size %zu)",
			     off + i, buf[i], model[off + i], len, off, size);
	}
}

static void do_read(void)
{
	size_t off = size ? below(size) : 0;

	check_range(off, 1 + below(MAX_IO));
}

static void do_truncate(void)
{
	size_t newsize = below(maxlen);

	if (ftruncate(fd, (off_t)newsize) < 0)
		fail("ftruncate to %zu: %s", newsize, strerror(errno));
	if (newsize > size)
		memset(model + size, 0, newsize - size);
	size = newsize;
}

static void do_stat(void)
{
	struct stat st;

	if (fstat(fd, &st) < 0)
		fail("fstat: %s", strerror(errno));
	if ((size_t)st.st_size != size)
		fail("fstat size %jd, expected %zu", (intmax_t)st.st_size, size);
}

static void do_reopen(void)
{
	if (close(fd) < 0)
		fail("close: %s", strerror(errno));
	open_file(0);
}

static void do_fsync(void)
{
	if (fsync(fd) < 0)
		fail("fsync: %s", strerror(errno));
}

int main(int argc, char **argv)
{
	long ops, mark;
	uint64_t hash = 0xcbf29ce484222325ULL;

	if (argc != 7) {
		fprintf(stderr, "usage: fsx FILE OPS SEED MAXLEN MARK NAME\n");
		return 2;
	}
	path = argv[1];
	ops = strtol(argv[2], NULL, 10);
	rng_state = strtoull(argv[3], NULL, 10) * 0x9E3779B97F4A7C15ULL | 1;
	maxlen = strtoul(argv[4], NULL, 10);
	mark = strtol(argv[5], NULL, 10);
	name = argv[6];
	if (ops <= 0 || mark <= 0 || maxlen == 0) {
		fprintf(stderr, "fsx: OPS, MAXLEN and MARK must be positive\n");
		return 2;
	}
	model = calloc(maxlen, 1);
	buf = malloc(MAX_IO > maxlen ? MAX_IO : maxlen);
	if (!model || !buf) {
		fprintf(stderr, "fsx: out of memory\n");
		return 1;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	open_file(O_CREAT | O_TRUNC);
	for (op = 1; op <= ops; op++) {
		unsigned r = (unsigned)below(100);

		if (r < 40)
			do_write();
		else if (r < 75)
			do_read();
		else if (r < 85)
			do_truncate();
		else if (r < 90)
			do_stat();
		else if (r < 95)
			do_reopen();
		else
			do_fsync();
		if (op % mark == 0)
			printf("@@KILL %s %ld\n", name, op);
	}
	do_reopen();
	do_stat();
	for (size_t off = 0; off < size; off += MAX_IO)
		check_range(off, MAX_IO);
	if (close(fd) < 0)
		fail("close: %s", strerror(errno));
	for (size_t i = 0; i < size; i++) {
		hash ^= model[i];
		hash *= 0x100000001b3ULL;
	}
	printf("@@VAL %s.size %zu\n@@VAL %s.fnv %016" PRIx64 "\n", name, size, name, hash);
	return 0;
}
