/* A tiny PVH "kernel" for hv: an x86-64 ELF with the XEN_ELFNOTE_PHYS32_ENTRY
 * note, entered in 32-bit protected mode with %ebx = hvm_start_info.
 * Built by build.sh (pvh.elf). It prints to the UART at 0x3f8:
 *   "pvh: magic ok\n" if start_info->magic is 0x336ec578 (else "pvh: bad magic\n"),
 *   "cmdline: <the command line>\n",
 *   "memmap: N\n" with N = start_info->memmap_entries (one digit),
 *   "modules: N\n" with N = start_info->nr_modules,
 * then writes 0 to port 0xf4 (hv's power-off port) and halts.
 * Built with --defsym IDLE=1 (pvh-idle.elf) it prints "idle\n" instead of
 * powering off and halts forever (interrupts stay disabled).
 */
        .code32
        .section .text
        .globl _start
_start:
        mov $0x80000, %esp         /* PVH gives no stack */
        mov %ebx, %ebp
        cmpl $0x336ec578, (%ebp)
        jne 1f
        mov $msg_ok, %esi
        call puts
        jmp 2f
1:      mov $msg_bad, %esi
        call puts
2:      mov $msg_cmd, %esi
        call puts
        mov 24(%ebp), %esi          /* cmdline_paddr (low half) */
        call puts
        mov $msg_nl, %esi
        call puts
        mov $msg_mm, %esi
        call puts
        mov 48(%ebp), %eax          /* memmap_entries */
        call putdigit
        mov $msg_mod, %esi
        call puts
        mov 12(%ebp), %eax          /* nr_modules */
        call putdigit
.ifdef IDLE
        mov $msg_idle, %esi         /* pvh-idle.elf: say so and wait forever */
        call puts
        jmp 3f
.endif
        mov $0xf4, %dx
        xor %al, %al
        out %al, (%dx)
3:      hlt
        jmp 3b

/* print the NUL-terminated string at %esi */
puts:   mov $0x3f8, %dx
4:      lodsb
        test %al, %al
        jz 5f
        out %al, (%dx)
        jmp 4b
5:      ret

/* print the digit %eax and a newline */
putdigit:
        mov $0x3f8, %dx
        add $'0', %al
        out %al, (%dx)
        mov $'\n', %al
        out %al, (%dx)
        ret

        .section .rodata
msg_ok:  .asciz "pvh: magic ok\n"
msg_bad: .asciz "pvh: bad magic\n"
msg_cmd: .asciz "cmdline: "
msg_nl:  .asciz "\n"
msg_mm:  .asciz "memmap: "
msg_mod: .asciz "modules: "
msg_idle: .asciz "idle\n"

        .section .note.Xen, "a", @note
        .align 4
        .long 4, 4, 18              /* namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz "Xen"
        .align 4
        .long _start
