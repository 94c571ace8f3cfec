/* Interrupts for the device modes: a 64-bit IDT (exceptions report and crash, vectors 0x20 and
 * 0x40..0x4f count and EOI, 0xff is the spurious vector), the local APIC software-enabled and
 * its timer as a periodic watchdog tick, so that halting for a device never waits forever. */
#include "probe.h"

#define LAPIC 0xfee00000UL
#define LAPIC_ID 0x20
#define LAPIC_EOI 0xb0
#define LAPIC_SVR 0xf0
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_DIV 0x3e0
#define LVT_MASKED (1u << 16)
#define LVT_PERIODIC (1u << 17)
#define VEC_SPURIOUS 0xff

/* entry.S: 32 exception stubs (addresses), counting stubs for vectors 0x20..0x4f at a fixed
 * stride from irq_stub_base, and the spurious stub. */
extern const u64 exc_stubs[32];
extern char irq_stub_base[], irq_spurious[];
#define IRQ_STUB_FIRST 0x20
#define IRQ_STUB_LAST 0x4f
#define IRQ_STUB_STRIDE 32

volatile u32 irq_counts[256];

struct idt_gate {
	u16 off_lo, sel;
	u8 ist, attr;
	u16 off_mid;
	u32 off_hi, zero;
} __attribute__((packed));

static struct idt_gate idt[256] __attribute__((aligned(16)));

static void set_gate(int v, u64 handler)
{
	idt[v].off_lo = (u16)handler;
	idt[v].sel = 0x08;		/* entry.S's 64-bit code segment */
	idt[v].ist = 0;
	idt[v].attr = 0x8e;		/* present, DPL 0, 64-bit interrupt gate (IF cleared) */
	idt[v].off_mid = (u16)(handler >> 16);
	idt[v].off_hi = (u32)(handler >> 32);
	idt[v].zero = 0;
}

static u32 lapic_r(u32 reg) { return mmio_r32(LAPIC + reg); }
static void lapic_w(u32 reg, u32 v) { mmio_w32(LAPIC + reg, v); }

u32 lapic_id(void) { return lapic_r(LAPIC_ID) >> 24; }

/* Called by entry.S for any exception: report it, then crash so the host sees a clear error. */
void probe_exception(u64 vector, u64 error, u64 rip)
{
	puts("probe: exception "); putdec(vector);
	puts(" error="); puthex(error);
	puts(" rip="); puthex(rip); putc('\n');
	triple_fault();
}

void intr_init(void)
{
	__asm__ volatile("cli");
	memset(idt, 0, sizeof(idt));
	for (int v = 0; v < 32; v++)
		set_gate(v, exc_stubs[v]);
	for (int v = IRQ_STUB_FIRST; v <= IRQ_STUB_LAST; v++)
		set_gate(v, (u64)irq_stub_base + (u64)(v - IRQ_STUB_FIRST) * IRQ_STUB_STRIDE);
	set_gate(VEC_SPURIOUS, (u64)irq_spurious);
	for (int v = 0; v < 256; v++)
		irq_counts[v] = 0;
	struct { u16 limit; u64 base; } __attribute__((packed)) idtr = { sizeof(idt) - 1, (u64)idt };
	__asm__ volatile("lidt %0" : : "m"(idtr));

	/* The legacy PIC stays masked (its vectors would alias exceptions), and so does LINT0. */
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
	lapic_w(LAPIC_LVT_LINT0, LVT_MASKED);
	lapic_w(LAPIC_SVR, 0x100 | VEC_SPURIOUS);	/* bit 8: APIC software enable */
	/* KVM's APIC timer counts at 1 GHz: divide by 16 -> 62.5 MHz, TICK_MS per period. */
	lapic_w(LAPIC_TIMER_DIV, 0x3);
	lapic_w(LAPIC_LVT_TIMER, LVT_PERIODIC | VEC_TIMER);
	lapic_w(LAPIC_TIMER_INIT, 62500 * TICK_MS);
}

void intr_stop(void)
{
	__asm__ volatile("cli");
	lapic_w(LAPIC_LVT_TIMER, LVT_MASKED);
	lapic_w(LAPIC_TIMER_INIT, 0);
}

int wait_count(volatile u32 *counter, u32 want, u32 ticks)
{
	u32 start = irq_counts[VEC_TIMER];
	for (;;) {
		__asm__ volatile("cli" : : : "memory");
		if (*counter >= want)
			return 1;
		if (irq_counts[VEC_TIMER] - start >= ticks)
			return 0;
		/* sti's one-instruction shadow covers hlt: an interrupt that is already pending
		 * wakes the hlt instead of being taken before it and lost. */
		__asm__ volatile("sti; hlt" : : : "memory");
	}
}
