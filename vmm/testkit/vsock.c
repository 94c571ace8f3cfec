/* The probe's `vsock` mode: drive the first virtio-vsock device as a minimal driver does
 * (VERSION_1; rx, tx and event queues, each with its own MSI-X vector; DRIVER_OK; rx and
 * event buffers posted) and run one stream connection each way (virtio 1.2, 5.10.6):
 *   - listen: wait (VSOCK_LISTEN_TICKS) for the device's REQUEST to guest port `vport=N`
 *     (default 5000), answer RESPONSE, read one line, send back "guest-echo: LINE\n", then
 *     SHUTDOWN (both directions) and wait for the device's RST;
 *   - connect: REQUEST to host CID 2, port `hport=M` (default 6000), wait for RESPONSE (RST:
 *     refused), send "hello-from-probe\n", read the host's reply line, then SHUTDOWN and RST.
 * `vport=0` or `hport=0` skips that part. Packets for no connection are answered with RST
 * (a RST is never answered); CREDIT_REQUEST is answered with CREDIT_UPDATE; every packet
 * sent carries buf_alloc (VSOCK_BUF_ALLOC) and fwd_cnt; rx buffers are posted back as soon as
 * their packet is copied out. Output lines:
 *   probe: vsock slot=SS features=0x...         the device's offer
 *   probe: vsock cid=N                          the guest CID from the device configuration
 *   probe: vsock accepted port=N from=2:P       the device's REQUEST, answered
 *   probe: vsock echoed [LINE]                  the line read (64 printable chars at most)
 *   probe: vsock listen closed=rst|timeout      what ended it after our SHUTDOWN
 *   probe: vsock connected port=M local=P       RESPONSE to our REQUEST
 *   probe: vsock connect refused                RST to our REQUEST
 *   probe: vsock host replied [LINE]
 *   probe: vsock connect closed=rst|timeout
 *   probe: vsock irqs=N                         MSIs taken on the three queues' vectors
 *   probe: vsock packets rx=N tx=M unexpected=U U: packets for no connection or malformed
 * Failures print "probe: vsock error: ..." and stop the mode.
 * The device bring-up (vsock_find, vsock_start) is shared with vsockbench.c through probe.h. */
#include "probe.h"

#define RX_VECTOR (VEC_MSI_BASE + 2)
#define TX_VECTOR (VEC_MSI_BASE + 3)
#define EVENT_VECTOR (VEC_MSI_BASE + 4)

#define HOST_CID VSOCK_HOST_CID
#define TYPE_STREAM VSOCK_TYPE_STREAM
#define OP_REQUEST VSOCK_OP_REQUEST
#define OP_RESPONSE VSOCK_OP_RESPONSE
#define OP_RST VSOCK_OP_RST
#define OP_SHUTDOWN VSOCK_OP_SHUTDOWN
#define OP_RW VSOCK_OP_RW
#define OP_CREDIT_UPDATE VSOCK_OP_CREDIT_UPDATE
#define OP_CREDIT_REQUEST VSOCK_OP_CREDIT_REQUEST
#define SHUTDOWN_RCV VSOCK_SHUTDOWN_RCV
#define SHUTDOWN_SEND VSOCK_SHUTDOWN_SEND

/* Buffers in the DMA area: rx buffers (header and data in one descriptor), one tx packet
 * (sent synchronously: header and data descriptors), event buffers. */
#define RX_BUFS 8
#define RX_BUF_AREA DMA_AREA
#define RX_BUF_SIZE 0x400
#define RX_DATA_MAX (RX_BUF_SIZE - sizeof(struct vsock_hdr))
#define TX_HDR (DMA_AREA + 0x2000)
#define TX_DATA (DMA_AREA + 0x2100)
#define TX_DATA_MAX 0x100
#define QUEUE_SIZE 16

/* What we advertise: we consume everything at once, so all of it is always free. */
#define VSOCK_BUF_ALLOC (64 * 1024)
#define LINE_MAX 64

#define TX_WAIT_TICKS (5000 / TICK_MS)
#define VSOCK_LISTEN_TICKS (30000 / TICK_MS)	/* for the host to connect */
#define VSOCK_REPLY_TICKS (10000 / TICK_MS)	/* for a handshake answer or a line */
#define VSOCK_CLOSE_TICKS (3000 / TICK_MS)	/* for the RST after our SHUTDOWN */
#define CONNECT_LOCAL_PORT 50000

enum { C_IDLE, C_CONNECTING, C_ESTABLISHED, C_CLOSED };

struct conn {
	int state;
	int refused;			/* RST while connecting */
	u32 local_port, peer_port;
	u32 peer_buf_alloc, peer_fwd_cnt;	/* from the last packet the device sent */
	u32 tx_cnt;			/* data bytes we sent */
	u32 fwd_cnt;			/* data bytes we received (and consumed) */
	u32 fwd_sent;			/* fwd_cnt as last told */
	u32 peer_shut;			/* SHUTDOWN flags the device sent */
	char line[LINE_MAX + 1];
	u32 line_len;
	int line_done;
};

static struct vsock_dev vdev;
static u64 rx_addr[QUEUE_SIZE];		/* rx buffer of each descriptor head */
static u32 rx_packets, tx_packets, unexpected;
static int stuck;			/* tx timed out: the shared buffers may still be the device's */
static u32 listen_port;
static struct conn listen_conn, out_conn;

/* The packet being handled (copied out of its rx buffer, which is posted back at once). */
static struct vsock_hdr pkt;
static u8 pkt_data[RX_BUF_SIZE];
static u32 pkt_data_len;

static int fail(const char *what)
{
	puts("probe: vsock error: ");
	puts(what);
	putc('\n');
	return -1;
}

static u32 now(void) { return irq_counts[VEC_TIMER]; }
static int expired(u32 start, u32 ticks) { return now() - start >= ticks; }

static int post_rx(u64 addr)
{
	struct vq_buf b = { addr, RX_BUF_SIZE, 1 };
	int head = virtq_add(&vdev.rx, &b, 1);
	if (head < 0)
		return -1;
	rx_addr[head] = addr;
	return 0;
}

/* Sends one packet (synchronously: waits for the device to take it). */
static int send_raw(u32 src_port, u64 dst_cid, u32 dst_port, u16 op, u32 flags, u32 fwd_cnt,
		    const void *data, u32 len)
{
	if (stuck || len > TX_DATA_MAX)
		return -1;
	volatile struct vsock_hdr *h = (volatile struct vsock_hdr *)TX_HDR;
	h->src_cid = vdev.cid;
	h->dst_cid = dst_cid;
	h->src_port = src_port;
	h->dst_port = dst_port;
	h->len = len;
	h->type = TYPE_STREAM;
	h->op = op;
	h->flags = flags;
	h->buf_alloc = VSOCK_BUF_ALLOC;
	h->fwd_cnt = fwd_cnt;
	if (len)
		memcpy((void *)TX_DATA, data, len);
	struct vq_buf bufs[2] = { { TX_HDR, sizeof(struct vsock_hdr), 0 }, { TX_DATA, len, 0 } };
	barrier();
	int head = virtq_add(&vdev.tx, bufs, len ? 2 : 1);
	if (head < 0)
		return fail("no free tx descriptors");
	tx_packets++;
	virtq_kick(&vdev.tx);
	int id = virtq_wait(&vdev.tx, 0, TX_WAIT_TICKS);
	if (id < 0) {
		stuck = 1;
		return fail("tx packet not used in time");
	}
	if (id != head)
		return fail("tx used ring returned another chain");
	return 0;
}

static int send(struct conn *c, u16 op, u32 flags, const void *data, u32 len)
{
	int r = send_raw(c->local_port, HOST_CID, c->peer_port, op, flags, c->fwd_cnt, data, len);
	if (r == 0) {
		c->fwd_sent = c->fwd_cnt;
		c->tx_cnt += len;
	}
	return r;
}

/* RST answering the packet in `pkt`, addresses mirrored. */
static void reply_rst(void)
{
	send_raw(pkt.dst_port, pkt.src_cid, pkt.src_port, OP_RST, 0, 0, 0, 0);
}

/* Takes the next rx packet into pkt/pkt_data, posting its buffer back; waits until `start` +
 * `ticks`. 0 on success, -1 on timeout. */
static int rx_next(u32 start, u32 ticks)
{
	for (;;) {
		__asm__ volatile("cli" : : : "memory");
		u32 len = 0;
		int id = virtq_poll(&vdev.rx, &len);
		if (id >= 0) {
			u64 addr = rx_addr[id];
			barrier();
			memcpy(&pkt, (const void *)addr, sizeof(pkt));
			u32 room = len >= sizeof(pkt) ? len - sizeof(pkt) : 0;
			pkt_data_len = pkt.len < room ? pkt.len : room;
			if (pkt_data_len > RX_DATA_MAX)
				pkt_data_len = RX_DATA_MAX;
			if (pkt_data_len)
				memcpy(pkt_data, (const void *)(addr + sizeof(pkt)), pkt_data_len);
			int bad = len < sizeof(pkt) || pkt.len != pkt_data_len;
			if (post_rx(addr) == 0)
				virtq_kick(&vdev.rx);
			rx_packets++;
			if (bad) {
				unexpected++;
				continue;
			}
			return 0;
		}
		if (expired(start, ticks))
			return -1;
		__asm__ volatile("sti; hlt" : : : "memory");
	}
}

/* Whether `pkt` belongs to `c`. */
static int for_conn(const struct conn *c)
{
	return (c->state == C_CONNECTING || c->state == C_ESTABLISHED) && pkt.dst_port == c->local_port &&
	       pkt.src_port == c->peer_port;
}

static void conn_packet(struct conn *c)
{
	c->peer_buf_alloc = pkt.buf_alloc;
	c->peer_fwd_cnt = pkt.fwd_cnt;
	switch (pkt.op) {
	case OP_RESPONSE:
		if (c->state == C_CONNECTING)
			c->state = C_ESTABLISHED;
		else
			unexpected++;
		break;
	case OP_RW:
		if (c->state != C_ESTABLISHED) {
			unexpected++;
			break;
		}
		for (u32 i = 0; i < pkt_data_len; i++) {
			if (c->line_done)
				break;
			if (pkt_data[i] == '\n')
				c->line_done = 1;
			else if (c->line_len < LINE_MAX)
				c->line[c->line_len++] = (char)pkt_data[i];
		}
		c->fwd_cnt += pkt_data_len;
		/* Tell the device about consumed data before its view of our space gets low. */
		if (c->fwd_cnt - c->fwd_sent > VSOCK_BUF_ALLOC / 2)
			send(c, OP_CREDIT_UPDATE, 0, 0, 0);
		break;
	case OP_CREDIT_REQUEST:
		send(c, OP_CREDIT_UPDATE, 0, 0, 0);
		break;
	case OP_CREDIT_UPDATE:
		break;
	case OP_SHUTDOWN:
		c->peer_shut |= pkt.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
		break;
	case OP_RST:
		if (c->state == C_CONNECTING)
			c->refused = 1;
		c->state = C_CLOSED;
		break;
	default:		/* REQUEST on a connection, unknown operations */
		unexpected++;
		break;
	}
}

/* Handles the packet in `pkt`. */
static void dispatch(void)
{
	if (pkt.dst_cid != vdev.cid || pkt.src_cid != HOST_CID || pkt.type != TYPE_STREAM) {
		unexpected++;
		return;
	}
	if (for_conn(&listen_conn)) {
		conn_packet(&listen_conn);
		return;
	}
	if (for_conn(&out_conn)) {
		conn_packet(&out_conn);
		return;
	}
	if (pkt.op == OP_REQUEST && listen_port && pkt.dst_port == listen_port && listen_conn.state == C_IDLE) {
		struct conn *c = &listen_conn;
		c->local_port = listen_port;
		c->peer_port = pkt.src_port;
		c->peer_buf_alloc = pkt.buf_alloc;
		c->peer_fwd_cnt = pkt.fwd_cnt;
		c->state = C_ESTABLISHED;
		if (send(c, OP_RESPONSE, 0, 0, 0) == 0) {
			puts("probe: vsock accepted port="); putdec(listen_port);
			puts(" from="); putdec(pkt.src_cid); putc(':'); putdec(pkt.src_port); putc('\n');
		}
		return;
	}
	/* A RST for nothing is dropped; anything else for nothing is answered with RST. */
	if (pkt.op != OP_RST) {
		unexpected++;
		reply_rst();
	}
}

/* Handles packets until `*flag` is set, or `*state` leaves `from`, or `ticks` pass. */
static void pump_until(volatile int *flag, volatile int *state, int from, u32 ticks)
{
	u32 start = now();
	while (!(flag && *flag) && !(state && *state != from)) {
		if (rx_next(start, ticks) < 0)
			return;
		dispatch();
	}
}

static void put_line(const struct conn *c)
{
	putc('[');
	for (u32 i = 0; i < c->line_len; i++)
		putc(c->line[i] >= 0x20 && c->line[i] < 0x7f ? c->line[i] : '?');
	puts("]\n");
}

/* Sends `len` bytes of data within the device's credit (asking for more once if short). */
static int send_data(struct conn *c, const char *data, u32 len)
{
	u32 used = c->tx_cnt - c->peer_fwd_cnt;
	if (c->peer_buf_alloc < used || c->peer_buf_alloc - used < len) {
		if (send(c, OP_CREDIT_REQUEST, 0, 0, 0))
			return -1;
		u32 start = now();
		while (c->state == C_ESTABLISHED && c->peer_buf_alloc - (c->tx_cnt - c->peer_fwd_cnt) < len) {
			if (rx_next(start, VSOCK_REPLY_TICKS) < 0)
				return fail("no credit from the device");
			dispatch();
		}
		if (c->state != C_ESTABLISHED)
			return fail("connection reset while waiting for credit");
	}
	return send(c, OP_RW, 0, data, len);
}

/* SHUTDOWN both ways, then the device's RST (a RST of ours if it does not come). */
static void close_conn(struct conn *c, const char *name)
{
	if (c->state == C_ESTABLISHED) {
		send(c, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND, 0, 0);
		pump_until(0, &c->state, C_ESTABLISHED, VSOCK_CLOSE_TICKS);
	}
	puts("probe: vsock "); puts(name);
	if (c->state == C_CLOSED) {
		puts(" closed=rst\n");
	} else {
		puts(" closed=timeout\n");
		send(c, OP_RST, 0, 0, 0);
		c->state = C_CLOSED;
	}
}

static void listen_part(void)
{
	struct conn *c = &listen_conn;
	pump_until(0, &c->state, C_IDLE, VSOCK_LISTEN_TICKS);
	if (c->state != C_ESTABLISHED) {
		fail("no connection from the host");
		listen_port = 0;
		return;
	}
	pump_until(&c->line_done, &c->state, C_ESTABLISHED, VSOCK_REPLY_TICKS);
	if (!c->line_done) {
		fail("no line from the host");
	} else {
		static const char prefix[] = "guest-echo: ";
		char echo[sizeof(prefix) + LINE_MAX + 1];
		u32 n = sizeof(prefix) - 1;
		memcpy(echo, prefix, n);
		memcpy(echo + n, c->line, c->line_len);
		n += c->line_len;
		echo[n++] = '\n';
		if (send_data(c, echo, n) == 0) {
			puts("probe: vsock echoed ");
			put_line(c);
		}
	}
	close_conn(c, "listen");
	listen_port = 0;	/* no further connections */
}

static void connect_part(u32 port)
{
	struct conn *c = &out_conn;
	c->local_port = CONNECT_LOCAL_PORT;
	c->peer_port = port;
	c->state = C_CONNECTING;
	if (send(c, OP_REQUEST, 0, 0, 0)) {
		c->state = C_CLOSED;
		return;
	}
	pump_until(0, &c->state, C_CONNECTING, VSOCK_REPLY_TICKS);
	if (c->refused) {
		puts("probe: vsock connect refused\n");
		return;
	}
	if (c->state != C_ESTABLISHED) {
		fail("connect timed out");
		send(c, OP_RST, 0, 0, 0);
		c->state = C_CLOSED;
		return;
	}
	puts("probe: vsock connected port="); putdec(port);
	puts(" local="); putdec(c->local_port); putc('\n');
	static const char hello[] = "hello-from-probe\n";
	if (send_data(c, hello, sizeof(hello) - 1) == 0) {
		pump_until(&c->line_done, &c->state, C_ESTABLISHED, VSOCK_REPLY_TICKS);
		if (c->line_done) {
			puts("probe: vsock host replied ");
			put_line(c);
		} else {
			fail("no reply line from the host");
		}
	}
	close_conn(c, "connect");
}

/* The device bring-up shared with vsockbench.c (probe.h). */
const char *vsock_find(struct vsock_dev *v)
{
	memset(v, 0, sizeof(*v));
	if (virtio_find(VIRTIO_VSOCK_DEVICE, 0, &v->d))
		return "no virtio-vsock device";
	if (virtio_negotiate(&v->d, VIRTIO_F_VERSION_1))
		return "feature negotiation (FEATURES_OK not accepted)";
	return 0;
}

#define EVENT_BUFS 2
#define EVENT_BUF_SIZE 8

const char *vsock_start(struct vsock_dev *v, const u16 sizes[3], const u8 vectors[3])
{
	struct virtio_dev *d = &v->d;
	struct virtq *qs[3] = { &v->rx, &v->tx, &v->ev };
	if (!d->devcfg)
		return "no device configuration capability";
	if (virtio_num_queues(d) < 3)
		return "fewer than 3 queues (rx, tx, event)";
	if (!d->msix_table || d->msix_size < 3)
		return "MSI-X table too small";
	virtio_msix_enable(d);
	for (u16 q = 0; q < 3; q++)
		if (vectors[q] && virtio_msix_entry(d, q, vectors[q]))
			return "MSI-X table entries did not take";
	for (u16 q = 0; q < 3; q++)
		if (virtq_setup(d, qs[q], q, sizes[q], q, vectors[q] ? q : VIRTIO_NO_VECTOR, vectors[q]))
			return "queue setup (size, rings or MSI-X vector rejected)";
	if (virtio_driver_ok(d, VIRTIO_NO_VECTOR))
		return "DRIVER_OK: the device needs a reset";

	/* The guest CID: le64 at 0, in two halves, retried while the config generation moves. */
	for (int tries = 0; tries < 10; tries++) {
		u8 gen = virtio_config_generation(d);
		v->cid = mmio_r32(d->devcfg) | (u64)mmio_r32(d->devcfg + 4) << 32;
		if (gen == virtio_config_generation(d))
			break;
	}
	for (int i = 0; i < EVENT_BUFS; i++) {
		struct vq_buf b = { VSOCK_EVENT_BUF_AREA + (u64)i * EVENT_BUF_SIZE, EVENT_BUF_SIZE, 1 };
		if (virtq_add(&v->ev, &b, 1) < 0)
			return "no free event descriptors";
	}
	virtq_kick(&v->ev);
	return 0;
}

static int run(u32 vport, u32 hport)
{
	static const u8 vectors[3] = { RX_VECTOR, TX_VECTOR, EVENT_VECTOR };
	static const u16 sizes[3] = { QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE };
	const char *err = vsock_find(&vdev);
	if (err)
		return fail(err);
	puts("probe: vsock slot="); puthexw(vdev.d.slot, 2);
	puts(" features="); puthex(vdev.d.features); putc('\n');
	if ((err = vsock_start(&vdev, sizes, vectors)))
		return fail(err);
	puts("probe: vsock cid="); putdec(vdev.cid); putc('\n');

	for (int i = 0; i < RX_BUFS; i++)
		if (post_rx(RX_BUF_AREA + (u64)i * RX_BUF_SIZE))
			return fail("no free rx descriptors");
	virtq_kick(&vdev.rx);

	if (vport) {
		listen_port = vport;
		listen_part();
	}
	if (hport && !stuck)
		connect_part(hport);

	puts("probe: vsock irqs=");
	putdec(irq_counts[RX_VECTOR] + irq_counts[TX_VECTOR] + irq_counts[EVENT_VECTOR]);
	putc('\n');
	puts("probe: vsock packets rx="); putdec(rx_packets);
	puts(" tx="); putdec(tx_packets);
	puts(" unexpected="); putdec(unexpected); putc('\n');
	virtio_reset(&vdev.d);	/* the device lets go of the rings and drops its connections */
	return 0;
}

void vsock_mode(u32 vport, u32 hport)
{
	intr_init();
	run(vport, hport);
	intr_stop();
}
