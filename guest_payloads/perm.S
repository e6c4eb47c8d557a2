/* Permission checks of the SVM instructions (kvmtest/cases/permission.py):
 * execute params.insn at CPL 3, in compatibility mode, in protected mode
 * with paging off, or in real mode (params.mode, PERM_*).
 *
 * L1 enables SVM as params.flags says and loads its own GDT (the shared one
 * plus 32-bit, 16-bit and CPL-3 segments).  Each mode has its own copy of the
 * instruction sites, perm64_<insn> (CPL 0 and 3), perm32_<insn>
 * (compatibility mode and paging off) and perm16_<insn> (real mode), and its
 * own exception handlers, which report the vector and the linear address of
 * the faulting instruction like common.S's stubs do.  An instruction that
 * does not fault reports SYNC(STAGE_AFTER_VMRUN), then DONE.
 */
#include "kvmtest_layout.h"
#include "svm.h"
	.intel_syntax noprefix
	.code64
	.text

#define SEL_CODE32 0x28
#define SEL_UDATA 0x30
#define SEL_UCODE64 0x38
#define SEL_CODE16 0x40
#define SEL_DATA16 0x48
/* Real mode: CS = 0xffff reaches the payload at 1 MiB (base 0xffff0). */
#define REAL_CS 0xffff
#define REAL_BASE 0xffff0
#define REAL_SP 0xfff0		/* SS = 0: [0xf000, 0xfff0) is free */
#define USER_RSP 0x1e000	/* inside L1's stack area */
#define KERNEL_RSP0 0x1c000	/* TSS.RSP0: CPL 3 -> 0 exception stack */
#define RFLAGS_IOPL3 0x3002	/* IOPL 3: ucall's OUT works at CPL 3 */
#define DESC(base, limit, access, flags) \
	(((limit) & 0xffff) | (((base) & 0xffffff) << 16) | ((access) << 40) | \
	 ((((limit) >> 16) & 0xf) << 48) | ((flags) << 52) | ((((base) >> 24) & 0xff) << 56))

	.globl l1_main
l1_main:
	call l1_svm_setup		/* rbx = the params' flags */
	/* The shared GDT's TSS descriptor (TR stays loaded from it). */
	mov rax, [GDT_GPA + SEL_TSS]
	mov [rip + perm_gdt + SEL_TSS], rax
	mov rax, [GDT_GPA + SEL_TSS + 8]
	mov [rip + perm_gdt + SEL_TSS + 8], rax
	lgdt [rip + perm_gdt_ptr]
	call build_idt32
	call build_ivt
	mov rax, [P_MODE]
	cmp rax, PERM_CPL3
	je to_cpl3
	cmp rax, PERM_CPL0
	je insn64
	/* Compatibility mode, then (PERM_NO_PAGING, PERM_REAL) further down. */
	push SEL_CODE32
	lea rax, [rip + compat32]
	push rax
	retfq

to_cpl3:
	mov qword ptr [TSS_GPA + 4], KERNEL_RSP0
	push SEL_UDATA | 3
	push USER_RSP
	push RFLAGS_IOPL3
	push SEL_UCODE64 | 3
	lea rax, [rip + insn64]
	push rax
	iretq

/* ---- 64-bit: CPL 0 and CPL 3 ---------------------------------------------- */
insn64:
	mov rbx, [P_INSN]
	cmp rbx, INSN_INVLPGA
	ja bad_insn64
	lea rax, [rip + table64]
	jmp [rax + rbx * 8]
table64:
	.quad p64_vmrun, p64_vmmcall, p64_vmload, p64_vmsave, p64_stgi, p64_clgi
	.quad bad_insn64, p64_invlpga
p64_vmrun:
	mov rax, [P_VMRUN_RAX]
	.globl perm64_vmrun
perm64_vmrun:
	VMRUN
	jmp no_fault64
p64_vmmcall:
	.globl perm64_vmmcall
perm64_vmmcall:
	VMMCALL
	jmp no_fault64
p64_vmload:
	mov rax, [P_VMRUN_RAX]
	.globl perm64_vmload
perm64_vmload:
	VMLOAD
	jmp no_fault64
p64_vmsave:
	mov rax, [P_VMRUN_RAX]
	.globl perm64_vmsave
perm64_vmsave:
	VMSAVE
	jmp no_fault64
p64_stgi:
	.globl perm64_stgi
perm64_stgi:
	STGI
	jmp no_fault64
p64_clgi:
	.globl perm64_clgi
perm64_clgi:
	CLGI
	jmp no_fault64
p64_invlpga:
	xor eax, eax
	mov ecx, 1
	.globl perm64_invlpga
perm64_invlpga:
	INVLPGA
	jmp no_fault64
no_fault64:
	mov esi, STAGE_AFTER_VMRUN
	mov edi, UCALL_SYNC
	call ucall
	mov edi, UCALL_DONE
	call ucall
1:	pause
	jmp 1b
bad_insn64:
	mov rsi, __LINE__
	lea rdx, [rip + msg_bad_insn]
	lea rcx, [rip + file_name]
	mov r8, rbx
	mov r9, INSN_INVLPGA
	call guest_assert_fail

/* The 32-bit IDT (8-byte interrupt gates to stubs32) and the real-mode IVT
 * (segment:offset to stubs16), built while still in 64-bit mode. */
build_idt32:
	lea rsi, [rip + stubs32]
	lea rdi, [rip + idt32]
	mov ecx, 32
1:	mov eax, esi
	and eax, 0xffff
	or eax, SEL_CODE32 << 16
	mov [rdi], eax
	mov eax, esi
	and eax, 0xffff0000
	or eax, 0x8e00
	mov [rdi + 4], eax
	add rsi, 16
	add rdi, 8
	loop 1b
	ret

build_ivt:
	lea rsi, [rip + stubs16]
	lea rdi, [rip + ivt]
	mov ecx, 32
1:	mov eax, esi
	sub eax, REAL_BASE
	or eax, REAL_CS << 16
	mov [rdi], eax
	add rsi, 16
	add rdi, 4
	loop 1b
	ret

/* ---- 32-bit: compatibility mode, then protected mode without paging ------- */
	.code32
compat32:
	/* Stack and data segments for legacy mode (64-bit mode ignores their
	 * hidden size bits, legacy mode does not). */
	mov ax, SEL_DATA
	mov ds, ax
	mov es, ax
	mov ss, ax
	cmp dword ptr [P_MODE], PERM_COMPAT
	je insn32
	/* Paging off: leaves long mode (EFER.LMA clears, EFER.LME stays). */
	mov eax, cr0
	and eax, ~CR0_PG
	mov cr0, eax
	lidt [idt32_ptr]
	cmp dword ptr [P_MODE], PERM_NO_PAGING
	je insn32
	/* Real mode: through a 16-bit code segment based where CS = 0xffff is. */
	ljmp SEL_CODE16, real16_pm - REAL_BASE

insn32:
	mov ebx, [P_INSN]
	cmp ebx, INSN_INVLPGA
	ja bad_insn32
	jmp [table32 + ebx * 4]
table32:
	.long p32_vmrun, p32_vmmcall, p32_vmload, p32_vmsave, p32_stgi, p32_clgi
	.long bad_insn32, p32_invlpga
p32_vmrun:
	mov eax, [P_VMRUN_RAX]
	.globl perm32_vmrun
perm32_vmrun:
	VMRUN
	jmp no_fault32
p32_vmmcall:
	.globl perm32_vmmcall
perm32_vmmcall:
	VMMCALL
	jmp no_fault32
p32_vmload:
	mov eax, [P_VMRUN_RAX]
	.globl perm32_vmload
perm32_vmload:
	VMLOAD
	jmp no_fault32
p32_vmsave:
	mov eax, [P_VMRUN_RAX]
	.globl perm32_vmsave
perm32_vmsave:
	VMSAVE
	jmp no_fault32
p32_stgi:
	.globl perm32_stgi
perm32_stgi:
	STGI
	jmp no_fault32
p32_clgi:
	.globl perm32_clgi
perm32_clgi:
	CLGI
	jmp no_fault32
p32_invlpga:
	xor eax, eax
	mov ecx, 1
	.globl perm32_invlpga
perm32_invlpga:
	INVLPGA
	jmp no_fault32
no_fault32:
	mov edi, UCALL_SYNC
	mov esi, STAGE_AFTER_VMRUN
	call ucall32
	mov edi, UCALL_DONE
	xor esi, esi
	call ucall32
1:	pause
	jmp 1b
bad_insn32:
	mov edi, UCALL_ASSERT
	mov esi, __LINE__
	call ucall32
1:	hlt
	jmp 1b

/* ucall32(cmd=edi, args[0]=esi): the 32-bit ucall; args[1..] are zero. */
ucall32:
	mov [UCALL_GPA], edi
	mov dword ptr [UCALL_GPA + 4], 0
	mov [UCALL_GPA + 8], esi
	mov dword ptr [UCALL_GPA + 12], 0
	mov dword ptr [UCALL_GPA + 16], 0
	mov dword ptr [UCALL_GPA + 20], 0
	mov dword ptr [UCALL_GPA + 24], 0
	mov dword ptr [UCALL_GPA + 28], 0
	mov eax, edi
	mov dx, UCALL_PORT
	out dx, eax
	ret

/* The end of exc32_common and exc16_common (assembled in each mode): the
 * EXCEPTION ucall whose arguments are already in place, then stay put. */
.macro EXCEPTION_UCALL_AND_HALT
	mov dword ptr [UCALL_GPA], UCALL_EXCEPTION
	mov dword ptr [UCALL_GPA + 4], 0
	mov eax, UCALL_EXCEPTION
	mov dx, UCALL_PORT
	out dx, eax
1:	hlt
	jmp 1b
.endm

/* 32-bit exception stubs: [esp] vector, +4 error code, +8 EIP. */
.macro STUB32 vec, has_err
	.balign 16
	.if \has_err == 0
	push 0
	.endif
	push \vec
	jmp exc32_common
.endm
	.balign 16
stubs32:
	STUB32 0, 0
	STUB32 1, 0
	STUB32 2, 0
	STUB32 3, 0
	STUB32 4, 0
	STUB32 5, 0
	STUB32 6, 0
	STUB32 7, 0
	STUB32 8, 1
	STUB32 9, 0
	STUB32 10, 1
	STUB32 11, 1
	STUB32 12, 1
	STUB32 13, 1
	STUB32 14, 1
	STUB32 15, 0
	STUB32 16, 0
	STUB32 17, 1
	STUB32 18, 0
	STUB32 19, 0
	STUB32 20, 0
	STUB32 21, 1
	STUB32 22, 0
	STUB32 23, 0
	STUB32 24, 0
	STUB32 25, 0
	STUB32 26, 0
	STUB32 27, 0
	STUB32 28, 0
	STUB32 29, 1
	STUB32 30, 1
	STUB32 31, 0
exc32_common:
	mov eax, [esp]
	mov [UCALL_GPA + 8], eax
	mov dword ptr [UCALL_GPA + 12], 0
	mov eax, [esp + 4]
	mov [UCALL_GPA + 16], eax
	mov dword ptr [UCALL_GPA + 20], 0
	mov eax, [esp + 8]
	mov [UCALL_GPA + 24], eax
	mov dword ptr [UCALL_GPA + 28], 0
	EXCEPTION_UCALL_AND_HALT

/* ---- 16-bit: real mode ------------------------------------------------------ */
	.code16
real16_pm:
	mov ax, SEL_DATA16
	mov ds, ax
	mov es, ax
	mov ss, ax
	mov eax, cr0
	and eax, ~CR0_PE
	mov cr0, eax
	ljmp REAL_CS, real16 - REAL_BASE
real16:
	xor ax, ax
	mov ds, ax
	mov es, ax
	mov ss, ax
	mov sp, REAL_SP
	lidt cs:[ivt_ptr - REAL_BASE]
	mov bx, [P_INSN]
	cmp bx, INSN_INVLPGA
	ja bad_insn16
	shl bx, 1
	jmp cs:[bx + table16 - REAL_BASE]
table16:
	.word p16_vmrun - REAL_BASE, p16_vmmcall - REAL_BASE, p16_vmload - REAL_BASE
	.word p16_vmsave - REAL_BASE, p16_stgi - REAL_BASE, p16_clgi - REAL_BASE
	.word bad_insn16 - REAL_BASE, p16_invlpga - REAL_BASE
p16_vmrun:
	mov eax, [P_VMRUN_RAX]
	.globl perm16_vmrun
perm16_vmrun:
	VMRUN
	jmp no_fault16
p16_vmmcall:
	.globl perm16_vmmcall
perm16_vmmcall:
	VMMCALL
	jmp no_fault16
p16_vmload:
	mov eax, [P_VMRUN_RAX]
	.globl perm16_vmload
perm16_vmload:
	VMLOAD
	jmp no_fault16
p16_vmsave:
	mov eax, [P_VMRUN_RAX]
	.globl perm16_vmsave
perm16_vmsave:
	VMSAVE
	jmp no_fault16
p16_stgi:
	.globl perm16_stgi
perm16_stgi:
	STGI
	jmp no_fault16
p16_clgi:
	.globl perm16_clgi
perm16_clgi:
	CLGI
	jmp no_fault16
p16_invlpga:
	xor eax, eax
	mov ecx, 1
	.globl perm16_invlpga
perm16_invlpga:
	INVLPGA
	jmp no_fault16

#define UCALL16(cmd, arg) \
	mov dword ptr [UCALL_GPA], cmd; mov dword ptr [UCALL_GPA + 4], 0; \
	mov dword ptr [UCALL_GPA + 8], arg; mov dword ptr [UCALL_GPA + 12], 0; \
	mov eax, cmd; mov dx, UCALL_PORT; out dx, eax
no_fault16:
	UCALL16(UCALL_SYNC, STAGE_AFTER_VMRUN)
	UCALL16(UCALL_DONE, 0)
1:	pause
	jmp 1b
bad_insn16:
	UCALL16(UCALL_ASSERT, __LINE__)
1:	hlt
	jmp 1b

/* Real-mode stubs: [sp] vector, +2 IP, +4 CS.  The reported address is the
 * linear one (CS << 4) + IP, i.e. the perm16_* symbol. */
.macro STUB16 vec
	.balign 16
	push \vec
	jmp exc16_common
.endm
	.balign 16
stubs16:
	STUB16 0
	STUB16 1
	STUB16 2
	STUB16 3
	STUB16 4
	STUB16 5
	STUB16 6
	STUB16 7
	STUB16 8
	STUB16 9
	STUB16 10
	STUB16 11
	STUB16 12
	STUB16 13
	STUB16 14
	STUB16 15
	STUB16 16
	STUB16 17
	STUB16 18
	STUB16 19
	STUB16 20
	STUB16 21
	STUB16 22
	STUB16 23
	STUB16 24
	STUB16 25
	STUB16 26
	STUB16 27
	STUB16 28
	STUB16 29
	STUB16 30
	STUB16 31
exc16_common:
	mov bp, sp
	movzx eax, word ptr [bp + 2]
	movzx edx, word ptr [bp + 4]
	shl edx, 4
	add eax, edx
	movzx ecx, word ptr [bp]
	mov [UCALL_GPA + 8], ecx
	mov dword ptr [UCALL_GPA + 12], 0
	mov dword ptr [UCALL_GPA + 16], 0
	mov dword ptr [UCALL_GPA + 20], 0
	mov [UCALL_GPA + 24], eax
	mov dword ptr [UCALL_GPA + 28], 0
	EXCEPTION_UCALL_AND_HALT
	.code64

	.data
	.balign 16
perm_gdt:
	.quad 0
	.quad DESC(0, 0xfffff, 0x9b, 0xa)		/* 0x08 code64 */
	.quad DESC(0, 0xfffff, 0x93, 0xc)		/* 0x10 data */
	.quad 0, 0					/* 0x18 TSS (copied) */
	.quad DESC(0, 0xfffff, 0x9b, 0xc)		/* 0x28 code32 */
	.quad DESC(0, 0xfffff, 0xf3, 0xc)		/* 0x30 user data */
	.quad DESC(0, 0xfffff, 0xfb, 0xa)		/* 0x38 user code64 */
	.quad DESC(REAL_BASE, 0xffff, 0x9b, 0x0)	/* 0x40 code16 */
	.quad DESC(0, 0xffff, 0x93, 0x0)		/* 0x48 data16 */
perm_gdt_end:
	.balign 8
	.word 0
perm_gdt_ptr:
	.word perm_gdt_end - perm_gdt - 1
	.quad perm_gdt
	.word 0
idt32_ptr:
	.word 32 * 8 - 1
	.long idt32
	.word 0
ivt_ptr:
	.word 32 * 4 - 1
	.long ivt
	.balign 8
idt32:
	.fill 32 * 8, 1, 0
ivt:
	.fill 32 * 4, 1, 0
msg_bad_insn: .asciz "params.insn out of range"
file_name: .asciz "perm.S"
