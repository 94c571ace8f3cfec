/* The probe's `fs` mode: drive the first virtio-fs device as a real driver does (VERSION_1, the
 * request queue with an MSI-X vector, DRIVER_OK) and talk FUSE (protocol 7.31) to it. Each
 * request is one chain: readable in_header + arguments (+ a name or write data), writable
 * out_header + reply. Output lines:
 *   probe: fs slot=SS features=0x...              the device's offer
 *   probe: fs init error=E major=7 minor=M        FUSE_INIT (the server's version)
 *   probe: fs tag=TAG                             the tag from the device configuration
 *   probe: fs lookup hello.txt error=E size=N     FUSE_LOOKUP in the root (nodeid 1)
 *   probe: fs read len=N fnv=0x...                FUSE_OPEN (O_RDONLY) + FUSE_READ of up to
 *                                                 4 KiB at 0 (FNV-1a of what came back)
 *   probe: fs text=[...]                          the file's first line (64 printable chars
 *                                                 at most)
 *   probe: fs lookup missing.txt error=E          -2 (ENOENT) expected
 *   probe: fs create error=E write error=E written=N
 *                                                 FUSE_CREATE from-guest.txt (0644, O_WRONLY |
 *                                                 O_CREAT) + FUSE_WRITE of FS_WRITE_TEXT; on
 *                                                 an error the write is skipped
 *                                                 ("write error=skipped written=0")
 *   probe: fs status init=E lookup=E open=E read=E release=E missing=E create=E write=E
 *          release2=E                             every request's error ("none": no reply,
 *                                                 "-": not sent)
 *   probe: fs irqs=N requests=M                   MSIs taken on the request queue's vector
 * Errors are the FUSE out_header's (0 or a negative errno). Failures print "probe: fs error:
 * ..." and stop the mode. Both handles are released (FUSE_RELEASE) as a closing driver does. */
#include "probe.h"

#define VIRTIO_FS_DEVICE 0x105a
#define FS_HIPRIO_QUEUE 0
#define FS_REQUEST_QUEUE 1
#define FS_TAG_BYTES 36

/* The request queue raises MSI-X table entry 1 (entry 0 would be the hiprio queue's, as Linux
 * lays them out), delivered on this vector. */
#define FS_MSIX_ENTRY 1
#define FS_VECTOR (VEC_MSI_BASE + 1)
#define WAIT_TICKS (5000 / TICK_MS)	/* 5 s per request */

/* ---- FUSE (include/uapi/linux/fuse.h), little endian ---- */
#define FUSE_LOOKUP 1
#define FUSE_OPEN 14
#define FUSE_READ 15
#define FUSE_WRITE 16
#define FUSE_RELEASE 18
#define FUSE_INIT 26
#define FUSE_CREATE 35
#define FUSE_ROOT_ID 1

#define O_RDONLY_ 0
#define O_WRONLY_ 01
#define O_CREAT_ 0100

struct fuse_in_header { u32 len, opcode; u64 unique, nodeid; u32 uid, gid, pid; u16 total_extlen, padding; };
struct fuse_out_header { u32 len; int error; u64 unique; };
struct fuse_init_in { u32 major, minor, max_readahead, flags; };
struct fuse_init_out {
	u32 major, minor, max_readahead, flags;
	u16 max_background, congestion_threshold;
	u32 max_write, time_gran;
	u16 max_pages, map_alignment;
	u32 flags2, unused[7];
};
struct fuse_attr {
	u64 ino, size, blocks, atime, mtime, ctime;
	u32 atimensec, mtimensec, ctimensec, mode, nlink, uid, gid, rdev, blksize, flags;
};
struct fuse_entry_out {
	u64 nodeid, generation, entry_valid, attr_valid;
	u32 entry_valid_nsec, attr_valid_nsec;
	struct fuse_attr attr;
};
struct fuse_open_in { u32 flags, open_flags; };
struct fuse_open_out { u64 fh; u32 open_flags, padding; };
struct fuse_create_in { u32 flags, mode, umask, open_flags; };
struct fuse_read_in { u64 fh, offset; u32 size, read_flags; u64 lock_owner; u32 flags, padding; };
struct fuse_write_in { u64 fh, offset; u32 size, write_flags; u64 lock_owner; u32 flags, padding; };
struct fuse_write_out { u32 size, padding; };
struct fuse_release_in { u64 fh; u32 flags, release_flags; u64 lock_owner; };

_Static_assert(sizeof(struct fuse_in_header) == 40, "fuse_in_header");
_Static_assert(sizeof(struct fuse_out_header) == 16, "fuse_out_header");
_Static_assert(sizeof(struct fuse_init_in) == 16, "fuse_init_in (7.31)");
_Static_assert(sizeof(struct fuse_init_out) == 64, "fuse_init_out");
_Static_assert(sizeof(struct fuse_attr) == 88, "fuse_attr");
_Static_assert(sizeof(struct fuse_entry_out) == 128, "fuse_entry_out");
_Static_assert(sizeof(struct fuse_open_out) == 16, "fuse_open_out");
_Static_assert(sizeof(struct fuse_create_in) == 16, "fuse_create_in");
_Static_assert(sizeof(struct fuse_read_in) == 40, "fuse_read_in");
_Static_assert(sizeof(struct fuse_write_in) == 40, "fuse_write_in");
_Static_assert(sizeof(struct fuse_release_in) == 24, "fuse_release_in");

/* Buffers in the DMA area. */
#define IN_HDR (DMA_AREA + 0x0000)
#define IN_ARGS (DMA_AREA + 0x0100)	/* up to 256 bytes */
#define IN_DATA (DMA_AREA + 0x0200)	/* a name or write data, up to 512 bytes */
#define OUT_HDR (DMA_AREA + 0x0400)
#define REPLY (DMA_AREA + 0x1000)	/* 4 KiB */
#define REPLY_BYTES 4096
#define IN_DATA_BYTES 512

/* Results that are not FUSE errors (those are 0 or negative). */
#define R_NOT_SENT 1
#define R_NO_REPLY 2

#define FS_WRITE_TEXT "written by the probe\n"

static u32 requests;
static u64 next_unique = 1;
static int stuck;	/* a request timed out: the shared buffers may still be the device's */

static int fail(const char *what)
{
	puts("probe: fs error: ");
	puts(what);
	putc('\n');
	return -1;
}

static void putint(int v)
{
	if (v < 0) {
		putc('-');
		putdec((u64)(-(long long)v));
	} else {
		putdec((u64)v);
	}
}

static void put_result(int r)
{
	if (r == R_NOT_SENT) puts("-");
	else if (r == R_NO_REPLY) puts("none");
	else putint(r);
}

/* One FUSE request: in_header + `args` (copied to IN_ARGS) + `data` (copied to IN_DATA) as the
 * readable part, out_header + `reply_len` bytes at REPLY as the writable part. Returns the
 * reply's error (0 or -errno) with `*reply_bytes` = reply bytes after the header, or
 * R_NO_REPLY when the device did not complete it or its reply header is not one for this
 * request (reported). */
static int fuse_request(struct virtq *q, u32 opcode, u64 nodeid, const void *args, u32 args_len,
			const void *data, u32 data_len, u32 reply_len, u32 *reply_bytes)
{
	if (reply_bytes)
		*reply_bytes = 0;
	if (stuck)
		return R_NO_REPLY;
	if (args_len > 256 || data_len > IN_DATA_BYTES || reply_len > REPLY_BYTES) {
		fail("request too large for the buffers");
		return R_NO_REPLY;
	}
	u64 unique = next_unique++;
	struct fuse_in_header *in = (struct fuse_in_header *)IN_HDR;
	memset(in, 0, sizeof(*in));
	in->len = sizeof(*in) + args_len + data_len;
	in->opcode = opcode;
	in->unique = unique;
	in->nodeid = nodeid;
	in->uid = 0;
	in->gid = 0;
	in->pid = 1;
	if (args_len)
		memcpy((void *)IN_ARGS, args, args_len);
	if (data_len)
		memcpy((void *)IN_DATA, data, data_len);
	struct fuse_out_header *out = (struct fuse_out_header *)OUT_HDR;
	memset(out, 0, sizeof(*out));

	struct vq_buf bufs[5];
	int n = 0;
	bufs[n++] = (struct vq_buf){ IN_HDR, sizeof(*in), 0 };
	if (args_len)
		bufs[n++] = (struct vq_buf){ IN_ARGS, args_len, 0 };
	if (data_len)
		bufs[n++] = (struct vq_buf){ IN_DATA, data_len, 0 };
	bufs[n++] = (struct vq_buf){ OUT_HDR, sizeof(*out), 1 };
	if (reply_len)
		bufs[n++] = (struct vq_buf){ REPLY, reply_len, 1 };
	barrier();
	int head = virtq_add(q, bufs, n);
	if (head < 0) {
		fail("no free descriptors");
		return R_NO_REPLY;
	}
	requests++;
	virtq_kick(q);
	u32 used_len = 0;
	int id = virtq_wait(q, &used_len, WAIT_TICKS);
	if (id < 0) {
		stuck = 1;
		fail("request timed out");
		return R_NO_REPLY;
	}
	if (id != head) {
		fail("used ring returned another chain");
		return R_NO_REPLY;
	}
	barrier();
	if (out->unique != unique || out->len < sizeof(*out) || out->len > sizeof(*out) + reply_len ||
	    out->len != used_len) {
		puts("probe: fs error: bad reply to opcode "); putdec(opcode);
		puts(": used="); putdec(used_len);
		puts(" len="); putdec(out->len);
		puts(" unique="); putdec(out->unique);
		puts(" (sent "); putdec(unique); puts(")\n");
		return R_NO_REPLY;
	}
	if (out->error > 0) {
		fail("positive error in a reply");
		return R_NO_REPLY;
	}
	if (reply_bytes)
		*reply_bytes = out->len - sizeof(*out);
	return out->error;
}

static u32 str_len(const char *s)
{
	u32 n = 0;
	while (s[n]) n++;
	return n;
}

/* FUSE_LOOKUP of `name` in the root: the entry in `*e`. */
static int lookup(struct virtq *q, const char *name, struct fuse_entry_out *e)
{
	u32 got = 0;
	int r = fuse_request(q, FUSE_LOOKUP, FUSE_ROOT_ID, 0, 0, name, str_len(name) + 1, sizeof(*e), &got);
	memset(e, 0, sizeof(*e));
	if (r == 0 && got < sizeof(*e)) {
		fail("short LOOKUP reply");
		return R_NO_REPLY;
	}
	if (r == 0)
		memcpy(e, (void *)REPLY, sizeof(*e));
	return r;
}

static int release(struct virtq *q, u64 nodeid, u64 fh, u32 flags)
{
	struct fuse_release_in rel = { .fh = fh, .flags = flags };
	return fuse_request(q, FUSE_RELEASE, nodeid, &rel, sizeof(rel), 0, 0, 0, 0);
}

/* The tag: bytes of the device configuration up to the first NUL, retried while the
 * configuration generation moves. */
static void read_tag(struct virtio_dev *d, char *tag)
{
	for (int tries = 0; tries < 10; tries++) {
		u8 gen = virtio_config_generation(d);
		for (int i = 0; i < FS_TAG_BYTES; i++)
			tag[i] = (char)mmio_r8(d->devcfg + i);
		if (gen == virtio_config_generation(d))
			break;
	}
	tag[FS_TAG_BYTES] = 0;
}

static int run(void)
{
	struct virtio_dev d;
	struct virtq q;
	if (virtio_find(VIRTIO_FS_DEVICE, 0, &d))
		return fail("no virtio-fs device");
	if (virtio_negotiate(&d, VIRTIO_F_VERSION_1))
		return fail("feature negotiation (FEATURES_OK not accepted)");
	puts("probe: fs slot="); puthexw(d.slot, 2);
	puts(" features="); puthex(d.features); putc('\n');
	if (!d.devcfg)
		return fail("no device configuration capability");
	if (virtio_num_queues(&d) < 2)
		return fail("fewer than 2 queues (hiprio + request)");
	if (!d.msix_table || d.msix_size <= FS_MSIX_ENTRY)
		return fail("MSI-X table too small");
	virtio_msix_enable(&d);
	if (virtio_msix_entry(&d, FS_MSIX_ENTRY, FS_VECTOR))
		return fail("MSI-X table entry did not take");
	/* Only the request queue: the transport does not need every queue enabled, and this
	 * driver sends nothing (FORGET, INTERRUPT) on the hiprio queue. */
	if (virtq_setup(&d, &q, FS_REQUEST_QUEUE, 16, 0, FS_MSIX_ENTRY, FS_VECTOR))
		return fail("request queue setup (size, rings or MSI-X vector rejected)");
	if (virtio_driver_ok(&d, VIRTIO_NO_VECTOR))
		return fail("DRIVER_OK: the device needs a reset");

	int r_init, r_lookup, r_open = R_NOT_SENT, r_read = R_NOT_SENT, r_release = R_NOT_SENT;
	int r_missing, r_create, r_write = R_NOT_SENT, r_release2 = R_NOT_SENT;
	u32 got = 0;

	/* 1. INIT */
	struct fuse_init_in init = { .major = 7, .minor = 31, .max_readahead = 0x20000, .flags = 0 };
	struct fuse_init_out io;
	memset(&io, 0, sizeof(io));
	r_init = fuse_request(&q, FUSE_INIT, 0, &init, sizeof(init), 0, 0, sizeof(io), &got);
	if (r_init == 0) {
		if (got < 24) return fail("short INIT reply");	/* FUSE_COMPAT_22_INIT_OUT_SIZE */
		memcpy(&io, (void *)REPLY, got < sizeof(io) ? got : sizeof(io));
	}
	puts("probe: fs init error="); put_result(r_init);
	puts(" major="); putdec(io.major);
	puts(" minor="); putdec(io.minor); putc('\n');
	if (r_init != 0)
		return fail("INIT failed");

	/* 2. The tag. */
	char tag[FS_TAG_BYTES + 1];
	read_tag(&d, tag);
	puts("probe: fs tag=");
	for (int i = 0; i < FS_TAG_BYTES && tag[i]; i++)
		putc(tag[i] >= 0x20 && tag[i] < 0x7f ? tag[i] : '?');
	putc('\n');

	/* 3. LOOKUP hello.txt */
	struct fuse_entry_out e;
	r_lookup = lookup(&q, "hello.txt", &e);
	puts("probe: fs lookup hello.txt error="); put_result(r_lookup);
	puts(" size="); putdec(e.attr.size); putc('\n');

	/* 4. OPEN + READ (+ RELEASE) */
	u32 len = 0;
	u8 *data = (u8 *)REPLY;
	if (r_lookup == 0) {
		struct fuse_open_in oi = { .flags = O_RDONLY_ };
		r_open = fuse_request(&q, FUSE_OPEN, e.nodeid, &oi, sizeof(oi), 0, 0, sizeof(struct fuse_open_out), &got);
		if (r_open == 0 && got < sizeof(struct fuse_open_out))
			return fail("short OPEN reply");
		if (r_open == 0) {
			u64 fh = ((struct fuse_open_out *)REPLY)->fh;
			struct fuse_read_in ri = { .fh = fh, .offset = 0, .size = 4096, .flags = O_RDONLY_ };
			memset(data, 0, REPLY_BYTES);
			r_read = fuse_request(&q, FUSE_READ, e.nodeid, &ri, sizeof(ri), 0, 0, REPLY_BYTES, &got);
			if (r_read == 0)
				len = got;
			puts("probe: fs read len="); putdec(len);
			puts(" fnv="); puthex(fnv1a(data, len)); putc('\n');
			puts("probe: fs text=[");
			for (u32 i = 0; i < len && i < 64 && data[i] != '\n'; i++)
				putc(data[i] >= 0x20 && data[i] < 0x7f ? (char)data[i] : '?');
			puts("]\n");
			r_release = release(&q, e.nodeid, fh, O_RDONLY_);
		}
	}

	/* 5. LOOKUP missing.txt */
	struct fuse_entry_out m;
	r_missing = lookup(&q, "missing.txt", &m);
	puts("probe: fs lookup missing.txt error="); put_result(r_missing); putc('\n');

	/* 6. CREATE + WRITE (+ RELEASE) */
	static const char name[] = "from-guest.txt";
	static const char text[] = FS_WRITE_TEXT;
	struct fuse_create_in ci = { .flags = O_WRONLY_ | O_CREAT_, .mode = 0100644 /* S_IFREG | 0644 */, .umask = 022 };
	r_create = fuse_request(&q, FUSE_CREATE, FUSE_ROOT_ID, &ci, sizeof(ci), name, sizeof(name),
				sizeof(struct fuse_entry_out) + sizeof(struct fuse_open_out), &got);
	u32 written = 0;
	if (r_create == 0) {
		if (got < sizeof(struct fuse_entry_out) + sizeof(struct fuse_open_out))
			return fail("short CREATE reply");
		u64 nodeid = ((struct fuse_entry_out *)REPLY)->nodeid;
		u64 fh = ((struct fuse_open_out *)(REPLY + sizeof(struct fuse_entry_out)))->fh;
		struct fuse_write_in wi = { .fh = fh, .offset = 0, .size = sizeof(text) - 1, .flags = O_WRONLY_ };
		r_write = fuse_request(&q, FUSE_WRITE, nodeid, &wi, sizeof(wi), text, sizeof(text) - 1,
				       sizeof(struct fuse_write_out), &got);
		if (r_write == 0 && got < sizeof(struct fuse_write_out))
			return fail("short WRITE reply");
		if (r_write == 0)
			written = ((struct fuse_write_out *)REPLY)->size;
		r_release2 = release(&q, nodeid, fh, O_WRONLY_);
	}
	puts("probe: fs create error="); put_result(r_create);
	puts(" write error=");
	if (r_write == R_NOT_SENT) puts("skipped");
	else put_result(r_write);
	puts(" written="); putdec(written); putc('\n');

	puts("probe: fs status init="); put_result(r_init);
	puts(" lookup="); put_result(r_lookup);
	puts(" open="); put_result(r_open);
	puts(" read="); put_result(r_read);
	puts(" release="); put_result(r_release);
	puts(" missing="); put_result(r_missing);
	puts(" create="); put_result(r_create);
	puts(" write="); put_result(r_write);
	puts(" release2="); put_result(r_release2);
	putc('\n');
	puts("probe: fs irqs="); putdec(irq_counts[FS_VECTOR]);
	puts(" requests="); putdec(requests); putc('\n');
	virtio_reset(&d);	/* the device lets go of the rings */
	return 0;
}

void fs_mode(void)
{
	intr_init();
	run();
	intr_stop();
}
