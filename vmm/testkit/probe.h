/* Shared by the probe guest's C files: integer types, port and MMIO access, COM1 output and the
 * interfaces of pci.c, idt.c and virtio.c. Freestanding: no libc, everything is inline here or
 * defined in one of the probe's own files. */
#ifndef PROBE_H
#define PROBE_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

void *memcpy(void *d, const void *s, unsigned long n);
void *memset(void *d, int c, unsigned long n);
void triple_fault(void) __attribute__((noreturn));

#define barrier() __asm__ volatile("" : : : "memory")

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

/* MMIO: one access of exactly the given width (volatile keeps the compiler from merging or
 * splitting them; the device side sees the width as the access size). */
static inline u8 mmio_r8(u64 a) { return *(volatile u8 *)a; }
static inline u16 mmio_r16(u64 a) { return *(volatile u16 *)a; }
static inline u32 mmio_r32(u64 a) { return *(volatile u32 *)a; }
static inline void mmio_w8(u64 a, u8 v) { *(volatile u8 *)a = v; }
static inline void mmio_w16(u64 a, u16 v) { *(volatile u16 *)a = v; }
static inline void mmio_w32(u64 a, u32 v) { *(volatile u32 *)a = v; }

static inline void putc(char c) { outb(0x3f8, (u8)c); }
static inline void puts(const char *s) { while (*s) putc(*s++); }
/* "0x" and the shortest lowercase hex. */
static inline void puthex(u64 v)
{
	puts("0x");
	int started = 0;
	for (int i = 60; i >= 0; i -= 4) {
		int d = (v >> i) & 0xf;
		if (d || started || i == 0) {
			putc("0123456789abcdef"[d]);
			started = 1;
		}
	}
}
/* Exactly `digits` hex digits, no prefix. */
static inline void puthexw(u64 v, int digits)
{
	for (int i = (digits - 1) * 4; i >= 0; i -= 4)
		putc("0123456789abcdef"[(v >> i) & 0xf]);
}
static inline void putdec(u64 v)
{
	char b[21];
	int n = 0;
	do { b[n++] = '0' + v % 10; v /= 10; } while (v);
	while (n) putc(b[--n]);
}

static inline u32 fnv1a(const u8 *p, u64 n)
{
	u32 h = 0x811c9dc5;
	while (n--) { h ^= *p++; h *= 0x01000193; }
	return h;
}

/* ---- Low memory the device modes may use (below 1 MiB, clear of the VMM's boot data at
 * 0x500-0xbfff, the command line at 0x20000 and the MP table at 0x9fc00). ---- */
#define VQ_RING_AREA 0x30000UL	/* 8 slots of 4 KiB, one per virtqueue */
#define VQ_RING_SLOT 0x1000UL
#define VQ_MAX_SIZE 64		/* what fits a slot: desc 0x000, avail 0x400, used 0x800 */
#define DMA_AREA 0x38000UL	/* 32 KiB of request headers and data buffers */
#define DMA_AREA_END 0x40000UL

/* ---- pci.c: bus 0 through configuration mechanism 1 (0xCF8/0xCFC), function 0 only ---- */
#define PCI_SLOTS 32
u8 pci_read8(u8 slot, u8 reg);
u16 pci_read16(u8 slot, u8 reg);
u32 pci_read32(u8 slot, u8 reg);
void pci_write16(u8 slot, u8 reg, u16 v);
void pci_write32(u8 slot, u8 reg, u32 v);
/* Next capability with `id` after config offset `from` (0: the first); 0 when there is none. */
u8 pci_find_cap(u8 slot, u8 id, u8 from);
/* The `pci` mode: one line per function and, for virtio devices, their capabilities. */
void pci_mode(void);

/* ---- idt.c: an IDT, the local APIC and a watchdog tick ---- */
#define VEC_TIMER 0x20		/* LAPIC timer watchdog tick */
#define VEC_MSI_BASE 0x40	/* vectors 0x40..0x4f count device MSIs */
#define VEC_MSI_COUNT 16
#define TICK_MS 10
extern volatile u32 irq_counts[256];
/* Loads the IDT, masks the legacy PIC and LINT0, software-enables the LAPIC and starts a
 * periodic tick so that every wait below is bounded. */
void intr_init(void);
void intr_stop(void);
u32 lapic_id(void);
/* Halts (interrupts on) until `*counter` reaches `want` or `ticks` watchdog ticks pass.
 * Returns 1 when it got there. */
int wait_count(volatile u32 *counter, u32 want, u32 ticks);

/* ---- virtio.c: the modern virtio-pci transport and split virtqueues ---- */
#define VIRTIO_F_VERSION_1 (1ULL << 32)
#define VIRTIO_NO_VECTOR 0xffff

struct virtio_dev {
	u8 slot;
	u16 device_id;
	u64 common, notify, isr, devcfg;	/* MMIO addresses of the capabilities' structures */
	u32 notify_mult;
	u8 msix_cap;
	u16 msix_size;
	u64 msix_table;
	u64 features;				/* offered by the device */
	u64 acked;				/* accepted by us */
};

struct vq_desc { u64 addr; u32 len; u16 flags; u16 next; };
struct vq_avail { u16 flags; u16 idx; u16 ring[]; };
struct vq_used_elem { u32 id; u32 len; };
struct vq_used { u16 flags; u16 idx; struct vq_used_elem ring[]; };

struct virtq {
	u16 index, size;
	u16 free_head, num_free;
	u16 avail_idx, last_used;
	u16 msix_entry;
	u8 vector;				/* the CPU vector its MSI-X entry delivers */
	u32 irqs_at_kick;			/* irq_counts[vector] at the last kick */
	volatile struct vq_desc *desc;
	volatile struct vq_avail *avail;
	volatile struct vq_used *used;
	u64 notify;
};

/* One buffer of a chain: `device_writes` marks it write-only for the device. */
struct vq_buf { u64 addr; u32 len; int device_writes; };

/* The n-th (from 0) virtio-pci function with this PCI device id; 0 on success. Fills in the
 * structure addresses from the capabilities and enables memory decoding and bus mastering. */
int virtio_find(u16 pci_device_id, int nth, struct virtio_dev *d);
/* Reset, ACKNOWLEDGE, DRIVER, features (accepts offered & want; want must include VERSION_1),
 * FEATURES_OK read back. 0 on success; on failure the device is left FAILED. */
int virtio_negotiate(struct virtio_dev *d, u64 want);
/* MSI-X enable in PCI config and table entry `entry` -> this CPU, `vector`, unmasked. */
void virtio_msix_enable(struct virtio_dev *d);
int virtio_msix_entry(struct virtio_dev *d, u16 entry, u8 vector);
/* Queue `index` of at most `size` entries in ring slot `slot`, raising MSI-X `entry`
 * (VIRTIO_NO_VECTOR: none). 0 on success. */
int virtq_setup(struct virtio_dev *d, struct virtq *q, u16 index, u16 size, int slot, u16 entry, u8 vector);
/* Sets the configuration-change vector and DRIVER_OK; 0 unless the device wants a reset. */
int virtio_driver_ok(struct virtio_dev *d, u16 config_entry);
u8 virtio_status(struct virtio_dev *d);
void virtio_reset(struct virtio_dev *d);
u16 virtio_num_queues(struct virtio_dev *d);
u8 virtio_config_generation(struct virtio_dev *d);
/* Puts a chain on the available ring; returns its head or -1 when descriptors are short. */
int virtq_add(struct virtq *q, const struct vq_buf *bufs, int n);
void virtq_kick(struct virtq *q);
/* A used chain (its head, freed for reuse, `*len` = bytes written), or -1 when none. */
int virtq_poll(struct virtq *q, u32 *len);
/* virtq_poll, halting in between, for at most `ticks` watchdog ticks; then, if the queue has
 * an MSI-X vector, up to VQ_IRQ_GRACE_TICKS more for the interrupt announcing it (so that one
 * interrupt per request is taken, and counted, before the next request is made). */
#define VQ_IRQ_GRACE_TICKS (1000 / TICK_MS)
int virtq_wait(struct virtq *q, u32 *len, u32 ticks);

/* ---- blk.c ---- */
void blk_mode(void);

/* ---- fs.c ---- */
void fs_mode(void);

/* ---- vsock.c: the `vsock` mode (port 0 skips that part), and the device bring-up and packet
 * header that vsockbench.c shares ---- */
#define VIRTIO_VSOCK_DEVICE 0x1053
#define VSOCK_RX_Q 0
#define VSOCK_TX_Q 1
#define VSOCK_EVENT_Q 2
#define VSOCK_HOST_CID 2
#define VSOCK_TYPE_STREAM 1
#define VSOCK_OP_REQUEST 1
#define VSOCK_OP_RESPONSE 2
#define VSOCK_OP_RST 3
#define VSOCK_OP_SHUTDOWN 4
#define VSOCK_OP_RW 5
#define VSOCK_OP_CREDIT_UPDATE 6
#define VSOCK_OP_CREDIT_REQUEST 7
#define VSOCK_SHUTDOWN_RCV 1
#define VSOCK_SHUTDOWN_SEND 2
/* Two 8-byte event buffers live here, posted by vsock_start. */
#define VSOCK_EVENT_BUF_AREA (DMA_AREA + 0x3000)

struct vsock_hdr {
	u64 src_cid, dst_cid;
	u32 src_port, dst_port, len;
	u16 type, op;
	u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));
_Static_assert(sizeof(struct vsock_hdr) == 44, "virtio_vsock_hdr");

struct vsock_dev {
	struct virtio_dev d;
	struct virtq rx, tx, ev;	/* rings in slots 0, 1, 2 */
	u64 cid;
};
/* Finds the first virtio-vsock function and negotiates VERSION_1. NULL on success, else what
 * failed. */
const char *vsock_find(struct vsock_dev *v);
/* Then: MSI-X entry q -> vectors[q] for each queue q (vector 0: that queue gets no vector and
 * never interrupts), queue q of up to sizes[q] entries, DRIVER_OK, the guest CID, two event
 * buffers posted and kicked. Receive buffers are the caller's. NULL on success, else what
 * failed. */
const char *vsock_start(struct vsock_dev *v, const u16 sizes[3], const u8 vectors[3]);
void vsock_mode(u32 vport, u32 hport);

/* ---- vsockbench.c (needs RAM up to 0x920000: its buffers sit at 8 MiB) ---- */
void vsockbench_mode(const char *cmdline);

/* ---- probe.c ---- */
/* The number in word `key`N (key includes the '='), or `dflt` when there is no such word or it
 * is not a decimal number that fits in 32 bits. */
u32 word_number(const char *s, const char *key, u32 dflt);
/* ---- blkbench.c (needs RAM up to 9 MiB: its data buffers sit at 8 MiB) ---- */
void blkbench_mode(const char *cmdline);

#endif
