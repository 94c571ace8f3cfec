/* probe: a freestanding test guest that reports, on COM1, what the VMM handed it, so host tests
 * can check boot hand-off from inside the guest. Words on the command line select extra work:
 *   smp    bring up every other CPU listed in the MP table (INIT-SIPI-SIPI) and count them
 *   pci    list PCI bus 0: every function, and each virtio device's BARs and capabilities
 *   blk    drive the first virtio-blk disk with MSI-X interrupts: write, flush, read, GET_ID
 *   fs     drive the first virtio-fs share with MSI-X interrupts: FUSE init, lookup, read, create
 *   vsock  drive the first virtio-vsock device with MSI-X interrupts: accept a host connection
 *          on guest port vport=N (default 5000) and echo a line, then connect to host port
 *          hport=M (default 6000) and exchange a line (0 skips either part)
 *   blkbench  timed sequential and random I/O on the first virtio-blk disk (`shoji bench
 *          devices`; words mib=N, ios=N, qd=N)
 *   vsockbench  vsock echo and streams both ways for `shoji bench vsock` (words port=N,
 *          rounds=N, msg=N, bytes=N, poll=N)
 *   crash  triple-fault after reporting
 *   hang   halt forever with interrupts off (tests timeouts and vCPU teardown)
 * (pci.c, blk.c, fs.c, vsock.c, blkbench.c and vsockbench.c describe their output lines;
 * virtio.c and idt.c are the driver core.)
 * Output lines (all start with "probe: "), then "PROBE-DONE" and an i8042 reset. */
#include "probe.h"

extern char ap_tramp_start[], ap_tramp_end[];

void *memcpy(void *d, const void *s, unsigned long n)
{
	u8 *dp = d;
	const u8 *sp = s;
	while (n--)
		*dp++ = *sp++;
	return d;
}

void *memset(void *d, int c, unsigned long n)
{
	u8 *dp = d;
	while (n--)
		*dp++ = (u8)c;
	return d;
}

static int has_word(const char *s, const char *w)
{
	if (!s) return 0;
	while (*s) {
		while (*s == ' ') s++;
		const char *a = s, *b = w;
		while (*b && *a == *b) { a++; b++; }
		if (!*b && (*a == ' ' || *a == 0)) return 1;
		while (*s && *s != ' ') s++;
	}
	return 0;
}

u32 word_number(const char *s, const char *key, u32 dflt)
{
	if (!s) return dflt;
	while (*s) {
		while (*s == ' ') s++;
		const char *a = s, *b = key;
		while (*b && *a == *b) { a++; b++; }
		if (!*b) {
			u64 v = 0;
			int digits = 0;
			while (*a >= '0' && *a <= '9' && v <= 0xffffffffULL) { v = v * 10 + (u64)(*a++ - '0'); digits++; }
			if (digits && (*a == ' ' || *a == 0) && v <= 0xffffffffULL) return (u32)v;
		}
		while (*s && *s != ' ') s++;
	}
	return dflt;
}

static u8 sum8(const u8 *p, u64 n) { u8 s = 0; while (n--) s += *p++; return s; }

/* Finds the MP floating pointer where the spec says to look and counts processor entries. */
static int mptable_cpus(int *csum_ok)
{
	static const u64 ranges[2][2] = { { 0x9fc00, 0xa0000 }, { 0xf0000, 0x100000 } };
	for (int r = 0; r < 2; r++) {
		for (u64 a = ranges[r][0]; a < ranges[r][1]; a += 16) {
			const u8 *p = (const u8 *)a;
			if (p[0] != '_' || p[1] != 'M' || p[2] != 'P' || p[3] != '_') continue;
			const u8 *cfg = (const u8 *)(u64)*(const u32 *)(p + 4);
			if (cfg[0] != 'P' || cfg[1] != 'C' || cfg[2] != 'M' || cfg[3] != 'P') return -1;
			u16 len = *(const u16 *)(cfg + 4), count = *(const u16 *)(cfg + 34);
			*csum_ok = sum8(p, 16) == 0 && sum8(cfg, len) == 0;
			const u8 *e = cfg + 44;
			int cpus = 0;
			for (u16 i = 0; i < count && e < cfg + len; i++) {
				if (e[0] == 0) { if (e[3] & 1) cpus++; e += 20; } else e += 8;
			}
			return cpus;
		}
	}
	return -1;
}

static void lapic_write(u32 reg, u32 v) { *(volatile u32 *)(u64)(0xfee00000u + reg) = v; }
static void delay(int n) { for (volatile int i = 0; i < n; i++) __asm__ volatile("pause"); }

static int start_aps(int expected)
{
	volatile u16 *count = (volatile u16 *)0x8100;
	*count = 0;
	memcpy((void *)0x8000, ap_tramp_start, ap_tramp_end - ap_tramp_start);
	lapic_write(0xf0, 0x1ff);		/* software-enable, spurious vector 0xff */
	lapic_write(0x310, 0);
	lapic_write(0x300, 0x000c4500);		/* INIT, all excluding self */
	delay(1000);
	for (int i = 0; i < 2; i++) {
		lapic_write(0x310, 0);
		lapic_write(0x300, 0x000c4608);	/* SIPI, vector 0x08 -> 0x8000 */
		delay(1000);
	}
	for (int spins = 0; spins < 200000 && *count < expected; spins++)
		__asm__ volatile("pause");
	return 1 + *count;
}

struct e820 { u64 addr, size; u32 type; } __attribute__((packed));

void probe_main(u64 info, int kind)
{
	const char *cmdline = 0;
	u64 initrd = 0, initrd_size = 0;
	puts("probe: boot=");
	puts(kind == 0 ? "pvh\n" : "linux64\n");
	if (kind == 0) {
		const u8 *si = (const u8 *)info;
		if (*(const u32 *)si != 0x336ec578) { puts("probe: bad start_info magic\n"); triple_fault(); }
		u32 nr_modules = *(const u32 *)(si + 12);
		u64 modlist = *(const u64 *)(si + 16);
		cmdline = (const char *)*(const u64 *)(si + 24);
		u64 memmap = *(const u64 *)(si + 40);
		u32 entries = *(const u32 *)(si + 48);
		if (nr_modules) {
			initrd = *(const u64 *)modlist;
			initrd_size = *(const u64 *)(modlist + 8);
		}
		for (u32 i = 0; i < entries; i++) {
			const u8 *e = (const u8 *)(memmap + 24 * i);
			puts("probe: e820 "); puthex(*(const u64 *)e); putc(' ');
			puthex(*(const u64 *)(e + 8)); putc(' '); putdec(*(const u32 *)(e + 16)); putc('\n');
		}
	} else {
		const u8 *bp = (const u8 *)info;
		cmdline = (const char *)(u64)*(const u32 *)(bp + 0x228);
		initrd = *(const u32 *)(bp + 0x218);
		initrd_size = *(const u32 *)(bp + 0x21c);
		u8 entries = bp[0x1e8];
		for (u8 i = 0; i < entries && i < 128; i++) {
			const struct e820 *e = (const struct e820 *)(bp + 0x2d0 + 20 * i);
			puts("probe: e820 "); puthex(e->addr); putc(' ');
			puthex(e->size); putc(' '); putdec(e->type); putc('\n');
		}
	}
	puts("probe: cmdline=[");
	if (cmdline) puts(cmdline);
	puts("]\n");
	if (initrd_size) {
		puts("probe: initrd size="); putdec(initrd_size);
		puts(" fnv="); puthex(fnv1a((const u8 *)initrd, initrd_size)); putc('\n');
	} else {
		puts("probe: initrd none\n");
	}
	int csum_ok = 0;
	int cpus = mptable_cpus(&csum_ok);
	puts("probe: mptable cpus="); putdec(cpus < 0 ? 0 : cpus);
	puts(cpus < 0 ? " missing\n" : csum_ok ? " checksum=ok\n" : " checksum=bad\n");
	if (has_word(cmdline, "smp") && cpus > 0) {
		puts("probe: smp online="); putdec(start_aps(cpus - 1)); putc('\n');
	}
	if (has_word(cmdline, "pci"))
		pci_mode();
	if (has_word(cmdline, "blk"))
		blk_mode();
	if (has_word(cmdline, "fs"))
		fs_mode();
	if (has_word(cmdline, "vsock"))
		vsock_mode(word_number(cmdline, "vport=", 5000), word_number(cmdline, "hport=", 6000));
	if (has_word(cmdline, "blkbench"))
		blkbench_mode(cmdline);
	if (has_word(cmdline, "vsockbench"))
		vsockbench_mode(cmdline);
	if (has_word(cmdline, "crash")) {
		puts("probe: crashing\n");
		triple_fault();
	}
	if (has_word(cmdline, "tick")) {
		/* A dot a line, forever (the console is line-buffered): a paused VM's output stops growing. */
		puts("probe: ticking\n");
		for (;;) { puts(".\n"); delay(20000); }
	}
	if (has_word(cmdline, "hang")) {
		puts("probe: hanging\n");
		for (;;) __asm__ volatile("cli; hlt");
	}
	puts("PROBE-DONE\n");
	outb(0x64, 0xfe);
	for (;;) __asm__ volatile("hlt");
}
