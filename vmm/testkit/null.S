/* null: the smallest guest. PVH entry (32-bit protected mode, flat segments): write a marker
 * to COM1, then pulse the i8042 reset line. Used for the fastest boot tests and `shoji bench`. */
	.section .note.Xen, "a"
	.balign 4
	.long 4, 8, 18		/* namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.balign 4
	.quad pvh_entry

	.section .text.head, "ax"
	.code32
	.globl pvh_entry
pvh_entry:
	mov $0x3f8, %dx
	mov $msg, %esi
1:	lodsb
	test %al, %al
	jz 2f
	out %al, %dx
	jmp 1b
2:	mov $0xfe, %al
	out %al, $0x64
3:	hlt
	jmp 3b

	.section .rodata
msg:	.asciz "SHOJI-NULL-OK\n"

	.section .note.GNU-stack, "", @progbits
