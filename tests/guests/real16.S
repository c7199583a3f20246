/* A real-mode test guest for hv, loaded at 0x1000 and entered with cs=0,
 * ip=0x1000 (the state KVM gives a new vCPU, with CS moved). Built by
 * build.sh; the committed real16.bin is its output.
 *   port 0x10 <- 'h', 'i'; then hlt.
 */
        .code16
        .globl _start
_start:
        mov $'h', %al
        out %al, $0x10
        mov $'i', %al
        out %al, $0x10
1:      hlt
        jmp 1b
