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
 * Built with hvrt.h (no C library) to keep the initramfs small.
 *
 * Host-side checks (not as PID 1):
 *   init --decode B64          print the decoded command
 *   init --parse-cmdline LINE  print the command hv.exec= in LINE decodes to
 */
#include "hvrt.h"

static char **environ_;

static void say(const char *a, const char *b, const char *c)
{
	struct line l = { .len = 0 };

	l_str(&l, a);
	l_str(&l, b);
	l_str(&l, c);
	l_flush(&l, 1);
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

static char decoded[4096];

/*
 * Decodes standard base64 (padding optional) of length len into a static
 * NUL-terminated buffer; NULL when the input is not base64, decodes to a
 * NUL byte or is too long.
 */
static char *b64decode(const char *in, size_t len)
{
	char *o = decoded;
	unsigned int acc = 0;
	int bits = 0;
	size_t i, pad = 0;

	if (len / 4 * 3 + 3 >= sizeof(decoded))
		return NULL;
	for (i = 0; i < len; i++) {
		int v;

		if (in[i] == '=') {
			pad++;
			continue;
		}
		if (pad)
			return NULL;	/* data after padding */
		v = b64val((unsigned char)in[i]);
		if (v < 0)
			return NULL;
		acc = (acc << 6) | (unsigned int)v;
		bits += 6;
		if (bits >= 8) {
			bits -= 8;
			*o = (char)((acc >> bits) & 0xff);
			if (*o == '\0')
				return NULL;
			o++;
		}
	}
	if (pad > 2 || bits >= 6)
		return NULL;
	*o = '\0';
	return decoded;
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
		if ((size_t)(end - p) >= klen && !hv_strncmp(p, key, klen)) {
			*found = 1;
			return b64decode(p + klen, (size_t)(end - p) - klen);
		}
		p = end;
	}
	return NULL;
}

static char *read_file(const char *path, char *buf, size_t size)
{
	int fd = sys_open(path, O_RDONLY | O_CLOEXEC, 0);
	ssize_t n;

	if (fd < 0)
		return NULL;
	n = sys_read(fd, buf, size - 1);
	sys_close(fd);
	if (n < 0)
		return NULL;
	buf[n] = '\0';
	return buf;
}

static __attribute__((noreturn)) void power_off(void)
{
	sys_sync();
	sys_reboot(LINUX_REBOOT_CMD_POWER_OFF);
	/* No power-off handler: halt instead of returning (init must not). */
	sys_reboot(LINUX_REBOOT_CMD_HALT);
	for (;;)
		sys_pause();
}

static volatile int stop_request;

static void on_signal(int sig)
{
	stop_request = sig;
}

static void handle_stop_request(void)
{
	int sig = stop_request;

	if (!sig)
		return;
	sys_sync();
	if (sig == SIGTERM)
		sys_reboot(LINUX_REBOOT_CMD_RESTART);
	power_off();
}

static void mounts(void)
{
	sys_mkdir("/proc", 0755);
	sys_mkdir("/sys", 0755);
	sys_mkdir("/dev", 0755);
	sys_mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC,
		  NULL);
	sys_mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
		  NULL);
	sys_mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
}

static void console_stdio(void)
{
	int fd;

	if (sys_ioctl(0, TCGETS, 0) != -9 && sys_ioctl(1, TCGETS, 0) != -9 &&
	    sys_ioctl(2, TCGETS, 0) != -9)
		return;		/* all three open (-EBADF is -9) */
	fd = sys_open("/dev/console", O_RDWR | O_NOCTTY, 0);
	if (fd < 0)
		return;
	sys_dup2(fd, 0);
	sys_dup2(fd, 1);
	sys_dup2(fd, 2);
	if (fd > 2)
		sys_close(fd);
}

/* Waits for pid, reaping orphans meanwhile; returns the shell-style status. */
static int wait_for(pid_t pid)
{
	for (;;) {
		int st = 0;
		pid_t r = sys_wait4(-1, &st, 0);

		if (r < 0) {
			if (r == -HV_EINTR) {
				handle_stop_request();
				continue;
			}
			return 255;
		}
		if (r != pid)
			continue;
		if ((st & 0x7f) == 0)
			return (st >> 8) & 0xff;		/* exited */
		if ((st & 0x7f) != 0x7f)
			return 128 + (st & 0x7f);	/* killed */
	}
}

/* fork + exec /bin/sh; tty: new session with /dev/ttyS0 as controlling tty */
static pid_t spawn_shell(char *const argv[], int tty)
{
	pid_t pid = sys_fork();

	if (pid != 0)
		return pid;
	if (tty) {
		int fd;

		sys_setsid();
		fd = sys_open("/dev/ttyS0", O_RDWR, 0);
		if (fd >= 0) {
			sys_ioctl(fd, TIOCSCTTY, 0);
			sys_dup2(fd, 0);
			sys_dup2(fd, 1);
			sys_dup2(fd, 2);
			if (fd > 2)
				sys_close(fd);
		}
	}
	sys_signal(SIGUSR1, SIG_DFL, 0);
	sys_signal(SIGUSR2, SIG_DFL, 0);
	sys_signal(SIGTERM, SIG_DFL, 0);
	sys_signal(SIGINT, SIG_DFL, 0);
	sys_execve("/bin/sh", argv, environ_);
	put_str(2, "hv-guest: cannot run /bin/sh\n");
	sys_exit(127);
}

static int host_mode(int argc, char **argv)
{
	char *cmd = NULL;
	int found = 1;

	if (argc == 3 && !hv_strcmp(argv[1], "--decode"))
		cmd = b64decode(argv[2], strlen(argv[2]));
	else if (argc == 3 && !hv_strcmp(argv[1], "--parse-cmdline"))
		cmd = exec_from_cmdline(argv[2], &found);
	else {
		put_str(2, "usage: init --decode B64 | --parse-cmdline CMDLINE "
			"(only PID 1 boots)\n");
		return 2;
	}
	if (!found) {
		put_str(2, "no hv.exec= parameter\n");
		return 3;
	}
	if (!cmd) {
		put_str(2, "invalid base64\n");
		return 1;
	}
	put_str(1, cmd);
	return 0;
}

static char *env[] = {
	"PATH=/bin:/sbin:/usr/bin:/usr/sbin",
	"HOME=/root",
	"SHELL=/bin/sh",
	"TERM=vt100",
	NULL
};

int main(int argc, char **argv, char **envp)
{
	static char buf[4096];
	char *line, *cmd = NULL, uptime[64] = "?";
	int found = 0;
	pid_t pid;
	(void)envp;

	if (sys_getpid() != 1)
		return host_mode(argc, argv);
	environ_ = env;

	sys_signal(SIGUSR1, on_signal, 0);
	sys_signal(SIGUSR2, on_signal, 0);
	sys_signal(SIGTERM, on_signal, 0);
	sys_signal(SIGINT, SIG_IGN, 0);		/* Ctrl-Alt-Del */

	mounts();
	console_stdio();
	sys_chdir("/root");

	line = read_file("/proc/uptime", buf, sizeof(buf));
	if (line) {
		size_t n = 0;

		while (line[n] && line[n] != ' ' && line[n] != '\n' &&
		       n < sizeof(uptime) - 1) {
			uptime[n] = line[n];
			n++;
		}
		uptime[n] = '\0';
	}
	say("hv-guest: ready uptime=", uptime, "\n");

	line = read_file("/proc/cmdline", buf, sizeof(buf));
	if (line)
		cmd = exec_from_cmdline(line, &found);

	if (found) {
		char *args[] = { "sh", "-c", cmd, NULL };
		struct line l = { .len = 0 };
		int status;

		if (!cmd) {
			say("hv-guest: hv.exec is not valid base64", "", "\n");
			status = 127;
		} else {
			pid = spawn_shell(args, 0);
			status = pid < 0 ? 127 : wait_for(pid);
		}
		l_str(&l, "hv-guest: exit-status ");
		l_udec(&l, (unsigned long)status);
		l_str(&l, "\n");
		l_flush(&l, 1);
		power_off();
	} else {
		/* Interactive: session leader on ttyS0 so job control works. */
		char *args[] = { "-sh", NULL };
		int tty = sys_access("/dev/ttyS0", 6) == 0;

		pid = spawn_shell(args, tty);
		if (pid > 0)
			wait_for(pid);
		say("hv-guest: shell exited, powering off", "", "\n");
		power_off();
	}
	return 0;
}
