/* Shared by every payload: entry, the ucall channel and the exception stubs.
 * Linked first, so l1_entry sits at CODE_GPA. */
#include "kvmtest_layout.h"
#include "svm.h"
	.intel_syntax noprefix
	.code64
	.text

	.globl l1_entry
l1_entry:
	mov rsp, L1_STACK_TOP
	call l1_main			/* each payload defines l1_main */
	UCALL0(UCALL_DONE)
	/* The host never resumes after DONE; if it does, stay put. */
1:	hlt
	jmp 1b

/* L1's SVM set-up asked for by the params' flags: EFER.SVME (PF_SET_SVME)
 * and MSR_VM_HSAVE_PA = P_HSAVE_PA (PF_SET_HSAVE).  Returns the flags in rbx;
 * clobbers rax, rcx, rdx.  A #GP here is L1's own (fuzz: l1:hsave_pa). */
	.globl l1_svm_setup
l1_svm_setup:
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
2:	ret

/* ucall(cmd=rdi, args[0..4]=rsi, rdx, rcx, r8, r9): fill struct ucall, then
 * OUT the command.  Preserves every register but the flags. */
	.globl ucall
ucall:
	push rax
	push rdx
	mov [UCALL_GPA + 0x00], rdi
	mov [UCALL_GPA + 0x08], rsi
	mov [UCALL_GPA + 0x10], rdx
	mov [UCALL_GPA + 0x18], rcx
	mov [UCALL_GPA + 0x20], r8
	mov [UCALL_GPA + 0x28], r9
	mov eax, edi
	mov dx, UCALL_PORT
	out dx, eax
	pop rdx
	pop rax
	ret

/* guest_assert_fail(line=rsi, msg=rdx, file=rcx, a=r8, b=r9): never returns. */
	.globl guest_assert_fail
guest_assert_fail:
	mov edi, UCALL_ASSERT
	call ucall
1:	cli
	hlt
	jmp 1b

/* Exception stubs: vector v's stub is at exc_stubs + 16 * v (the host's IDT
 * points there).  Vectors without an error code push a zero one so that
 * exc_common sees one frame layout. */
.macro STUB vec, has_err
	.balign 16
	.if \has_err == 0
	push 0
	.endif
	push \vec
	jmp exc_common
.endm

	.balign 16
	.globl exc_stubs
exc_stubs:
	STUB 0, 0
	STUB 1, 0
	STUB 2, 0
	STUB 3, 0
	STUB 4, 0
	STUB 5, 0
	STUB 6, 0
	STUB 7, 0
	STUB 8, 1
	STUB 9, 0
	STUB 10, 1
	STUB 11, 1
	STUB 12, 1
	STUB 13, 1
	STUB 14, 1
	STUB 15, 0
	STUB 16, 0
	STUB 17, 1
	STUB 18, 0
	STUB 19, 0
	STUB 20, 0
	STUB 21, 1
	STUB 22, 0
	STUB 23, 0
	STUB 24, 0
	STUB 25, 0
	STUB 26, 0
	STUB 27, 0
	STUB 28, 0
	STUB 29, 1
	STUB 30, 1
	STUB 31, 0
	.globl exc_stubs_end
exc_stubs_end:

/* Frame: [rsp] vector, +8 error code, +16 RIP, +24 CS, +32 RFLAGS, +40 RSP. */
exc_common:
	mov rsi, [rsp]
	mov rdx, [rsp + 8]
	mov rcx, [rsp + 16]
	mov r8, [rsp + 24]
	mov r9, [rsp + 40]
	mov rax, [rsp + 32]
	mov [UCALL_GPA + 0x30], rax
	mov edi, UCALL_EXCEPTION
	call ucall
	/* An exception ends the case: the host does not resume us. */
1:	cli
	hlt
	jmp 1b

/* ---- L2 code: runs only after a successful VMRUN; in every payload so any
 * payload can VMRUN the default VMCB12 (vmcb12.py picks the entry) ---- */
	.balign 16
	.globl l2_vmmcall
l2_vmmcall:
	VMMCALL
	/* VMMCALL must be intercepted; falling through is a harness bug. */
	ud2

	.balign 16
	.globl l2_hlt
l2_hlt:
	hlt
	ud2

	.balign 16
	.globl l2_ioio
l2_ioio:
	mov dx, 0x80
	out dx, al
	VMMCALL

	.balign 16
	.globl l2_rdmsr
l2_rdmsr:
	mov ecx, MSR_EFER
	rdmsr
	VMMCALL

	.balign 16
	.globl l2_ud
l2_ud:
	ud2

/* 32-bit L2 entry for the legacy PAE-paging (late failure) cases.  VMMCALL
 * has the same encoding in 32-bit code. */
	.balign 16
	.code32
	.globl l2_vmmcall32
l2_vmmcall32:
	VMMCALL
	ud2
	.code64
