/* The placeholder PID 1 of Shoji's initramfs until the guest agent takes over: prove that
 * userspace runs (a marker with the kernel's boot time), then reboot, which ends the VM. */
#include <fcntl.h>
#include <stdio.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <time.h>
#include <unistd.h>

int main(void)
{
	int fd = open("/dev/console", O_WRONLY | O_NOCTTY);
	if (fd < 0) {
		mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
		fd = open("/dev/console", O_WRONLY | O_NOCTTY);
	}
	struct timespec bt;
	clock_gettime(CLOCK_BOOTTIME, &bt);
	dprintf(fd, "SHOJI-INIT-OK boottime=%ld.%06ld\n", (long)bt.tv_sec, bt.tv_nsec / 1000);
	sync();
	reboot(RB_AUTOBOOT);
	return 1;
}
