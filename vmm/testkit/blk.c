/* The probe's `blk` mode: drive the first virtio-blk device as a real driver does (features,
 * one MSI-X-signalled queue) and report what it sees:
 *   probe: blk slot=SS features=0x...       the device's offer
 *   probe: blk ro                           the disk is read-only (VIRTIO_BLK_F_RO)
 *   probe: blk ro write rejected status=1   ...and a write to it failed with IOERR
 *   probe: blk capacity=N read fnv=0x...    sectors, FNV-1a of sectors 1..8 (4 KiB)
 *   probe: blk verify sector0=ok            sector 0 reads back as written (rw disks)
 *   probe: blk id=...                       GET_ID
 *   probe: blk status out=S flush=S in=S getid=S
 *   probe: blk irqs=N                       MSIs taken on the queue's vector (one per
 *                                           request: each wait takes its interrupt)
 *   probe: blk requests=N
 * Sector 0 of a rw disk is overwritten with blk_pattern(): "SHOJI-PROBE-SECTOR0", then byte i
 * is (i * 7) & 0xff. Failures print "probe: blk error: ..." and stop the mode. */
#include "probe.h"

#define VIRTIO_BLK_DEVICE 0x1042
#define BLK_F_RO (1ULL << 5)
#define BLK_F_BLK_SIZE (1ULL << 6)
#define BLK_F_FLUSH (1ULL << 9)

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define S_IOERR 1

#define BLK_VECTOR VEC_MSI_BASE
#define WAIT_TICKS (5000 / TICK_MS)	/* 5 s per request */

struct blk_req { u32 type, reserved; u64 sector; };

/* Buffers in the DMA area. */
#define REQ_HDR (DMA_AREA + 0x0000)
#define REQ_STATUS (DMA_AREA + 0x0100)
#define ID_BUF (DMA_AREA + 0x0200)
#define PATTERN_BUF (DMA_AREA + 0x1000)
#define READ_BUF (DMA_AREA + 0x2000)	/* 4 KiB */
#define READ0_BUF (DMA_AREA + 0x3000)
#define ID_BYTES 20

static const char MAGIC[] = "SHOJI-PROBE-SECTOR0";

static void blk_pattern(u8 *p)
{
	for (int i = 0; i < 512; i++)
		p[i] = i < (int)sizeof(MAGIC) - 1 ? (u8)MAGIC[i] : (u8)(i * 7);
}

static int fail(const char *what)
{
	puts("probe: blk error: ");
	puts(what);
	putc('\n');
	return -1;
}

static u32 requests;
static int stuck;	/* a request timed out: the shared buffers may still be the device's */

/* One request: header, optional data buffer, status byte. Returns the status the device wrote
 * (0xff if it wrote none) or -1 if it did not complete in time. */
static int blk_request(struct virtq *q, u32 type, u64 sector, u64 buf, u32 len, int device_writes)
{
	if (stuck)
		return -1;
	volatile struct blk_req *h = (volatile struct blk_req *)REQ_HDR;
	volatile u8 *status = (volatile u8 *)REQ_STATUS;
	h->type = type;
	h->reserved = 0;
	h->sector = sector;
	*status = 0xff;
	struct vq_buf bufs[3];
	int n = 0;
	bufs[n++] = (struct vq_buf){ REQ_HDR, sizeof(struct blk_req), 0 };
	if (len)
		bufs[n++] = (struct vq_buf){ buf, len, device_writes };
	bufs[n++] = (struct vq_buf){ REQ_STATUS, 1, 1 };
	int head = virtq_add(q, bufs, n);
	if (head < 0)
		return fail("no free descriptors");
	requests++;
	virtq_kick(q);
	u32 used_len = 0;
	int id = virtq_wait(q, &used_len, WAIT_TICKS);
	if (id < 0) {
		stuck = 1;
		return fail("request timed out");
	}
	if (id != head)
		return fail("used ring returned another chain");
	return *status;
}

static void put_status(const char *name, int s)
{
	putc(' ');
	puts(name);
	putc('=');
	if (s < 0) puts("none");
	else putdec((u64)s);
}

static int run(void)
{
	struct virtio_dev d;
	struct virtq q;
	if (virtio_find(VIRTIO_BLK_DEVICE, 0, &d))
		return fail("no virtio-blk device");
	if (virtio_negotiate(&d, VIRTIO_F_VERSION_1 | BLK_F_RO | BLK_F_BLK_SIZE | BLK_F_FLUSH))
		return fail("feature negotiation (FEATURES_OK not accepted)");
	puts("probe: blk slot="); puthexw(d.slot, 2);
	puts(" features="); puthex(d.features); putc('\n');
	if (!d.devcfg)
		return fail("no device configuration capability");
	if (!d.msix_table || d.msix_size < 1)
		return fail("no MSI-X table");
	virtio_msix_enable(&d);
	if (virtio_msix_entry(&d, 0, BLK_VECTOR))
		return fail("MSI-X table entry 0 did not take");
	if (virtq_setup(&d, &q, 0, 16, 0, 0, BLK_VECTOR))
		return fail("queue 0 setup (size, rings or MSI-X vector rejected)");
	if (virtio_driver_ok(&d, VIRTIO_NO_VECTOR))
		return fail("DRIVER_OK: the device needs a reset");

	/* Capacity (le64 at 0) in two halves, retried while the config generation moves. */
	u64 cap = 0;
	for (int tries = 0; tries < 10; tries++) {
		u8 gen = virtio_config_generation(&d);
		cap = mmio_r32(d.devcfg) | (u64)mmio_r32(d.devcfg + 4) << 32;
		if (gen == virtio_config_generation(&d))
			break;
	}

	int ro = (d.acked & BLK_F_RO) != 0;
	u8 *pat = (u8 *)PATTERN_BUF;
	blk_pattern(pat);
	if (ro)
		puts("probe: blk ro\n");
	int out = blk_request(&q, T_OUT, 0, PATTERN_BUF, 512, 0);
	if (ro) {
		puts(out == S_IOERR ? "probe: blk ro write rejected status=" : "probe: blk ro write NOT rejected status=");
		if (out < 0) puts("none");
		else putdec((u64)out);
		putc('\n');
	}
	int flush = blk_request(&q, T_FLUSH, 0, 0, 0, 0);
	u8 *data = (u8 *)READ_BUF;
	memset(data, 0, 4096);
	int in = blk_request(&q, T_IN, 1, READ_BUF, 4096, 1);
	puts("probe: blk capacity="); putdec(cap);
	puts(" read fnv="); puthex(fnv1a(data, 4096)); putc('\n');
	if (!ro) {
		u8 *back = (u8 *)READ0_BUF;
		memset(back, 0, 512);
		int s = blk_request(&q, T_IN, 0, READ0_BUF, 512, 1);
		int same = s == 0;
		for (int i = 0; same && i < 512; i++)
			same = back[i] == pat[i];
		puts(same ? "probe: blk verify sector0=ok\n" : "probe: blk verify sector0=bad\n");
	}
	u8 *id = (u8 *)ID_BUF;
	memset(id, 0, ID_BYTES + 1);
	int getid = blk_request(&q, T_GET_ID, 0, ID_BUF, ID_BYTES, 1);
	puts("probe: blk id=");
	for (int i = 0; i < ID_BYTES && id[i]; i++)
		putc(id[i] >= 0x20 && id[i] < 0x7f ? (char)id[i] : '?');
	putc('\n');
	puts("probe: blk status");
	put_status("out", out);
	put_status("flush", flush);
	put_status("in", in);
	put_status("getid", getid);
	putc('\n');
	puts("probe: blk irqs="); putdec(irq_counts[BLK_VECTOR]); putc('\n');
	puts("probe: blk requests="); putdec(requests); putc('\n');
	virtio_reset(&d);	/* the device lets go of the rings */
	return 0;
}

void blk_mode(void)
{
	intr_init();
	run();
	intr_stop();
}
