/*
 * eptwatch e2e test guest: a tiny freestanding multiboot (v1) kernel.
 *
 * Build (see tests/e2e/qemu_vm.py:build_guest or the Makefile beside this file):
 *     as --32 -o guest.o guest.S
 *     ld -m elf_i386 -T linker.ld -o guest.elf guest.o
 * Boot:   qemu-system-x86_64 -machine q35,accel=kvm -kernel guest.elf ...
 *
 * What it does:
 *   1. 32-bit multiboot entry: init COM1, read mem_upper / the command line
 *      from the multiboot info, build identity page tables for the low 4 GiB
 *      using 2 MiB pages (U/S=1 so ring 3 may touch everything), enable long
 *      mode.
 *   2. 64-bit ring 0: TSS + IDT (exceptions are reported on serial; the
 *      #UD handler doubles as the ring 3 -> ring 0 return path), parse args.
 *   3. Drop to ring 3 and write one qword (the pass number) to every 4 KiB
 *      page of [touch_start, touch_end).  Ring 3 runs natively; ring 0 may be
 *      emulated (slow) on shadow-paging hosts, so the hot loop is in ring 3.
 *   4. `ud2` at user_done -> #UD -> back to ring 0, print
 *        "EPTWATCH-TOUCHED pass=0x.. start=0x.. end=0x.. tsc=0x..\n"
 *      then wait (sti; hlt) for one-byte commands on COM1 (IRQ4 via the 8259):
 *        't'  touch all pages again (pass+1), prints EPTWATCH-TOUCHED again
 *        'p'  print "EPTWATCH-PONG"
 *        'q'  ACPI S5 power-off (PM1a_CNT = PMBASE+4 <- SLP_EN|SLP_TYP(0))
 *
 * Kernel command line (-append), all optional, decimal:
 *   touch_start_mib=N   first MiB to touch (default 8)
 *   touch_end_mib=N     end of touched range in MiB (default: end of RAM
 *                       from multiboot mem_upper; clamped to it)
 *   autostop=1          power off via ACPI right after the first pass
 *
 * Assembled with plain `as --32` (no C preprocessor). The 64-bit code sits in
 * the same elf32-i386 image (QEMU's multiboot loader refuses ELF64); every
 * absolute address is < 2 GiB so 32-bit relocations are enough.
 */

        .equ MB_MAGIC,      0x1BADB002
        .equ MB_FLAGS,      0x00000003      /* page-align modules, want mem info */
        .equ MB_BOOT_MAGIC, 0x2BADB002
        .equ COM1,          0x3f8
        .equ KCODE,         0x08
        .equ KDATA,         0x10
        .equ UDATA,         0x1b            /* 0x18 | RPL 3 */
        .equ UCODE,         0x23            /* 0x20 | RPL 3 */
        .equ TSSSEL,        0x28
        .equ PAGE,          4096
        .equ DEFAULT_START, 0x800000        /* 8 MiB */

/* ------------------------------------------------------------------------ */
        .section .multiboot, "a"
        .align 4
        .long MB_MAGIC
        .long MB_FLAGS
        .long -(MB_MAGIC + MB_FLAGS)

/* ------------------------------------------------------------------------ */
        .section .text
        .code32
        .globl _start
_start:
        cli
        cld
        movl    $kstack_top, %esp
        movl    %eax, mb_magic
        movl    %ebx, mb_info

        call    serial_init32
        movl    $msg_boot, %esi
        call    puts32

        cmpl    $MB_BOOT_MAGIC, mb_magic
        je      1f
        movl    $msg_badmagic, %esi
        call    puts32
        jmp     halt32
1:
        /* multiboot info: flags bit0 -> mem_upper (KiB above 1 MiB) */
        movl    mb_info, %ebx
        testl   $1, (%ebx)
        jnz     2f
        movl    $msg_nomem, %esi
        call    puts32
        jmp     halt32
2:
        movl    8(%ebx), %eax
        shll    $10, %eax
        addl    $0x100000, %eax
        movl    %eax, ram_top
        movl    $0, ram_top+4
        /* flags bit2 -> cmdline */
        testl   $4, (%ebx)
        jz      3f
        movl    16(%ebx), %eax
        movl    %eax, cmdline
3:
        /* zero PML4, PDPT and 4 page directories (contiguous, 6 pages) */
        movl    $pml4, %edi
        movl    $(6 * PAGE / 4), %ecx
        xorl    %eax, %eax
        rep stosl

        movl    $(pdpt + 7), pml4           /* P|RW|US */

        movl    $pdpt, %edi
        movl    $(pd0 + 7), %eax
        movl    $4, %ecx
4:      movl    %eax, (%edi)
        addl    $PAGE, %eax
        addl    $8, %edi
        loop    4b

        /* 2048 PDEs: identity map 0..4 GiB with 2 MiB pages, P|RW|US|PS */
        movl    $pd0, %edi
        movl    $0x87, %eax
        movl    $2048, %ecx
5:      movl    %eax, (%edi)
        movl    $0, 4(%edi)
        addl    $0x200000, %eax
        addl    $8, %edi
        loop    5b

        /* enter long mode */
        movl    $pml4, %eax
        movl    %eax, %cr3
        movl    %cr4, %eax
        orl     $0x20, %eax                 /* PAE */
        movl    %eax, %cr4
        movl    $0xC0000080, %ecx           /* EFER */
        rdmsr
        orl     $0x100, %eax                /* LME */
        wrmsr
        movl    %cr0, %eax
        orl     $0x80000001, %eax           /* PG | PE */
        movl    %eax, %cr0
        lgdt    gdt_ptr
        ljmp    $KCODE, $long_entry

halt32:
        cli
        hlt
        jmp     halt32

serial_init32:
        movw    $(COM1 + 1), %dx
        movb    $0x00, %al                  /* IER: no interrupts */
        outb    %al, %dx
        movw    $(COM1 + 3), %dx
        movb    $0x80, %al                  /* DLAB */
        outb    %al, %dx
        movw    $(COM1 + 0), %dx
        movb    $0x01, %al                  /* divisor 1 = 115200 */
        outb    %al, %dx
        movw    $(COM1 + 1), %dx
        movb    $0x00, %al
        outb    %al, %dx
        movw    $(COM1 + 3), %dx
        movb    $0x03, %al                  /* 8N1 */
        outb    %al, %dx
        movw    $(COM1 + 2), %dx
        movb    $0xC7, %al                  /* FIFO on, clear */
        outb    %al, %dx
        movw    $(COM1 + 4), %dx
        movb    $0x0B, %al                  /* DTR RTS OUT2 */
        outb    %al, %dx
        ret

/* esi = NUL-terminated string */
puts32:
        lodsb
        testb   %al, %al
        jz      1f
        call    putc32
        jmp     puts32
1:      ret

putc32:
        pushl   %edx
        pushl   %eax
        movw    $(COM1 + 5), %dx
1:      inb     %dx, %al
        testb   $0x20, %al
        jz      1b
        popl    %eax
        movw    $COM1, %dx
        outb    %al, %dx
        popl    %edx
        ret

/* ------------------------------------------------------------------------ */
        .code64
long_entry:
        movw    $KDATA, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        xorw    %ax, %ax
        movw    %ax, %fs
        movw    %ax, %gs
        leaq    kstack_top(%rip), %rsp

        leaq    msg_long(%rip), %rsi
        call    puts

        /* --- TSS: rsp0 = kernel stack top, descriptor at GDT 0x28 --- */
        leaq    kstack_top(%rip), %rax
        movq    %rax, tss+4(%rip)
        movw    $104, tss+102(%rip)         /* I/O bitmap base beyond limit */
        leaq    tss(%rip), %rax
        movq    %rax, %rbx
        andq    $0xFFFFFF, %rbx
        shlq    $16, %rbx
        orq     $103, %rbx                  /* limit */
        movq    $0x89, %rcx                 /* present, 64-bit available TSS */
        shlq    $40, %rcx
        orq     %rcx, %rbx
        movq    %rax, %rcx
        shrq    $24, %rcx
        andq    $0xFF, %rcx
        shlq    $56, %rcx
        orq     %rcx, %rbx
        movq    %rbx, tss_desc(%rip)
        shrq    $32, %rax
        movq    %rax, tss_desc+8(%rip)
        movw    $TSSSEL, %ax
        ltr     %ax

        /* --- IDT --- */
        xorl    %ebx, %ebx
1:      movq    %rbx, %rdi
        leaq    exc_table(%rip), %rax
        movl    (%rax,%rbx,4), %esi
        movl    $0x8E, %edx
        call    set_gate
        incl    %ebx
        cmpl    $32, %ebx
        jb      1b
2:      movq    %rbx, %rdi
        leaq    unexpected_irq(%rip), %rsi
        movl    $0x8E, %edx
        call    set_gate
        incl    %ebx
        cmpl    $256, %ebx
        jb      2b
        movl    $0x24, %edi                 /* IRQ4 (COM1) after PIC remap */
        leaq    serial_irq(%rip), %rsi
        movl    $0x8E, %edx
        call    set_gate
        lidt    idt_ptr(%rip)

        /* --- 8259: remap to 0x20/0x28, mask everything for now --- */
        call    pic_init

        /* --- arguments --- */
        movq    $DEFAULT_START, touch_start(%rip)
        movq    ram_top(%rip), %rax
        movq    %rax, touch_end(%rip)

        leaq    key_start(%rip), %rdi
        call    find_arg
        cmpq    $-1, %rax
        je      3f
        shlq    $20, %rax
        movq    %rax, touch_start(%rip)
3:      leaq    key_end(%rip), %rdi
        call    find_arg
        cmpq    $-1, %rax
        je      4f
        shlq    $20, %rax
        cmpq    ram_top(%rip), %rax
        jbe     31f
        movq    ram_top(%rip), %rax
31:     movq    %rax, touch_end(%rip)
4:      leaq    key_autostop(%rip), %rdi
        call    find_arg
        cmpq    $-1, %rax
        je      5f
        movq    %rax, autostop(%rip)
5:
        andq    $-PAGE, touch_start(%rip)
        andq    $-PAGE, touch_end(%rip)

        leaq    msg_config(%rip), %rsi
        call    puts
        movq    ram_top(%rip), %rdi
        call    puthex
        leaq    msg_start(%rip), %rsi
        call    puts
        movq    touch_start(%rip), %rdi
        call    puthex
        leaq    msg_end(%rip), %rsi
        call    puts
        movq    touch_end(%rip), %rdi
        call    puthex
        call    newline

        movq    $1, pass(%rip)

/* Drop to ring 3 and touch; comes back through ud2 (#UD) -> after_touch. */
touch_pass:
        rdtsc
        shlq    $32, %rdx
        orq     %rdx, %rax
        movq    %rax, tsc_before(%rip)

        movq    touch_start(%rip), %rdi
        movq    touch_end(%rip), %rsi
        movq    pass(%rip), %rdx
        pushq   $UDATA                      /* SS */
        leaq    ustack_top(%rip), %rax
        pushq   %rax                        /* RSP */
        pushq   $0x2                        /* RFLAGS: IF=0, IOPL=0 */
        pushq   $UCODE                      /* CS */
        leaq    user_touch(%rip), %rax
        pushq   %rax                        /* RIP */
        iretq

after_touch:
        rdtsc
        shlq    $32, %rdx
        orq     %rdx, %rax
        subq    tsc_before(%rip), %rax
        movq    %rax, %r12

        leaq    msg_touched(%rip), %rsi
        call    puts
        movq    pass(%rip), %rdi
        call    puthex
        leaq    msg_start(%rip), %rsi
        call    puts
        movq    touch_start(%rip), %rdi
        call    puthex
        leaq    msg_end(%rip), %rsi
        call    puts
        movq    touch_end(%rip), %rdi
        call    puthex
        leaq    msg_tsc(%rip), %rsi
        call    puts
        movq    %r12, %rdi
        call    puthex
        call    newline

        cmpq    $0, autostop(%rip)
        jne     poweroff

        /* enable COM1 receive interrupt, unmask IRQ4 */
        movw    $(COM1 + 1), %dx
        movb    $0x01, %al
        outb    %al, %dx
        movb    $0xEF, %al
        outb    %al, $0x21

        leaq    msg_waiting(%rip), %rsi
        call    puts

wait_cmd:
        sti
        hlt
        cli
        movzbl  cmd(%rip), %eax
        testl   %eax, %eax
        jz      wait_cmd
        movb    $0, cmd(%rip)
        cmpb    $'t', %al
        je      retouch
        cmpb    $'q', %al
        je      poweroff
        cmpb    $'p', %al
        jne     wait_cmd
        leaq    msg_pong(%rip), %rsi
        call    puts
        jmp     wait_cmd

retouch:
        incq    pass(%rip)
        leaq    kstack_top(%rip), %rsp
        jmp     touch_pass

poweroff:
        leaq    msg_poweroff(%rip), %rsi
        call    puts
        /* ICH9 LPC (00:1f.0): make sure ACPI decode is on (0x44 bit 7) */
        movl    $0x8000F844, %eax
        movw    $0xCF8, %dx
        outl    %eax, %dx
        movw    $0xCFC, %dx
        inl     %dx, %eax
        orl     $0x80, %eax
        outl    %eax, %dx
        /* PMBASE at 0x40 */
        movl    $0x8000F840, %eax
        movw    $0xCF8, %dx
        outl    %eax, %dx
        movw    $0xCFC, %dx
        inl     %dx, %eax
        andl    $0xFF80, %eax
        jnz     1f
        movl    $0x600, %eax
1:      addl    $4, %eax                    /* PM1a_CNT */
        movl    %eax, %edx
        movw    $0x2000, %ax                /* SLP_EN | SLP_TYP=0 (S5) */
        outw    %ax, %dx
        /* QEMU stops the VM asynchronously; do not print anything more here
         * (the harness notices a failed power-off by QEMU not exiting). */
halt64:
        cli
        hlt
        jmp     halt64

/* ---- ring 3 code ---- */
/* rdi = start, rsi = end, rdx = value to store */
user_touch:
        movq    %rdi, %rax
        cmpq    %rsi, %rax
        jae     2f
1:      movq    %rdx, (%rax)
        addq    $PAGE, %rax
        cmpq    %rsi, %rax
        jb      1b
2:
user_done:
        ud2                                 /* #UD -> back to ring 0 */
3:      jmp     3b

/* ---- ring 0 entry points ---- */
/* Ring 3 returns to the kernel by faulting (ud2 at user_done); `int $0x80`
 * through a DPL3 gate and `syscall` do not work on the shadow-paging,
 * paravirtual KVM this was developed on (#UD resp. CPL stays 3), while
 * exceptions are delivered correctly everywhere. */
user_returned:
        /* abandon the exception frame: back to the kernel flow */
        leaq    kstack_top(%rip), %rsp
        movw    $KDATA, %ax
        movw    %ax, %ds
        movw    %ax, %es
        jmp     after_touch

serial_irq:
        pushq   %rax
        pushq   %rdx
1:      movw    $(COM1 + 5), %dx
        inb     %dx, %al
        testb   $1, %al
        jz      2f
        movw    $COM1, %dx
        inb     %dx, %al
        cmpb    $0x20, %al
        jbe     1b                          /* ignore whitespace/control */
        movb    %al, cmd(%rip)
        jmp     1b
2:      movb    $0x20, %al
        outb    %al, $0x20                  /* EOI */
        popq    %rdx
        popq    %rax
        iretq

unexpected_irq:
        pushq   %rax
        movb    $0x20, %al
        outb    %al, $0xA0
        outb    %al, $0x20
        popq    %rax
        iretq

exc_common:
        /* #UD raised by ring 3 at user_done = "touch pass finished" */
        cmpq    $6, 0(%rsp)
        jne     1f
        testq   $3, 16(%rsp)                /* saved CS: from ring 3? */
        jz      1f
        leaq    user_done(%rip), %rax
        cmpq    %rax, 8(%rsp)               /* saved RIP */
        je      user_returned
1:
        leaq    msg_exc(%rip), %rsi
        call    puts
        movq    0(%rsp), %rdi               /* vector */
        call    puthex
        call    space
        movq    8(%rsp), %rdi               /* error code or RIP */
        call    puthex
        call    space
        movq    16(%rsp), %rdi
        call    puthex
        call    space
        movq    24(%rsp), %rdi
        call    puthex
        call    space
        movq    %cr2, %rdi
        call    puthex
        call    newline
        jmp     halt64

        .irp vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
exc_stub_\vec:
        pushq   $\vec
        jmp     exc_common
        .endr

/* rdi = vector, rsi = handler, edx = type/attr */
set_gate:
        shlq    $4, %rdi
        leaq    idt(%rip), %rax
        addq    %rax, %rdi
        movw    %si, (%rdi)
        movw    $KCODE, 2(%rdi)
        movb    $0, 4(%rdi)
        movb    %dl, 5(%rdi)
        movq    %rsi, %rax
        shrq    $16, %rax
        movw    %ax, 6(%rdi)
        shrq    $16, %rax
        movl    %eax, 8(%rdi)
        movl    $0, 12(%rdi)
        ret

pic_init:
        movb    $0x11, %al
        outb    %al, $0x20
        outb    %al, $0xA0
        movb    $0x20, %al
        outb    %al, $0x21
        movb    $0x28, %al
        outb    %al, $0xA1
        movb    $0x04, %al
        outb    %al, $0x21
        movb    $0x02, %al
        outb    %al, $0xA1
        movb    $0x01, %al
        outb    %al, $0x21
        outb    %al, $0xA1
        movb    $0xFF, %al
        outb    %al, $0x21
        outb    %al, $0xA1
        ret

/* rdi = key (NUL-terminated, e.g. "touch_end_mib="); rax = decimal value or -1.
 * The key must follow a space (the multiboot cmdline starts with the path). */
find_arg:
        movq    cmdline(%rip), %rsi
        testq   %rsi, %rsi
        jz      9f
1:      movb    (%rsi), %al
        testb   %al, %al
        jz      9f
        cmpb    $' ', -1(%rsi)
        jne     4f
        movq    %rsi, %r8
        movq    %rdi, %r9
2:      movb    (%r9), %cl
        testb   %cl, %cl
        jz      5f                          /* whole key matched */
        cmpb    (%r8), %cl
        jne     4f
        incq    %r8
        incq    %r9
        jmp     2b
4:      incq    %rsi
        jmp     1b
5:      xorl    %eax, %eax
6:      movzbl  (%r8), %ecx
        subl    $'0', %ecx
        cmpl    $9, %ecx
        ja      7f
        imulq   $10, %rax
        addq    %rcx, %rax
        incq    %r8
        jmp     6b
7:      ret
9:      movq    $-1, %rax
        ret

/* serial output (ring 0) */
putc:                                       /* al */
        pushq   %rdx
        pushq   %rax
        movw    $(COM1 + 5), %dx
1:      inb     %dx, %al
        testb   $0x20, %al
        jz      1b
        popq    %rax
        movw    $COM1, %dx
        outb    %al, %dx
        popq    %rdx
        ret

puts:                                       /* rsi */
        lodsb
        testb   %al, %al
        jz      1f
        call    putc
        jmp     puts
1:      ret

newline:
        movb    $'\n', %al
        jmp     putc

space:
        movb    $' ', %al
        jmp     putc

puthex:                                     /* rdi, printed as 0x... */
        pushq   %rcx
        pushq   %rbx
        movb    $'0', %al
        call    putc
        movb    $'x', %al
        call    putc
        movl    $60, %ecx
        xorl    %ebx, %ebx                  /* seen a non-zero digit */
1:      movq    %rdi, %rax
        shrq    %cl, %rax
        andl    $0xF, %eax
        testl   %ecx, %ecx
        jz      2f                          /* always print the last digit */
        testl   %ebx, %ebx
        jnz     2f
        testl   %eax, %eax
        jz      3f
2:      movl    $1, %ebx
        cmpb    $10, %al
        jb      21f
        addb    $('a' - 10 - '0'), %al
21:     addb    $'0', %al
        call    putc
3:      subl    $4, %ecx
        jns     1b
        popq    %rbx
        popq    %rcx
        ret

/* ------------------------------------------------------------------------ */
        .section .rodata
exc_table:
        .irp vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .long exc_stub_\vec
        .endr
msg_boot:       .asciz "EPTWATCH-BOOT\n"
msg_badmagic:   .asciz "EPTWATCH-ERROR bad multiboot magic\n"
msg_nomem:      .asciz "EPTWATCH-ERROR no multiboot memory info\n"
msg_long:       .asciz "EPTWATCH-LONGMODE\n"
msg_config:     .asciz "EPTWATCH-CONFIG ram_top="
msg_start:      .asciz " start="
msg_end:        .asciz " end="
msg_tsc:        .asciz " tsc="
msg_touched:    .asciz "EPTWATCH-TOUCHED pass="
msg_waiting:    .asciz "EPTWATCH-WAITING\n"
msg_pong:       .asciz "EPTWATCH-PONG\n"
msg_poweroff:   .asciz "EPTWATCH-POWEROFF\n"
msg_exc:        .asciz "EPTWATCH-EXCEPTION "
key_start:      .asciz "touch_start_mib="
key_end:        .asciz "touch_end_mib="
key_autostop:   .asciz "autostop="

/* ------------------------------------------------------------------------ */
        .section .data
        .align 16
gdt:
        .quad 0
        .quad 0x00AF9A000000FFFF            /* 0x08 kernel code, 64-bit */
        .quad 0x00CF92000000FFFF            /* 0x10 kernel data */
        .quad 0x00CFF2000000FFFF            /* 0x18 user data, DPL 3 */
        .quad 0x00AFFA000000FFFF            /* 0x20 user code, 64-bit, DPL 3 */
tss_desc:
        .quad 0                             /* 0x28 TSS, filled at run time */
        .quad 0
gdt_end:
        .align 4
gdt_ptr:
        .word gdt_end - gdt - 1
        .long gdt
        .align 4
idt_ptr:
        .word 256 * 16 - 1
        .long idt
        .long 0

        .align 8
mb_magic:       .long 0
mb_info:        .long 0
cmdline:        .quad 0
ram_top:        .quad 0
touch_start:    .quad 0
touch_end:      .quad 0
autostop:       .quad 0
pass:           .quad 0
tsc_before:     .quad 0
cmd:            .byte 0

/* ------------------------------------------------------------------------ */
        .section .bss
        .align 4096
pml4:   .skip 4096
pdpt:   .skip 4096
pd0:    .skip 4 * 4096
idt:    .skip 4096
        .align 16
tss:    .skip 104
        .align 16
        .skip 16384
kstack_top:
        .skip 16384
ustack_top:
