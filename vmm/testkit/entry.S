/* Entry code of the probe guest. Two ways in, one C body:
 *  - PVH: 32-bit protected mode, paging off, %ebx = hvm_start_info. We enable long mode with
 *    our own identity map of the first 4 GiB (so the LAPIC at 0xfee00000 is reachable).
 *  - Linux 64-bit boot protocol (bzImage): long mode at load + 0x200, %rsi = boot_params.
 * Both call probe_main(info, kind). Also holds the real-mode AP trampoline that counts CPUs. */
	.section .note.Xen, "a"
	.balign 4
	.long 4, 8, 18
	.asciz "Xen"
	.balign 4
	.quad pvh_entry

	.section .text.head, "ax"
	.code32
	.globl pvh_entry
pvh_entry:
	mov %ebx, %edi
	lgdt gdt_desc
	mov %cr4, %eax
	or $0x20, %eax			/* PAE */
	mov %eax, %cr4
	mov $pml4, %eax
	mov %eax, %cr3
	mov $0xc0000080, %ecx		/* EFER.LME */
	rdmsr
	or $0x100, %eax
	wrmsr
	mov %cr0, %eax
	or $0x80000001, %eax		/* PG | PE */
	mov %eax, %cr0
	ljmp $0x08, $pvh_long

	.section .text.entry64, "ax"
	.code64
	.globl linux64_entry
linux64_entry:
	mov %rsi, %rdi
	mov $1, %esi
	jmp common64
pvh_long:
	xor %esi, %esi
common64:
	lgdt gdt_desc
	mov $pml4, %rax
	mov %rax, %cr3
	mov $0x10, %ax
	mov %ax, %ds
	mov %ax, %es
	mov %ax, %ss
	mov $stack_top, %rsp
	pushq $0x08			/* reload CS from our GDT: the boot protocol's CS selector */
	lea 2f(%rip), %rax		/* may name a data descriptor here, and iretq reloads CS */
	pushq %rax
	lretq
2:	call probe_main
1:	hlt
	jmp 1b

/* Crash on purpose: an IDT of limit 0 makes ud2 a triple fault. */
	.globl triple_fault
triple_fault:
	lidt null_idt
	ud2

/* Exception stubs: where the CPU pushes no error code, push 0, then the vector; exc_common
 * hands (vector, error, rip) to probe_exception (idt.c), which reports and crashes. */
	.macro exc_stub v
exc_\v:
	.if (\v == 8) || (\v >= 10 && \v <= 14) || (\v == 17) || (\v == 21) || (\v == 29) || (\v == 30)
	.else
	pushq $0
	.endif
	pushq $\v
	jmp exc_common
	.endm
	.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	exc_stub \v
	.endr
exc_common:
	mov (%rsp), %rdi
	mov 8(%rsp), %rsi
	mov 16(%rsp), %rdx
	and $-16, %rsp
	call probe_exception
1:	hlt
	jmp 1b

/* Counting interrupt stubs for vectors 0x20..0x4f, 32 bytes apart from irq_stub_base: each
 * increments irq_counts[vector] and signals EOI to the local APIC. */
	.balign 32
	.globl irq_stub_base
irq_stub_base:
	.set vec, 0x20
	.rept 0x30
	.balign 32
	lock incl irq_counts + 4 * vec(%rip)
	push %rax
	mov $0xfee000b0, %eax
	movl $0, (%rax)
	pop %rax
	iretq
	.set vec, vec + 1
	.endr

/* The spurious vector: no EOI, as the APIC sets no in-service bit for it. */
	.globl irq_spurious
irq_spurious:
	iretq

/* Real-mode trampoline for application processors, copied to 0x8000 by the BSP. */
	.code16
	.globl ap_tramp_start, ap_tramp_end
ap_tramp_start:
	cli
	xor %ax, %ax
	mov %ax, %ds
	lock incw 0x8100
1:	hlt
	jmp 1b
ap_tramp_end:
	.code64

	.section .rodata
	.balign 8
gdt:	.quad 0
	.quad 0x00af9a000000ffff	/* 0x08: 64-bit code */
	.quad 0x00cf92000000ffff	/* 0x10: data */
gdt_desc:
	.word gdt_desc - gdt - 1
	.quad gdt
null_idt:
	.word 0
	.quad 0
	.balign 8
	.globl exc_stubs
exc_stubs:
	.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.quad exc_\v
	.endr

	.section .data
	.balign 4096
pml4:	.quad pdpt + 3
	.fill 511, 8, 0
pdpt:	.quad pd + 0x0003, pd + 0x1003, pd + 0x2003, pd + 0x3003
	.fill 508, 8, 0
pd:
	.set i, 0
	.rept 2048
	.quad (i << 21) | 0x83
	.set i, i + 1
	.endr
	.balign 16
	.fill 4096, 1, 0
stack_top:

	.section .note.GNU-stack, "", @progbits
