/*
 * The 64-bit user-mode (CPL3) variant of boot.S: the heavy dirtier.
 *
 * No mode switches: the VMM enters it at its first byte in 64-bit mode at
 * CPL3, with identity-mapped page tables, a TSS whose I/O bitmap opens COM1, and
 * the range at RANGE (0x1f0) patched in, as for boot.S.  Then:
 *   writes BOOT_CHAR 'A' to COM1 once;
 *   forever: increments the first byte of every 4 KiB page in [start, end),
 *            lowest page first, then writes PROGRESS_CHAR 'B' to COM1.
 * Position-independent; on a software KVM backend (kvm_pvm) it runs natively.
 * Build: clients/kvm/guests/build.py (GNU as --64, objcopy -O binary).
 */
	.set COM1, 0x3f8
	.set RANGE, 0x1f0

	.text
	.code64
start:
	movw $COM1, %dx
	movb $'A', %al
	outb %al, %dx
pass:
	movl range_start(%rip), %esi	/* zero-extended to %rsi */
	movl range_end(%rip), %edi
1:	cmpq %rdi, %rsi
	jae 2f
	incb (%rsi)
	addq $4096, %rsi
	jmp 1b
2:	movb $'B', %al
	outb %al, %dx			/* %dx stays COM1 */
	jmp pass

	.org RANGE
range_start:
	.long 0x00100000
range_end:
	.long 0x08000000
	.org 512
