/* An SVM instruction inside SMM (kvmtest/cases/permission.py).
 *
 * L1 enables SVM, asks the host for an SMI (SYNC(STAGE_HOST_ACTION)) and
 * waits.  KVM enters SMM at SMBASE + 0x8000 in real mode with EFER = 0 and
 * paging off; the handler the host copies there only jumps into this image
 * (CS = 0xffff reaches 1 MiB), where smm16 enters long mode again (CR3 =
 * L1's tables, CR4.PAE, EFER.LME|SVME, CR0.PE|PG) with L1's GDT and IDT, and
 * executes params.insn at smm_<insn>.  A fault is reported by common.S's
 * stubs (from SMM); no fault: SYNC(STAGE_AFTER_VMRUN), then DONE.  The case
 * ends there: the handler never RSMs.
 *
 * With params.mode != PERM_SMM, L1 runs the same instruction sites itself,
 * outside SMM (the negative control).
 */
#include "kvmtest_layout.h"
#include "svm.h"
	.intel_syntax noprefix
	.code64
	.text

#define REAL_CS 0xffff
#define REAL_BASE 0xffff0
#define SMM_STACK (SMRAM_GPA + 0xc000)	/* below the state-save area */
#define CR4_PAE 0x20

	.globl l1_main
l1_main:
	call l1_svm_setup		/* rbx = the params' flags */
	cmp qword ptr [P_MODE], PERM_SMM
	jne smm_insn
	mov esi, STAGE_HOST_ACTION
	mov edi, UCALL_SYNC
	call ucall
	/* The SMI arrives here; the case ends in SMM. */
3:	pause
	jmp 3b

/* ---- the instruction, in SMM or not ---------------------------------------- */
	.globl smm_insn
smm_insn:
	mov rbx, [P_INSN]
	cmp rbx, INSN_VMRUN
	je 1f
	cmp rbx, INSN_VMLOAD
	je 2f
	mov rsi, __LINE__
	lea rdx, [rip + msg_bad_insn]
	lea rcx, [rip + file_name]
	mov r8, rbx
	mov r9, INSN_VMLOAD
	call guest_assert_fail
1:	mov rax, [P_VMRUN_RAX]
	.globl smm_vmrun
smm_vmrun:
	VMRUN
	jmp 3f
2:	mov rax, [P_VMRUN_RAX]
	.globl smm_vmload
smm_vmload:
	VMLOAD
3:	mov esi, STAGE_AFTER_VMRUN
	mov edi, UCALL_SYNC
	call ucall
	mov edi, UCALL_DONE
	call ucall
4:	pause
	jmp 4b

/* ---- SMM ------------------------------------------------------------------------ */
/* Copied to SMBASE + 0x8000: real mode, CS.base = SMBASE. */
	.code16
	.globl smi_handler
smi_handler:
	ljmp REAL_CS, smm16 - REAL_BASE
	.globl smi_handler_end
smi_handler_end:

smm16:
	mov eax, L1_CR3
	mov cr3, eax
	mov eax, CR4_PAE
	mov cr4, eax
	mov ecx, MSR_EFER
	rdmsr
	or eax, EFER_LME | EFER_SVME
	wrmsr
	lgdt cs:[gdt_ptr - REAL_BASE]
	mov eax, cr0
	or eax, CR0_PE | CR0_PG
	mov cr0, eax
	/* Far jump with a 32-bit offset into the 64-bit code segment. */
	.byte 0x66, 0xea
	.long smm64
	.word SEL_CODE64
	.code64
smm64:
	mov ax, SEL_DATA
	mov ds, ax
	mov es, ax
	mov ss, ax
	mov rsp, SMM_STACK
	lidt [rip + idt_ptr]
	jmp smm_insn

	.balign 8
	.word 0
gdt_ptr:
	.word 5 * 8 - 1
	.long GDT_GPA
	.word 0
idt_ptr:
	.word IDT_VECTORS * 16 - 1
	.quad IDT_GPA
msg_bad_insn: .asciz "params.insn is neither vmrun nor vmload"
file_name: .asciz "smm_vmrun.S"
