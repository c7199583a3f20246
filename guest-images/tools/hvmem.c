/*
 * hvmem: memory workloads for the hv guest (free-page and dirty-tracking
 * experiments).
 *
 *   hvmem fill MIB [--free]  fill MIB MiB of fresh memory with a
 *                            deterministic non-zero pattern; with --free
 *                            unmap it and exit, else keep it and wait
 *   hvmem hold MIB           fill, print the checksum, keep the region;
 *                            a line "verify" on stdin or SIGUSR1 re-checks
 *                            every byte
 *   hvmem dirty MIB RATE     fill, then rewrite RATE pages per second of
 *                            the region until killed
 *
 * Every output line is flushed at once (the console is the only channel).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MIB (1024UL * 1024UL)
#define PAGE 4096UL
#define GOLDEN 0x9E3779B97F4A7C15ULL

/* Word i of the pattern: (i + 1) * odd constant, never zero below 2^64. */
static inline uint64_t pattern(uint64_t i, uint64_t gen)
{
	return (i + 1 + gen * 0x100000001ULL) * GOLDEN;
}

static void out(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
#include <stdarg.h>
static void out(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	fflush(stdout);
}

static void usage(void)
{
	fprintf(stderr, "usage: hvmem fill MIB [--free] | hvmem hold MIB | "
		"hvmem dirty MIB RATE\n");
	exit(2);
}

static unsigned long number(const char *s)
{
	char *end;
	unsigned long v;

	errno = 0;
	v = strtoul(s, &end, 10);
	if (errno || end == s || *end || v == 0)
		usage();
	return v;
}

static uint64_t *map_region(unsigned long mib)
{
	void *p = mmap(NULL, mib * MIB, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED) {
		out("hvmem: mmap %lu MiB failed: %s\n", mib, strerror(errno));
		exit(1);
	}
	return p;
}

static void fill(uint64_t *w, size_t words)
{
	size_t i;

	for (i = 0; i < words; i++)
		w[i] = pattern(i, 0);
}

static uint64_t checksum(const uint64_t *w, size_t words)
{
	uint64_t h = 0xcbf29ce484222325ULL;
	size_t i;

	for (i = 0; i < words; i++)
		h = (h ^ w[i]) * 0x100000001b3ULL;
	return h;
}

static volatile sig_atomic_t verify_request;

static void on_usr1(int sig)
{
	(void)sig;
	verify_request = 1;
}

static void verify(const uint64_t *w, size_t words)
{
	size_t i;

	for (i = 0; i < words; i++) {
		uint64_t want = pattern(i, 0);

		if (w[i] != want) {
			size_t off = i * 8;
			uint64_t diff = w[i] ^ want;

			while (!(diff & 0xff)) {
				diff >>= 8;
				off++;
			}
			out("hvmem: verify FAILED at offset %zu\n", off);
			return;
		}
	}
	out("hvmem: verify ok\n");
}

static void wait_forever(void)
{
	for (;;)
		pause();
}

static int cmd_fill(unsigned long mib, int do_free)
{
	uint64_t *w = map_region(mib);

	fill(w, mib * MIB / 8);
	out("hvmem: filled %lu MiB\n", mib);
	if (do_free) {
		munmap(w, mib * MIB);
		out("hvmem: freed\n");
		return 0;
	}
	wait_forever();
	return 0;
}

static __attribute__((noreturn)) void cmd_hold(unsigned long mib)
{
	size_t words = mib * MIB / 8;
	uint64_t *w = map_region(mib);
	struct sigaction sa;
	int stdin_open = 1;
	char line[256];
	size_t have = 0;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;	/* no SA_RESTART: interrupts read() */
	sigaction(SIGUSR1, &sa, NULL);

	fill(w, words);
	out("hvmem: hold %lu MiB checksum=%016llx\n", mib,
	    (unsigned long long)checksum(w, words));
	for (;;) {
		if (verify_request) {
			verify_request = 0;
			verify(w, words);
			continue;
		}
		if (!stdin_open) {
			pause();
			continue;
		}
		ssize_t n = read(0, line + have, sizeof(line) - 1 - have);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			stdin_open = 0;
			continue;
		}
		have += (size_t)n;
		line[have] = '\0';
		char *nl;

		while ((nl = strchr(line, '\n'))) {
			*nl = '\0';
			if (!strcmp(line, "verify") || !strcmp(line, "verify\r"))
				verify(w, words);
			memmove(line, nl + 1, strlen(nl + 1) + 1);
			have = strlen(line);
		}
		if (have >= sizeof(line) - 1)
			have = 0;	/* overlong line: drop it */
	}
}

static __attribute__((noreturn)) void cmd_dirty(unsigned long mib, unsigned long rate)
{
	size_t words = mib * MIB / 8, pages = mib * MIB / PAGE, next = 0;
	uint64_t *w = map_region(mib), gen = 1;
	struct timespec t;
	/* Work in 10 ms ticks; carry the fraction so the rate is exact. */
	unsigned long tick_ns = 10 * 1000 * 1000, acc = 0;

	fill(w, words);
	out("hvmem: dirtying %lu MiB at %lu pages/s\n", mib, rate);
	clock_gettime(CLOCK_MONOTONIC, &t);
	for (;;) {
		unsigned long n;

		acc += rate;
		n = acc / 100;
		acc %= 100;
		while (n--) {
			uint64_t *pg = w + next * (PAGE / 8);
			size_t i;

			for (i = 0; i < PAGE / 8; i++)
				pg[i] = pattern(next * (PAGE / 8) + i, gen);
			if (++next == pages) {
				next = 0;
				gen++;
			}
		}
		t.tv_nsec += (long)tick_ns;
		if (t.tv_nsec >= 1000000000L) {
			t.tv_nsec -= 1000000000L;
			t.tv_sec++;
		}
		while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t,
				       NULL) == EINTR)
			;
	}
}

int main(int argc, char **argv)
{
	if (argc < 3)
		usage();
	if (!strcmp(argv[1], "fill")) {
		if (argc == 3)
			return cmd_fill(number(argv[2]), 0);
		if (argc == 4 && !strcmp(argv[3], "--free"))
			return cmd_fill(number(argv[2]), 1);
		usage();
	}
	if (!strcmp(argv[1], "hold") && argc == 3)
		cmd_hold(number(argv[2]));
	if (!strcmp(argv[1], "dirty") && argc == 4)
		cmd_dirty(number(argv[2]), number(argv[3]));
	usage();
	return 2;
}
