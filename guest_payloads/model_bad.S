/* Bad-input payload for the model backend's own tests (tests/model/):
 * params.insn selects what L1 does wrong.  Each must end the case with a
 * clear per-case result, never a hang or a silent pass. */
#include "kvmtest_layout.h"
#include "svm.h"
	.intel_syntax noprefix
	.code64
	.text

	.globl l1_main
l1_main:
	mov rbx, [P_INSN]
	cmp rbx, 0
	je bad_jump
	cmp rbx, 1
	je bad_insn
	cmp rbx, 2
	je bad_mmio
	cmp rbx, 3
	je bad_div
	.globl bad_ud2
bad_ud2:
	ud2

	.globl bad_jump
bad_jump:
	mov rax, UNBACKED_GPA
	jmp rax

	.globl bad_insn
bad_insn:
	/* vpxord zmm0, zmm0, zmm0 (AVX-512): no AVX-512 in the model's CPU */
	.byte 0x62, 0xf1, 0x7d, 0x48, 0xef, 0xc0
	ret

	.globl bad_mmio
bad_mmio:
	mov rax, UNBACKED_GPA
	mov dword ptr [rax], 0x12345678
	ret

	.globl bad_div
bad_div:
	xor ecx, ecx
	div ecx
	ret
