/* The guest->host channel, end to end: the host writes full 64-bit values
 * into the params block, this payload sends them back through each kind of
 * report, and the test compares with what it wrote.  A decoder that truncates
 * a field or drops an argument cannot agree with the encoder by accident.
 * params.insn selects the report:
 *   0  the result block: slot i = msr_value rotated left by 5*i, then SYNC
 *   1  an EXCEPTION ucall carrying vmrun_rax, hsave_pa, msr_index, msr_value,
 *      count as vector, error code, RIP, CS, RSP
 *   2  an ASSERT ucall: line = count, a = msr_value, b = vmrun_rax
 *   3  a real #GP: load DS with selector msr_index (beyond the GDT limit)
 *   4  a ucall with command count (no command the host knows), arguments
 *      msr_value and vmrun_rax */
#include "kvmtest_layout.h"
#include "svm.h"
	.intel_syntax noprefix
	.code64
	.text
	.globl l1_main
l1_main:
	mov rax, [P_INSN]
	cmp rax, 1
	je echo_exception
	cmp rax, 2
	je echo_assert
	cmp rax, 3
	je echo_gp
	cmp rax, 4
	je echo_unknown
	/* 0: fill every result slot, then report */
	mov rax, [P_MSR_VALUE]
	mov rdi, R_STAGE
	mov ecx, RESULT_BYTES / 8
1:	mov [rdi], rax
	rol rax, 5
	add rdi, 8
	dec ecx
	jnz 1b
	UCALL0(UCALL_SYNC)
	ret

echo_exception:
	mov rsi, [P_VMRUN_RAX]
	mov rdx, [P_HSAVE_PA]
	mov rcx, [P_MSR_INDEX]
	mov r8, [P_MSR_VALUE]
	mov r9, [P_COUNT]
	mov edi, UCALL_EXCEPTION
	call ucall
	ret

echo_assert:
	mov rsi, [P_COUNT]
	xor edx, edx
	xor ecx, ecx
	mov r8, [P_MSR_VALUE]
	mov r9, [P_VMRUN_RAX]
	jmp guest_assert_fail

	.globl echo_gp_insn
echo_gp:
	mov rax, [P_MSR_INDEX]
echo_gp_insn:
	mov ds, ax
	ret

echo_unknown:
	mov rdi, [P_COUNT]
	mov rsi, [P_MSR_VALUE]
	mov rdx, [P_VMRUN_RAX]
	xor ecx, ecx
	xor r8d, r8d
	xor r9d, r9d
	call ucall
	ret
