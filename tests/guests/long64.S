/* The protected-mode part of a tiny 64-bit "bzImage" for hv: loaded at 1 MiB,
 * entered at +0x200 in long mode (identity-mapped) with %rsi = boot_params,
 * as the Linux 64-bit boot protocol says. tests/test_boot.py puts a setup
 * header in front of it. Built by build.sh (long64.bin). It prints
 * "long mode: boot_params ok\n" (or "long mode: bad boot_params\n") followed
 * by the command line to the UART at 0x3f8, then writes 0 to port 0xf4.
 */
        .code64
        .globl _start
_start:
        hlt                                 /* startup_32 would live here */
        .org 0x200
startup_64:
        lea msg_ok(%rip), %rbx
        cmpl $0x53726448, 0x202(%rsi)       /* "HdrS" in the setup header */
        je 1f
        lea msg_bad(%rip), %rbx
1:      call puts
        mov 0x228(%rsi), %ebx               /* cmd_line_ptr */
        call puts
        mov $'\n', %al
        out %al, (%dx)
        mov $0xf4, %dx
        xor %eax, %eax
        out %al, (%dx)
2:      hlt
        jmp 2b

/* print the NUL-terminated string at %rbx */
puts:   mov $0x3f8, %dx
3:      mov (%rbx), %al
        test %al, %al
        jz 4f
        out %al, (%dx)
        inc %rbx
        jmp 3b
4:      ret

msg_ok:  .asciz "long mode: boot_params ok\n"
msg_bad: .asciz "long mode: bad boot_params\n"
