/*
 * /init of the hv guest.
 *
 * Every fork/exec is expensive when the guest kernel is emulated, so init is
 * a small static C program rather than a shell script:
 *   - mounts proc, sysfs and devtmpfs;
 *   - prints "hv-guest: ready uptime=SECONDS" on the console;
 *   - with hv.exec=B64 on the kernel command line (standard base64 of a
 *     UTF-8 shell command) runs `/bin/sh -c COMMAND` with stdio on the
 *     console, prints "hv-guest: exit-status N" and powers off;
 *   - otherwise starts an interactive shell on /dev/ttyS0 (job control) and
 *     powers off when it exits.
 * busybox's poweroff/reboot/halt signal init (SIGUSR2/SIGTERM/SIGUSR1);
 * init honours them.
 *
 * Host-side checks (not as PID 1):
 *   init --decode B64          print the decoded command
 *   init --parse-cmdline LINE  print the command hv.exec= in LINE decodes to
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

static void say(const char *fmt, const char *arg)
{
	char buf[512];
	int n = snprintf(buf, sizeof(buf), fmt, arg);
	if (n > 0)
		(void)!write(1, buf, n < (int)sizeof(buf) ? n : (int)sizeof(buf) - 1);
}

static int b64val(unsigned char c)
{
	if (c >= 'A' && c <= 'Z')
		return c - 'A';
	if (c >= 'a' && c <= 'z')
		return c - 'a' + 26;
	if (c >= '0' && c <= '9')
		return c - '0' + 52;
	if (c == '+')
		return 62;
	if (c == '/')
		return 63;
	return -1;
}

/*
 * Decodes standard base64 (padding optional) of length len into a new
 * NUL-terminated string; NULL when the input is not base64 or decodes to
 * a NUL byte.
 */
static char *b64decode(const char *in, size_t len)
{
	char *out = malloc(len / 4 * 3 + 4), *o = out;
	unsigned int acc = 0;
	int bits = 0;
	size_t i, pad = 0;

	if (!out)
		return NULL;
	for (i = 0; i < len; i++) {
		int v;

		if (in[i] == '=') {
			pad++;
			continue;
		}
		if (pad)
			goto bad;	/* data after padding */
		v = b64val((unsigned char)in[i]);
		if (v < 0)
			goto bad;
		acc = (acc << 6) | (unsigned int)v;
		bits += 6;
		if (bits >= 8) {
			bits -= 8;
			*o = (char)((acc >> bits) & 0xff);
			if (*o == '\0')
				goto bad;
			o++;
		}
	}
	if (pad > 2 || bits >= 6)
		goto bad;
	*o = '\0';
	return out;
bad:
	free(out);
	return NULL;
}

/*
 * The command hv.exec= on a kernel command line decodes to; *found is set
 * when the parameter is present.  NULL when absent or undecodable.
 */
static char *exec_from_cmdline(const char *line, int *found)
{
	const char *p = line;
	const char *key = "hv.exec=";
	size_t klen = strlen(key);

	*found = 0;
	while (*p) {
		const char *end;

		while (*p == ' ' || *p == '\t' || *p == '\n')
			p++;
		end = p;
		while (*end && *end != ' ' && *end != '\t' && *end != '\n')
			end++;
		if ((size_t)(end - p) >= klen && !strncmp(p, key, klen)) {
			*found = 1;
			return b64decode(p + klen, (size_t)(end - p) - klen);
		}
		p = end;
	}
	return NULL;
}

static char *read_file(const char *path)
{
	static char buf[8192];
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	ssize_t n;

	if (fd < 0)
		return NULL;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n < 0)
		return NULL;
	buf[n] = '\0';
	return buf;
}

static void power_off(void)
{
	sync();
	reboot(RB_POWER_OFF);
	/* No power-off handler: halt instead of returning (init must not). */
	reboot(RB_HALT_SYSTEM);
	for (;;)
		pause();
}

static volatile sig_atomic_t stop_request;

static void on_signal(int sig)
{
	stop_request = sig;
}

static void handle_stop_request(void)
{
	int sig = stop_request;

	if (!sig)
		return;
	sync();
	if (sig == SIGTERM)
		reboot(RB_AUTOBOOT);
	power_off();
}

static void mounts(void)
{
	mkdir("/proc", 0755);
	mkdir("/sys", 0755);
	mkdir("/dev", 0755);
	mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
}

static void console_stdio(void)
{
	int fd;

	if (fcntl(0, F_GETFD) >= 0 && fcntl(1, F_GETFD) >= 0 &&
	    fcntl(2, F_GETFD) >= 0)
		return;
	fd = open("/dev/console", O_RDWR | O_NOCTTY);
	if (fd < 0)
		return;
	dup2(fd, 0);
	dup2(fd, 1);
	dup2(fd, 2);
	if (fd > 2)
		close(fd);
}

/* Waits for pid, reaping orphans meanwhile; returns the shell-style status. */
static int wait_for(pid_t pid)
{
	for (;;) {
		int st;
		pid_t r = waitpid(-1, &st, 0);

		if (r < 0) {
			if (errno == EINTR) {
				handle_stop_request();
				continue;
			}
			return 255;
		}
		if (r != pid)
			continue;
		if (WIFEXITED(st))
			return WEXITSTATUS(st);
		if (WIFSIGNALED(st))
			return 128 + WTERMSIG(st);
	}
}

static int host_mode(int argc, char **argv)
{
	char *cmd = NULL;
	int found = 1;

	if (argc == 3 && !strcmp(argv[1], "--decode"))
		cmd = b64decode(argv[2], strlen(argv[2]));
	else if (argc == 3 && !strcmp(argv[1], "--parse-cmdline"))
		cmd = exec_from_cmdline(argv[2], &found);
	else {
		fprintf(stderr, "usage: init --decode B64 | "
			"--parse-cmdline CMDLINE (only PID 1 boots)\n");
		return 2;
	}
	if (!found) {
		fprintf(stderr, "no hv.exec= parameter\n");
		return 3;
	}
	if (!cmd) {
		fprintf(stderr, "invalid base64\n");
		return 1;
	}
	fputs(cmd, stdout);
	return 0;
}

int main(int argc, char **argv)
{
	struct sigaction sa;
	char *line, *cmd = NULL, uptime[64] = "?";
	int found = 0;
	pid_t pid;

	if (getpid() != 1)
		return host_mode(argc, argv);

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigaction(SIGUSR1, &sa, NULL);
	sigaction(SIGUSR2, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	signal(SIGINT, SIG_IGN);	/* Ctrl-Alt-Del */

	mounts();
	console_stdio();
	setenv("PATH", "/bin:/sbin:/usr/bin:/usr/sbin", 1);
	setenv("HOME", "/root", 1);
	setenv("SHELL", "/bin/sh", 1);
	setenv("TERM", "vt100", 0);
	chdir("/root");

	line = read_file("/proc/uptime");
	if (line) {
		size_t n = strcspn(line, " \n");

		if (n >= sizeof(uptime))
			n = sizeof(uptime) - 1;
		memcpy(uptime, line, n);
		uptime[n] = '\0';
	}
	say("hv-guest: ready uptime=%s\n", uptime);

	line = read_file("/proc/cmdline");
	if (line)
		cmd = exec_from_cmdline(line, &found);

	if (found) {
		char *args[] = { "sh", "-c", cmd, NULL };
		char num[16];
		int status;

		if (!cmd) {
			say("hv-guest: hv.exec is not valid base64%s\n", "");
			status = 127;
		} else if (posix_spawn(&pid, "/bin/sh", NULL, NULL, args,
				       environ)) {
			say("hv-guest: cannot run /bin/sh%s\n", "");
			status = 127;
		} else {
			status = wait_for(pid);
		}
		snprintf(num, sizeof(num), "%d", status);
		say("hv-guest: exit-status %s\n", num);
		power_off();
	} else {
		/* Interactive: session leader on ttyS0 so job control works. */
		char *args[] = { "-sh", NULL };
		posix_spawnattr_t attr;
		posix_spawn_file_actions_t fa;
		int tty_ok = access("/dev/ttyS0", R_OK | W_OK) == 0;

		posix_spawnattr_init(&attr);
		posix_spawn_file_actions_init(&fa);
		if (tty_ok) {
			posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSID);
			posix_spawn_file_actions_addopen(&fa, 0, "/dev/ttyS0",
							 O_RDWR, 0);
			posix_spawn_file_actions_adddup2(&fa, 0, 1);
			posix_spawn_file_actions_adddup2(&fa, 0, 2);
		}
		if (posix_spawn(&pid, "/bin/sh", &fa, &attr, args, environ)) {
			say("hv-guest: cannot run /bin/sh%s\n", "");
		} else {
			wait_for(pid);
		}
		say("hv-guest: shell exited, powering off%s\n", "");
		power_off();
	}
	return 0;
}
