/*
 * The Firecracker test guest: prints a marker on the serial port, then echoes every
 * byte it receives. Firecracker loads it like a Linux ELF vmlinux and jumps to _start
 * in 64-bit long mode (identity-mapped low memory, interrupts off), so no set-up is
 * needed: plain port I/O on COM1.
 *
 * Linked at physical 0x100000 (1 MiB, where Firecracker loads kernels); see conftest.py.
 */
    .set    COM1_DATA, 0x3f8
    .set    COM1_LSR,  0x3fd        /* line status register; bit 0: a byte is waiting */

    .code64
    .text
    .globl  _start
_start:
    lea     marker(%rip), %rsi
    mov     $COM1_DATA, %dx
print:
    lodsb
    test    %al, %al
    jz      echo
    out     %al, %dx
    jmp     print
echo:
    mov     $COM1_LSR, %dx
wait_byte:
    in      %dx, %al
    test    $1, %al
    jz      wait_byte
    mov     $COM1_DATA, %dx
    in      %dx, %al
    out     %al, %dx
    jmp     echo

marker:
    .asciz  "PYRO-TINY-READY\n"
