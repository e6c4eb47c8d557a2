/* The failed-VMRUN payload.  L1 enables SVM as params.flags says, optionally
 * clears GIF, executes VMRUN on params.vmrun_rax, and after VMRUN returns
 * (a #VMEXIT of L2, or a failed VMRUN) records its own state in the result
 * block and reports SYNC(STAGE_AFTER_VMRUN).  Reaching vmrun_next at all is
 * what proves L1 resumed after the VMRUN.
 *
 */
#include "kvmtest_layout.h"
#include "svm.h"
	.intel_syntax noprefix
	.code64
	.text

/* cpp, not .macro: the field names are cpp macros themselves. */
#define SAVE_STATE(P) \
	mov [P##_RSP], rsp; \
	mov rax, cr0; mov [P##_CR0], rax; \
	mov rax, cr3; mov [P##_CR3], rax; \
	mov rax, cr4; mov [P##_CR4], rax; \
	mov ecx, MSR_EFER; rdmsr; mov [P##_EFER], eax; mov [P##_EFER + 4], edx

	.globl l1_main
l1_main:
	mov rbx, [P_FLAGS]
	test rbx, PF_SET_SVME
	jz 1f
	mov ecx, MSR_EFER
	rdmsr
	or eax, EFER_SVME
	wrmsr
1:	test rbx, PF_SET_HSAVE
	jz 2f
	mov ecx, MSR_VM_HSAVE_PA
	mov eax, [P_HSAVE_PA]
	mov edx, [P_HSAVE_PA + 4]
	wrmsr
2:	test rbx, PF_CLGI
	jz 3f
	CLGI
3:	test rbx, PF_STGI
	jz 4f
	STGI
4:	SAVE_STATE(R_PRE)
	mov qword ptr [R_STAGE], STAGE_BEFORE_VMRUN
	mov rax, [P_VMRUN_RAX]
	.globl insn_vmrun
insn_vmrun:
	VMRUN
	.globl vmrun_next
vmrun_next:
	mov [R_RAX], rax
	pushfq
	pop rax
	mov [R_RFLAGS], rax
	SAVE_STATE(R)
	mov qword ptr [R_STAGE], STAGE_AFTER_VMRUN
	mov esi, STAGE_AFTER_VMRUN
	mov edi, UCALL_SYNC
	call ucall
	ret

