/* The probe's `vsockbench` mode: the guest side of `shoji bench vsock`. It listens on guest port
 * `port=N` (default 5001), accepts one host connection and then serves three phases that the
 * host drives and times (the guest keeps no clock; it prints nothing until the end):
 *   echo    every byte received goes straight back, until `rounds=N` × `msg=N` bytes (default
 *           100 × 64) have been echoed (the host measures round trips);
 *   sink    `bytes=N` bytes (default 1 MiB) are received and dropped, then a 16-byte
 *           acknowledgement goes back: le64 bytes received, le64 stamp mismatches (the host
 *           measures host -> guest throughput up to the acknowledgement);
 *   source  after one more byte from the host (the go signal), `bytes=N` bytes are sent in
 *           packets of 64 KiB (the last one shorter), then SHUTDOWN (guest -> host throughput).
 * The sink stream carries, at every 8-byte-aligned offset W from its start, the le64 word
 * SINK_TAG | W; the first aligned word of each received packet is checked (a packet boundary
 * can fall anywhere). Every source packet is the same 64 KiB of SOURCE_TAG | W words (W: offset
 * in the packet), so byte P of the source stream is byte P mod 65536 of that block.
 *
 * Guest instructions are expensive where kernel mode is emulated (PVM: about 1 µs each), so
 * each phase has a fast path of a few dozen instructions per packet, and everything unusual
 * goes through one general handler (rx_packet):
 *   - 16 receive buffers of header + 64 KiB (the device's largest payload), one descriptor each,
 *     descriptor i always buffer i; handled buffers go back on the available ring at once, and
 *     the device is notified only when it may be running short of them;
 *   - 32 prebuilt two-descriptor transmit chains ("slots"): slot i < 16 echoes from receive
 *     buffer i (its data descriptor points into that buffer: no copy, and the buffer goes back
 *     once the device has used the echo), slots 16..31 are a pool for source data and control
 *     packets; one notification per batch;
 *   - the transmit queue has no MSI-X vector (no interrupt per transmitted packet): its used ring
 *     is polled;
 *   - the guest advertises 2 MiB of buffer space and reports what it has consumed every 512 KiB
 *     (every packet it sends carries that count as well);
 *   - waits are `sti; hlt` on the receive queue's MSI-X vector, bounded by the LAPIC watchdog;
 *     with `poll=N` (default 0) the guest first checks the receive used ring up to N times, as
 *     Linux's cpuidle-haltpoll does (where waking from hlt is slow, a packet due soon is seen
 *     sooner); in the echo phase the guest halts (or polls) a dozen instructions after its
 *     notification and does the bookkeeping (slots back, buffers published, owed packets, the
 *     stall check) every ECHO_BATCH echoes or when woken without a packet.
 *
 * Output lines after the source phase (or after a failure):
 *   probe: vsockbench accepted port=N from=2:P
 *   probe: vsockbench echo bytes=B packets=N
 *   probe: vsockbench sink bytes=B packets=N mismatches=M
 *   probe: vsockbench source bytes=B packets=N
 *   probe: vsockbench closed=rst|timeout           what ended it after our SHUTDOWN
 *   probe: vsockbench stats rx=N tx=N rx_kicks=N tx_kicks=N irqs=N halts=N polled=N
 *          slot_waits=N credit_waits=N unexpected=N
 * (irqs: MSIs taken; halts: waits that ended in hlt; polled: waits that found a packet without
 * halting; slot_waits: polls for a free pool slot; credit_waits: times the source phase ran out
 * of the device's credit.) A failure prints "probe: vsockbench error: WHAT phase=NAME" first.
 * Needs guest RAM up to 0x920000 (the buffers sit at 8 MiB). */
#include "probe.h"

#define INLINE static inline __attribute__((always_inline))

#define RX_VECTOR (VEC_MSI_BASE + 5)
#define EVENT_VECTOR (VEC_MSI_BASE + 6)

#define RX_QSIZE 16
#define TX_QSIZE 64
#define RX_BUFS 16
#define TX_SLOTS 32
#define POOL_FIRST RX_BUFS		/* slots below echo from the receive buffer of their number */
#define HDR_SIZE 44u
#define PKT_MAX 0x10000u		/* the device's largest payload */
#define RX_BUF_LEN (HDR_SIZE + PKT_MAX)
#define RX_STRIDE 0x11000UL
#define RX_AREA 0x800000UL
#define SRC_AREA (RX_AREA + RX_BUFS * RX_STRIDE)	/* 0x910000: the source phase's 64 KiB */
#define TX_HDR_AREA DMA_AREA				/* 64 bytes per slot */
#define ACK_AREA (DMA_AREA + 64UL * TX_SLOTS)

#define BUF_ALLOC (2u << 20)
#define CREDIT_EVERY (BUF_ALLOC / 4)
#define RX_LOW 4			/* notify the device when it may have this few buffers left */
#define SINK_TAG 0x5653494e00000000ULL	/* "VSIN" in the top half; the offset below */
#define SOURCE_TAG 0x56534f5500000000ULL	/* "VSOU" */

#define ACCEPT_TICKS (30000 / TICK_MS)	/* for the host to connect */
#define STALL_TICKS (10000 / TICK_MS)	/* no progress in a phase */
#define CLOSE_TICKS (3000 / TICK_MS)	/* for the RST after our SHUTDOWN */

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2

/* In order: the general handler relies on it. */
enum { ACCEPT, ECHO, SINK, WAIT_GO, SOURCE, CLOSING, DONE, FAILED };

struct bench {
	struct vsock_dev v;
	int phase;
	int failed_in;			/* the phase a failure ended */
	int closed_by_rst;
	int blocked;			/* something waits for a free pool slot */
	int ack_due, credit_due;
	u32 since;			/* tick of the last progress */
	u32 port, peer_port;
	u32 echo_total, stream_total;
	u32 echo_bytes, sink_bytes, source_bytes;
	u32 echo_pkts, sink_pkts, source_pkts;
	u32 peer_buf_alloc, peer_fwd_cnt, tx_cnt;	/* the device's credit for our data */
	u32 fwd_cnt, fwd_sent;				/* data we consumed, and as last told */
	u16 rx_avail, rx_published, rx_last, rx_unkicked;
	u16 tx_avail, tx_last;
	int tx_unkicked;
	u32 pool;				/* bit k: slot POOL_FIRST + k is free */
	u32 poll;				/* checks of the rx used ring before halting */
	u32 rx_pkts, tx_pkts, rx_kicks, tx_kicks, halts, polled, slot_waits, credit_waits, unexpected, mismatches;
	const char *error;
};

static struct bench b;

INLINE u32 now(void) { return irq_counts[VEC_TIMER]; }

static void fail(const char *what)
{
	if (!b.error) {
		b.error = what;
		b.failed_in = b.phase;
	}
	b.phase = FAILED;
}

INLINE u64 rx_buf(u32 i) { return RX_AREA + (u64)i * RX_STRIDE; }
INLINE volatile struct vsock_hdr *tx_hdr(u32 k) { return (volatile struct vsock_hdr *)(TX_HDR_AREA + 64UL * k); }

/* ---- Receive buffers ---- */

/* Receive buffer `i` back on the available ring (the device sees it after rx_sync). */
INLINE void rx_repost(u32 i)
{
	b.v.rx.avail->ring[b.rx_avail & (RX_QSIZE - 1)] = (u16)i;
	b.rx_avail++;
}

/* Publishes reposted buffers, and notifies the device when it may have few others left. (A
 * device out of buffers waits for a notification; it has used every buffer it had, so once
 * those are handled, `left` below is at most 0.) */
static void rx_sync(void)
{
	if (b.rx_avail != b.rx_published) {
		barrier();
		b.v.rx.avail->idx = b.rx_avail;
		b.rx_unkicked += (u16)(b.rx_avail - b.rx_published);
		b.rx_published = b.rx_avail;
	}
	if (!b.rx_unkicked)
		return;
	int left = (int)(u16)(b.rx_avail - b.v.rx.used->idx) - (int)b.rx_unkicked;
	if (left > RX_LOW)
		return;
	barrier();
	mmio_w16(b.v.rx.notify, VSOCK_RX_Q);
	b.rx_kicks++;
	b.rx_unkicked = 0;
}

/* ---- Transmit slots ---- */

INLINE void tx_push(u32 k)
{
	b.v.tx.avail->ring[b.tx_avail & (TX_QSIZE - 1)] = (u16)(2 * k);
	b.tx_avail++;
	b.tx_unkicked = 1;
	b.tx_pkts++;
}

/* Makes the pushed chains available and notifies the device, once per batch. */
INLINE void tx_flush(void)
{
	if (!b.tx_unkicked)
		return;
	barrier();
	b.v.tx.avail->idx = b.tx_avail;
	barrier();
	mmio_w16(b.v.tx.notify, VSOCK_TX_Q);
	b.tx_kicks++;
	b.tx_unkicked = 0;
}

/* Takes back what the device has sent: an echo slot returns its receive buffer, a pool slot
 * becomes free. */
INLINE void tx_reap(void)
{
	volatile struct vq_used *u = b.v.tx.used;
	while (b.tx_last != u->idx) {
		barrier();
		u32 k = u->ring[b.tx_last & (TX_QSIZE - 1)].id >> 1;
		b.tx_last++;
		if (k < POOL_FIRST)
			rx_repost(k);
		else if (k < TX_SLOTS)
			b.pool |= 1u << (k - POOL_FIRST);
		else
			fail("the tx used ring returned an unknown chain");
	}
}

/* A packet from a pool slot (sent at the next tx_flush). 0, or -1 when the pool is empty. */
INLINE int pool_send(u32 src_port, u32 dst_port, u16 op, u32 flags, u64 data, u32 len)
{
	if (!b.pool)
		return -1;
	u32 k = (u32)__builtin_ctz(b.pool);
	b.pool &= ~(1u << k);
	k += POOL_FIRST;
	volatile struct vsock_hdr *h = tx_hdr(k);
	h->src_port = src_port;
	h->dst_port = dst_port;
	h->len = len;
	h->op = op;
	h->flags = flags;
	h->fwd_cnt = b.fwd_cnt;
	volatile struct vq_desc *d = b.v.tx.desc;
	d[2 * k].flags = len ? DESC_F_NEXT : 0;
	d[2 * k + 1].addr = data;
	d[2 * k + 1].len = len;
	tx_push(k);
	return 0;
}

/* A packet of the connection; like every one, it tells the device our fwd_cnt. */
INLINE int conn_send(u16 op, u32 flags, u64 data, u32 len)
{
	if (pool_send(b.port, b.peer_port, op, flags, data, len))
		return -1;
	b.fwd_sent = b.fwd_cnt;
	b.tx_cnt += len;
	return 0;
}

/* Echoes the `len` bytes in receive buffer `id` from its own slot (headers prefilled with the
 * connection's ports and RW, the data descriptor pointing into the buffer). */
INLINE void echo_send(u32 id, u32 len)
{
	volatile struct vsock_hdr *h = tx_hdr(id);
	h->len = len;
	h->fwd_cnt = b.fwd_cnt;
	b.v.tx.desc[2 * id + 1].len = len;
	tx_push(id);
	b.fwd_sent = b.fwd_cnt;
	b.tx_cnt += len;
}

/* The device's credit for our data. */
INLINE u32 credit(void)
{
	u32 used = b.tx_cnt - b.peer_fwd_cnt;
	return used > b.peer_buf_alloc ? 0 : b.peer_buf_alloc - used;
}

/* ---- The general handler ---- */

/* A packet that is not for the connection (or there is none yet). 0: handled; -1: it waits for
 * a pool slot. */
static int rx_other(u32 id, const struct vsock_hdr *h)
{
	if (!b.pool)
		return -1;
	if (h->op == VSOCK_OP_REQUEST && b.phase == ACCEPT && h->dst_port == b.port) {
		b.peer_port = h->src_port;
		b.peer_buf_alloc = h->buf_alloc;
		b.peer_fwd_cnt = h->fwd_cnt;
		for (u32 k = 0; k < POOL_FIRST; k++) {
			tx_hdr(k)->src_port = b.port;
			tx_hdr(k)->dst_port = b.peer_port;
		}
		conn_send(VSOCK_OP_RESPONSE, 0, 0, 0);
		b.phase = ECHO;
	} else if (h->op != VSOCK_OP_RST) {
		/* Anything else for no connection is answered with RST (a RST never is). */
		b.unexpected++;
		pool_send(h->dst_port, h->src_port, VSOCK_OP_RST, 0, 0, 0);
	}
	rx_repost(id);
	return 0;
}

/* Data for the connection in receive buffer `id`. */
static void rx_data(u32 id, u32 len)
{
	u64 data = rx_buf(id) + HDR_SIZE;
	switch (b.phase) {
	case ECHO:
		/* The host waits for each echo before sending more, so the device has written
		 * every earlier echo out and its credit is back: a shortage is a broken run. */
		if (credit() < len || len > b.echo_total - b.echo_bytes) {
			fail(credit() < len ? "echo: no credit for the reply" : "echo: more bytes than expected");
			break;
		}
		b.fwd_cnt += len;
		echo_send(id, len);	/* the buffer comes back with the slot */
		b.echo_bytes += len;
		b.echo_pkts++;
		if (b.echo_bytes == b.echo_total)
			b.phase = SINK;
		return;
	case SINK: {
		u32 o = b.sink_bytes, off = (8 - (o & 7)) & 7;
		if (off + 8 <= len && *(const u64 *)(data + off) != (SINK_TAG | (u64)(o + off)))
			b.mismatches++;
		b.sink_bytes += len;
		b.sink_pkts++;
		if (b.sink_bytes >= b.stream_total) {
			if (b.sink_bytes > b.stream_total)
				fail("sink: more bytes than expected");
			b.ack_due = 1;
			b.phase = WAIT_GO;
		}
		break;
	}
	case WAIT_GO:
		if (!b.ack_due)
			b.phase = SOURCE;
		else
			b.unexpected++;		/* the host sent more before our acknowledgement */
		break;
	default:
		b.unexpected++;
		break;
	}
	b.fwd_cnt += len;
	rx_repost(id);
}

/* Any packet, in receive buffer `id` with `used_len` bytes written. 0: handled (the buffer is
 * back on the ring, or held by its echo); -1: it waits for a pool slot. */
static __attribute__((noinline)) int rx_packet(u32 id, u32 used_len)
{
	const struct vsock_hdr *h = (const struct vsock_hdr *)rx_buf(id);
	if (used_len < HDR_SIZE || h->len != used_len - HDR_SIZE || h->dst_cid != b.v.cid ||
	    h->src_cid != VSOCK_HOST_CID || h->type != VSOCK_TYPE_STREAM) {
		b.unexpected++;
		rx_repost(id);
		return 0;
	}
	if (b.phase == ACCEPT || h->src_port != b.peer_port || h->dst_port != b.port)
		return rx_other(id, h);
	b.peer_buf_alloc = h->buf_alloc;
	b.peer_fwd_cnt = h->fwd_cnt;
	switch (h->op) {
	case VSOCK_OP_RW:
		rx_data(id, h->len);
		return 0;
	case VSOCK_OP_CREDIT_UPDATE:
		break;
	case VSOCK_OP_CREDIT_REQUEST:
		b.credit_due = 1;
		break;
	case VSOCK_OP_SHUTDOWN:
		if (b.phase != CLOSING)
			fail("the host shut the connection down");
		break;
	case VSOCK_OP_RST:
		if (b.phase == CLOSING) {
			b.closed_by_rst = 1;
			b.phase = DONE;
		} else if (b.phase == ECHO && b.echo_bytes == 0) {
			b.phase = ACCEPT;	/* a handshake the device gave up on: listen again */
		} else {
			fail("the connection was reset");
		}
		break;
	default:
		b.unexpected++;
		break;
	}
	rx_repost(id);
	return 0;
}

/* The next used receive buffer through the general handler. 1 if it handled one. */
static int rx_one(void)
{
	volatile struct vq_used *u = b.v.rx.used;
	if (u->idx == b.rx_last || b.phase == FAILED)
		return 0;
	barrier();
	volatile struct vq_used_elem *e = &u->ring[b.rx_last & (RX_QSIZE - 1)];
	u32 id = e->id, len = e->len;
	if (id >= RX_BUFS) {
		fail("the rx used ring returned an unknown buffer");
		return 0;
	}
	if (rx_packet(id, len) < 0) {
		b.blocked = 1;
		return 0;
	}
	b.rx_last++;
	b.rx_pkts++;
	return 1;
}

/* Packets the connection owes: the acknowledgement, a credit update, the final SHUTDOWN. */
static void owed(void)
{
	tx_reap();
	if (b.phase == ACCEPT || b.phase >= CLOSING)
		return;
	if (b.ack_due) {
		volatile u64 *ack = (volatile u64 *)ACK_AREA;
		ack[0] = b.sink_bytes;
		ack[1] = b.mismatches;
		if (conn_send(VSOCK_OP_RW, 0, ACK_AREA, 16)) {
			b.blocked = 1;
			return;
		}
		b.ack_due = 0;
	}
	if (b.credit_due || b.fwd_cnt - b.fwd_sent >= CREDIT_EVERY) {
		if (conn_send(VSOCK_OP_CREDIT_UPDATE, 0, 0, 0)) {
			b.blocked = 1;
			return;
		}
		b.credit_due = 0;
	}
	if (b.phase == SOURCE && b.source_bytes == b.stream_total) {
		if (conn_send(VSOCK_OP_SHUTDOWN, VSOCK_SHUTDOWN_RCV | VSOCK_SHUTDOWN_SEND, 0, 0)) {
			b.blocked = 1;
			return;
		}
		b.phase = CLOSING;
	}
}

/* Nothing to do: sends what is pending, gives buffers back, checks the receive queue up to
 * `poll=N` times, then halts until its interrupt (or the tick); when something waits for a pool
 * slot (which comes back without an interrupt), it only polls. 0 once `ticks` have passed since
 * the last progress. */
static int idle(u32 ticks)
{
	tx_flush();
	rx_sync();
	if (now() - b.since >= ticks)
		return 0;
	if (b.blocked) {
		b.blocked = 0;
		b.slot_waits++;
		__asm__ volatile("pause");
		return 1;
	}
	volatile struct vq_used *u = b.v.rx.used;
	for (u32 n = b.poll; n && u->idx == b.rx_last; n--)
		__asm__ volatile("pause");
	if (u->idx != b.rx_last) {
		b.polled++;
		return 1;
	}
	__asm__ volatile("cli" : : : "memory");
	if (u->idx == b.rx_last) {
		b.halts++;
		__asm__ volatile("sti; hlt" : : : "memory");
	} else {
		__asm__ volatile("sti" : : : "memory");
	}
	return 1;
}

/* Phases without a fast path (accept, wait for go, closing, the SHUTDOWN after the source):
 * everything through the general handler until the phase changes. */
static void general(void)
{
	int phase = b.phase;
	u32 ticks = phase == ACCEPT ? ACCEPT_TICKS : phase == CLOSING ? CLOSE_TICKS : STALL_TICKS;
	b.since = now();
	while (b.phase == phase) {
		tx_reap();
		int got = 0;
		while (b.phase == phase && rx_one())
			got = 1;
		owed();
		if (got || b.phase != phase) {
			b.since = now();
			continue;
		}
		if (!idle(ticks)) {
			if (phase == CLOSING)
				b.phase = DONE;		/* closed=timeout */
			else
				fail(phase == ACCEPT ? "no connection from the host" : "no progress for 10 s");
		}
	}
	tx_flush();
	rx_sync();
}

/* Off a fast path: the next packet through the general handler, or, when there is none (or it
 * waits for a pool slot), the idle wait. 0 when the phase has made no progress for STALL_TICKS. */
static int slow_step(int have_packet)
{
	if (have_packet && rx_one()) {
		owed();
		tx_flush();
		b.since = now();
		return 1;
	}
	owed();
	return idle(STALL_TICKS);
}

/* The echo phase's fast path: RW data of the connection, at most what is left to echo and
 * within the device's credit, goes straight back from its own slot, one notification each (the
 * host waits for every echo). With nothing received, the guest halts at once (a dozen
 * instructions after its notification, so it is asleep when the next message comes), and does
 * the general bookkeeping (slots back, buffers published, owed packets, the stall check) only
 * every ECHO_BATCH echoes or when woken without a packet (the tick). Anything else goes through
 * the general handler. The state lives in locals here (it is handed back to `b` off the fast
 * path). The fast path leaves the device's credit figures in `b` as they were: the source phase
 * starts from the go packet's. */
#define ECHO_BATCH 4
static __attribute__((noinline)) void echo_phase(void)
{
	volatile struct vq_used *ru = b.v.rx.used;
	volatile struct vq_avail *ta = b.v.tx.avail;
	volatile struct vq_desc *td = b.v.tx.desc;
	const u64 notify = b.v.tx.notify;
	const u32 port = b.port, peer = b.peer_port;
	u16 rx_last = b.rx_last, tx_avail = b.tx_avail;
	const u32 poll = b.poll;
	u32 fwd = b.fwd_cnt, tx_cnt = b.tx_cnt, left = b.echo_total - b.echo_bytes, pkts = 0, halts = 0, polled = 0;
	int quick = 0;		/* the bookkeeping is done: wait the quick way */
	b.since = now();
	while (left && b.phase == ECHO) {
		u16 used = ru->idx;
		if (used != rx_last) {
			barrier();
			volatile struct vq_used_elem *e = &ru->ring[rx_last & (RX_QSIZE - 1)];
			u32 id = e->id, ulen = e->len, len = ulen - HDR_SIZE;
			const struct vsock_hdr *h = (const struct vsock_hdr *)rx_buf(id);
			if (id < RX_BUFS && h->op == VSOCK_OP_RW && ulen > HDR_SIZE && h->len == len && len <= left &&
			    h->src_port == peer && h->dst_port == port &&
			    (u64)(tx_cnt - h->fwd_cnt) + len <= h->buf_alloc) {
				rx_last++;
				fwd += len;
				tx_cnt += len;
				left -= len;
				volatile struct vsock_hdr *th = tx_hdr(id);
				th->len = len;
				th->fwd_cnt = fwd;
				td[2 * id + 1].len = len;
				ta->ring[tx_avail & (TX_QSIZE - 1)] = (u16)(2 * id);
				tx_avail++;
				barrier();
				ta->idx = tx_avail;
				barrier();
				mmio_w16(notify, VSOCK_TX_Q);
				if (++pkts % ECHO_BATCH == 0)
					quick = 0;
				continue;
			}
		} else if (quick) {
			/* As in idle(). */
			for (u32 n = poll; n && ru->idx == rx_last; n--)
				__asm__ volatile("pause");
			if (ru->idx != rx_last) {
				polled++;
				continue;
			}
			__asm__ volatile("cli" : : : "memory");
			if (ru->idx == rx_last) {
				halts++;
				__asm__ volatile("sti; hlt" : : : "memory");
				quick = ru->idx != rx_last;	/* woken by the tick: bookkeeping next */
			}
			__asm__ volatile("sti" : : : "memory");
			continue;
		}
		b.rx_last = rx_last;
		b.tx_avail = tx_avail;
		b.fwd_cnt = b.fwd_sent = fwd;
		b.tx_cnt = tx_cnt;
		b.echo_bytes = b.echo_total - left;
		b.echo_pkts += pkts;
		b.rx_pkts += pkts;
		b.tx_pkts += pkts;
		b.tx_kicks += pkts;
		b.halts += halts;
		b.polled += polled;
		if (pkts)
			b.since = now();
		pkts = halts = polled = 0;
		if (used != rx_last) {
			if (!slow_step(1))
				fail("no progress for 10 s");
		} else {
			/* The bookkeeping, and the stall check; then wait the quick way. */
			owed();
			tx_flush();
			rx_sync();
			if (now() - b.since >= STALL_TICKS)
				fail("no progress for 10 s");
			quick = 1;
		}
		rx_last = b.rx_last;
		tx_avail = b.tx_avail;
		fwd = b.fwd_cnt;
		tx_cnt = b.tx_cnt;
		left = b.echo_total - b.echo_bytes;
	}
	b.rx_last = rx_last;
	b.tx_avail = tx_avail;
	b.fwd_cnt = b.fwd_sent = fwd;
	b.tx_cnt = tx_cnt;
	b.echo_bytes = b.echo_total - left;
	b.echo_pkts += pkts;
	b.rx_pkts += pkts;
	b.tx_pkts += pkts;
	b.tx_kicks += pkts;
	b.halts += halts;
	b.polled += polled;
	if (!left && b.phase == ECHO)
		b.phase = SINK;
}

/* The sink phase's fast path: RW data of the connection, at most what is left, is checked (one
 * stamp), counted and its buffer put straight back on the ring; every RX_BUFS / 4 packets, and
 * off the fast path, the state goes back to `b`, the buffers are published (the device
 * notified when it may be short) and a credit update sent when due. */
static __attribute__((noinline)) void sink_phase(void)
{
	volatile struct vq_used *ru = b.v.rx.used;
	volatile struct vq_avail *ra = b.v.rx.avail;
	const u32 port = b.port, peer = b.peer_port;
	u16 rx_last = b.rx_last, rx_avail = b.rx_avail;
	u32 fwd = b.fwd_cnt, got = b.sink_bytes, left = b.stream_total - b.sink_bytes, pkts = 0, bad = 0;
	b.since = now();
	while (left && b.phase == SINK) {
		u16 used = ru->idx;
		int took = 0;
		if (used != rx_last) {
			barrier();
			volatile struct vq_used_elem *e = &ru->ring[rx_last & (RX_QSIZE - 1)];
			u32 id = e->id, ulen = e->len, len = ulen - HDR_SIZE;
			u64 buf = rx_buf(id);
			const struct vsock_hdr *h = (const struct vsock_hdr *)buf;
			if (id < RX_BUFS && h->op == VSOCK_OP_RW && ulen > HDR_SIZE && h->len == len && len <= left &&
			    h->src_port == peer && h->dst_port == port) {
				u32 off = (0u - got) & 7;
				if (off + 8 <= len && *(const u64 *)(buf + HDR_SIZE + off) != (SINK_TAG | (u64)(got + off)))
					bad++;
				rx_last++;
				fwd += len;
				got += len;
				left -= len;
				ra->ring[rx_avail & (RX_QSIZE - 1)] = (u16)id;
				rx_avail++;
				if (++pkts % (RX_BUFS / 4) && left)
					continue;
				took = 1;
			}
		}
		b.rx_last = rx_last;
		b.rx_avail = rx_avail;
		b.fwd_cnt = fwd;
		b.sink_bytes = got;
		b.sink_pkts += pkts;
		b.rx_pkts += pkts;
		b.mismatches += bad;
		if (pkts)
			b.since = now();
		pkts = bad = 0;
		if (!left)
			break;
		if (took) {
			owed();
			tx_flush();
			rx_sync();
		} else if (!slow_step(used != rx_last)) {
			fail("no progress for 10 s");
		}
		rx_last = b.rx_last;
		rx_avail = b.rx_avail;
		fwd = b.fwd_cnt;
		got = b.sink_bytes;
		left = b.stream_total - b.sink_bytes;
	}
	if (!left && b.phase == SINK) {
		b.ack_due = 1;
		b.phase = WAIT_GO;
	}
}

static __attribute__((noinline)) void source_phase(void)
{
	volatile struct vq_used *u = b.v.rx.used;
	b.since = now();
	while (b.phase == SOURCE && b.source_bytes < b.stream_total) {
		tx_reap();
		/* Credit updates (every packet of the device's carries its fwd_cnt). */
		while (u->idx != b.rx_last) {
			barrier();
			volatile struct vq_used_elem *e = &u->ring[b.rx_last & (RX_QSIZE - 1)];
			u32 id = e->id;
			const struct vsock_hdr *h = (const struct vsock_hdr *)rx_buf(id);
			if (id < RX_BUFS && e->len == HDR_SIZE && h->op == VSOCK_OP_CREDIT_UPDATE &&
			    h->src_port == b.peer_port && h->dst_port == b.port) {
				b.peer_buf_alloc = h->buf_alloc;
				b.peer_fwd_cnt = h->fwd_cnt;
				rx_repost(id);
				b.rx_last++;
				b.rx_pkts++;
			} else if (!rx_one()) {
				break;
			}
		}
		int sent = 0;
		while (b.source_bytes < b.stream_total) {
			u32 len = b.stream_total - b.source_bytes;
			if (len > PKT_MAX)
				len = PKT_MAX;
			if (credit() < len) {
				if (!sent)
					b.credit_waits++;	/* the device's CREDIT_UPDATE interrupts */
				break;
			}
			if (conn_send(VSOCK_OP_RW, 0, SRC_AREA, len)) {
				b.blocked = 1;
				break;
			}
			b.source_bytes += len;
			b.source_pkts++;
			sent = 1;
		}
		if (sent) {
			tx_flush();
			b.since = now();
		} else {
			owed();
			if (!idle(STALL_TICKS))
				fail("no progress for 10 s");
		}
	}
}

static void serve(void)
{
	__asm__ volatile("sti" : : : "memory");
	while (b.phase != DONE && b.phase != FAILED) {
		if (b.phase == ECHO)
			echo_phase();
		else if (b.phase == SINK)
			sink_phase();
		else if (b.phase == SOURCE && b.source_bytes < b.stream_total)
			source_phase();
		else
			general();
	}
}

static const char *phase_name(int p)
{
	static const char *const names[] = { "accept", "echo", "sink", "wait-go", "source", "closing", "done", "failed" };
	return names[p];
}

static void report(void)
{
	if (b.error) {
		puts("probe: vsockbench error: ");
		puts(b.error);
		puts(" phase=");
		puts(phase_name(b.failed_in));
		putc('\n');
	}
	if (b.peer_port) {
		puts("probe: vsockbench accepted port="); putdec(b.port);
		puts(" from=2:"); putdec(b.peer_port); putc('\n');
	}
	puts("probe: vsockbench echo bytes="); putdec(b.echo_bytes);
	puts(" packets="); putdec(b.echo_pkts); putc('\n');
	puts("probe: vsockbench sink bytes="); putdec(b.sink_bytes);
	puts(" packets="); putdec(b.sink_pkts);
	puts(" mismatches="); putdec(b.mismatches); putc('\n');
	puts("probe: vsockbench source bytes="); putdec(b.source_bytes);
	puts(" packets="); putdec(b.source_pkts); putc('\n');
	if (!b.error)
		puts(b.closed_by_rst ? "probe: vsockbench closed=rst\n" : "probe: vsockbench closed=timeout\n");
	puts("probe: vsockbench stats rx="); putdec(b.rx_pkts);
	puts(" tx="); putdec(b.tx_pkts);
	puts(" rx_kicks="); putdec(b.rx_kicks);
	puts(" tx_kicks="); putdec(b.tx_kicks);
	puts(" irqs="); putdec(irq_counts[RX_VECTOR] + irq_counts[EVENT_VECTOR]);
	puts(" halts="); putdec(b.halts);
	puts(" polled="); putdec(b.polled);
	puts(" slot_waits="); putdec(b.slot_waits);
	puts(" credit_waits="); putdec(b.credit_waits);
	puts(" unexpected="); putdec(b.unexpected); putc('\n');
}

static void run(const char *cmdline)
{
	static const u8 vectors[3] = { RX_VECTOR, 0, EVENT_VECTOR };
	static const u16 sizes[3] = { RX_QSIZE, TX_QSIZE, 2 };
	memset(&b, 0, sizeof(b));
	b.port = word_number(cmdline, "port=", 5001);
	u32 rounds = word_number(cmdline, "rounds=", 100), msg = word_number(cmdline, "msg=", 64);
	b.stream_total = word_number(cmdline, "bytes=", 1 << 20);
	b.poll = word_number(cmdline, "poll=", 0);
	if (!b.port || !rounds || !msg || msg > PKT_MAX || (u64)rounds * msg > 0xffffffffULL || !b.stream_total) {
		puts("probe: vsockbench error: bad port=, rounds=, msg= or bytes=\n");
		return;
	}
	b.echo_total = rounds * msg;
	const char *err = vsock_find(&b.v);
	if (!err)
		err = vsock_start(&b.v, sizes, vectors);
	if (!err && (b.v.rx.size != RX_QSIZE || b.v.tx.size != TX_QSIZE))
		err = "the device's queues are too short";
	if (err) {
		puts("probe: vsockbench error: ");
		puts(err);
		putc('\n');
		return;
	}

	/* The block every source packet sends. */
	volatile u64 *src = (volatile u64 *)SRC_AREA;
	for (u32 i = 0; i < PKT_MAX / 8; i++)
		src[i] = SOURCE_TAG | (u64)i * 8;
	/* Receive buffer i is descriptor i; slot k is descriptors 2k (its header) -> 2k+1 (the
	 * data). */
	volatile struct vq_desc *rd = b.v.rx.desc, *td = b.v.tx.desc;
	for (u32 i = 0; i < RX_BUFS; i++) {
		rd[i].addr = rx_buf(i);
		rd[i].len = RX_BUF_LEN;
		rd[i].flags = DESC_F_WRITE;
		rd[i].next = 0;
	}
	for (u32 k = 0; k < TX_SLOTS; k++) {
		volatile struct vsock_hdr *h = tx_hdr(k);
		h->src_cid = b.v.cid;
		h->dst_cid = VSOCK_HOST_CID;
		h->type = VSOCK_TYPE_STREAM;
		h->buf_alloc = BUF_ALLOC;
		h->flags = 0;
		h->op = VSOCK_OP_RW;
		td[2 * k].addr = (u64)h;
		td[2 * k].len = HDR_SIZE;
		td[2 * k].flags = DESC_F_NEXT;
		td[2 * k].next = (u16)(2 * k + 1);
		td[2 * k + 1].addr = k < POOL_FIRST ? rx_buf(k) + HDR_SIZE : 0;
		td[2 * k + 1].flags = 0;
		td[2 * k + 1].next = 0;
	}
	b.pool = (1u << (TX_SLOTS - POOL_FIRST)) - 1;
	for (u32 i = 0; i < RX_BUFS; i++)
		rx_repost(i);
	rx_sync();

	serve();
	virtio_reset(&b.v.d);	/* the device lets go of the rings and drops the connection */
	report();
}

void vsockbench_mode(const char *cmdline)
{
	intr_init();
	run(cmdline);
	intr_stop();
}
