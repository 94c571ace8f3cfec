/* The placeholder PID 1 of Shoji's initramfs until the guest agent takes over: prove that
 * userspace runs (a marker with the kernel's boot time), then reboot, which ends the VM.
 *
 * With `shoji.selftest` on the kernel command line it first reports what the guest sees, for
 * the VMM's device tests: every PCI function (slot, vendor:device), every block device with
 * its size and the FNV-1a hash of its first 4 KiB, then rewrites the first sector of a disk
 * named by `shoji.selftest.write=vdX` with a marker. `shoji.selftest.vsock=PORT` answers one
 * host connection on that vsock port ("guest-echo: LINE") and `shoji.selftest.vsock.host=PORT`
 * connects to the host's PORT and prints the reply; `shoji.selftest.fs=TAG` mounts that
 * virtio-fs share read-write at /mnt/TAG, prints hello.txt and tries to create a file. */
#include <dirent.h>
#include <errno.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <time.h>
#include <unistd.h>

static int console = 2;

static int read_small(const char *path, char *buf, int len)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) return -1;
	int n = read(fd, buf, len - 1);
	close(fd);
	if (n < 0) return -1;
	buf[n] = 0;
	while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' ')) buf[--n] = 0;
	return n;
}

static unsigned fnv1a(const unsigned char *p, long n)
{
	unsigned h = 0x811c9dc5u;
	while (n-- > 0) { h ^= *p++; h *= 0x01000193u; }
	return h;
}

/* <linux/vm_sockets.h>, which musl's headers do not carry. */
#define AF_VSOCK_ 40
struct sockaddr_vm_ {
	unsigned short svm_family;
	unsigned short svm_reserved1;
	unsigned int svm_port;
	unsigned int svm_cid;
	unsigned char svm_zero[4];
};

static long param(const char *cmdline, const char *key)
{
	const char *p = strstr(cmdline, key);
	long v = -1;
	if (p) sscanf(p + strlen(key), "%ld", &v);
	return v;
}

/* Reads one line (up to n-1 bytes) with a poll timeout; returns its length or -1. */
static int read_line(int fd, char *buf, int n, int timeout_ms)
{
	int len = 0;
	while (len < n - 1) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		if (poll(&p, 1, timeout_ms) <= 0) return -1;
		int r = read(fd, buf + len, 1);
		if (r <= 0) return -1;
		if (buf[len] == '\n') break;
		len++;
	}
	buf[len] = 0;
	return len;
}

static void vsock_listen(long port)
{
	int s = socket(AF_VSOCK_, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_vm_ a = { .svm_family = AF_VSOCK_, .svm_port = (unsigned)port, .svm_cid = -1U };
	if (s < 0 || bind(s, (void *)&a, sizeof a) || listen(s, 1)) {
		dprintf(console, "selftest: vsock listen %ld failed errno=%d\n", port, errno);
		return;
	}
	dprintf(console, "selftest: vsock listening %ld\n", port);
	struct pollfd p = { .fd = s, .events = POLLIN };
	if (poll(&p, 1, 300000) <= 0) { dprintf(console, "selftest: vsock accept timeout\n"); return; }
	int c = accept(s, NULL, NULL);
	char line[256];
	if (c < 0 || read_line(c, line, sizeof line, 60000) < 0) {
		dprintf(console, "selftest: vsock accept/read failed errno=%d\n", errno);
		return;
	}
	dprintf(c, "guest-echo: %s\n", line);
	dprintf(console, "selftest: vsock echoed [%s]\n", line);
	close(c);
	close(s);
}

static void vsock_connect(long port)
{
	int s = socket(AF_VSOCK_, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_vm_ a = { .svm_family = AF_VSOCK_, .svm_port = (unsigned)port, .svm_cid = 2 };
	char line[256];
	if (s < 0 || connect(s, (void *)&a, sizeof a)) {
		dprintf(console, "selftest: vsock connect %ld failed errno=%d\n", port, errno);
		return;
	}
	dprintf(s, "hello-from-guest\n");
	if (read_line(s, line, sizeof line, 60000) < 0) {
		dprintf(console, "selftest: vsock reply read failed errno=%d\n", errno);
		return;
	}
	dprintf(console, "selftest: vsock host replied [%s]\n", line);
	close(s);
}

static void fs_check(const char *tag)
{
	char dir[128], path[256], buf[256];
	snprintf(dir, sizeof dir, "/mnt/%s", tag);
	mkdir("/mnt", 0755);
	mkdir(dir, 0755);
	if (mount(tag, dir, "virtiofs", 0, NULL)) {
		dprintf(console, "selftest: fs mount %s failed errno=%d\n", tag, errno);
		return;
	}
	snprintf(path, sizeof path, "%s/hello.txt", dir);
	int n = read_small(path, buf, sizeof buf);
	dprintf(console, "selftest: fs %s hello.txt [%s] len=%d\n", tag, n >= 0 ? buf : "", n);
	snprintf(path, sizeof path, "%s/from-guest.txt", dir);
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	int e = fd < 0 ? errno : 0;
	if (fd >= 0) {
		dprintf(fd, "written by the guest\n");
		close(fd);
	}
	dprintf(console, "selftest: fs %s create errno=%d\n", tag, e);
	umount(dir);
}

static void selftest(const char *cmdline)
{
	char path[512], a[64], b[64];
	mount("sysfs", "/sys", "sysfs", 0, NULL);
	DIR *d = opendir("/sys/bus/pci/devices");
	struct dirent *e;
	while (d && (e = readdir(d))) {
		if (e->d_name[0] == '.') continue;
		snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/vendor", e->d_name);
		read_small(path, a, sizeof a);
		snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/device", e->d_name);
		read_small(path, b, sizeof b);
		dprintf(console, "selftest: pci %s %s:%s\n", e->d_name, a, b);
	}
	if (d) closedir(d);
	const char *w = strstr(cmdline, "shoji.selftest.write=");
	char wdev[16] = "";
	if (w) sscanf(w + strlen("shoji.selftest.write="), "%15[a-z]", wdev);
	d = opendir("/sys/block");
	while (d && (e = readdir(d))) {
		if (strncmp(e->d_name, "vd", 2)) continue;
		snprintf(path, sizeof path, "/sys/block/%s/size", e->d_name);
		read_small(path, a, sizeof a);
		snprintf(path, sizeof path, "/sys/block/%s/ro", e->d_name);
		read_small(path, b, sizeof b);
		snprintf(path, sizeof path, "/dev/%s", e->d_name);
		unsigned char buf[4096];
		int fd = open(path, O_RDWR | O_CLOEXEC);
		if (fd < 0) fd = open(path, O_RDONLY | O_CLOEXEC);
		long n = fd < 0 ? -1 : pread(fd, buf, sizeof buf, 0);
		dprintf(console, "selftest: block %s sectors=%s ro=%s read=%ld fnv=0x%08x\n", e->d_name, a, b, n,
			n > 0 ? fnv1a(buf, n) : 0);
		if (fd >= 0 && !strcmp(e->d_name, wdev)) {
			memset(buf, 0, 512);
			strcpy((char *)buf, "SHOJI-GUEST-WROTE-THIS");
			long wn = pwrite(fd, buf, 512, 0);
			int s = fsync(fd);
			dprintf(console, "selftest: wrote %s %ld sync=%d\n", e->d_name, wn, s);
		}
		if (fd >= 0) close(fd);
	}
	if (d) closedir(d);
	const char *f = cmdline;
	while ((f = strstr(f, "shoji.selftest.fs="))) {
		char tag[40] = "";
		sscanf(f + strlen("shoji.selftest.fs="), "%39[A-Za-z0-9_-]", tag);
		if (tag[0]) fs_check(tag);
		f++;
	}
	long port = param(cmdline, "shoji.selftest.vsock=");
	if (port > 0) vsock_listen(port);
	port = param(cmdline, "shoji.selftest.vsock.host=");
	if (port > 0) vsock_connect(port);
}

int main(void)
{
	int fd = open("/dev/console", O_WRONLY | O_NOCTTY);
	mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
	if (fd < 0) fd = open("/dev/console", O_WRONLY | O_NOCTTY);
	console = fd;
	struct timespec bt;
	clock_gettime(CLOCK_BOOTTIME, &bt);
	dprintf(fd, "SHOJI-INIT-OK boottime=%ld.%06ld\n", (long)bt.tv_sec, bt.tv_nsec / 1000);
	char cmdline[4096] = "";
	mount("proc", "/proc", "proc", 0, NULL);
	read_small("/proc/cmdline", cmdline, sizeof cmdline);
	if (strstr(cmdline, "shoji.selftest")) selftest(cmdline);
	dprintf(fd, "SHOJI-INIT-DONE\n");
	sync();
	reboot(RB_AUTOBOOT);
	return 1;
}
