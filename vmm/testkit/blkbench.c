/* The probe's `blkbench` mode: timed workloads on the first virtio-blk disk for `shoji bench
 * devices`. The guest only marks the phases; the host timestamps the lines as they arrive.
 *   probe: bench disk capacity=S qd=Q ro=0|1      sectors, requests in flight, read-only
 *   probe: bench seqread start
 *   probe: bench seqread end bytes=B requests=R
 *   probe: bench seqread stats errors=E mismatches=M kicks=K irqs=I
 *   probe: bench randread ...                      (the same three lines)
 *   probe: bench seqwrite ...                      (the same three lines; on a read-only disk
 *                                                  "probe: bench seqwrite skipped ro" instead)
 * seqread/seqwrite: 64 KiB requests over the first N MiB (`mib=N`, default 16, at most the
 * disk); randread: `ios=N` (default 2000) 4 KiB reads at 4 KiB-aligned offsets anywhere on the
 * disk, from an LCG. Up to `qd=N` requests (default 8, at most 16) are in flight. Kicks are
 * the notifications the guest wrote; irqs, the MSI-X interrupts it took (while it polls with
 * interrupts off, pending ones merge, so irqs counts waits rather than completions).
 *
 * Guest instructions are expensive where kernel mode is emulated (PVM), so per-request work is
 * a handful of stores: each in-flight slot has a prebuilt three-descriptor chain (header, data,
 * status) and only the header's sector changes. Completions are awaited with `sti; hlt` on the
 * queue's MSI-X vector; every wait is bounded by the LAPIC watchdog tick.
 *
 * Data check without touching every byte: the host writes a stamp, STAMP_TAG | S, into the
 * first 8 bytes of every 4 KiB block (S = the block's first sector); each read checks the stamp
 * at the start of its buffer, and each write stamps the first 8 bytes it writes, which the host
 * can check afterwards. The write phase runs last because it stamps only the first block of
 * each 64 KiB request. Errors count requests whose status byte is not OK (or unknown used
 * ids); mismatches, reads whose stamp was wrong. A failure prints "probe: bench error: ..."
 * and ends the mode. Needs guest RAM up to 9 MiB (the data buffers sit at 8 MiB). */
#include "probe.h"

#define VIRTIO_BLK_DEVICE 0x1042
#define BLK_F_RO (1ULL << 5)
#define T_IN 0
#define T_OUT 1

#define BENCH_VECTOR (VEC_MSI_BASE + 1)
#define STALL_TICKS (5000 / TICK_MS)	/* no completion for 5 s: give up */
#define MAX_QD 16
#define SEQ_BYTES 0x10000u		/* 64 KiB */
#define RAND_BYTES 0x1000u		/* 4 KiB */
#define SECTORS_PER_BLOCK 8		/* 4 KiB */
#define STAMP_TAG 0x53484f4a00000000ULL	/* "SHOJ" in the top half; the sector below */

/* Per-slot headers and status bytes in the DMA area; data buffers (64 KiB per slot) above the
 * probe image, which is far smaller than 7 MiB. */
#define HDR_AREA DMA_AREA
#define STATUS_AREA (DMA_AREA + 0x400)
#define BUF_AREA 0x800000UL

#define USED_F_NO_NOTIFY 1
#define DESC_F_NEXT 1
#define DESC_F_WRITE 2

struct blk_req { u32 type, reserved; u64 sector; };

struct bench {
	struct virtq q;
	int qd;
	int stalled;
};

static int fail(const char *what)
{
	puts("probe: bench error: ");
	puts(what);
	putc('\n');
	return -1;
}

/* The number after "key=" on the command line, or `dflt`. */
static u64 word_value(const char *s, const char *key, u64 dflt)
{
	if (!s) return dflt;
	while (*s) {
		while (*s == ' ') s++;
		const char *a = s, *b = key;
		while (*b && *a == *b) { a++; b++; }
		if (!*b && *a == '=' && a[1] >= '0' && a[1] <= '9') {
			u64 v = 0;
			for (a++; *a >= '0' && *a <= '9'; a++)
				v = v * 10 + (u64)(*a - '0');
			return v;
		}
		while (*s && *s != ' ') s++;
	}
	return dflt;
}

/* Slot k's chain: descriptor k (header) -> MAX_QD + k (data) -> 2 * MAX_QD + k (status), so
 * a used element's id is the slot. */
#define DATA_DESC(k) (MAX_QD + (k))
#define STATUS_DESC(k) (2 * MAX_QD + (k))
#define HDR(k) ((volatile struct blk_req *)(HDR_AREA + 16UL * (k)))
#define STATUS(k) (*(volatile u8 *)(STATUS_AREA + (k)))
#define BUF(k) ((volatile u64 *)(BUF_AREA + (u64)SEQ_BYTES * (k)))

static void build_chains(struct bench *b, u32 type, u32 len)
{
	for (int k = 0; k < b->qd; k++) {
		volatile struct vq_desc *d = b->q.desc;
		HDR(k)->type = type;
		HDR(k)->reserved = 0;
		d[k].addr = HDR_AREA + 16UL * k;
		d[k].len = sizeof(struct blk_req);
		d[k].flags = DESC_F_NEXT;
		d[k].next = (u16)DATA_DESC(k);
		d[DATA_DESC(k)].addr = (u64)BUF(k);
		d[DATA_DESC(k)].len = len;
		d[DATA_DESC(k)].flags = DESC_F_NEXT | (type == T_IN ? DESC_F_WRITE : 0);
		d[DATA_DESC(k)].next = (u16)STATUS_DESC(k);
		d[STATUS_DESC(k)].addr = STATUS_AREA + k;
		d[STATUS_DESC(k)].len = 1;
		d[STATUS_DESC(k)].flags = DESC_F_WRITE;
		d[STATUS_DESC(k)].next = 0;
	}
}

/* The request stream: sequential `step`-sector requests from sector 0, or (blocks != 0) an
 * LCG over the disk's 4 KiB blocks (scaled by a multiply, no division). */
struct stream { u64 x, step, blocks; };
static inline __attribute__((always_inline)) u64 next_sector(struct stream *st)
{
	if (st->blocks) {
		st->x = st->x * 6364136223846793005ULL + 1442695040888963407ULL;
		return ((st->x >> 32) * st->blocks >> 32) * SECTORS_PER_BLOCK;
	}
	st->x += st->step;
	return st->x - st->step;
}

/* Runs `n` requests of `len` bytes of `type`, sequential from sector 0 or (blocks != 0)
 * random 4 KiB blocks below `blocks`; prints the start, end and stats lines. Inlined into
 * each call with constant arguments, so the loop carries only what that phase needs. */
static inline __attribute__((always_inline)) void phase(struct bench *b, const char *name, const u32 type,
							const u32 len, const u64 n, const u64 blocks)
{
	volatile struct vq_used_elem *uring = b->q.used->ring;
	volatile u16 *uidx = &b->q.used->idx, *uflags = &b->q.used->flags;
	volatile u16 *aring = b->q.avail->ring, *aidxp = &b->q.avail->idx;
	const u16 mask = (u16)(b->q.size - 1), qindex = b->q.index;
	const u64 notify = b->q.notify;
	u16 last = b->q.last_used, aidx = b->q.avail_idx;
	struct stream st = { blocks ? 0x243f6a8885a308d3ULL : 0, len / 512, blocks };
	u64 submitted = 0, completed = 0, errors = 0, mismatches = 0, kicks = 0;
	u32 irqs_before = irq_counts[BENCH_VECTOR];
	build_chains(b, type, len);
	puts("probe: bench "); puts(name); puts(" start\n");

	/* Fill the queue; then each completion resubmits its slot, one kick per batch. The
	 * device's NO_NOTIFY flag (it is still polling the ring) saves kicks; no fence is needed
	 * (x86 keeps store order, and the device reads the index after the ring entries). */
	for (int k = 0; k < b->qd && submitted < n; k++, submitted++) {
		u64 s = next_sector(&st);
		HDR(k)->sector = s;
		STATUS(k) = 0xff;
		if (type == T_OUT)
			BUF(k)[0] = STAMP_TAG | s;
		aring[aidx & mask] = (u16)k;
		aidx++;
	}
	u32 last_progress = irq_counts[VEC_TIMER];
	int refilled = submitted != 0;
	while (completed < n) {
		if (refilled) {
			barrier();
			*aidxp = aidx;
			barrier();
			if (!(*uflags & USED_F_NO_NOTIFY)) {
				mmio_w16(notify, qindex);
				kicks++;
			}
			refilled = 0;
			last_progress = irq_counts[VEC_TIMER];
		}
		__asm__ volatile("cli" : : : "memory");
		u16 used = *uidx;
		if (used == last) {
			if (irq_counts[VEC_TIMER] - last_progress >= STALL_TICKS) {
				b->stalled = 1;
				break;
			}
			__asm__ volatile("sti; hlt" : : : "memory");
			continue;
		}
		barrier();
		do {
			u32 k = uring[last & mask].id;
			last++;
			if (k >= (u32)b->qd) {
				errors++;	/* not one of our heads: count it, the slot is lost */
				continue;
			}
			completed++;
			if (STATUS(k) != 0)
				errors++;
			else if (type == T_IN && BUF(k)[0] != (STAMP_TAG | HDR(k)->sector))
				mismatches++;
			if (submitted < n) {
				u64 s = next_sector(&st);
				HDR(k)->sector = s;
				STATUS(k) = 0xff;
				if (type == T_OUT)
					BUF(k)[0] = STAMP_TAG | s;
				aring[aidx & mask] = (u16)k;
				aidx++;
				submitted++;
				refilled = 1;
			}
		} while (last != used);
		last_progress = irq_counts[VEC_TIMER];
	}
	__asm__ volatile("sti" : : : "memory");
	b->q.last_used = last;
	b->q.avail_idx = aidx;
	puts("probe: bench "); puts(name);
	puts(" end bytes="); putdec(completed * len);
	puts(" requests="); putdec(completed); putc('\n');
	puts("probe: bench "); puts(name);
	puts(" stats errors="); putdec(errors);
	puts(" mismatches="); putdec(mismatches);
	puts(" kicks="); putdec(kicks);
	puts(" irqs="); putdec(irq_counts[BENCH_VECTOR] - irqs_before); putc('\n');
	if (b->stalled)
		fail("a request did not complete within 5 s");
}

static int run(const char *cmdline)
{
	static struct bench b;
	struct virtio_dev d;
	memset(&b, 0, sizeof(b));
	if (virtio_find(VIRTIO_BLK_DEVICE, 0, &d))
		return fail("no virtio-blk device");
	if (virtio_negotiate(&d, VIRTIO_F_VERSION_1 | BLK_F_RO))
		return fail("feature negotiation (FEATURES_OK not accepted)");
	if (!d.devcfg || !d.msix_table || d.msix_size < 1)
		return fail("no device configuration or MSI-X table");
	virtio_msix_enable(&d);
	if (virtio_msix_entry(&d, 0, BENCH_VECTOR))
		return fail("MSI-X table entry 0 did not take");
	if (virtq_setup(&d, &b.q, 0, VQ_MAX_SIZE, 0, 0, BENCH_VECTOR))
		return fail("queue 0 setup");
	if (virtio_driver_ok(&d, VIRTIO_NO_VECTOR))
		return fail("DRIVER_OK: the device needs a reset");

	u64 cap = 0;
	for (int tries = 0; tries < 10; tries++) {
		u8 gen = virtio_config_generation(&d);
		cap = mmio_r32(d.devcfg) | (u64)mmio_r32(d.devcfg + 4) << 32;
		if (gen == virtio_config_generation(&d))
			break;
	}
	int ro = (d.acked & BLK_F_RO) != 0;
	u64 qd = word_value(cmdline, "qd", 8);
	if (qd < 1) qd = 1;
	if (qd > MAX_QD) qd = MAX_QD;
	if (b.q.size < 3 * MAX_QD)
		return fail("queue too short for the bench's descriptor layout");
	b.qd = (int)qd;
	u64 seq_bytes = word_value(cmdline, "mib", 16) << 20;
	if (seq_bytes > cap * 512) seq_bytes = cap * 512;
	u64 seq_reqs = seq_bytes / SEQ_BYTES;
	u64 blocks = cap / SECTORS_PER_BLOCK;
	u64 ios = word_value(cmdline, "ios", 2000);
	puts("probe: bench disk capacity="); putdec(cap);
	puts(" qd="); putdec(qd);
	puts(ro ? " ro=1\n" : " ro=0\n");
	if (b.qd < 1 || blocks == 0) {
		virtio_reset(&d);
		return fail("queue or disk too small");
	}

	/* Reads first: the write phase stamps only the first block of each request. */
	phase(&b, "seqread", T_IN, SEQ_BYTES, seq_reqs, 0);
	if (!b.stalled)
		phase(&b, "randread", T_IN, RAND_BYTES, ios, blocks);
	if (!b.stalled && ro)
		puts("probe: bench seqwrite skipped ro\n");
	else if (!b.stalled)
		phase(&b, "seqwrite", T_OUT, SEQ_BYTES, seq_reqs, 0);
	virtio_reset(&d);	/* the device lets go of the rings (also after a stall) */
	/* Idle 100 ms before the probe resets the machine, so that a host sampling the VMM's CPU
	 * time from another thread when the last line arrives finds the VMM still running. */
	u32 now = irq_counts[VEC_TIMER];
	wait_count(&irq_counts[VEC_TIMER], now + 100 / TICK_MS, 2 * 100 / TICK_MS);
	return b.stalled ? -1 : 0;
}

void blkbench_mode(const char *cmdline)
{
	intr_init();
	run(cmdline);
	intr_stop();
}
