/*
 * The project's boot sector (512 bytes, loaded at 0x7c00 by the "BIOS").
 *
 * Real mode -> 32-bit protected mode (flat 4 GiB segments), then:
 *   writes BOOT_CHAR 'A' to COM1 once;
 *   forever: increments the first byte of every 4 KiB page in [start, end),
 *            lowest page first, then writes PROGRESS_CHAR 'B' to COM1.
 * start and end are u32 guest-physical addresses at RANGE (0x1f0) in this
 * sector, so the VMM patches them before loading it.  COM1 output waits for
 * LSR "transmitter empty" as a real driver does.
 * Build: clients/kvm/guests/build.py (GNU as --32, objcopy -O binary).
 */
	.set LOAD, 0x7c00
	.set COM1, 0x3f8
	.set RANGE, 0x1f0

	.text
	.code16
start:
	cli
	cld
	xorw %ax, %ax
	movw %ax, %ds
	movw %ax, %ss
	movw $LOAD, %sp
	inb $0x92, %al			/* fast A20 gate on (bit 1), never reset (bit 0) */
	orb $0x02, %al
	andb $0xfe, %al
	outb %al, $0x92
	lgdtl LOAD + (gdt_desc - start)
	movl %cr0, %eax
	orl $1, %eax			/* CR0.PE */
	movl %eax, %cr0
	ljmpl $0x08, $(LOAD + (protected - start))

	.code32
protected:
	movw $0x10, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %fs
	movw %ax, %gs
	movw %ax, %ss
	movl $LOAD, %esp
	movb $'A', %al
	call putc
pass:
	movl LOAD + RANGE, %esi		/* start */
	movl LOAD + RANGE + 4, %edi	/* end */
1:	cmpl %edi, %esi
	jae 2f
	incb (%esi)
	addl $4096, %esi
	jmp 1b
2:	movb $'B', %al
	call putc
	jmp pass

putc:					/* %al: the character */
	movb %al, %ah
	movw $COM1 + 5, %dx		/* LSR */
3:	inb %dx, %al
	testb $0x20, %al		/* transmitter holding register empty */
	jz 3b
	movw $COM1, %dx
	movb %ah, %al
	outb %al, %dx
	ret

	.p2align 3
gdt:
	.quad 0
	.quad 0x00cf9a000000ffff	/* 0x08: code, 32-bit, flat */
	.quad 0x00cf92000000ffff	/* 0x10: data, flat */
gdt_desc:
	.word gdt_desc - gdt - 1
	.long LOAD + (gdt - start)

	.org RANGE
range_start:
	.long 0x00100000
range_end:
	.long 0x08000000
	.org 510
	.word 0xaa55
