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

/* Before VMRUN, L1 flips the CR0/CR4/EFER bits the case asks for.  KVM
 * holds L1's state in the hardware VMCB01 with bits of its own (svm.c
 * svm_set_cr0/svm_set_cr4/svm_set_efer: CR4.MCE of the host, CR0.CD/NW
 * cleared, CR0.PG/WP and EFER.NX forced under npt=0), and an SMI in L2
 * copies that hardware state through HSAVE + 0x400 (svm_enter_smm,
 * svm_leave_smm), so the #VMEXIT after RSM can hand it to L1.  The VMCB12
 * cases make L1's state equal to the hardware one (nothing to leak), the
 * smm/l1-* cases make them differ (kvmtest/cases/smm.py). */
	.code64
	.globl l1_main
l1_main:
	mov rax, cr0
	xor rax, [P_L1_CR0_XOR]
	mov cr0, rax
	mov rax, cr4
	xor rax, [P_L1_CR4_XOR]
	mov cr4, rax
	mov ecx, MSR_EFER
	rdmsr
	xor eax, [P_L1_EFER_XOR]
	xor edx, [P_L1_EFER_XOR + 4]
	wrmsr
	jmp vmrun_l1_main

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
	.globl l2_smi_ud2
l2_smi_ud2:
	ud2

/* The SMM handler, position independent: entered with CS.base = SMBASE,
 * IP = 0x8000, DS.base = 0 with a 4 GiB limit (KVM's enter_smm), CR0.PE=0.
 * smm_patches (filled by the host in its SMRAM copy): entries of
 * { u32 gpa; u32 nbytes; u8 bytes[8] }, ended by gpa = 0; an entry whose
 * nbytes has bit 31 set is a WRMSR instead: gpa is the MSR index, bytes
 * the value. */
	.code16
	.balign 16
	.globl smm_handler
smm_handler:
	inc dword ptr cs:[0x8000 + smm_count - smm_handler]
	mov bx, 0x8000 + smm_patches - smm_handler
1:	mov edx, cs:[bx]
	test edx, edx
	jz 3f
	mov ecx, cs:[bx + 4]
	test ecx, ecx
	js 4f
	xor di, di
2:	mov al, cs:[bx + di + 8]
	mov [edx], al
	inc edx
	inc di
	loop 2b
	add bx, 16
	jmp 1b
4:	mov ecx, edx
	mov eax, cs:[bx + 8]
	mov edx, cs:[bx + 12]
	wrmsr
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
