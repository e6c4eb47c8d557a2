/* The SMM payload: vmrun.S's L1 (VMRUN, then report after the #VMEXIT),
 * plus an L2 that asks the host for an SMI and a 16-bit SMM handler that
 * patches VMCB12 before RSM.
 *
 * Flow: L1 VMRUNs into l2_smi; L2 reports SYNC(STAGE_L2_SMI) with an OUT
 * that KVM handles itself (I/O not intercepted), so the host can queue
 * KVM_SMI while the vCPU is in guest mode.  KVM enters SMM from L2 (the
 * state-save area records "SVM guest" and the VMCB12 GPA), the handler
 * (copied by the host to SMBASE + 0x8000) writes the case's patches into
 * guest memory, then RSM asks KVM to re-enter L2 from that VMCB12.  If it
 * does, L2 resumes after its OUT and VMMCALLs: L1 sees #VMEXIT(VMMCALL).
 */
#define l1_main vmrun_l1_main
#include "vmrun.S"
#undef l1_main

/* Host side: kvmtest/smm.py (STAGE_L2_SMI there). */
#define STAGE_L2_SMI 0x534d
#define CR4_MCE (1 << 6)

/* L1 runs with CR4.MCE set.  KVM sets it in the hardware CR4 whatever L1
 * asks (svm_set_cr4: host_cr4_mce), and an SMI in L2 makes that hardware
 * value L1's own: svm_enter_smm saves VMCB01's save area to HSAVE,
 * svm_leave_smm copies it back, and the #VMEXIT after RSM loads L1's CR4
 * from it.  With MCE already set, L1's CR4 check after the #VMEXIT tests
 * the VMCB12 defect only (the leak itself is not this family's subject). */
	.code64
	.globl l1_main
l1_main:
	test qword ptr [P_FLAGS], PF_L1_CR4_AS_IS
	jnz 1f			/* smm/l1-cr4-kept: the leak is the subject */
	mov rax, cr4
	or eax, CR4_MCE
	mov cr4, rax
1:	jmp vmrun_l1_main

	.code64
	.balign 16
	.globl l2_smi
l2_smi:
	mov esi, STAGE_L2_SMI
	mov edi, UCALL_SYNC
	call ucall
	/* The SMI arrives here, and RSM comes back here. */
	.globl l2_smi_resume
l2_smi_resume:
	VMMCALL
	ud2

/* The SMM handler, position independent: entered with CS.base = SMBASE,
 * IP = 0x8000, DS.base = 0 with a 4 GiB limit (KVM's enter_smm), CR0.PE=0.
 * smm_patches (filled by the host in its SMRAM copy): entries of
 * { u32 gpa; u32 nbytes; u8 bytes[8] }, ended by gpa = 0. */
	.code16
	.balign 16
	.globl smm_handler
smm_handler:
	inc dword ptr cs:[0x8000 + smm_count - smm_handler]
	mov bx, 0x8000 + smm_patches - smm_handler
1:	mov edx, cs:[bx]
	test edx, edx
	jz 3f
	mov cx, cs:[bx + 4]
	xor di, di
2:	mov al, cs:[bx + di + 8]
	mov [edx], al
	inc edx
	inc di
	loop 2b
	add bx, 16
	jmp 1b
3:	rsm

	.balign 4
	.globl smm_count
smm_count:
	.long 0
	.balign 16
	.globl smm_patches
smm_patches:
	.fill 16 * 8, 1, 0
	.globl smm_handler_end
smm_handler_end:
	.code64
