#!/bin/sh
# Rebuilds the tiny test guests with binutils (as, ld):
#   pm32.bin, real16.bin  flat binaries linked at 0x1000
#   long64.bin            64-bit code for a test bzImage: loaded at 1 MiB, entry +0x200
#   pvh.elf               an x86-64 ELF with a PVH entry note, loaded at 1 MiB
#   pvh-idle.elf          the same, waiting forever instead of powering off
set -e
cd "$(dirname "$0")"
for g in pm32 real16; do
    as --32 -o "$g.o" "$g.S"
    ld -m elf_i386 -Ttext=0x1000 -e _start --oformat binary -o "$g.bin" "$g.o"
    rm -f "$g.o"
done
as --64 -o long64.o long64.S
ld -m elf_x86_64 -Ttext=0x100000 -e _start --oformat binary -o long64.bin long64.o
rm -f long64.o
as --64 -o pvh.o pvh.S
ld -m elf_x86_64 -Ttext=0x100000 -e _start -z noexecstack -z max-page-size=4096 -o pvh.elf pvh.o
rm -f pvh.o
as --64 --defsym IDLE=1 -o pvh-idle.o pvh.S
ld -m elf_x86_64 -Ttext=0x100000 -e _start -z noexecstack -z max-page-size=4096 -o pvh-idle.elf pvh-idle.o
rm -f pvh-idle.o
