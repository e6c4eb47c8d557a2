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
	call l1_svm_setup		/* rbx = the params' flags */
	test rbx, PF_CLGI
	jz 3f
	CLGI
3:	test rbx, PF_STGI
	jz 4f
	STGI
4:	test rbx, PF_L2_IDT
	jz 5f
	call build_l2_idt
5:	SAVE_STATE(R_PRE)
	mov qword ptr [R_STAGE], STAGE_BEFORE_VMRUN
	mov rax, [P_VMRUN_RAX]
	mov [R_PRE_RAX], rax
	/* The flags VMRUN sees: neither pop nor mov changes them. */
	pushfq
	pop qword ptr [R_PRE_RFLAGS]
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


/* L2's own IDT at L2_IDT_GPA: 256 64-bit interrupt gates, vector v to
 * l2_evt_stubs + 16 * v.  Event-injection cases point VMCB12's IDTR here so
 * that whatever EVENTINJ delivers lands in l2_evt_common. */
build_l2_idt:
	lea rsi, [rip + l2_evt_stubs]
	mov rdi, L2_IDT_GPA
	mov ecx, 256
1:	mov rax, rsi
	and eax, 0xFFFF				/* offset 15:0 */
	or eax, SEL_CODE64 << 16		/* selector */
	mov rdx, 0x8E00				/* present, DPL 0, interrupt gate */
	shl rdx, 32
	or rax, rdx
	mov rdx, rsi
	shr rdx, 16
	and edx, 0xFFFF				/* offset 31:16 */
	shl rdx, 48
	or rax, rdx
	mov [rdi], rax
	mov rdx, rsi
	shr rdx, 32				/* offset 63:32 */
	mov [rdi + 8], rdx
	add rsi, 16
	add rdi, 16
	loop 1b
	ret

/* L2 event stubs: push the vector (push imm32) and join l2_evt_common. */
	.balign 16
	.globl l2_evt_stubs
l2_evt_stubs:
	.set vec, 0
	.rept 256
	.balign 16
	.byte 0x68
	.long vec
	jmp l2_evt_common
	.set vec, vec + 1
	.endr

/* Entered with [rsp] = vector, then the CPU's frame.  L2's RSP was 16-byte
 * aligned (L2_STACK_TOP), so the handler's entry RSP says whether the CPU
 * pushed an error code (L2_STACK_TOP - 48) or not (- 40). */
l2_evt_common:
	mov rax, [rsp]
	mov [R_L2_EVENT_VECTOR], rax
	lea rax, [rsp + 8]
	mov [R_L2_EVENT_RSP], rax
	mov rax, [rsp + 8]
	mov [R_L2_EVENT_WORD], rax
	VMMCALL
	ud2
