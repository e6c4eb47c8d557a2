/* Instruction-level checks: execute one SVM instruction (or the EFER.SVME
 * write) chosen by params.insn.  If it faults, the exception stub reports the
 * vector and RIP, which the host compares with the insn_* symbol.  If it does
 * not fault, L1 writes RAX and EFER into the result block and SYNC(
 * STAGE_AFTER_VMRUN) says so. */
#include "kvmtest_layout.h"
#include "svm.h"
	.intel_syntax noprefix
	.code64
	.text

	.globl l1_main
l1_main:
	call l1_svm_setup
	mov r12, rbx			/* the params' flags */
	mov rbx, [P_INSN]
	cmp rbx, INSN_WRMSR
	ja bad_insn
	lea rax, [rip + insn_table]
	jmp [rax + rbx * 8]

insn_table:
	.quad do_vmrun, do_vmmcall, do_vmload, do_vmsave, do_stgi, do_clgi
	.quad do_skinit, do_invlpga, do_wrmsr

do_vmrun:
	mov rax, [P_VMRUN_RAX]
	.globl insn_vmrun
insn_vmrun:
	VMRUN
	jmp no_fault
do_vmmcall:
	.globl insn_vmmcall
insn_vmmcall:
	VMMCALL
	jmp no_fault
do_vmload:
	mov rax, [P_VMRUN_RAX]
	.globl insn_vmload
insn_vmload:
	VMLOAD
	jmp no_fault
do_vmsave:
	mov rax, [P_VMRUN_RAX]
	.globl insn_vmsave
insn_vmsave:
	VMSAVE
	jmp no_fault
do_stgi:
	.globl insn_stgi
insn_stgi:
	STGI
	jmp no_fault
do_clgi:
	.globl insn_clgi
insn_clgi:
	CLGI
	jmp no_fault
do_skinit:
	mov eax, [P_VMRUN_RAX]
	.globl insn_skinit
insn_skinit:
	SKINIT
	jmp no_fault
do_invlpga:
	xor eax, eax
	mov ecx, 1
	.globl insn_invlpga
insn_invlpga:
	INVLPGA
	jmp no_fault
do_wrmsr:
	mov ecx, [P_MSR_INDEX]
	mov eax, [P_MSR_VALUE]
	mov edx, [P_MSR_VALUE + 4]
	.globl insn_wrmsr
insn_wrmsr:
	wrmsr
	jmp no_fault

no_fault:
	/* L1's report: RAX as the instruction left it (VMMCALL's hypercall
	 * return value) and EFER (a WRMSR's effect). */
	mov [R_RAX], rax
	mov ecx, MSR_EFER
	rdmsr
	mov [R_EFER], eax
	mov [R_EFER + 4], edx
	mov qword ptr [R_STAGE], STAGE_AFTER_VMRUN
	mov esi, STAGE_AFTER_VMRUN
	mov edi, UCALL_SYNC
	call ucall
	ret

bad_insn:
	mov rsi, __LINE__
	lea rdx, [rip + msg_bad_insn]
	lea rcx, [rip + file_name]
	mov r8, rbx
	mov r9, INSN_WRMSR
	call guest_assert_fail

msg_bad_insn: .asciz "params.insn out of range"
file_name: .asciz "svm_insn.S"
