#!/bin/sh
# Rebuilds the tiny test guests with binutils: flat binaries linked at 0x1000.
set -e
cd "$(dirname "$0")"
for g in pm32 real16; do
    as --32 -o "$g.o" "$g.S"
    ld -m elf_i386 -Ttext=0x1000 -e _start --oformat binary -o "$g.bin" "$g.o"
    rm -f "$g.o"
done
