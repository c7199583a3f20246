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
 * Every output line is written at once (the console is the only channel).
 * Built with hvrt.h (no C library) to keep the initramfs small.
 */
#include "hvrt.h"

#define MIB (1024UL * 1024UL)
#define PAGE 4096UL
#define GOLDEN 0x9E3779B97F4A7C15ULL

/* Word i of the pattern: (i + 1) * odd constant, never zero below 2^64. */
static inline uint64_t pattern(uint64_t i, uint64_t gen)
{
	return (i + 1 + gen * 0x100000001ULL) * GOLDEN;
}

static __attribute__((noreturn)) void usage(void)
{
	put_str(2, "usage: hvmem fill MIB [--free] | hvmem hold MIB | "
		"hvmem dirty MIB RATE\n");
	sys_exit(2);
}

static unsigned long number(const char *s)
{
	unsigned long v = 0;

	if (!*s)
		usage();
	for (; *s; s++) {
		if (*s < '0' || *s > '9' || v > (1UL << 40))
			usage();
		v = v * 10 + (unsigned long)(*s - '0');
	}
	if (v == 0)
		usage();
	return v;
}

static void say_mib(const char *a, unsigned long mib, const char *b)
{
	struct line l = { .len = 0 };

	l_str(&l, a);
	l_udec(&l, mib);
	l_str(&l, b);
	l_flush(&l, 1);
}

/*
 * MAP_POPULATE: the kernel allocates all pages in one call instead of one
 * user-mode page fault per page, about 15% faster when the guest kernel is
 * emulated.  The memory ends up the same: every page freshly allocated.
 */
static uint64_t *map_region(unsigned long mib)
{
	void *p = sys_mmap(NULL, mib * MIB, PROT_READ | PROT_WRITE,
			   MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);

	if (IS_ERR_RET(p)) {
		say_mib("hvmem: mmap of ", mib, " MiB failed\n");
		sys_exit(1);
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

static volatile int verify_request;

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
			say_mib("hvmem: verify FAILED at offset ", off, "\n");
			return;
		}
	}
	put_str(1, "hvmem: verify ok\n");
}

static __attribute__((noreturn)) void wait_forever(void)
{
	for (;;)
		sys_pause();
}

static int cmd_fill(unsigned long mib, int do_free)
{
	uint64_t *w = map_region(mib);

	fill(w, mib * MIB / 8);
	say_mib("hvmem: filled ", mib, " MiB\n");
	if (do_free) {
		sys_munmap(w, mib * MIB);
		put_str(1, "hvmem: freed\n");
		return 0;
	}
	wait_forever();
}

static __attribute__((noreturn)) void cmd_hold(unsigned long mib)
{
	size_t words = mib * MIB / 8;
	uint64_t *w = map_region(mib);
	struct line l = { .len = 0 };
	int stdin_open = 1;
	char line[256];
	size_t have = 0;

	/* Before the fill, so an early signal is not fatal; no SA_RESTART:
	 * the signal interrupts read(). */
	sys_signal(SIGUSR1, on_usr1, 0);

	fill(w, words);
	l_str(&l, "hvmem: hold ");
	l_udec(&l, mib);
	l_str(&l, " MiB checksum=");
	l_hex16(&l, checksum(w, words));
	l_str(&l, "\n");
	l_flush(&l, 1);
	for (;;) {
		ssize_t n;
		size_t i, startl;

		if (verify_request) {
			verify_request = 0;
			verify(w, words);
			continue;
		}
		if (!stdin_open) {
			sys_pause();
			continue;
		}
		n = sys_read(0, line + have, sizeof(line) - have);
		if (n == -HV_EINTR)
			continue;
		if (n <= 0) {
			stdin_open = 0;
			continue;
		}
		have += (size_t)n;
		/* Handle complete lines; keep a partial one. */
		startl = 0;
		for (i = 0; i < have; i++) {
			if (line[i] != '\n')
				continue;
			size_t len = i - startl;

			if (len && line[startl + len - 1] == '\r')
				len--;
			if (len == 6 && !memcmp(line + startl, "verify", 6))
				verify(w, words);
			startl = i + 1;
		}
		memmove(line, line + startl, have - startl);
		have -= startl;
		if (have == sizeof(line))
			have = 0;	/* overlong line: drop it */
	}
}

static __attribute__((noreturn)) void cmd_dirty(unsigned long mib,
						unsigned long rate)
{
	size_t words = mib * MIB / 8, pages = mib * MIB / PAGE, next = 0;
	uint64_t *w = map_region(mib), gen = 1;
	struct timespec t;
	struct line l = { .len = 0 };
	/* Work in 10 ms ticks; carry the fraction so the rate is exact. */
	long tick_ns = 10 * 1000 * 1000;
	unsigned long acc = 0;

	fill(w, words);
	l_str(&l, "hvmem: dirtying ");
	l_udec(&l, mib);
	l_str(&l, " MiB at ");
	l_udec(&l, rate);
	l_str(&l, " pages/s\n");
	l_flush(&l, 1);
	sys_clock_gettime(CLOCK_MONOTONIC, &t);
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
		t.tv_nsec += tick_ns;
		if (t.tv_nsec >= 1000000000L) {
			t.tv_nsec -= 1000000000L;
			t.tv_sec++;
		}
		while (sys_clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME,
					   &t) == -HV_EINTR)
			;
	}
}

int main(int argc, char **argv, char **envp)
{
	(void)envp;
	if (argc < 3)
		usage();
	if (!hv_strcmp(argv[1], "fill")) {
		if (argc == 3)
			return cmd_fill(number(argv[2]), 0);
		if (argc == 4 && !hv_strcmp(argv[3], "--free"))
			return cmd_fill(number(argv[2]), 1);
		usage();
	}
	if (!hv_strcmp(argv[1], "hold") && argc == 3)
		cmd_hold(number(argv[2]));
	if (!hv_strcmp(argv[1], "dirty") && argc == 4)
		cmd_dirty(number(argv[2]), number(argv[3]));
	usage();
}
