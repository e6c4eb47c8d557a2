/* Events around a VMRUN (kvmtest/cases/gif.py): when do an interrupt, an
 * NMI, an SMI or a single-step trap reach L1?
 *
 * L1 enables SVM, installs handlers that log and return (INTR_VECTOR, NMI,
 * #DB; an SMI handler the host copies to SMRAM), masks interrupts (CLI),
 * optionally clears GIF, then asks the host to queue the case's event
 * (SYNC(STAGE_HOST_ACTION)).  Then:
 *
 *     before_vmrun: VMRUN [RFLAGS.TF set just before it with EV_TF]
 *     after_vmrun:  [IRET to self with EV_IRET: ends NMI blocking]
 *     after_iret:   STI; NOP (the STI shadow)
 *     after_sti:    STGI
 *     after_stgi:   CLI, report
 *
 * Every label is a marker in the event log; a handler logs the RIP it
 * interrupted.  GIF=0 holds INTR, NMI and SMI pending (APM vol. 2 15.17,
 * table 15-10), so an event queued before a VMRUN that fails must show up
 * as "<event>@after_stgi", right before "mark@after_stgi".  A single-step
 * trap is not held by GIF: EFLAGS.TF traps after the VMRUN completes, i.e.
 * after the #VMEXIT (APM vol. 2 15.5.1, "VMRUN and TF/RF Bits in EFLAGS"):
 * "db@after_vmrun" with DR6.BS.
 *
 * EV_NO_SVM leaves out CLGI, VMRUN and STGI (a guest without SVM, any KVM
 * host: the host loop's event plumbing, tests/test_events_kvm.py).
 */
#include "kvmtest_layout.h"
#include "svm.h"
	.intel_syntax noprefix
	.code64
	.text

#include "eventlog.h"

#define RFLAGS_TF (1 << 8)

	.globl l1_main
l1_main:
	mov qword ptr [LOG_GPA], 0
	call l1_svm_setup		/* rbx = the params' flags */
	mov edi, 1
	lea rsi, [rip + db_handler]
	call set_gate
	mov edi, 2
	lea rsi, [rip + nmi_handler]
	call set_gate
	mov edi, INTR_VECTOR
	lea rsi, [rip + intr_handler]
	call set_gate
	lidt [rip + idt_ptr]
	cli
	test qword ptr [P_MODE], EV_NO_SVM
	jnz 3f
	test rbx, PF_CLGI
	jz 3f
	CLGI
3:	test rbx, PF_STGI
	jz 4f
	STGI
4:	mov esi, STAGE_HOST_ACTION
	mov edi, UCALL_SYNC
	call ucall
	/* RFLAGS for the VMRUN: TF only with EV_TF.  POPF setting TF traps
	 * after the instruction that follows it: the VMRUN. */
	pushfq
	pop rcx
	and rcx, ~RFLAGS_TF
	test qword ptr [P_MODE], EV_TF
	jz 5f
	or rcx, RFLAGS_TF
5:
	MARK(before_vmrun)
	mov rax, [P_VMRUN_RAX]
	test qword ptr [P_MODE], EV_NO_SVM
	jnz no_vmrun
	push rcx
	popfq
	.globl events_vmrun
events_vmrun:
	VMRUN
	MARK(after_vmrun)
	mov [R_RAX], rax
	test qword ptr [P_MODE], EV_IRET
	jz 6f
	/* IRET to the next instruction: ends NMI blocking (after an NMI, or
	 * as KVM_SET_VCPU_EVENTS nmi.masked left it). */
	mov rax, rsp
	push SEL_DATA
	push rax
	pushfq
	push SEL_CODE64
	lea rax, [rip + 7f]
	push rax
	iretq
7:
	MARK(after_iret)
6:	sti
	nop
	MARK(after_sti)
	test qword ptr [P_MODE], EV_NO_SVM
	jnz 9f
	STGI
9:
	MARK(after_stgi)
	cli
	mov qword ptr [R_STAGE], STAGE_AFTER_VMRUN
	mov esi, STAGE_AFTER_VMRUN
	mov edi, UCALL_SYNC
	call ucall
	ret

/* EV_NO_SVM: the same RFLAGS, then straight to after_vmrun (TF traps after
 * the JMP, i.e. at after_vmrun, as after a VMRUN). */
no_vmrun:
	push rcx
	popfq
	jmp after_vmrun

/* Handlers: log what they interrupted and return.  The frame's RIP is at
 * [rsp] on entry (none of these vectors pushes an error code). */
intr_handler:
	push rdi
	push rsi
	mov edi, LOG_INTR
	mov rsi, [rsp + 16]
	call log_event
	pop rsi
	pop rdi
	iretq

nmi_handler:
	push rdi
	push rsi
	mov edi, LOG_NMI
	mov rsi, [rsp + 16]
	call log_event
	pop rsi
	pop rdi
	iretq

/* #DB: log the RIP and DR6 (BD, BS, BT, B0..B3), reset DR6, and stop
 * single-stepping (TF cleared in the frame's RFLAGS). */
db_handler:
	push rdi
	push rsi
	push rax
	mov edi, LOG_DB
	mov rsi, [rsp + 24]
	call log_event
	mov rax, dr6
	and eax, LOG_DR6_MASK
	mov rsi, rax
	mov edi, LOG_DR6
	call log_event
	mov eax, 0xffff0ff0
	mov dr6, rax
	and qword ptr [rsp + 24 + 16], ~RFLAGS_TF
	pop rax
	pop rsi
	pop rdi
	iretq

	.balign 8
idt_ptr:
	.word 16 * (INTR_VECTOR + 1) - 1
	.quad IDT_GPA

/* L2: the default VMCB12's l2_vmmcall (common.S) */

/* The SMI handler: the host copies smi_handler..smi_handler_end to SMBASE +
 * 0x8000 (KVM enters SMM there in real mode, CS.base = SMBASE, DS.base = 0
 * with a 4 GiB limit).  It logs the RIP the SMI interrupted (the state-save
 * area's RIP, SMBASE + 0xFF78) and resumes with RSM. */
#define SMRAM_RIP (SMRAM_GPA + 0xff78)
	.code16
	.globl smi_handler
smi_handler:
	mov esi, SMRAM_RIP
	mov eax, [esi]
	mov edx, [esi + 4]
	mov ebx, [LOG_GPA]
	cmp ebx, LOG_MAX
	jae 1f
	shl ebx, 4
	mov dword ptr [ebx + LOG_GPA + 8], LOG_SMI
	mov dword ptr [ebx + LOG_GPA + 12], 0
	mov [ebx + LOG_GPA + 16], eax
	mov [ebx + LOG_GPA + 20], edx
	shr ebx, 4
	inc ebx
	mov [LOG_GPA], ebx
1:	rsm
	.globl smi_handler_end
smi_handler_end:
	.code64
