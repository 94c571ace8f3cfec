/* A minimal virtio 1.x driver core for the probe's device modes: find a virtio-pci function and
 * its structures through the capability list, negotiate features, MSI-X, and split virtqueues
 * (set up, add a chain, kick, wait for it to be used). Device modes (blk.c, fs.c, vsock.c)
 * build on these and only add their request formats. */
#include "probe.h"

/* Common configuration structure (virtio 1.x, 4.1.4.3). */
#define C_DFSELECT 0x00
#define C_DF 0x04
#define C_GFSELECT 0x08
#define C_GF 0x0c
#define C_MSIX_CONFIG 0x10
#define C_NUM_QUEUES 0x12
#define C_STATUS 0x14
#define C_CFG_GENERATION 0x15
#define C_Q_SELECT 0x16
#define C_Q_SIZE 0x18
#define C_Q_MSIX 0x1a
#define C_Q_ENABLE 0x1c
#define C_Q_NOTIFY_OFF 0x1e
#define C_Q_DESC 0x20
#define C_Q_DRIVER 0x28
#define C_Q_DEVICE 0x30

#define S_ACKNOWLEDGE 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 0x40
#define S_FAILED 0x80

#define CAP_VENDOR 0x09
#define CAP_MSIX 0x11
#define CFG_COMMON 1
#define CFG_NOTIFY 2
#define CFG_ISR 3
#define CFG_DEVICE 4

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2

static u64 bar_addr(u8 slot, u8 bar)
{
	if (bar > 5)
		return 0;
	u32 lo = pci_read32(slot, 0x10 + 4 * bar);
	if (lo & 1)
		return 0;	/* I/O BAR: the modern transport uses memory BARs */
	u64 a = lo & ~0xfu;
	if (((lo >> 1) & 3) == 2 && bar < 5)
		a |= (u64)pci_read32(slot, 0x14 + 4 * bar) << 32;
	return a;
}

int virtio_find(u16 pci_device_id, int nth, struct virtio_dev *d)
{
	memset(d, 0, sizeof(*d));
	for (u8 slot = 0; slot < PCI_SLOTS; slot++) {
		u32 id = pci_read32(slot, 0x00);
		if ((id & 0xffff) != 0x1af4 || (id >> 16) != pci_device_id || nth-- > 0)
			continue;
		d->slot = slot;
		d->device_id = pci_device_id;
		for (u8 p = pci_find_cap(slot, CAP_VENDOR, 0); p; p = pci_find_cap(slot, CAP_VENDOR, p)) {
			u8 type = pci_read8(slot, p + 3);
			u64 a = bar_addr(slot, pci_read8(slot, p + 4));
			if (!a)
				continue;
			a += pci_read32(slot, p + 8);
			/* The first capability of each type is the preferred one. */
			if (type == CFG_COMMON && !d->common) d->common = a;
			if (type == CFG_ISR && !d->isr) d->isr = a;
			if (type == CFG_DEVICE && !d->devcfg) d->devcfg = a;
			if (type == CFG_NOTIFY && !d->notify) {
				d->notify = a;
				d->notify_mult = pci_read32(slot, p + 16);
			}
		}
		d->msix_cap = pci_find_cap(slot, CAP_MSIX, 0);
		if (d->msix_cap) {
			d->msix_size = (pci_read16(slot, d->msix_cap + 2) & 0x7ff) + 1;
			u32 t = pci_read32(slot, d->msix_cap + 4);
			u64 a = bar_addr(slot, t & 7);
			d->msix_table = a ? a + (t & ~7u) : 0;
		}
		if (!d->common || !d->notify || !d->isr)
			return -1;
		/* Memory space + bus master. */
		pci_write16(slot, 0x04, pci_read16(slot, 0x04) | 0x6);
		return 0;
	}
	return -1;
}

u8 virtio_status(struct virtio_dev *d) { return mmio_r8(d->common + C_STATUS); }
static void set_status(struct virtio_dev *d, u8 s) { mmio_w8(d->common + C_STATUS, s); }
void virtio_reset(struct virtio_dev *d) { set_status(d, 0); }
u16 virtio_num_queues(struct virtio_dev *d) { return mmio_r16(d->common + C_NUM_QUEUES); }
u8 virtio_config_generation(struct virtio_dev *d) { return mmio_r8(d->common + C_CFG_GENERATION); }

int virtio_negotiate(struct virtio_dev *d, u64 want)
{
	set_status(d, 0);
	/* The reset is complete when status reads back 0 (bounded: a device that never gets
	 * there is reported as failed). */
	for (int i = 0; virtio_status(d) != 0; i++)
		if (i == 1000)
			return -1;
	set_status(d, S_ACKNOWLEDGE);
	set_status(d, S_ACKNOWLEDGE | S_DRIVER);
	mmio_w32(d->common + C_DFSELECT, 0);
	u64 lo = mmio_r32(d->common + C_DF);
	mmio_w32(d->common + C_DFSELECT, 1);
	u64 hi = mmio_r32(d->common + C_DF);
	d->features = hi << 32 | lo;
	d->acked = d->features & want;
	if (!(d->acked & VIRTIO_F_VERSION_1)) {
		set_status(d, S_ACKNOWLEDGE | S_DRIVER | S_FAILED);
		return -1;
	}
	mmio_w32(d->common + C_GFSELECT, 0);
	mmio_w32(d->common + C_GF, (u32)d->acked);
	mmio_w32(d->common + C_GFSELECT, 1);
	mmio_w32(d->common + C_GF, (u32)(d->acked >> 32));
	set_status(d, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
	if (!(virtio_status(d) & S_FEATURES_OK)) {
		set_status(d, S_ACKNOWLEDGE | S_DRIVER | S_FAILED);
		return -1;
	}
	return 0;
}

void virtio_msix_enable(struct virtio_dev *d)
{
	if (!d->msix_cap)
		return;
	u16 ctrl = pci_read16(d->slot, d->msix_cap + 2);
	ctrl &= ~(1 << 14);	/* function mask off */
	ctrl |= 1 << 15;	/* MSI-X enable */
	pci_write16(d->slot, d->msix_cap + 2, ctrl);
}

int virtio_msix_entry(struct virtio_dev *d, u16 entry, u8 vector)
{
	if (!d->msix_table || entry >= d->msix_size)
		return -1;
	u64 e = d->msix_table + 16UL * entry;
	mmio_w32(e + 0, 0xfee00000u | lapic_id() << 12);	/* fixed delivery to this CPU */
	mmio_w32(e + 4, 0);
	mmio_w32(e + 8, vector);				/* edge, fixed, vector */
	mmio_w32(e + 12, 0);					/* unmasked */
	return mmio_r32(e + 12) == 0 && mmio_r32(e + 8) == vector ? 0 : -1;
}

int virtq_setup(struct virtio_dev *d, struct virtq *q, u16 index, u16 size, int slot, u16 entry, u8 vector)
{
	if (slot < 0 || VQ_RING_AREA + VQ_RING_SLOT * (u64)(slot + 1) > DMA_AREA)
		return -1;
	mmio_w16(d->common + C_Q_SELECT, index);
	u16 max = mmio_r16(d->common + C_Q_SIZE);
	if (max == 0 || mmio_r16(d->common + C_Q_ENABLE))
		return -1;	/* no such queue, or already live */
	if (size > max) size = max;
	if (size > VQ_MAX_SIZE) size = VQ_MAX_SIZE;
	while (size & (size - 1))
		size &= size - 1;	/* a power of two */
	u64 base = VQ_RING_AREA + VQ_RING_SLOT * (u64)slot;
	memset((void *)base, 0, VQ_RING_SLOT);
	memset(q, 0, sizeof(*q));
	q->index = index;
	q->size = size;
	q->desc = (volatile struct vq_desc *)base;
	q->avail = (volatile struct vq_avail *)(base + 0x400);
	q->used = (volatile struct vq_used *)(base + 0x800);
	for (u16 i = 0; i < size; i++)
		q->desc[i].next = i + 1;	/* the free list */
	q->free_head = 0;
	q->num_free = size;
	q->msix_entry = entry;
	q->vector = vector;

	mmio_w16(d->common + C_Q_SIZE, size);
	mmio_w32(d->common + C_Q_DESC, (u32)(u64)q->desc);
	mmio_w32(d->common + C_Q_DESC + 4, (u32)((u64)q->desc >> 32));
	mmio_w32(d->common + C_Q_DRIVER, (u32)(u64)q->avail);
	mmio_w32(d->common + C_Q_DRIVER + 4, (u32)((u64)q->avail >> 32));
	mmio_w32(d->common + C_Q_DEVICE, (u32)(u64)q->used);
	mmio_w32(d->common + C_Q_DEVICE + 4, (u32)((u64)q->used >> 32));
	mmio_w16(d->common + C_Q_MSIX, entry);
	if (mmio_r16(d->common + C_Q_MSIX) != entry)
		return -1;	/* the device could not assign the vector */
	q->notify = d->notify + (u64)mmio_r16(d->common + C_Q_NOTIFY_OFF) * d->notify_mult;
	mmio_w16(d->common + C_Q_ENABLE, 1);
	return 0;
}

int virtio_driver_ok(struct virtio_dev *d, u16 config_entry)
{
	mmio_w16(d->common + C_MSIX_CONFIG, config_entry);
	if (mmio_r16(d->common + C_MSIX_CONFIG) != config_entry)
		return -1;
	set_status(d, virtio_status(d) | S_DRIVER_OK);
	u8 s = virtio_status(d);
	return (s & S_DRIVER_OK) && !(s & (S_NEEDS_RESET | S_FAILED)) ? 0 : -1;
}

int virtq_add(struct virtq *q, const struct vq_buf *bufs, int n)
{
	if (n <= 0 || n > q->num_free)
		return -1;
	u16 head = q->free_head, i = head, last = head;
	for (int k = 0; k < n; k++) {
		last = i;
		q->desc[i].addr = bufs[k].addr;
		q->desc[i].len = bufs[k].len;
		q->desc[i].flags = (bufs[k].device_writes ? DESC_F_WRITE : 0) | (k + 1 < n ? DESC_F_NEXT : 0);
		i = q->desc[i].next;
	}
	q->free_head = q->desc[last].next;
	q->num_free -= n;
	q->avail->ring[q->avail_idx % q->size] = head;
	barrier();	/* descriptors and ring entry before the index (x86 keeps store order) */
	q->avail_idx++;
	q->avail->idx = q->avail_idx;
	barrier();
	return head;
}

void virtq_kick(struct virtq *q)
{
	q->irqs_at_kick = irq_counts[q->vector];
	mmio_w16(q->notify, q->index);
}

int virtq_poll(struct virtq *q, u32 *len)
{
	if (q->used->idx == q->last_used)
		return -1;
	barrier();
	volatile struct vq_used_elem *e = &q->used->ring[q->last_used % q->size];
	u32 id = e->id;
	if (len)
		*len = e->len;
	q->last_used++;
	if (id >= q->size)
		return -1;	/* a broken device; the caller sees no completion */
	/* Back onto the free list: the whole chain. */
	u16 i = (u16)id, n = 1;
	while ((q->desc[i].flags & DESC_F_NEXT) && n < q->size) {
		i = q->desc[i].next;
		n++;
	}
	q->desc[i].next = q->free_head;
	q->free_head = (u16)id;
	q->num_free += n;
	return (int)id;
}

int virtq_wait(struct virtq *q, u32 *len, u32 ticks)
{
	u32 start = irq_counts[VEC_TIMER];
	int id;
	for (;;) {
		__asm__ volatile("cli" : : : "memory");
		id = virtq_poll(q, len);
		if (id >= 0)
			break;
		if (irq_counts[VEC_TIMER] - start >= ticks)
			return -1;
		__asm__ volatile("sti; hlt" : : : "memory");	/* woken by its MSI or the tick */
	}
	/* The used ring can be seen before the MSI that announces it is taken (interrupts are
	 * off while polling). Take it now: an MSI still pending when the next request's arrives
	 * would merge with it, as edge interrupts of one vector do. */
	if (q->vector && q->msix_entry != VIRTIO_NO_VECTOR)
		wait_count(&irq_counts[q->vector], q->irqs_at_kick + 1, VQ_IRQ_GRACE_TICKS);
	return id;
}
