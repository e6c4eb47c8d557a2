/* L2 stops for the host (kvmtest/cases/unmap.py, nested_state.py): vmrun.S's
 * L1, and an L2 that reports twice before its VMMCALL:
 *
 *     l2_pause:        SYNC(STAGE_HOST_ACTION)   e.g. KVM_SMI
 *     l2_pause_again:  SYNC(STAGE_L2_PAUSE)      e.g. delete VMCB12's memslot,
 *                                                or a nested-state round trip
 *                      VMMCALL                   -> #VMEXIT(VMMCALL) to L1
 *
 * The OUTs are not intercepted by L1, so KVM exits to the host from guest
 * mode.  The SMI handler (copied to SMBASE + 0x8000 by the host) reports
 * SYNC(STAGE_SMM) from SMM, then RSMs back into L2.
 *
 * L1 sets CR4.MCE and EFER.NX itself first: an SMI taken in L2 leaves
 * KVM's hardware CR4.MCE in L1's CR4 (smm/l1-cr4-kept), and with kvm_amd
 * npt=0 KVM's hardware EFER.NX in L1's EFER (measured on every kernel), which
 * is not what these cases are about.
 */
#define l1_main vmrun_l1_main
#include "vmrun.S"
#undef l1_main

#define CR4_MCE (1 << 6)
#define EFER_NX (1 << 11)

	.code64
	.globl l1_main
l1_main:
	mov rax, cr4
	or eax, CR4_MCE
	mov cr4, rax
	mov ecx, MSR_EFER
	rdmsr
	or eax, EFER_NX
	wrmsr
	jmp vmrun_l1_main

	.balign 16
	.globl l2_pause
l2_pause:
	mov esi, STAGE_HOST_ACTION
	mov edi, UCALL_SYNC
	call ucall
	.globl l2_pause_again
l2_pause_again:
	mov esi, STAGE_L2_PAUSE
	mov edi, UCALL_SYNC
	call ucall
	.globl l2_pause_vmmcall
l2_pause_vmmcall:
	VMMCALL
	ud2

/* Real mode, CS.base = SMBASE, DS.base = 0 with a 4 GiB limit. */
	.code16
	.globl smi_handler
smi_handler:
	mov dword ptr [UCALL_GPA], UCALL_SYNC
	mov dword ptr [UCALL_GPA + 4], 0
	mov dword ptr [UCALL_GPA + 8], STAGE_SMM
	mov dword ptr [UCALL_GPA + 12], 0
	mov eax, UCALL_SYNC
	mov dx, UCALL_PORT
	out dx, eax
	rsm
	.globl smi_handler_end
smi_handler_end:
	.code64
