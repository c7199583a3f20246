/*
 * hvrt: the minimal x86-64 Linux runtime of the guest tools.
 *
 * The tools are linked without a C library (-nostdlib -static): a static
 * glibc binary is ~700 KiB, and every byte of the initramfs is unpacked by
 * the guest kernel at boot, which is slow when that kernel is emulated.
 * With this header each tool is a few KiB.  Only what the tools use is
 * here: raw system calls, a few string functions, unbuffered output.
 * System call wrappers return -errno on failure, like the kernel.
 */
#ifndef HVRT_H
#define HVRT_H

#include <stddef.h>
#include <stdint.h>
#include <linux/types.h>
#include <asm/unistd.h>
#include <asm/signal.h>
#include <linux/fcntl.h>
#include <linux/mman.h>
#include <linux/reboot.h>
#include <linux/time.h>
#include <linux/wait.h>
#include <asm-generic/ioctls.h>

typedef long ssize_t;
typedef int pid_t;

/* ------------------------------------------------------------ syscalls */

static inline long sc6(long n, long a, long b, long c, long d, long e, long f)
{
	long ret;
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;
	register long r9 __asm__("r9") = f;

	__asm__ volatile ("syscall"
			  : "=a"(ret)
			  : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8),
			    "r"(r9)
			  : "rcx", "r11", "memory");
	return ret;
}
#define sc(n, a, b, c) sc6((n), (long)(a), (long)(b), (long)(c), 0, 0, 0)

static inline ssize_t sys_read(int fd, void *buf, size_t n)
{ return sc(__NR_read, fd, buf, n); }
static inline ssize_t sys_write(int fd, const void *buf, size_t n)
{ return sc(__NR_write, fd, buf, n); }
static inline int sys_open(const char *path, int flags, int mode)
{ return (int)sc6(__NR_openat, AT_FDCWD, (long)path, flags, mode, 0, 0); }
static inline int sys_close(int fd) { return (int)sc(__NR_close, fd, 0, 0); }
static inline int sys_dup2(int a, int b) { return (int)sc(__NR_dup2, a, b, 0); }
static inline int sys_mkdir(const char *p, int mode)
{ return (int)sc(__NR_mkdir, p, mode, 0); }
static inline int sys_chdir(const char *p) { return (int)sc(__NR_chdir, p, 0, 0); }
static inline int sys_access(const char *p, int mode)
{ return (int)sc(__NR_access, p, mode, 0); }
static inline int sys_mount(const char *src, const char *dst, const char *fs,
			    unsigned long flags, const void *data)
{ return (int)sc6(__NR_mount, (long)src, (long)dst, (long)fs, (long)flags,
		  (long)data, 0); }
static inline pid_t sys_fork(void) { return (pid_t)sc(__NR_fork, 0, 0, 0); }
static inline int sys_execve(const char *p, char *const argv[],
			     char *const envp[])
{ return (int)sc(__NR_execve, p, argv, envp); }
static inline pid_t sys_wait4(pid_t pid, int *status, int options)
{ return (pid_t)sc6(__NR_wait4, pid, (long)status, options, 0, 0, 0); }
static inline pid_t sys_getpid(void) { return (pid_t)sc(__NR_getpid, 0, 0, 0); }
static inline pid_t sys_setsid(void) { return (pid_t)sc(__NR_setsid, 0, 0, 0); }
static inline int sys_ioctl(int fd, unsigned long req, long arg)
{ return (int)sc(__NR_ioctl, fd, req, arg); }
static inline int sys_kill(pid_t pid, int sig) { return (int)sc(__NR_kill, pid, sig, 0); }
static inline void sys_sync(void) { sc(__NR_sync, 0, 0, 0); }
static inline int sys_reboot(unsigned int cmd)
{ return (int)sc6(__NR_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2,
		  cmd, 0, 0, 0); }
static inline int sys_pause(void) { return (int)sc(__NR_pause, 0, 0, 0); }
static inline void *sys_mmap(void *addr, size_t len, int prot, int flags,
			     int fd, long off)
{ return (void *)sc6(__NR_mmap, (long)addr, (long)len, prot, flags, fd, off); }
static inline int sys_munmap(void *addr, size_t len)
{ return (int)sc(__NR_munmap, addr, len, 0); }
static inline int sys_clock_gettime(int clk, struct timespec *ts)
{ return (int)sc(__NR_clock_gettime, clk, ts, 0); }
static inline int sys_clock_nanosleep(int clk, int flags,
				      const struct timespec *ts)
{ return (int)sc6(__NR_clock_nanosleep, clk, flags, (long)ts, 0, 0, 0); }
static inline __attribute__((noreturn)) void sys_exit(int code)
{
	for (;;)
		sc(__NR_exit_group, code, 0, 0);
}

#define IS_ERR_RET(x) ((unsigned long)(x) > (unsigned long)-4096L)
#ifndef TIMER_ABSTIME
#define TIMER_ABSTIME 1
#endif
#ifndef MS_NOSUID
#define MS_NOSUID 2
#define MS_NODEV 4
#define MS_NOEXEC 8
#endif
#define HV_EINTR 4

/* Signals: the kernel's rt_sigaction needs a restorer calling sigreturn. */
struct hv_sigaction {
	void (*handler)(int);
	unsigned long flags;
	void (*restorer)(void);
	unsigned long mask;
};
#define HV_SA_RESTORER 0x04000000
#define HV_SA_RESTART 0x10000000

void hv_sigreturn(void);
__asm__(".text\n.global hv_sigreturn\nhv_sigreturn:\n"
	"\tmov $" "15" ", %eax\n\tsyscall\n\thlt\n");

static inline int sys_signal(int sig, void (*fn)(int), int restart)
{
	struct hv_sigaction sa = {
		.handler = fn,
		.flags = HV_SA_RESTORER | (restart ? HV_SA_RESTART : 0),
		.restorer = hv_sigreturn,
		.mask = 0,
	};
	return (int)sc6(__NR_rt_sigaction, sig, (long)&sa, 0, 8, 0, 0);
}

/* ------------------------------------------------------------- strings */

/* gcc may emit calls to these even with no C library. */
void *memset(void *d, int c, size_t n)
{
	unsigned char *p = d;

	while (n--)
		*p++ = (unsigned char)c;
	return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
	unsigned char *p = d;
	const unsigned char *q = s;

	while (n--)
		*p++ = *q++;
	return d;
}

void *memmove(void *d, const void *s, size_t n)
{
	unsigned char *p = d;
	const unsigned char *q = s;

	if (p < q) {
		while (n--)
			*p++ = *q++;
	} else {
		while (n--)
			p[n] = q[n];
	}
	return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const unsigned char *p = a, *q = b;

	for (; n; n--, p++, q++)
		if (*p != *q)
			return *p - *q;
	return 0;
}

size_t strlen(const char *s)
{
	size_t n = 0;

	while (s[n])
		n++;
	return n;
}

static inline int hv_strcmp(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return (unsigned char)*a - (unsigned char)*b;
}

static inline int hv_strncmp(const char *a, const char *b, size_t n)
{
	for (; n; n--, a++, b++) {
		if (*a != *b)
			return (unsigned char)*a - (unsigned char)*b;
		if (!*a)
			return 0;
	}
	return 0;
}

/* -------------------------------------------------------------- output */

/* A line is assembled here, then written with one write(2). */
struct line {
	char buf[1024];
	size_t len;
};

static inline void l_str(struct line *l, const char *s)
{
	while (*s && l->len < sizeof(l->buf))
		l->buf[l->len++] = *s++;
}

static inline void l_udec(struct line *l, unsigned long v)
{
	char tmp[24];
	int n = 0;

	do {
		tmp[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n && l->len < sizeof(l->buf))
		l->buf[l->len++] = tmp[--n];
}

static inline void l_hex16(struct line *l, uint64_t v)
{
	int i;

	for (i = 60; i >= 0 && l->len < sizeof(l->buf); i -= 4)
		l->buf[l->len++] = "0123456789abcdef"[(v >> i) & 0xf];
}

static inline void l_flush(struct line *l, int fd)
{
	size_t off = 0;

	while (off < l->len) {
		ssize_t n = sys_write(fd, l->buf + off, l->len - off);

		if (n == -HV_EINTR)
			continue;
		if (n <= 0)
			break;
		off += (size_t)n;
	}
	l->len = 0;
}

static inline void put_str(int fd, const char *s)
{
	struct line l = { .len = 0 };

	l_str(&l, s);
	l_flush(&l, fd);
}

/* --------------------------------------------------------------- start */

int main(int argc, char **argv, char **envp);

__attribute__((used, noreturn)) void hv_start_c(long *sp)
{
	int argc = (int)sp[0];
	char **argv = (char **)(sp + 1);

	sys_exit(main(argc, argv, argv + argc + 1));
}

__asm__(".text\n.global _start\n_start:\n"
	"\txor %ebp, %ebp\n"
	"\tmov %rsp, %rdi\n"
	"\tand $-16, %rsp\n"
	"\tcall hv_start_c\n"
	"\thlt\n");

#endif
