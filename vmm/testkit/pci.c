/* PCI bus 0 through configuration mechanism 1, and the probe's `pci` mode: enumerate every slot
 * (function 0), size the BARs, and list virtio-pci and MSI-X capabilities. */
#include "probe.h"

#define CFG_ADDR 0xcf8
#define CFG_DATA 0xcfc

static void cfg_select(u8 slot, u8 reg) { outl(CFG_ADDR, 0x80000000u | (u32)(slot & 31) << 11 | (reg & 0xfc)); }

u8 pci_read8(u8 slot, u8 reg) { cfg_select(slot, reg); return inb(CFG_DATA + (reg & 3)); }
u16 pci_read16(u8 slot, u8 reg) { cfg_select(slot, reg); return inw(CFG_DATA + (reg & 2)); }
u32 pci_read32(u8 slot, u8 reg) { cfg_select(slot, reg); return inl(CFG_DATA); }
void pci_write16(u8 slot, u8 reg, u16 v) { cfg_select(slot, reg); outw(CFG_DATA + (reg & 2), v); }
void pci_write32(u8 slot, u8 reg, u32 v) { cfg_select(slot, reg); outl(CFG_DATA, v); }

u8 pci_find_cap(u8 slot, u8 id, u8 from)
{
	if (!(pci_read16(slot, 0x06) & (1 << 4)))
		return 0;
	u8 p = from ? pci_read8(slot, from + 1) : pci_read8(slot, 0x34);
	/* A looping or corrupt list must not hang the probe: at most 48 capabilities fit. */
	for (int guard = 0; p >= 0x40 && guard < 48; guard++) {
		p &= 0xfc;
		if (pci_read8(slot, p) == id)
			return p;
		p = pci_read8(slot, p + 1);
	}
	return 0;
}

static void line(u8 slot)
{
	puts("probe: pci ");
	puthexw(slot, 2);
	putc(' ');
}

/* Memory BARs by the sizing protocol, with decoding off meanwhile as a real OS does it. */
static void print_bars(u8 slot)
{
	u16 cmd = pci_read16(slot, 0x04);
	pci_write16(slot, 0x04, cmd & ~3);
	for (int i = 0; i < 6; i++) {
		u8 reg = 0x10 + 4 * i;
		u32 orig = pci_read32(slot, reg);
		pci_write32(slot, reg, 0xffffffff);
		u32 mask = pci_read32(slot, reg);
		pci_write32(slot, reg, orig);
		if (mask == 0 || mask == 0xffffffff)
			continue;
		line(slot);
		if (mask & 1) {
			puts("bar"); putdec(i); puts(" io="); puthex(orig & ~3u);
			puts(" size="); puthex((~(mask & ~3u) + 1) & 0xffff); putc('\n');
			continue;
		}
		u64 addr = orig & ~0xfu, size = ~(u64)(mask & ~0xfu) + 1;
		if (((mask >> 1) & 3) == 2 && i < 5) {	/* 64-bit: the next BAR holds the top half */
			i++;
			reg += 4;
			u32 hi = pci_read32(slot, reg);
			pci_write32(slot, reg, 0xffffffff);
			u32 hmask = pci_read32(slot, reg);
			pci_write32(slot, reg, hi);
			addr |= (u64)hi << 32;
			size = ~((u64)hmask << 32 | (mask & ~0xfu)) + 1;
		} else {
			size &= 0xffffffff;
		}
		puts("bar"); putdec(i); puts(" mem="); puthex(addr);
		puts(" size="); puthex(size); putc('\n');
	}
	pci_write16(slot, 0x04, cmd);
}

static void print_caps(u8 slot)
{
	if (!(pci_read16(slot, 0x06) & (1 << 4)))
		return;
	u8 p = pci_read8(slot, 0x34);
	for (int guard = 0; p >= 0x40 && guard < 48; guard++) {
		p &= 0xfc;
		u8 id = pci_read8(slot, p);
		if (id == 0x11) {
			u16 ctrl = pci_read16(slot, p + 2);
			u32 table = pci_read32(slot, p + 4), pba = pci_read32(slot, p + 8);
			line(slot);
			puts("cap msix size="); putdec((ctrl & 0x7ff) + 1);
			puts(" table="); putdec(table & 7); putc(':'); puthex(table & ~7u);
			puts(" pba="); putdec(pba & 7); putc(':'); puthex(pba & ~7u);
			putc('\n');
		} else if (id == 0x09) {
			u8 cfg_type = pci_read8(slot, p + 3), bar = pci_read8(slot, p + 4);
			line(slot);
			puts("cap virtio type="); putdec(cfg_type);
			puts(" bar="); putdec(bar);
			puts(" off="); puthex(pci_read32(slot, p + 8));
			puts(" len="); puthex(pci_read32(slot, p + 12));
			if (cfg_type == 2) {
				puts(" mult="); putdec(pci_read32(slot, p + 16));
			}
			putc('\n');
		} else {
			line(slot);
			puts("cap id="); puthex(id); putc('\n');
		}
		p = pci_read8(slot, p + 1);
	}
}

void pci_mode(void)
{
	int found = 0;
	for (u8 slot = 0; slot < PCI_SLOTS; slot++) {
		u32 id = pci_read32(slot, 0x00);
		if ((id & 0xffff) == 0xffff || (id & 0xffff) == 0)
			continue;
		found++;
		u32 class = pci_read32(slot, 0x08) >> 8;
		line(slot);
		puthexw(id & 0xffff, 4); putc(':'); puthexw(id >> 16, 4);
		puts(" class="); puthexw(class, 6); putc('\n');
		if ((id & 0xffff) != 0x1af4)
			continue;
		print_bars(slot);
		print_caps(slot);
	}
	puts("probe: pci functions="); putdec(found); putc('\n');
}
