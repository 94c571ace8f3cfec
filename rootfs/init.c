/* The placeholder PID 1 of Shoji's initramfs until the guest agent takes over: prove that
 * userspace runs (a marker with the kernel's boot time), then reboot, which ends the VM.
 *
 * With `shoji.selftest` on the kernel command line it first reports what the guest sees, for
 * the VMM's device tests: every PCI function (slot, vendor:device), every block device with
 * its size and the FNV-1a hash of its first 4 KiB, then rewrites the first sector of a disk
 * named by `shoji.selftest.write=vdX` with a marker. */
#include <dirent.h>
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
