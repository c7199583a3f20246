/* A 32-bit protected-mode test guest for hv (flat segments set by the test,
 * loaded and entered at 0x1000). Built by build.sh; the committed pm32.bin is
 * its output.
 *   port 0x10 <- 'A'                         (1-byte out)
 *   al <- port 0x11, port 0x12 <- al         (in, echoed back)
 *   port 0x14 <- 0x12345678                  (4-byte out)
 *   [0xd0000000] <- 0xcafef00d               (MMIO write)
 *   eax <- [0xd0000008], port 0x14 <- eax    (MMIO read, echoed)
 *   loop: eax <- port 0x15; stop if 0; [eax] <- 0xdeadbeef
 *   hlt forever
 */
        .code32
        .globl _start
_start:
        mov $0x41, %al
        out %al, $0x10
        in $0x11, %al
        out %al, $0x12
        mov $0x12345678, %eax
        out %eax, $0x14
        movl $0xcafef00d, 0xd0000000
        mov 0xd0000008, %eax
        out %eax, $0x14
1:      in $0x15, %eax
        test %eax, %eax
        jz 2f
        movl $0xdeadbeef, (%eax)
        jmp 1b
2:      hlt
        jmp 2b
